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
from lsd.nn.masks import BlockDiffusionMask

NEG_INF = -1e30
# The `implementation` values of `dot_product_attention` (those of jax.nn.dot_product_attention).
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def check_implementation(implementation: str | None) -> None:
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation={implementation!r} is not supported; accepted: "
      f"{list(ATTENTION_IMPLEMENTATIONS)}"
    )


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
  implementation: str | None = None,
) -> Float[Array, "B T H D"]:
  """Softmax attention (`jax.nn.dot_product_attention`); G kv heads are shared by H // G query heads
  each (GQA). Scores and softmax in fp32. `implementation`: None or "xla" (any backend), "cudnn"
  (fused kernel on NVIDIA GPUs; fp16/bf16)."""
  b, t, h, d = q.shape
  g = k.shape[2]
  if h % g:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
  check_implementation(implementation)

  def four_d(x):  # jax.nn wants [B, H, T, S] with B and H either full or 1
    if x is None:
      return None
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    return jnp.broadcast_to(x, (x.shape[0], x.shape[1], t, k.shape[1]))

  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    bias=four_d(bias),
    mask=four_d(mask),
    scale=scale,
    implementation=implementation,
  )


def block_diffusion_attention(
  q: Float[Array, "B 2L H D"],
  k: Float[Array, "B 2L G D"],
  v: Float[Array, "B 2L G D"],
  mask: BlockDiffusionMask,
  scale: float | None = None,
) -> Float[Array, "B 2L H D"]:
  """Attention over the block-diffusion canvas [x_t ; x0] under `mask.dense()`, scoring only what
  that mask can show: every query against the L clean keys (noisy block b sees clean blocks < b,
  clean block b sees clean blocks <= b), and each noisy block against its own B noisy keys. That
  is 2L^2 + L*B scores where the dense mask scores 4L^2, and the same values up to fp32 summation
  order (test). One softmax per row over both parts, merged through a shared max and normaliser as
  in `cached_attention`; the max is a constant of the gradient (softmax does not depend on it), so
  the backward pass does not differentiate it.
  """
  b, t2, h, d = q.shape
  g = k.shape[2]
  if h % g:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
  length, blk_size = t2 // 2, mask.block_size
  if mask.valid.shape != (b, length) or not isinstance(blk_size, int) or blk_size < 1:
    raise ValueError(
      f"BlockDiffusionMask: valid {mask.valid.shape} and block_size={blk_size!r} must be "
      f"[{b}, {length}] (half the canvas of {t2}) and a Python int >= 1"
    )
  if t2 % 2 or length % blk_size:
    raise ValueError(f"block_size={blk_size} must divide half the canvas ({t2} / 2)")
  n, r = length // blk_size, h // g
  scale = d**-0.5 if scale is None else scale
  qg = q.reshape(b, t2, g, r, d)
  k0, v0 = k[:, length:], v[:, length:]
  valid = mask.valid
  # Every query against the clean keys: [B, G, R, 2L, L].
  s0 = jnp.einsum("btgrd,bsgd->bgrts", qg, k0).astype(jnp.float32) * scale
  blk = jnp.arange(length) // blk_size
  last_seen = jnp.concatenate([blk - 1, blk])  # noisy rows: blocks < b; clean rows: <= b
  see = (blk[None, :] <= last_seen[:, None])[None, None, None] & valid[:, None, None, None, :]
  s0 = jnp.where(see, s0, NEG_INF)
  # Each noisy block against itself: [B, G, R, n, B, B].
  qt = qg[:, :length].reshape(b, n, blk_size, g, r, d)
  kt = k[:, :length].reshape(b, n, blk_size, g, d)
  vt = v[:, :length].reshape(b, n, blk_size, g, d)
  st = jnp.einsum("bnigrd,bnjgd->bgrnij", qt, kt).astype(jnp.float32) * scale
  st = jnp.where(valid.reshape(b, 1, 1, n, 1, blk_size), st, NEG_INF)
  top = jnp.max(s0, -1, keepdims=True)
  top_t = jnp.maximum(
    top[..., :length, :].reshape(b, g, r, n, blk_size, 1), st.max(-1, keepdims=True)
  )
  top_t = jax.lax.stop_gradient(top_t)
  top = jax.lax.stop_gradient(
    jnp.concatenate([top_t.reshape(b, g, r, length, 1), top[..., length:, :]], axis=3)
  )
  p0, pt = jnp.exp(s0 - top), jnp.exp(st - top_t)
  o0 = jnp.einsum("bgrts,bsgd->bgrtd", p0.astype(v0.dtype), v0).astype(jnp.float32)
  d0 = jnp.sum(p0, -1, keepdims=True)
  ot = jnp.einsum("bgrnij,bnjgd->bgrnid", pt.astype(vt.dtype), vt).astype(jnp.float32)
  dt = jnp.sum(pt, -1, keepdims=True)
  noisy = (o0[..., :length, :] + ot.reshape(b, g, r, length, d)) / (
    d0[..., :length, :] + dt.reshape(b, g, r, length, 1)
  )
  out = jnp.concatenate([noisy, o0[..., length:, :] / d0[..., length:, :]], axis=3)
  return jnp.transpose(out.astype(v.dtype), (0, 3, 1, 2, 4)).reshape(b, t2, h, d)


@flax.struct.dataclass
class KVCache:
  """Fixed-size cache of post-RoPE keys/values for every layer.

  k, v: [layers, B, G, S, D] (heads before slots: the layout the attention matmuls read, so a
  long cache is never transposed); `length` (int32 scalar) counts committed positions: slots >=
  length are ignored. Writing never changes the shape, so cached decoding compiles once.
  """

  k: Array
  v: Array
  length: Array

  @classmethod
  def zeros(
    cls, layers: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype=jnp.float32
  ):
    shape = (layers, batch, kv_heads, size, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

  @property
  def size(self) -> int:
    return self.k.shape[3]

  def resize(self, size: int) -> KVCache:
    """The same committed slots in a cache of `size` slots (static): zero-padded or truncated.
    Truncating below `length` would drop committed keys; callers keep size >= length."""
    cur = self.k.shape[3]
    if size == cur:
      return self
    if size < cur:
      return KVCache(self.k[:, :, :, :size], self.v[:, :, :, :size], self.length)
    pad = [(0, 0)] * self.k.ndim
    pad[3] = (0, size - cur)
    return KVCache(jnp.pad(self.k, pad), jnp.pad(self.v, pad), self.length)

  def drop_oldest(self, n: int) -> KVCache:
    """Drops the `n` (static) oldest committed slots: every slot moves `n` to the left, the last `n`
    slots become zeros and length shrinks by `n` (not below 0). The shape is unchanged, so a
    sliding-window loop compiles once ("commit and shift": append a block, then drop the oldest)."""
    if n <= 0:
      return self
    pad = [(0, 0)] * self.k.ndim
    pad[3] = (0, min(n, self.size))
    keep = slice(min(n, self.size), None)
    return KVCache(
      jnp.pad(self.k[:, :, :, keep], pad),
      jnp.pad(self.v[:, :, :, keep], pad),
      jnp.maximum(self.length - n, 0),
    )

  def layer(self, i: int) -> LayerCache:
    return LayerCache(self.k[i], self.v[i], self.length)

  def append(self, new: list[tuple[Array, Array]]) -> KVCache:
    """Stores every layer's new keys/values (`new[i]` = (k, v), each [B, T, G, D]) at slots
    [length, length + T) with one update of the stacked arrays (in place inside a jitted loop:
    writing per layer and re-stacking would copy the whole cache on every call) and advances
    length by T."""
    k_new = jnp.swapaxes(jnp.stack([k for k, _ in new]), 2, 3).astype(self.k.dtype)
    v_new = jnp.swapaxes(jnp.stack([v for _, v in new]), 2, 3).astype(self.v.dtype)
    zero = jnp.zeros((), jnp.int32)
    idx = (zero, zero, zero, self.length, zero)
    return KVCache(
      jax.lax.dynamic_update_slice(self.k, k_new, idx),
      jax.lax.dynamic_update_slice(self.v, v_new, idx),
      self.length + k_new.shape[3],
    )


@flax.struct.dataclass
class LayerCache:
  """One layer's view of a `KVCache` (read-only: writes go through `KVCache.append`)."""

  k: Array  # B G S D
  v: Array
  length: Array


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
    implementation: str | None = None,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    check_implementation(implementation)
    self.implementation = implementation  # dot_product_attention's (no KV cache)
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
  ) -> tuple[Float[Array, "B T E"], tuple[Array, Array] | None]:
    """Self-attention over x (RoPE at `positions`), or cross-attention to `context` (no RoPE).

    With `cache`, queries see the cache's committed slots [0, length) plus the new keys of x under
    `mask` ([.., T, T]); x's own keys/values ([B, T, G, D] each) are returned for the caller to
    append (`KVCache.append`, all layers at once), else None.
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
    if isinstance(mask, BlockDiffusionMask):
      if cache is not None or bias is not None or context is not None:
        raise ValueError(
          "a BlockDiffusionMask is a training mask of self-attention: no KV cache, bias or context"
        )
      out = block_diffusion_attention(q, k, v, mask)
      return self.o(out.reshape(b, t, self.n_heads * self.head_dim)), None
    if cache is None:
      out = dot_product_attention(q, k, v, mask=mask, bias=bias, implementation=self.implementation)
      return self.o(out.reshape(b, t, self.n_heads * self.head_dim)), None
    if bias is not None:
      raise ValueError("an attention bias is not supported together with a KV cache")
    out = cached_attention(q, k, v, cache, mask)
    return self.o(out.reshape(b, t, self.n_heads * self.head_dim)), (k, v)


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

  The cache part and the new-key part are scored and weighted separately and merged through a
  shared max and normaliser (no concatenation of keys, values or scores), and every matmul keeps
  the heads-major [B, G, R, T, .] layout of the [B, G, S, D] cache: on XLA:CPU an einsum that writes
  the token-major output directly costs several times more for a long cache.
  """
  b, t, h, d = q.shape
  g = k.shape[2]
  if h % g:
    raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({g})")
  scale = d**-0.5 if scale is None else scale
  size = cache.k.shape[2]
  qg = q.reshape(b, t, g, h // g, d)
  ck, cv = cache.k.astype(k.dtype), cache.v.astype(v.dtype)
  s_cache = jnp.einsum("btgrd,bgsd->bgrts", qg, ck).astype(jnp.float32) * scale
  s_new = jnp.einsum("btgrd,bsgd->bgrts", qg, k).astype(jnp.float32) * scale
  s_cache = jnp.where(jnp.arange(size) < cache.length, s_cache, NEG_INF)
  if mask is not None:
    mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, (1, 1, t, t)))
    if mask.shape[1] == 1:
      mask = mask[:, :, None]  # [#B, 1, 1, T, T]
    else:
      mask = mask.reshape(mask.shape[0], g, h // g, t, t)
    s_new = jnp.where(mask, s_new, NEG_INF)
  top = jnp.maximum(jnp.max(s_cache, -1, keepdims=True), jnp.max(s_new, -1, keepdims=True))
  p_cache, p_new = jnp.exp(s_cache - top), jnp.exp(s_new - top)
  denom = jnp.sum(p_cache, -1, keepdims=True) + jnp.sum(p_new, -1, keepdims=True)
  out = jnp.einsum("bgrts,bgsd->bgrtd", p_cache.astype(cv.dtype), cv) + jnp.einsum(
    "bgrts,bsgd->bgrtd", p_new.astype(v.dtype), v
  )
  out = (out.astype(jnp.float32) / denom).astype(v.dtype)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d)
