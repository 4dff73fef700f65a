"""Building blocks: dense/embedding with logical axes, norms, MLPs, AdaLN conditioning, time embeddings.

Every parameter carries logical axis names; `lsd.parallel` maps them to mesh axes through the rules in
the config. Norm statistics are computed in fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float

init = nnx.initializers


# The checkpoint name of every `linear` output: remat policies that keep projections name it
# (a custom VJP hides the dot_general inside from `jax.checkpoint_policies.dots_*_saveable`).
LINEAR_NAME = "linear"


def linear(x: Float[Array, "... K"], w: Float[Array, "K N"]) -> Float[Array, "... N"]:
  """x @ w, with the weight gradient written as x^T @ g over the flattened tokens.

  The values are autodiff's (test); only the layout XLA picks changes. With autodiff's form,
  XLA:CPU lays the gradient g out transposed for the weight-gradient matmul, inside the loop
  fusion that produces g (a SiLU or softmax backward), and that strided loop ran far below memory
  speed (`benchmarks/cpu_kernels.py`, docs/performance.md). Transposing x instead, explicitly,
  keeps the producer's loop contiguous. The output carries the checkpoint name `LINEAR_NAME`.
  """
  return checkpoint_name(_linear(x, w), LINEAR_NAME)


@jax.custom_vjp
def _linear(x, w):
  return jnp.einsum("...k,kn->...n", x, w)


def _linear_fwd(x, w):
  return _linear(x, w), (x, w)


def _linear_bwd(res, g):
  x, w = res
  dx = jnp.einsum("...n,kn->...k", g, w)
  dw = x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
  return dx, dw.astype(w.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def _linear_dot_general(
  lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None
):
  """`nnx.Linear`'s dot_general through `linear` (its one contraction: the last input axis with
  the kernel's first); any other request goes to `jax.lax.dot_general` unchanged."""
  plain = (((lhs.ndim - 1,), (0,)), ((), ()))
  if (
    dimension_numbers != plain
    or precision is not None
    or preferred_element_type is not None
    or out_sharding is not None
  ):
    return jax.lax.dot_general(
      lhs,
      rhs,
      dimension_numbers,
      precision=precision,
      preferred_element_type=preferred_element_type,
      out_sharding=out_sharding,
    )
  return linear(lhs, rhs)


def dense(
  d_in: int,
  d_out: int,
  axes: tuple[str | None, str | None],
  *,
  use_bias: bool = False,
  dtype=jnp.float32,
  kernel_init=None,
  rngs: nnx.Rngs,
) -> nnx.Linear:
  """nnx.Linear with fp32 params, `dtype` compute and logical axes on kernel and bias."""
  kernel_init = kernel_init or init.variance_scaling(1.0, "fan_in", "truncated_normal")
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nnx.with_partitioning(kernel_init, axes),
    bias_init=nnx.with_partitioning(init.zeros_init(), (axes[1],)),
    dot_general=_linear_dot_general,
    rngs=rngs,
  )


class Embed(nnx.Module):
  """Token embedding [V, E] with an `attend` method for tied output projections."""

  def __init__(self, vocab: int, d_model: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = nnx.Param(
      init.normal(0.02)(rngs.params(), (vocab, d_model), jnp.float32), sharding=("vocab", "embed")
    )

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: Float[Array, "... E"]) -> Float[Array, "... V"]:
    return linear(x, self.embedding[...].astype(x.dtype).T)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed", rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), sharding=(axis_name,))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
  def __init__(
    self,
    dim: int,
    *,
    eps: float = 1e-5,
    use_scale: bool = True,
    use_bias: bool = True,
    rngs: nnx.Rngs,
  ):
    del rngs
    self.eps = eps
    self.scale = (
      nnx.Param(jnp.ones((dim,), jnp.float32), sharding=("embed",)) if use_scale else None
    )
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), sharding=("embed",)) if use_bias else None

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)


def normalize_to_sphere(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
  """Each vector along the last axis L2-normalised and scaled to norm sqrt(d); fp32. Where the
  latents of a normalising autoencoder live (`lsd.models.autoencoder`), and where latent samplers
  and losses project their clean estimates back to."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), -1, keepdims=True))
  return x / jnp.maximum(norm, 1e-6) * math.sqrt(x.shape[-1])


def make_norm(kind: str, dim: int, *, eps: float | None = None, rngs: nnx.Rngs) -> nnx.Module:
  if kind == "rms":
    return RMSNorm(dim, eps=eps or 1e-6, rngs=rngs)
  if kind == "layer":
    return LayerNorm(dim, eps=eps or 1e-5, rngs=rngs)
  raise ValueError(f"norm={kind!r} is not supported; accepted: ['rms', 'layer']")


_ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "silu": jax.nn.silu,
  "relu": jax.nn.relu,
}


class MLP(nnx.Module):
  """Feed-forward: gated (swiglu: silu gate, geglu: gelu gate) or plain (gelu / gelu_tanh / relu)."""

  def __init__(
    self,
    d_model: int,
    d_ff: int,
    kind: str = "swiglu",
    *,
    use_bias: bool = False,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    gated = {"swiglu": "silu", "geglu": "gelu"}
    if kind not in gated and kind not in _ACTIVATIONS:
      raise ValueError(
        f"mlp={kind!r} is not supported; accepted: {list(gated) + list(_ACTIVATIONS)}"
      )
    self.act = _ACTIVATIONS[gated.get(kind, kind)]
    self.gate = (
      dense(d_model, d_ff, ("embed", "mlp"), use_bias=use_bias, dtype=dtype, rngs=rngs)
      if kind in gated
      else None
    )
    self.up = dense(d_model, d_ff, ("embed", "mlp"), use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.down = dense(d_ff, d_model, ("mlp", "embed"), use_bias=use_bias, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
    return self.down(h)


class AdaLN(nnx.Module):
  """Maps a conditioning vector c [B, C] to `n` modulation vectors [B, 1, E] each.

  Zero-initialised (adaLN-zero): at init every shift/scale/gate is 0, so a gated residual branch starts
  as the identity map.
  """

  def __init__(self, cond_dim: int, d_model: int, n: int, *, rngs: nnx.Rngs):
    self.n = n
    self.proj = dense(
      cond_dim,
      n * d_model,
      ("cond", "embed"),
      use_bias=True,
      kernel_init=init.zeros_init(),
      rngs=rngs,
    )

  def __call__(self, c: Float[Array, "B C"]) -> list[Float[Array, "B 1 E"]]:
    out = self.proj(jax.nn.silu(c))[:, None, :]
    return jnp.split(out, self.n, axis=-1)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1 + scale) + shift


def sinusoidal_embedding(t: Float[Array, " B"], dim: int, max_period: float = 10_000.0) -> Array:
  """[B] -> [B, dim]: cos/sin features of t at geometrically spaced frequencies."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """Scalar noise level -> conditioning vector: sinusoidal features then a 2-layer MLP."""

  def __init__(self, d_out: int, *, freq_dim: int = 256, scale: float = 1000.0, rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    self.scale = scale
    self.fc1 = dense(freq_dim, d_out, (None, "cond"), use_bias=True, rngs=rngs)
    self.fc2 = dense(d_out, d_out, ("cond", "cond"), use_bias=True, rngs=rngs)

  def __call__(self, t: Float[Array, " B"]) -> Float[Array, "B C"]:
    return self.fc2(jax.nn.silu(self.fc1(sinusoidal_embedding(t * self.scale, self.freq_dim))))
