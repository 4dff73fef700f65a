"""Multi-head / grouped-query attention with RoPE, optional QK-norm, cross-attention and a KV cache.

Shapes: B batch, T query length, S key length, H query heads, G kv heads, D head dim.
Softmax runs in fp32 whatever the compute dtype. Masks are boolean, True = may attend.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.nn.layers import RMSNorm, dense

NEG_INF = -1e30


# ---------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------
def apply_rope(x: Float[Array, "B T H D"], positions: Int[Array, "B T"], base: float) -> Array:
  """Rotary embedding, "rotate half" convention (first half pairs with second half of D)."""
  d = x.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # B T D/2
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Core attention
# ---------------------------------------------------------------------------------------------------
def dot_product_attention(
  q: Float[Array, "B T H D"],
  k: Float[Array, "B S G D"],
  v: Float[Array, "B S G D"],
  mask: Bool[Array, "#B #H T S"] | None = None,
  bias: Float[Array, "#B #H T S"] | None = None,
  scale: float | None = None,
) -> Float[Array, "B T H D"]:
  """Softmax attention; G kv heads are shared by H // G query heads each (GQA)."""
  b, t, h, d = q.shape
  g = k.shape[2]
  if h % g:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
  scale = d**-0.5 if scale is None else scale
  qg = q.reshape(b, t, g, h // g, d)
  logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k).astype(jnp.float32) * scale
  logits = logits.reshape(b, h, t, -1)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bgrts,bsgd->btgrd", probs.reshape(b, g, h // g, t, -1), v)
  return out.reshape(b, t, h, d)


@flax.struct.dataclass
class KVCache:
  """Fixed-size cache of post-RoPE keys/values for every layer.

  k, v: [layers, B, S, G, D]; `length` (int32 scalar) counts committed positions: slots >= length are
  ignored. Writing never changes the shape, so cached decoding compiles once.
  """

  k: Array
  v: Array
  length: Array

  @classmethod
  def zeros(
    cls, layers: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype=jnp.float32
  ):
    shape = (layers, batch, size, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

  @property
  def size(self) -> int:
    return self.k.shape[2]

  def resize(self, size: int) -> KVCache:
    """The same committed slots in a cache of `size` slots (static): zero-padded or truncated.
    Truncating below `length` would drop committed keys; callers keep size >= length."""
    cur = self.k.shape[2]
    if size == cur:
      return self
    if size < cur:
      return KVCache(self.k[:, :, :size], self.v[:, :, :size], self.length)
    pad = [(0, 0)] * self.k.ndim
    pad[2] = (0, size - cur)
    return KVCache(jnp.pad(self.k, pad), jnp.pad(self.v, pad), self.length)

  def layer(self, i: int) -> LayerCache:
    return LayerCache(self.k[i], self.v[i], self.length)

  @classmethod
  def stack(cls, layers: list[LayerCache], length: Array) -> KVCache:
    return cls(jnp.stack([c.k for c in layers]), jnp.stack([c.v for c in layers]), length)


@flax.struct.dataclass
class LayerCache:
  k: Array  # B S G D
  v: Array
  length: Array

  def write(self, k_new: Array, v_new: Array) -> LayerCache:
    """Stores k_new/v_new ([B, T, G, D]) at slots [length, length + T); length is advanced by the
    caller once all layers have written (see `KVCache.stack`)."""
    zero = jnp.zeros((), jnp.int32)
    idx = (zero, self.length, zero, zero)
    k = jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), idx)
    v = jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), idx)
    return LayerCache(k, v, self.length)


# ---------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------
class Attention(nnx.Module):
  """Self- or cross-attention. Parameters carry logical axes ('embed', 'heads' / 'kv')."""

  def __init__(
    self,
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    *,
    rope_base: float = 0.0,
    qk_norm: bool = False,
    use_bias: bool = False,
    d_context: int | None = None,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.n_heads = n_heads
    self.n_kv_heads = n_kv_heads or n_heads
    self.head_dim = head_dim or d_model // n_heads
    self.rope_base = rope_base
    d_kv_in = d_context or d_model
    hd, kd = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
    self.q = dense(d_model, hd, ("embed", "heads"), use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.k = dense(d_kv_in, kd, ("embed", "kv"), use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.v = dense(d_kv_in, kd, ("embed", "kv"), use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.o = dense(hd, d_model, ("heads", "embed"), use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(self.head_dim, axis_name="head_dim", rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(self.head_dim, axis_name="head_dim", rngs=rngs) if qk_norm else None

  def project_kv(self, x: Array, positions: Array | None) -> tuple[Array, Array]:
    b, s, _ = x.shape
    k = self.k(x).reshape(b, s, self.n_kv_heads, self.head_dim)
    v = self.v(x).reshape(b, s, self.n_kv_heads, self.head_dim)
    if self.k_norm is not None:
      k = self.k_norm(k)
    if self.rope_base and positions is not None:
      k = apply_rope(k, positions, self.rope_base)
    return k, v

  def __call__(
    self,
    x: Float[Array, "B T E"],
    *,
    positions: Int[Array, "B T"] | None = None,
    mask: Bool[Array, "#B #H T S"] | None = None,
    bias: Array | None = None,
    context: Float[Array, "B S C"] | None = None,
    cache: LayerCache | None = None,
  ) -> tuple[Float[Array, "B T E"], LayerCache | None]:
    """Self-attention over x (RoPE at `positions`), or cross-attention to `context` (no RoPE).

    With `cache`, queries see the cache's committed slots [0, length) plus the new keys of x under
    `mask` ([.., T, T]); the returned cache has x's keys written at [length, length + T).
    """
    b, t, _ = x.shape
    q = self.q(x).reshape(b, t, self.n_heads, self.head_dim)
    if self.q_norm is not None:
      q = self.q_norm(q)
    if context is not None:
      k, v = self.project_kv(context, None)
    else:
      if self.rope_base:
        q = apply_rope(q, positions, self.rope_base)
      k, v = self.project_kv(x, positions)
    if cache is None:
      out = dot_product_attention(q, k, v, mask=mask, bias=bias)
      return self.o(out.reshape(b, t, self.n_heads * self.head_dim)), None
    if bias is not None:
      raise ValueError("an attention bias is not supported together with a KV cache")
    out = cached_attention(q, k, v, cache, mask)
    return self.o(out.reshape(b, t, self.n_heads * self.head_dim)), cache.write(k, v)


def cached_attention(
  q: Float[Array, "B T H D"],
  k: Float[Array, "B T G D"],
  v: Float[Array, "B T G D"],
  cache: LayerCache,
  mask: Bool[Array, "#B #H T T"] | None = None,
  scale: float | None = None,
) -> Float[Array, "B T H D"]:
  """Attention of T new queries over the cache's committed slots [0, length) plus the T new keys
  (under `mask`, [.., T, T]; None = all visible), one softmax over both.

  The scores against the cache and against the new keys are computed separately and only the
  [T, S + T] score rows are joined, so the cache (S slots, possibly thousands) is read in place
  rather than copied into a concatenated key/value array on every call.
  """
  b, t, h, d = q.shape
  g = k.shape[2]
  if h % g:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
  scale = d**-0.5 if scale is None else scale
  size = cache.k.shape[1]
  qg = q.reshape(b, t, g, h // g, d)
  ck, cv = cache.k.astype(k.dtype), cache.v.astype(v.dtype)
  s_cache = jnp.einsum("btgrd,bsgd->bgrts", qg, ck).astype(jnp.float32) * scale
  s_new = jnp.einsum("btgrd,bsgd->bgrts", qg, k).astype(jnp.float32) * scale
  slot_valid = jnp.arange(size) < cache.length
  s_cache = jnp.where(slot_valid, s_cache, NEG_INF)
  if mask is not None:
    mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, (1, 1, t, t)))
    if mask.shape[1] == 1:
      mask = mask[:, :, None]  # [#B, 1, 1, T, T]
    else:
      mask = mask.reshape(mask.shape[0], g, h // g, t, t)
    s_new = jnp.where(mask, s_new, NEG_INF)
  probs = jax.nn.softmax(jnp.concatenate([s_cache, s_new], axis=-1), axis=-1).astype(v.dtype)
  out = jnp.einsum("bgrts,bsgd->btgrd", probs[..., :size], cv) + jnp.einsum(
    "bgrts,bsgd->btgrd", probs[..., size:], v
  )
  return out.reshape(b, t, h, d)
