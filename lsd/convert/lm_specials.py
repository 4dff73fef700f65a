"""A pretrained causal LM as lsd's decoder: rows for the special ids its lsd tokenizer appends.

An imported checkpoint (GPT-2 safetensors, `lsd.convert.hf`; a llama GGUF, `lsd.convert.gguf`) is
read through its own BPE with lsd's specials (`lsd.data.tokenizer.with_lsd_specials`): the token it
ends texts with is `<eos>` (same id, same row), `<pad>`, `<bos>` and `<mask>` are appended after
its ids. `decoder_config` sizes the decoder's vocabulary for them; `build_decoder` adds their rows:
`<bos>` copies the `<eos>` row (these checkpoints start a text after their end-of-text token), the
others are the mean row, whose logit is the mean logit (with a separate output head, its columns
likewise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd.nn.transformer import Transformer, TransformerConfig


def decoder_config(cfg: TransformerConfig, tokenizer, source) -> TransformerConfig:
  """`cfg` (a checkpoint's causal `Transformer` config) with rows for the special ids `tokenizer`
  appended (<pad>, <bos>, <mask>). Raises ValueError when any other id has no row."""
  n = cfg.vocab_size
  appended = {i for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.mask_id) if i >= n}
  if tokenizer.vocab_size - len(appended) > n or tokenizer.eos_id >= n:
    raise ValueError(
      f"{source}: the tokenizer has {tokenizer.vocab_size} ids, the checkpoint {n} rows; only "
      "<pad>, <bos> and <mask> may lie beyond them (is it this checkpoint's tokenizer?)"
    )
  return dataclasses.replace(cfg, vocab_size=max(n, tokenizer.vocab_size))


def special_rows(x: np.ndarray, rows: int, tokenizer) -> np.ndarray:
  """[V, D] embedding rows -> [rows, D]: the appended ids get the mean row, `<bos>` (when
  appended) the `<eos>` row."""
  x = np.asarray(x, np.float32)
  n = x.shape[0]
  out = np.concatenate([x, np.repeat(x.mean(0, keepdims=True), rows - n, axis=0)])
  if n <= tokenizer.bos_id < rows:
    out[tokenizer.bos_id] = x[tokenizer.eos_id]
  return out


def build_decoder(target: TransformerConfig, params: dict[str, Any], tokenizer) -> Transformer:
  """Our causal `Transformer` of config `target` (`decoder_config`) from a checkpoint's pure
  params dict (shaped like `nnx.state(Transformer(cfg)).to_pure_dict()`, the checkpoint's
  vocabulary), fp32, with the appended ids' rows (`special_rows`) in the embedding and, when
  untied, the output head."""
  params = dict(params)
  rows = target.vocab_size
  params["embed"] = {"embedding": special_rows(params["embed"]["embedding"], rows, tokenizer)}
  if "head" in params:
    kernel = np.asarray(params["head"]["kernel"]).T  # [V, D]
    params["head"] = {**params["head"], "kernel": special_rows(kernel, rows, tokenizer).T}
  abstract = nnx.eval_shape(lambda: Transformer(target, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  as_fp32 = lambda tree: {  # noqa: E731
    k: as_fp32(v) if isinstance(v, dict) else jnp.asarray(v, jnp.float32) for k, v in tree.items()
  }
  state.replace_by_pure_dict(as_fp32(params))
  return nnx.merge(graphdef, state)
