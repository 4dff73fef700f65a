"""T5 encoder (imported checkpoints): relative position buckets, unscaled attention, T5 LayerNorm.

T5 differs from our pre-norm `Block` in three ways, so its block is composed here: attention logits
are not scaled by 1/sqrt(D) (the scale is folded into the initialisation of q), positions enter only
as a learned per-head bias over log-spaced relative-distance buckets (computed once, shared by every
layer), and the norm is RMS-style (no mean subtraction, no bias) = `lsd.nn.RMSNorm`. The MLP is
gated GELU (tanh approximation) for v1.1 / flan checkpoints and plain ReLU for the original T5.
Shapes: B batch, T tokens, H heads, D head dim, E width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.models.bert import activation_from_hf, activation_to_hf, key_padding_mask
from lsd.nn.attention import dot_product_attention
from lsd.nn.layers import Embed, RMSNorm, dense
from lsd.nn.transformer import DTYPES

_ACTIVATIONS = {
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  n_heads: int = 8
  d_ff: int = 2048
  n_layers: int = 8
  num_buckets: int = 32
  max_distance: int = 128
  activation: str = "relu"
  gated: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"  # compute dtype; params stay fp32

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> T5Config:
    """From a transformers `T5Config` dict: `feed_forward_proj` is "relu" (original T5),
    "gated-gelu" (v1.1; transformers runs it with the tanh GELU) or "[gated-]<activation>"."""
    proj = hf.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.removeprefix("gated-")
    act = "gelu_new" if proj == "gated-gelu" else act
    return cls(
      vocab_size=hf["vocab_size"],
      d_model=hf["d_model"],
      d_kv=hf["d_kv"],
      n_heads=hf["num_heads"],
      d_ff=hf["d_ff"],
      n_layers=hf["num_layers"],
      num_buckets=hf.get("relative_attention_num_buckets", 32),
      max_distance=hf.get("relative_attention_max_distance", 128),
      activation=activation_from_hf(act, "t5"),
      gated=gated,
      norm_eps=hf.get("layer_norm_epsilon", 1e-6),
    )

  def to_hf(self) -> dict[str, Any]:
    act = activation_to_hf(self.activation)
    proj = "gated-gelu" if self.gated and act == "gelu_new" else ("gated-" * self.gated) + act
    return {
      "architectures": ["T5EncoderModel"],
      "model_type": "t5",
      "vocab_size": self.vocab_size,
      "d_model": self.d_model,
      "d_kv": self.d_kv,
      "num_heads": self.n_heads,
      "d_ff": self.d_ff,
      "num_layers": self.n_layers,
      "relative_attention_num_buckets": self.num_buckets,
      "relative_attention_max_distance": self.max_distance,
      "feed_forward_proj": proj,
      "layer_norm_epsilon": self.norm_eps,
      "is_encoder_decoder": False,
    }


def relative_position_buckets(
  q_len: int, k_len: int, num_buckets: int, max_distance: int
) -> np.ndarray:
  """Bidirectional T5 buckets, int32 [q_len, k_len] (static: computed in numpy at trace time).

  Half the buckets are for keys after the query. Within a half, distances below `num_buckets // 4`
  each get their own bucket; larger ones share log-spaced buckets up to `max_distance`, beyond which
  everything falls in the last bucket. The float32 arithmetic mirrors the reference implementation
  so distances on a bucket edge land on the same side.
  """
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]  # key - query
  half = num_buckets // 2
  offset = np.where(rel > 0, half, 0)
  dist = np.abs(rel)
  exact = half // 2
  # Distances below `exact` take the exact branch; clamping them keeps log() finite.
  far = np.maximum(dist, exact).astype(np.float32)
  ratio = np.log(far / np.float32(exact)) / np.float32(math.log(max_distance / exact))
  log_bucket = exact + (ratio * np.float32(half - exact)).astype(np.int64)
  log_bucket = np.minimum(log_bucket, half - 1)
  return (offset + np.where(dist < exact, dist, log_bucket)).astype(np.int32)


class T5Attention(nnx.Module):
  """Unscaled multi-head self-attention with an additive position bias; no biases."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    dt, inner = DTYPES[cfg.dtype], cfg.n_heads * cfg.d_kv
    self.n_heads, self.d_kv = cfg.n_heads, cfg.d_kv
    self.q = dense(cfg.d_model, inner, ("embed", "heads"), dtype=dt, rngs=rngs)
    self.k = dense(cfg.d_model, inner, ("embed", "kv"), dtype=dt, rngs=rngs)
    self.v = dense(cfg.d_model, inner, ("embed", "kv"), dtype=dt, rngs=rngs)
    self.o = dense(inner, cfg.d_model, ("heads", "embed"), dtype=dt, rngs=rngs)

  def __call__(
    self,
    x: Float[Array, "B T E"],
    *,
    mask: Bool[Array, "#B #H T T"] | None,
    bias: Float[Array, "1 H T T"],
  ) -> Float[Array, "B T E"]:
    b, t, _ = x.shape
    q, k, v = (p(x).reshape(b, t, self.n_heads, self.d_kv) for p in (self.q, self.k, self.v))
    out = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=1.0)
    return self.o(out.reshape(b, t, self.n_heads * self.d_kv))


class T5FeedForward(nnx.Module):
  """wo(act(wi_0 x) * wi_1 x) when gated, else wo(act(wi x)); no biases."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    dt = DTYPES[cfg.dtype]
    self.act = _ACTIVATIONS[cfg.activation]
    self.gate = (
      dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), dtype=dt, rngs=rngs) if cfg.gated else None
    )
    self.up = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), dtype=dt, rngs=rngs)
    self.down = dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), dtype=dt, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
    return self.down(h)


class T5Block(nnx.Module):
  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.attn = T5Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.mlp = T5FeedForward(cfg, rngs=rngs)

  def __call__(self, x: Array, *, mask: Array | None, bias: Array) -> Array:
    x = x + self.attn(self.attn_norm(x), mask=mask, bias=bias)
    return x + self.mlp(self.mlp_norm(x))


class T5Encoder(nnx.Module):
  """T5 encoder stack: token ids -> final hidden states (after the final T5 LayerNorm)."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=DTYPES[cfg.dtype], rngs=rngs)
    self.rel_bias = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_buckets, cfg.n_heads)),
      sharding=(None, "heads"),
    )
    self.blocks = nnx.List([T5Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)

  def position_bias(self, t: int) -> Float[Array, "1 H T T"]:
    buckets = relative_position_buckets(t, t, self.cfg.num_buckets, self.cfg.max_distance)
    return jnp.take(self.rel_bias[...], buckets, axis=0).transpose(2, 0, 1)[None]

  def __call__(
    self, tokens: Int[Array, "B T"], valid: Bool[Array, "B T"] | None = None
  ) -> Float[Array, "B T E"]:
    """Last hidden states (fp32); padded keys are hidden by `valid`."""
    x = self.embed(tokens)
    mask, bias = key_padding_mask(valid), self.position_bias(tokens.shape[1])
    for block in self.blocks:
      x = block(x, mask=mask, bias=bias)
    return self.final_norm(x).astype(jnp.float32)
