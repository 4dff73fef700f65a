"""Gaussian diffusion on l x d latents, shared by the latent methods (LD4LG and its successors):
the denoiser's clean estimate of the latents (self-conditioned, optionally guided and projected),
written once for training losses and samplers alike, and the denoiser's training loss.

The denoiser is anything with the `Denoiser` call signature (`lsd.models.denoiser.LatentDenoiser`
is one); this module never imports a model. A projection of the estimates (e.g. onto the sqrt(d)
sphere where an autoencoder's latents live, `lsd.nn.layers.normalize_to_sphere`) is passed in.
Shapes: B batch, L latents, D latent width. `latent_valid` [B, L] (None = all valid) marks the
latents that exist when a variable number of them per example is padded (SLD's segments): the
denoiser attends only to valid ones and the loss averages only over them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.diffusion.gaussian import (
  COSINE,
  CosineSchedule,
  diffusion_loss,
  eps_from_x0,
  predict_x0_eps,
  q_sample,
)
from lsd.diffusion.guidance import cfg_combine

Projection = Callable[[Array], Array]  # x0_hat [B, L, D] -> x0_hat [B, L, D]
# An extra loss on a training pass's estimate: (x0_hat [B, L, D], t [B]) -> (loss, metrics).
X0Loss = Callable[[Array, Array], tuple[Array, dict]]


class Denoiser(Protocol):
  """A latent denoiser: predicts the `objective`'s target from z_t at noise level alpha_bar."""

  cfg: Any  # its config; `diffusion_training_loss` reads `cfg.dropout`

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
    latent_valid: Bool[Array, "B L"] | None = None,  # passed only when not None
    rngs: nnx.Rngs | None = None,
  ) -> Float[Array, "B L D"]: ...


class X0Estimate(NamedTuple):
  pred: Float[Array, "B L D"]  # the denoiser's output (CFG-combined when guided)
  x0: Float[Array, "B L D"]  # the clean estimate x0_hat (projected when a projection is given)
  eps: Float[Array, "B L D"]  # the noise estimate consistent with x0_hat and z_t


def estimate_x0(
  model: Denoiser,
  z_t: Float[Array, "B L D"],
  alpha_bar: Float[Array, " B"],
  *,
  objective: str,
  cond: dict | None = None,
  x0_sc: Float[Array, "B L D"] | None = None,
  sc_valid: Bool[Array, " B"] | None = None,
  guidance_scale: float = 1.0,
  project: Projection | None = None,
  latent_valid: Bool[Array, "B L"] | None = None,
  rngs: nnx.Rngs | None = None,
) -> X0Estimate:
  """One denoiser pass at z_t and the clean estimate it implies: (pred, x0_hat, eps_hat), fp32.

  x0_sc / sc_valid: the self-conditioning input, an earlier estimate of x0 (None, or rows where
  sc_valid is False: the denoiser's learned initial vector). cond: the denoiser's condition keywords
  (labels, context, context_valid, drop_cond). guidance_scale != 1 with a condition: classifier-free
  guidance, a second pass with the condition dropped and the outputs mixed by `cfg_combine`.
  project: applied to x0_hat, after which eps_hat is recomputed from z_t and the projected x0_hat.
  latent_valid: the latents that exist (None = all; the denoiser then gets no such keyword).
  rngs: the denoiser's dropout randomness (None = deterministic).
  """
  cond = cond or {}
  extra = {} if latent_valid is None else {"latent_valid": latent_valid}
  pred = model(z_t, alpha_bar, x0_sc=x0_sc, sc_valid=sc_valid, **cond, **extra, rngs=rngs)
  if guidance_scale != 1.0 and cond:
    null = jnp.ones((z_t.shape[0],), bool)
    uncond = model(
      z_t, alpha_bar, x0_sc=x0_sc, sc_valid=sc_valid, **cond, **extra, drop_cond=null, rngs=rngs
    )
    pred = cfg_combine(pred, uncond, guidance_scale)
  x0, eps = predict_x0_eps(pred, z_t, alpha_bar, objective)
  if project is not None:
    x0 = project(x0)
    eps = eps_from_x0(z_t, x0, alpha_bar)
  return X0Estimate(pred, x0, eps)


def self_conditioned_x0(
  model: Denoiser,
  z_t: Float[Array, "B L D"],
  alpha_bar: Float[Array, " B"],
  *,
  objective: str,
  cond: dict | None = None,
  self_condition: bool = True,
  project: Projection | None = None,
  latent_valid: Bool[Array, "B L"] | None = None,
) -> Float[Array, "B L D"]:
  """The denoiser's clean estimate from z_t alone, as a sampler step without history makes it: a
  first pass without self-conditioning and, for a self-conditioned denoiser, a second pass that
  reads the first's (projected) estimate. Deterministic (no dropout)."""
  est = functools.partial(
    estimate_x0, model, z_t, alpha_bar, objective=objective, cond=cond, latent_valid=latent_valid
  )
  x0 = est(project=project).x0
  if self_condition:
    x0 = est(x0_sc=x0, sc_valid=jnp.ones((z_t.shape[0],), bool), project=project).x0
  return x0


def _dropout_rngs(dropout: float, key: jax.Array) -> nnx.Rngs | None:
  return nnx.Rngs(dropout=key) if dropout else None


def diffusion_training_loss(
  model: Denoiser,
  x0: Float[Array, "B L D"],
  key: jax.Array,
  *,
  labels: Int[Array, " B"] | None = None,
  context: Float[Array, "B S C"] | None = None,
  context_valid: Bool[Array, "B S"] | None = None,
  objective: str = "v",
  schedule: CosineSchedule = COSINE,
  self_condition_prob: float = 0.5,
  cond_drop_prob: float = 0.1,
  project_self_cond: Projection | None = None,
  x0_loss: X0Loss | None = None,
  latent_valid: Bool[Array, "B L"] | None = None,
) -> tuple[Float[Array, ""], dict]:
  """The latent denoiser's loss on clean latents x0 [B, L, D] (fp32 scalar, metrics).

  t ~ U(0, 1) per example; with probability `self_condition_prob` (one coin per batch, as in the
  LD4LG reference) a first, gradient-free pass supplies its estimate x0_hat (through
  `project_self_cond`, e.g. onto the sphere the latents live on) to the second; each example's
  class / context is dropped with `cond_drop_prob`. The loss is the unweighted L2 of the second
  pass's prediction against the `objective`'s target. `x0_loss(x0_hat, t) -> (loss, metrics)`, if
  given, is added with gradient through the second pass's (unprojected) estimate x0_hat, e.g. a
  frozen decoder's cross-entropy of the sentences read from it. `latent_valid` (None = all): the
  denoiser attends only to the valid latents, and the L2 and the x0_mse metric average only over
  them (per example, then over the batch), so what invalid positions hold changes nothing. Statics:
  objective, schedule, the probabilities, the projection.
  """
  b = x0.shape[0]
  k_t, k_noise, k_coin, k_drop, k_first, k_second = jax.random.split(key, 6)
  t = jax.random.uniform(k_t, (b,))
  z_t, eps = q_sample(k_noise, x0, t, schedule)
  ab = schedule.alpha_bar(t)
  cond = {"labels": labels, "context": context, "context_valid": context_valid}
  cond = {k: v for k, v in cond.items() if v is not None}
  if cond and cond_drop_prob > 0:
    cond["drop_cond"] = jax.random.bernoulli(k_drop, cond_drop_prob, (b,))
  est = functools.partial(
    estimate_x0, model, z_t, ab, objective=objective, cond=cond, latent_valid=latent_valid
  )
  dropout = model.cfg.dropout

  x0_sc, sc_valid = None, None
  if self_condition_prob > 0:
    use = jax.random.bernoulli(k_coin, self_condition_prob)

    def first_pass():
      return est(project=project_self_cond, rngs=_dropout_rngs(dropout, k_first)).x0

    x0_sc = jax.lax.stop_gradient(jax.lax.cond(use, first_pass, lambda: jnp.zeros_like(z_t)))
    sc_valid = jnp.broadcast_to(use, (b,))
  out = est(x0_sc=x0_sc, sc_valid=sc_valid, rngs=_dropout_rngs(dropout, k_second))
  loss = diffusion_loss(out.pred, x0, eps, t, objective, mask=latent_valid, schedule=schedule)
  if latent_valid is None:
    metrics = {"x0_mse": jnp.mean(jnp.square(out.x0 - x0))}
  else:
    w = latent_valid.astype(jnp.float32)[..., None]
    denom = jnp.maximum(jnp.sum(w) * x0.shape[-1], 1.0)
    metrics = {"x0_mse": jnp.sum(jnp.square(out.x0 - x0) * w) / denom}
  if x0_loss is not None:
    extra, extra_metrics = x0_loss(out.x0, t)
    metrics.update(extra_metrics, l2_loss=loss)
    loss = loss + extra
  return loss, metrics


def noised_estimates(
  model: Denoiser,
  x0: Float[Array, "B L D"],
  key: jax.Array,
  *,
  t_max: float,
  objective: str,
  schedule: CosineSchedule = COSINE,
  labels: Int[Array, " B"] | None = None,
  cond_drop_prob: float = 0.0,
  self_condition: bool = True,
  project: Projection | None = None,
) -> tuple[Float[Array, "B L D"], Float[Array, " B"]]:
  """A frozen denoiser's estimates of clean latents x0 noised to t ~ U(0, t_max), as a sampler
  meets them (`self_conditioned_x0`), without gradient: (x0_hat, t). With `labels`, each row's
  class is dropped to the null class with `cond_drop_prob` (the sampler's CFG evaluates both).
  What a decoder is tuned to read when it must turn a denoiser's samples into text."""
  b = x0.shape[0]
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  t = jax.random.uniform(k_t, (b,)) * t_max
  z_t, _ = q_sample(k_noise, x0, t, schedule)
  cond = {}
  if labels is not None:
    cond["labels"] = labels
    if cond_drop_prob > 0:
      cond["drop_cond"] = jax.random.bernoulli(k_drop, cond_drop_prob, (b,))
  x0_hat = self_conditioned_x0(
    model,
    z_t,
    schedule.alpha_bar(t),
    objective=objective,
    cond=cond,
    self_condition=self_condition,
    project=project,
  )
  return jax.lax.stop_gradient(x0_hat), t
