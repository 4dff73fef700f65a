"""Hugging Face (transformers layout) checkpoints <-> our NNX models: GPT-2, BERT, BART, T5 encoder.

Each architecture is a table of `Rule`s pairing our dotted parameter names with transformers tensor
names, so import and export are the same table read in opposite directions. Layout differences:
torch `nn.Linear` stores [out, in] (we store kernels [in, out]: transposed); GPT-2's `Conv1D` is
already [in, out] and fuses q/k/v into one `c_attn` (split along the output axis); BART's
`final_logits_bias` is [1, V]. Tied embeddings are read from whichever copy a checkpoint holds and
written once, under the name transformers ties the others to. Wrapper prefixes (`transformer.`,
`bert.`, `model.`) are stripped on import, so base-model and task-head checkpoints both load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd.convert.lm_specials import build_decoder, decoder_config
from lsd.convert.safetensors_io import flatten, load_safetensors, save_safetensors, unflatten
from lsd.models.bart import Bart, BartConfig
from lsd.models.bert import BertConfig, BertEncoder
from lsd.models.gpt2 import GPT2LM, GPT2Config
from lsd.models.t5 import T5Config, T5Encoder
from lsd.nn.transformer import Transformer, TransformerConfig

log = logging.getLogger(__name__)

# kind -> (HF tensor -> our tensors, our tensors -> HF tensor)
_KINDS: dict[str, tuple[Callable, Callable]] = {
  "copy": (lambda x: (x,), lambda xs: xs[0]),
  "linear": (lambda x: (x.T,), lambda xs: xs[0].T),
  "split3": (lambda x: tuple(np.split(x, 3, axis=-1)), lambda xs: np.concatenate(xs, axis=-1)),
  "row": (lambda x: (x.reshape(-1),), lambda xs: xs[0][None, :]),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our tensors `ours` <-> the HF tensor `hf[0]`; `hf[1:]` are tied copies also accepted on import.

  `optional`: a checkpoint may lack it (e.g. a base model without a task head); it is then zeros.
  """

  ours: tuple[str, ...]
  hf: tuple[str, ...]
  kind: str = "copy"
  optional: bool = False


def _rule(
  ours: str | tuple[str, ...], hf: str | tuple[str, ...], kind: str = "copy", optional: bool = False
) -> Rule:
  return Rule(
    (ours,) if isinstance(ours, str) else ours, (hf,) if isinstance(hf, str) else hf, kind, optional
  )


def _norm(ours: str, hf: str, hf_scale: str = "weight") -> Iterator[Rule]:
  yield _rule(f"{ours}.scale", f"{hf}.{hf_scale}")
  yield _rule(f"{ours}.bias", f"{hf}.bias")


def _linear(ours: str, hf: str, bias: bool = True) -> Iterator[Rule]:
  yield _rule(f"{ours}.kernel", f"{hf}.weight", "linear")
  if bias:
    yield _rule(f"{ours}.bias", f"{hf}.bias")


# --------------------------------------------------------------------------------------------------
# Name tables (HF names are given without the wrapper prefix; see `Arch.prefix`)
# --------------------------------------------------------------------------------------------------
def _gpt2_rules(cfg: GPT2Config) -> Iterator[Rule]:
  t = "transformer"
  yield _rule(f"{t}.embed.embedding", "wte.weight")
  yield _rule(f"{t}.pos_embed", "wpe.weight")
  for i in range(cfg.n_layers):
    o, h = f"{t}.blocks.{i}", f"h.{i}"
    yield from _norm(f"{o}.attn_norm", f"{h}.ln_1")
    yield _rule(tuple(f"{o}.attn.{p}.kernel" for p in "qkv"), f"{h}.attn.c_attn.weight", "split3")
    yield _rule(tuple(f"{o}.attn.{p}.bias" for p in "qkv"), f"{h}.attn.c_attn.bias", "split3")
    yield _rule(f"{o}.attn.o.kernel", f"{h}.attn.c_proj.weight")
    yield _rule(f"{o}.attn.o.bias", f"{h}.attn.c_proj.bias")
    yield from _norm(f"{o}.mlp_norm", f"{h}.ln_2")
    for ours, hf in (("up", "c_fc"), ("down", "c_proj")):
      yield _rule(f"{o}.mlp.{ours}.kernel", f"{h}.mlp.{hf}.weight")
      yield _rule(f"{o}.mlp.{ours}.bias", f"{h}.mlp.{hf}.bias")
  yield from _norm(f"{t}.final_norm", "ln_f")
  if not cfg.tie_embeddings:
    yield _rule(f"{t}.head.kernel", "lm_head.weight", "linear")


def _bert_rules(cfg: BertConfig) -> Iterator[Rule]:
  e = "embeddings"
  yield _rule("embed.embedding", f"{e}.word_embeddings.weight")
  yield _rule("pos_embed", f"{e}.position_embeddings.weight")
  yield _rule("type_embed", f"{e}.token_type_embeddings.weight")
  yield from _norm("embed_norm", f"{e}.LayerNorm")
  for i in range(cfg.n_layers):
    o, h = f"blocks.{i}", f"encoder.layer.{i}"
    for p, name in zip("qkv", ("query", "key", "value"), strict=True):
      yield from _linear(f"{o}.attn.{p}", f"{h}.attention.self.{name}")
    yield from _linear(f"{o}.attn.o", f"{h}.attention.output.dense")
    yield from _norm(f"{o}.attn_norm", f"{h}.attention.output.LayerNorm")
    yield from _linear(f"{o}.mlp.up", f"{h}.intermediate.dense")
    yield from _linear(f"{o}.mlp.down", f"{h}.output.dense")
    yield from _norm(f"{o}.mlp_norm", f"{h}.output.LayerNorm")
  # MLM / classification checkpoints are saved without the pooler.
  yield _rule("pooler.kernel", "pooler.dense.weight", "linear", optional=True)
  yield _rule("pooler.bias", "pooler.dense.bias", optional=True)


def _bart_rules(cfg: BartConfig) -> Iterator[Rule]:
  yield _rule(
    "shared.embedding",
    (
      "shared.weight",
      "encoder.embed_tokens.weight",
      "decoder.embed_tokens.weight",
      "lm_head.weight",
    ),
  )
  yield _rule("final_logits_bias", "final_logits_bias", "row", optional=True)
  for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
    yield _rule(f"{side}.pos_embed", f"{side}.embed_positions.weight")
    yield from _norm(f"{side}.embed_norm", f"{side}.layernorm_embedding")
    for i in range(n):
      o, h = f"{side}.blocks.{i}", f"{side}.layers.{i}"
      attns = [("attn", "self_attn")] + ([("cross", "encoder_attn")] if side == "decoder" else [])
      for ours, hf in attns:
        for p in "qkv":
          yield from _linear(f"{o}.{ours}.{p}", f"{h}.{hf}.{p}_proj")
        yield from _linear(f"{o}.{ours}.o", f"{h}.{hf}.out_proj")
        yield from _norm(f"{o}.{ours}_norm", f"{h}.{hf}_layer_norm")
      yield from _linear(f"{o}.mlp.up", f"{h}.fc1")
      yield from _linear(f"{o}.mlp.down", f"{h}.fc2")
      yield from _norm(f"{o}.mlp_norm", f"{h}.final_layer_norm")


def _t5_encoder_rules(cfg: T5Config) -> Iterator[Rule]:
  yield _rule("embed.embedding", ("shared.weight", "encoder.embed_tokens.weight"))
  yield _rule("rel_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
  ff = (
    (("gate", "wi_0"), ("up", "wi_1"), ("down", "wo"))
    if cfg.gated
    else (("up", "wi"), ("down", "wo"))
  )
  for i in range(cfg.n_layers):
    o, h = f"blocks.{i}", f"encoder.block.{i}.layer"
    for p in "qkvo":
      yield _rule(f"{o}.attn.{p}.kernel", f"{h}.0.SelfAttention.{p}.weight", "linear")
    yield _rule(f"{o}.attn_norm.scale", f"{h}.0.layer_norm.weight")
    for ours, hf in ff:
      yield _rule(f"{o}.mlp.{ours}.kernel", f"{h}.1.DenseReluDense.{hf}.weight", "linear")
    yield _rule(f"{o}.mlp_norm.scale", f"{h}.1.layer_norm.weight")
  yield _rule("final_norm.scale", "encoder.final_layer_norm.weight")


@dataclasses.dataclass(frozen=True)
class Arch:
  """One importable architecture.

  prefix: the wrapper prefix transformers' task model puts on every name except `top_level` ones;
  written on export, stripped (with `also_strip`) on import. ignore: regexes of checkpoint tensors
  that are known and deliberately unused (buffers, other heads, the T5 decoder, tied copies).
  """

  config_cls: type
  model_cls: type
  rules: Callable[[Any], Iterator[Rule]]
  prefix: str = ""
  top_level: frozenset[str] = frozenset()
  also_strip: tuple[str, ...] = ()
  ignore: tuple[str, ...] = ()


ARCHS: dict[str, Arch] = {
  "gpt2": Arch(
    GPT2Config,
    GPT2LM,
    _gpt2_rules,
    prefix="transformer.",
    top_level=frozenset({"lm_head.weight"}),
    ignore=(r"\.attn\.(masked_)?bias$", r"^lm_head\.weight$"),
  ),
  "bert": Arch(
    BertConfig,
    BertEncoder,
    _bert_rules,
    also_strip=("bert.",),
    ignore=(r"position_ids$", r"^cls\.", r"^classifier\."),
  ),
  "bart": Arch(
    BartConfig,
    Bart,
    _bart_rules,
    prefix="model.",
    top_level=frozenset({"final_logits_bias", "lm_head.weight"}),
  ),
  "t5_encoder": Arch(
    T5Config,
    T5Encoder,
    _t5_encoder_rules,
    ignore=(r"^decoder\.", r"^lm_head\.weight$"),
  ),
}


def _arch(name: str) -> Arch:
  if name not in ARCHS:
    raise ValueError(f"architecture {name!r} is not supported; accepted: {sorted(ARCHS)}")
  return ARCHS[name]


# --------------------------------------------------------------------------------------------------
# Name translation
# --------------------------------------------------------------------------------------------------
def hf_to_ours(arch: str, cfg: Any, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """HF tensors (any wrapper prefix) -> our flat fp32 params. Raises on missing tensors; logs a
  warning naming checkpoint tensors that nothing used."""
  spec = _arch(arch)
  stripped = {}
  for name, x in hf.items():
    for p in (spec.prefix, *spec.also_strip):
      if p and name.startswith(p):
        name = name[len(p) :]
        break
    stripped[name] = x
  ours, used, missing = {}, set(), []
  for rule in spec.rules(cfg):
    source = next((n for n in rule.hf if n in stripped), None)
    if source is None:
      if not rule.optional:
        missing.append(rule.hf[0])
        continue
      log.warning("%s checkpoint has no %s; using zeros", arch, rule.hf[0])
      values = (None,) * len(rule.ours)
    else:
      used.add(source)
      values = _KINDS[rule.kind][0](np.asarray(stripped[source], np.float32))
    ours.update(zip(rule.ours, values, strict=True))
  if missing:
    raise ValueError(
      f"{arch} checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}; it holds e.g. "
      f"{sorted(hf)[:5]}. Is it a {arch} checkpoint matching its config.json?"
    )
  unused = [n for n in stripped if n not in used and not any(re.search(p, n) for p in spec.ignore)]
  if unused:
    log.warning("%s import ignored %d checkpoint tensors, e.g. %s", arch, len(unused), unused[:5])
  return ours


def ours_to_hf(arch: str, cfg: Any, ours: dict[str, Any]) -> dict[str, np.ndarray]:
  """Our flat params -> HF tensors with transformers' full names (task-model prefix included)."""
  spec = _arch(arch)
  out = {}
  for rule in spec.rules(cfg):
    name = rule.hf[0] if rule.hf[0] in spec.top_level else spec.prefix + rule.hf[0]
    out[name] = _KINDS[rule.kind][1]([np.asarray(ours[n], np.float32) for n in rule.ours])
  return out


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
def build_model(arch: str, cfg: Any, params: dict[str, Any]) -> nnx.Module:
  """Our model for `cfg` holding the flat `params`; names and shapes must match exactly (a missing
  optional tensor, given as None, becomes zeros)."""
  spec = _arch(arch)
  abstract = nnx.eval_shape(lambda: spec.model_cls(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = flatten(state.to_pure_dict())
  if set(expected) != set(params):
    raise ValueError(
      f"{arch} params do not match the model: missing {sorted(set(expected) - set(params))[:5]}, "
      f"unexpected {sorted(set(params) - set(expected))[:5]}"
    )
  values = {}
  for name, leaf in expected.items():
    x = np.zeros(leaf.shape, np.float32) if params[name] is None else params[name]
    if tuple(np.shape(x)) != tuple(leaf.shape):
      raise ValueError(f"{arch} param {name}: checkpoint shape {np.shape(x)}, model {leaf.shape}")
    values[name] = jnp.asarray(x, jnp.float32)
  state.replace_by_pure_dict(unflatten(values))
  return nnx.merge(graphdef, state)


def _resolve(source: str | os.PathLike) -> Path:
  """A local directory (or a file inside it), else a hub id fetched with huggingface_hub."""
  path = Path(source)
  if path.is_file():
    return path.parent
  if path.is_dir():
    return path
  if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)):
    from huggingface_hub import snapshot_download  # only needed with network access

    return Path(
      snapshot_download(
        str(source), allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]
      )
    )
  raise FileNotFoundError(f"{source!r} is neither a local checkpoint path nor a hub model id")


def _load_weights(folder: Path) -> dict[str, np.ndarray]:
  single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
  if single.is_file():
    return load_safetensors(single)
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for s in shards for k, v in load_safetensors(folder / s).items()}
  raise FileNotFoundError(
    f"{folder} has neither model.safetensors nor model.safetensors.index.json; only safetensors "
    "checkpoints are read (re-save a .bin checkpoint with "
    "save_pretrained(safe_serialization=True))"
  )


def import_hf(
  arch: str, source: str | os.PathLike, *, dtype: str = "float32"
) -> tuple[nnx.Module, Any]:
  """Loads an HF checkpoint (directory with config.json + safetensors, or a hub id) as our model.

  Args:
    arch: one of `ARCHS` ("gpt2", "bert", "bart", "t5_encoder").
    source: a local directory, a file inside it, or a hub id (downloaded with huggingface_hub).
    dtype: compute dtype of the returned model; params are fp32.
  Returns:
    (model, config): the NNX model and its config dataclass.
  """
  spec = _arch(arch)
  folder = _resolve(source)
  cfg = spec.config_cls.from_hf(json.loads((folder / "config.json").read_text()))
  cfg = dataclasses.replace(cfg, dtype=dtype)
  model = build_model(arch, cfg, hf_to_ours(arch, cfg, _load_weights(folder)))
  return model, cfg


def export_hf(arch: str, model: nnx.Module, out_dir: str | os.PathLike) -> Path:
  """Writes `model` as `out_dir/model.safetensors` + `config.json` that transformers loads with
  `from_pretrained` (the task model: GPT2LMHeadModel, BertModel, BartForConditionalGeneration,
  T5EncoderModel). Each file is written atomically."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  flat = flatten(nnx.state(model, nnx.Param).to_pure_dict())
  save_safetensors(
    ours_to_hf(arch, model.cfg, flat), out / "model.safetensors", metadata={"format": "pt"}
  )
  fd, tmp = tempfile.mkstemp(dir=out, prefix=".config.json.", suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(model.cfg.to_hf(), f, indent=2)
  os.replace(tmp, out / "config.json")
  return out


# --------------------------------------------------------------------------------------------------
# GPT-2 as a causal-LM decoder with lsd's tokenizer
# --------------------------------------------------------------------------------------------------
def gpt2_config(source: str | os.PathLike) -> GPT2Config:
  """The `GPT2Config` of a checkpoint's config.json (no weights are read)."""
  path = _resolve(source) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: not a Hugging Face checkpoint directory")
  return GPT2Config.from_hf(json.loads(path.read_text()))


def gpt2_decoder_config(source: str | os.PathLike, tokenizer) -> TransformerConfig:
  """The causal `Transformer` config of a GPT-2 checkpoint read through `tokenizer`
  (`lsd.data.tokenizer.gpt2_with_lsd_specials`): the checkpoint's rows plus the special ids the
  tokenizer appended (`lsd.convert.lm_specials.decoder_config`)."""
  return decoder_config(gpt2_config(source).transformer_config(), tokenizer, source)


def import_gpt2_decoder(source: str | os.PathLike, tokenizer) -> Transformer:
  """A GPT-2 checkpoint as our causal `Transformer` (`gpt2_decoder_config`), fp32, with rows for
  the ids the checkpoint lacks (`lsd.convert.lm_specials.build_decoder`: `<bos>` copies the
  `<eos>` row, GPT-2 starting a text after `<|endoftext|>`; the others are the mean row)."""
  lm, _ = import_hf("gpt2", source)
  target = gpt2_decoder_config(source, tokenizer)
  return build_decoder(target, nnx.state(lm.transformer, nnx.Param).to_pure_dict(), tokenizer)
