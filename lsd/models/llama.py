"""Llama-architecture causal LMs (the SmolLM2 judge) expressed on the shared `Transformer`.

A llama model is our decoder stack with RMSNorm, SwiGLU, grouped-query attention and "rotate half"
RoPE, no biases: `llama_config` is the whole architecture. `LlamaLM` holds imported weights as an
NNX (graphdef, state) pair and scores token batches with jitted pure functions, so every call with
the same padded shape reuses one compiled program.

Shapes: B batch, T tokens, E width, V vocabulary. `valid` is a bool [B, T] validity mask (True = a
real token); padding sits on the right, so causal attention never lets a real token see it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import Array

from lsd.nn.masks import causal_mask
from lsd.nn.transformer import Transformer, TransformerConfig

# Tokens (rows x positions, flattened) scored per step of the chunked output projection: bounds the
# [chunk, V] fp32 logits (V = 49,152 for SmolLM2: 200 MB) instead of materialising [B, T, V], and
# never pads a short batch beyond its own B x (T - 1) tokens.
_HEAD_TOKENS = 1024


def llama_config(
  *,
  vocab_size: int,
  d_model: int,
  n_layers: int,
  n_heads: int,
  n_kv_heads: int,
  d_ff: int,
  rope_base: float,
  norm_eps: float,
  tie_embeddings: bool,
  head_dim: int = 0,
  dtype: str = "float32",
) -> TransformerConfig:
  """The llama architecture as a `TransformerConfig` (pre-norm RMSNorm, SwiGLU, GQA + RoPE)."""
  cfg = TransformerConfig(
    vocab_size=vocab_size,
    d_model=d_model,
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=n_kv_heads,
    head_dim=head_dim,
    d_ff=d_ff,
    mlp="swiglu",
    norm="rms",
    norm_eps=norm_eps,
    rope_base=rope_base,
    use_bias=False,
    qk_norm=False,
    tie_embeddings=tie_embeddings,
    dtype=dtype,
  )
  cfg.validate("llama")
  return cfg


def _mask(valid: Array, segments: Array | None = None) -> Array:
  """bool [B, T] validity (and int [B, T] segment ids, 0 = padding, for rows packing several
  texts) -> bool [B, 1, T, T] attention mask: causal, within one segment."""
  t = valid.shape[1]
  # Keys that are padding are hidden as well, so the result does not depend on what fills them.
  mask = causal_mask(t)[None, None] & valid[:, None, None, :]
  if segments is not None:
    mask = mask & (segments[:, None, :, None] == segments[:, None, None, :])
  return mask


def _project(model: Transformer, x: Array) -> Array:
  """[..., E] hidden states -> [..., V] fp32 logits (tied or untied head)."""
  logits = model.embed.attend(x) if model.head is None else model.head(x)
  return logits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens: Array, valid: Array) -> Array:
  model = nnx.merge(graphdef, state)
  return model(tokens, mask=_mask(valid))[0]


@functools.partial(jax.jit, static_argnums=0)
def _hidden(graphdef, state, tokens: Array, valid: Array, positions, segments) -> Array:
  model = nnx.merge(graphdef, state)
  mask = _mask(valid, segments)
  return model(tokens, positions=positions, mask=mask, return_hidden=True)[0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _next_token_nll(graphdef, state, tokens: Array, valid: Array, positions, segments) -> Array:
  model = nnx.merge(graphdef, state)
  mask = _mask(valid, segments)
  x = model(tokens, positions=positions, mask=mask, return_hidden=True)[0][:, :-1]  # B T-1 E
  b, n, e = x.shape
  if b * n == 0:  # one-token rows: nothing to score
    return jnp.zeros((b, n), jnp.float32)
  x, targets = x.reshape(b * n, e), tokens[:, 1:].reshape(b * n)
  size = min(_HEAD_TOKENS, b * n)
  pad = -(b * n) % size
  xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, size, e)  # chunks C E
  ts = jnp.pad(targets, (0, pad)).reshape(-1, size)

  def chunk_nll(args):
    xc, tc = args
    logits = _project(model, xc)
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked

  nll = jax.lax.map(chunk_nll, (xs, ts))  # chunks C
  return nll.reshape(-1)[: b * n].reshape(b, n)


class LlamaLM:
  """An imported llama-architecture LM: config, weights and special-token ids.

  Args:
    cfg: the architecture (see `llama_config`); `cfg.dtype` is the compute dtype.
    params: a pure dict shaped like `nnx.state(Transformer(cfg)).to_pure_dict()` (numpy or jax
      arrays, kept in fp32).
    bos_id / eos_id / pad_id: special ids from the checkpoint (None when it has none).
    name: a short label used in reports.
  """

  def __init__(
    self,
    cfg: TransformerConfig,
    params: dict[str, Any],
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    name: str = "llama",
  ):
    self.cfg = cfg
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.name = name
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    self.graphdef, state = nnx.split(abstract)
    expected = jax.tree_util.tree_map(lambda x: tuple(x.shape), state.to_pure_dict())
    got = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), params)
    if expected != got:
      raise ValueError(
        f"llama params do not match the architecture {cfg}: expected shapes {expected}, got {got}"
      )
    state.replace_by_pure_dict(
      jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    )
    self.state = state

  @property
  def params(self) -> dict[str, Any]:
    return self.state.to_pure_dict()

  def logits(self, tokens: Array, valid: Array | None = None) -> Array:
    """int [B, T] tokens, bool [B, T] valid (default all) -> fp32 [B, T, V] next-token logits;
    positions of padding hold garbage."""
    tokens, valid, _, _ = self._args(tokens, valid, None, None)
    return _logits(self.graphdef, self.state, tokens, valid)

  def hidden(
    self,
    tokens: Array,
    valid: Array | None = None,
    *,
    positions: Array | None = None,
    segments: Array | None = None,
  ) -> Array:
    """int [B, T], bool [B, T] -> fp32 [B, T, E] final hidden states (after the final norm,
    before the output projection). `segments` (int [B, T], 0 = padding) packs several texts in a
    row: each attends only within its segment, with `positions` (int [B, T]) restarting at 0 for
    each; default: one text per row at positions 0, 1, ..."""
    args = self._args(tokens, valid, positions, segments)
    return _hidden(self.graphdef, self.state, *args)

  def next_token_nll(
    self,
    tokens: Array,
    valid: Array | None = None,
    *,
    positions: Array | None = None,
    segments: Array | None = None,
  ) -> Array:
    """int [B, T], bool [B, T] -> fp32 [B, T - 1] with entry t = -log p(tokens[:, t + 1] |
    tokens[:, :t + 1]), meaningful only where `valid[:, t + 1]` (and, packed, where t and t + 1
    are in one segment; `segments` and `positions` as in `hidden`). Never builds [B, T, V]
    logits."""
    args = self._args(tokens, valid, positions, segments)
    return _next_token_nll(self.graphdef, self.state, *args)

  @staticmethod
  def _args(tokens, valid, positions, segments):
    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    if (positions is None) != (segments is None):
      raise ValueError("packed rows need both positions= and segments= (or neither)")
    if segments is not None:
      positions, segments = jnp.asarray(positions, jnp.int32), jnp.asarray(segments, jnp.int32)
    return tokens, valid, positions, segments
