"""LD4LG's latent denoiser: a transformer over the l latent vectors of one text.

  concat(z_t, x0_sc) --Linear(2d -> W)--> + learned positions (+ segment embeddings) + time tokens
  --> N pre-norm blocks, AdaLN-zero on the time (+ class) embedding, optional cross-attention to a
      context, U-ViT long skips (block i's output joins block N-1-i through Linear(2W -> W))
  --> LayerNorm --> zero-initialised Linear(W -> d) = the prediction (v, eps or x0)

The time input is the noise level alpha_bar (sinusoidal features of 1000 alpha_bar), not the step.
Conditions are dropped per example by `drop_cond` (classifier-free guidance): a dropped class becomes
the null class `num_classes`, a dropped context the learned one-token null context.

Segments (SLD, `num_segments` = K > 0): the L latents are K segments of L / K latents each; the
learned positions then index a latent within its segment and a learned segment embedding marks its
segment. `latent_valid` [B, L] marks the latents that exist (a text with fewer segments is padded):
attention never reads an invalid latent, so whatever an invalid position holds changes no valid
position's output. None (every latent valid) is the unmasked computation itself.

Shapes: B batch, L = num_latents, D = d_latent, W = d_model, S context length, C = d_context.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.config import ConfigError, check_positive, dataclass_from_config
from lsd.nn import Block, Embed, TimestepEmbedding, TransformerConfig, dense, make_norm


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
  num_latents: int = 32
  d_latent: int = 64
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  d_ff: int = 0  # 0 = the `lsd.nn` default for `mlp`
  mlp: str = "geglu"
  norm: str = "layer"
  dropout: float = 0.0
  self_condition: bool = True
  num_classes: int = 0  # > 0: class-conditional, with the extra null class `num_classes`
  num_segments: int = 0  # > 0: the latents are this many segments (segment embeddings); 0 = one
  d_context: int = 0  # > 0: cross-attention to a [B, S, d_context] context
  dtype: str = "float32"

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, **overrides) -> DenoiserConfig:
    return dataclass_from_config(cls, cfg, **overrides)

  def validate(self, prefix: str = "denoiser") -> None:
    for name in ("num_latents", "d_latent"):
      check_positive(f"{prefix}.{name}", getattr(self, name))
    for name in ("num_classes", "d_context", "num_segments"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 0:
        raise ConfigError(f"{prefix}.{name}={value!r} must be an int >= 0 (0 = off)")
    if self.num_segments and self.num_latents % self.num_segments:
      raise ConfigError(
        f"{prefix}.num_latents={self.num_latents} must be a multiple of "
        f"{prefix}.num_segments={self.num_segments} (the same number of latents per segment)"
      )
    self.block_config().validate(prefix)

  @property
  def cond_dim(self) -> int:
    # The width of the time (+ class) embedding that drives AdaLN. The reference's 4W embedding
    # would make each block's AdaLN projection (cond_dim x 6W) larger than the block itself.
    return self.d_model

  def block_config(self) -> TransformerConfig:
    # Positions are learned and added at the input: no RoPE.
    return TransformerConfig(
      vocab_size=1,
      d_model=self.d_model,
      n_layers=self.n_layers,
      n_heads=self.n_heads,
      d_ff=self.d_ff,
      mlp=self.mlp,
      norm=self.norm,
      rope_base=0.0,
      dropout=self.dropout,
      cond_dim=self.cond_dim,
      cross_attention=self.d_context > 0,
      d_context=self.d_context,
      dtype=self.dtype,
    )


class LatentDenoiser(nnx.Module):
  """(z_t, alpha_bar, conditions) -> prediction [B, L, D] (fp32); exactly zero at initialisation."""

  def __init__(self, cfg: DenoiserConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    bc = cfg.block_config()
    dt, w = bc.compute_dtype, cfg.d_model
    normal = nnx.initializers.normal(0.02)
    d_in = 2 * cfg.d_latent if cfg.self_condition else cfg.d_latent
    self.proj_in = dense(d_in, w, ("latent", "embed"), use_bias=True, dtype=dt, rngs=rngs)
    self.sc_init = (
      nnx.Param(normal(rngs.params(), (cfg.d_latent,)), sharding=("latent",))
      if cfg.self_condition
      else None
    )
    k = cfg.num_segments
    n_pos = cfg.num_latents // k if k else cfg.num_latents
    self.pos = nnx.Param(normal(rngs.params(), (n_pos, w)), sharding=(None, "embed"))
    self.segment_embed = (
      nnx.Param(normal(rngs.params(), (k, w)), sharding=(None, "embed")) if k else None
    )
    self.time = TimestepEmbedding(cfg.cond_dim, freq_dim=w, scale=1000.0, rngs=rngs)
    self.time_to_tokens = dense(cfg.cond_dim, w, ("cond", "embed"), use_bias=True, rngs=rngs)
    if cfg.num_classes:
      self.class_embed = Embed(cfg.num_classes + 1, w, rngs=rngs)
      self.class_proj = dense(w, cfg.cond_dim, ("embed", "cond"), use_bias=True, rngs=rngs)
    else:
      self.class_embed = self.class_proj = None
    self.null_context = (
      nnx.Param(normal(rngs.params(), (cfg.d_context,)), sharding=("embed",))
      if cfg.d_context
      else None
    )
    self.blocks = nnx.List([Block(bc, rngs=rngs) for _ in range(cfg.n_layers)])
    self.skips = nnx.List(
      [
        dense(2 * w, w, ("mlp", "embed"), use_bias=True, dtype=dt, rngs=rngs)
        for _ in range(cfg.n_layers // 2)
      ]
    )
    self.final_norm = make_norm(cfg.norm, w, rngs=rngs)
    self.proj_out = dense(
      w,
      cfg.d_latent,
      ("embed", "latent"),
      use_bias=True,
      kernel_init=nnx.initializers.zeros_init(),
      rngs=rngs,
    )

  def __call__(
    self,
    z_t: Float[Array, "B L D"],
    alpha_bar: Float[Array, " B"],
    *,
    x0_sc: Float[Array, "B L D"] | None = None,
    sc_valid: Bool[Array, " B"] | None = None,
    labels: Int[Array, " B"] | None = None,
    context: Float[Array, "B S C"] | None = None,
    context_valid: Bool[Array, "B S"] | None = None,
    drop_cond: Bool[Array, " B"] | None = None,
    latent_valid: Bool[Array, "B L"] | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> Float[Array, "B L D"]:
    """Args:
    z_t: noisy latents; alpha_bar: their noise level in (0, 1).
    x0_sc: the previous clean estimate for self-conditioning; rows where `sc_valid` is False
      (or all rows when x0_sc is None) use the learned initial vector instead.
    labels: class ids in [0, num_classes) (required when num_classes > 0).
    context, context_valid: cross-attention context (required when d_context > 0).
    drop_cond: rows whose class / context is replaced by the null one (CFG); None = none.
    latent_valid: the latents that exist (segments of a shorter text are padded); attention reads
      only valid ones. None = all.
    rngs: dropout randomness (None = deterministic).
    """
    c = self.cfg
    b = z_t.shape[0]
    x = jnp.asarray(z_t, jnp.float32)
    if self.sc_init is not None:
      init = jnp.broadcast_to(self.sc_init[...], x.shape)
      if x0_sc is None:
        sc = init
      else:
        keep = jnp.ones((b,), bool) if sc_valid is None else sc_valid
        sc = jnp.where(keep[:, None, None], jnp.asarray(x0_sc, jnp.float32), init)
      x = jnp.concatenate([x, sc], axis=-1)
    drop = jnp.zeros((b,), bool) if drop_cond is None else drop_cond

    emb = self.time(jnp.asarray(alpha_bar, jnp.float32))
    if self.class_embed is not None:
      if labels is None:
        raise ValueError(f"denoiser.num_classes={c.num_classes}: pass labels (class ids)")
      emb = emb + self.class_proj(self.class_embed(jnp.where(drop, c.num_classes, labels)))
    pos = self.pos[...]
    if self.segment_embed is not None:  # latent i of segment j: pos[i] + segment_embed[j]
      d = self.segment_embed.shape[-1]
      pos = (self.segment_embed[...][:, None, :] + pos[None, :, :]).reshape(-1, d)
    h = self.proj_in(x) + pos.astype(x.dtype)
    h = h + self.time_to_tokens(jax.nn.gelu(emb))[:, None, :].astype(h.dtype)

    context_mask = None
    if self.null_context is not None:
      if context is None:
        raise ValueError(f"denoiser.d_context={c.d_context}: pass a context [B, S, {c.d_context}]")
      s = context.shape[1]
      valid = jnp.ones((b, s), bool) if context_valid is None else context_valid
      null = jnp.broadcast_to(self.null_context[...], context.shape).astype(context.dtype)
      context = jnp.where(drop[:, None, None], null, context)
      valid = jnp.where(drop[:, None], jnp.arange(s)[None, :] == 0, valid)
      context_mask = valid[:, None, None, :]

    mask = None if latent_valid is None else latent_valid[:, None, None, :]
    n, n_skip = c.n_layers, c.n_layers // 2
    stored = []
    for i, block in enumerate(self.blocks):
      if i >= n - n_skip:
        h = self.skips[i - (n - n_skip)](jnp.concatenate([h, stored.pop()], axis=-1))
      h, _ = block(
        h,
        positions=None,
        mask=mask,
        cond=emb,
        context=context,
        context_mask=context_mask,
        rngs=rngs,
      )
      if i < n_skip:
        stored.append(h)
    return self.proj_out(self.final_norm(h)).astype(jnp.float32)
