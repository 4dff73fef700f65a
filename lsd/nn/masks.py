"""Attention masks as boolean arrays (True = may attend), built from iota comparisons.

All masks are `bool[..., Tq, Tk]`. Block sizes may be traced scalars, so one compiled program serves
several block sizes (mix-scale training draws the block size per step).
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


def causal_mask(
  q_len: int, k_len: int | None = None, offset: int | Array = 0
) -> Bool[Array, "Q K"]:
  """Query i (at absolute position offset + i) sees keys 0..offset + i."""
  k_len = q_len if k_len is None else k_len
  q = jnp.arange(q_len)[:, None] + offset
  k = jnp.arange(k_len)[None, :]
  return k <= q


def bidirectional_mask(q_len: int, k_len: int | None = None) -> Bool[Array, "Q K"]:
  return jnp.ones((q_len, q_len if k_len is None else k_len), bool)


def padding_mask(
  valid_q: Bool[Array, "B Q"], valid_k: Bool[Array, "B K"]
) -> Bool[Array, "B 1 Q K"]:
  """Masks keys that are padding. Padded queries keep one valid key (themselves) via `valid_k` only,

  so rows of padding never become all-False (which would give NaN softmax); their outputs are
  ignored by every loss through the validity mask.
  """
  del valid_q
  return valid_k[:, None, None, :]


def block_causal_mask(length: int, block_size: int | Array, window: int = 0) -> Bool[Array, "L L"]:
  """Query in block b sees every key in blocks <= b (bidirectional inside a block).

  window: W > 0 (static) also hides keys before position b * block_size - W, so block b sees its
  own block and the last W tokens before it (the keys a sliding-window KV cache holds).
  """
  pos = jnp.arange(length)
  blk = pos // block_size
  mask = blk[None, :] <= blk[:, None]
  if window:
    mask = mask & (pos[None, :] >= blk[:, None] * block_size - window)
  return mask


def bd3_training_mask(length: int, block_size: int | Array) -> Bool[Array, "2L 2L"]:
  """The vectorised block-diffusion training mask over the concatenation [x_t ; x_0] (length 2L).

  - noisy block b sees its own noisy block (block diagonal, x_t half),
  - noisy block b sees clean blocks < b (offset block-causal),
  - clean block b sees clean blocks <= b (block-causal, the activations a KV cache would hold).
  With block_size == length the x_t half sees only itself: the MDLM bidirectional model.
  """
  idx = jnp.arange(2 * length)
  clean = idx >= length
  blk = (idx % length) // block_size
  q_clean, k_clean = clean[:, None], clean[None, :]
  q_blk, k_blk = blk[:, None], blk[None, :]
  block_diag = (q_blk == k_blk) & (q_clean == k_clean)
  offset_block_causal = (~q_clean) & k_clean & (q_blk > k_blk)
  block_causal = q_clean & k_clean & (q_blk >= k_blk)
  return block_diag | offset_block_causal | block_causal


@flax.struct.dataclass
class BlockDiffusionMask:
  """`bd3_training_mask(L, block_size)` with padding keys hidden, over [x_t ; x0], kept in its
  structured form: `Attention` then computes only the scores this mask can show
  (`lsd.nn.attention.block_diffusion_attention`, about half of the 2L x 2L scores) instead of
  scoring every pair and masking three quarters of them. `dense()` is the equivalent boolean mask.

  valid: the validity of the L canvas positions, shared by both halves. block_size: static (a
  Python int dividing L); a traced block size needs the dense mask.
  """

  valid: Bool[Array, "B L"]
  block_size: int = flax.struct.field(pytree_node=False)

  def dense(self) -> Bool[Array, "B 1 2L 2L"]:
    valid2 = jnp.concatenate([self.valid, self.valid], axis=1)
    length = self.valid.shape[1]
    return bd3_training_mask(length, self.block_size)[None, None] & padding_mask(valid2, valid2)


def segment_mask(segment_ids: Int[Array, "B L"]) -> Bool[Array, "B 1 L L"]:
  """Tokens attend only within their own packed document."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
