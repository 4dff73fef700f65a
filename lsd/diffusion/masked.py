"""Masked (absorbing-state) diffusion losses: MDLM, block diffusion (BD3-LM) and mix-scale training.

Vocabulary (shared with MaxText's block diffusion): a *canvas* is one training row of L tokens; it is
split into *blocks* of B tokens (B divides L); `valid` is the validity mask (False = padding, never
noised, never scored).

Noise (log-linear schedule with eps = 0, see `lsd.diffusion.schedules`): one time t per (example,
block), drawn on the clipped interval [t_min, t_max] (t_min keeps 1/t finite; it plays the role of
MDLM's eps); every valid token of the block becomes [MASK] independently with probability t.

Loss (MDLM NELBO with the "subs" parameterisation): per token (1/t) * -log p(x0 | x_t) at masked valid
positions and 0 elsewhere, summed and divided by the number of valid tokens (BD3-LM convention).

Block diffusion is trained in one forward over [x_t ; x_0] (length 2L, both halves at positions
0..L-1) under `bd3_training_mask`: noisy block b sees itself and the clean blocks < b. With B = L the
x_t half sees only itself, which is the MDLM loss; `mdlm_loss` computes that with an L-length forward
and draws exactly the same noise, so the two agree on the same key.

Every function here is pure (key in, values out) and jit-friendly; block sizes may be traced int32
scalars, so one compiled program serves every block size a mix-scale run draws.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.diffusion.schedules import ClippedInterval, LogLinear
from lsd.nn import BlockDiffusionMask, bd3_training_mask, padding_mask


class MaskedLM(Protocol):
  """What the losses need of a masked diffusion LM (`lsd.models.masked_lm.MaskedLM` is one):
  `mask_id`, `cfg.dropout`, a call returning (log-probs [B, T, V], cache), and `target_nll`
  (-log p of given targets at the first positions, what the training losses read)."""

  mask_id: int

  @property
  def cfg(self) -> Any: ...

  def __call__(self, tokens: Array, **kwargs) -> tuple[Array, Any]: ...

  def target_nll(self, tokens: Array, targets: Array, **kwargs) -> Array: ...


# BD3-LM's convention: the mask probability is t itself; eps enters only through t_min.
SCHEDULE = LogLinear(eps=0.0)


@dataclasses.dataclass(frozen=True)
class NoiseSpec:
  """How the noise of one training step is drawn (static: Python values, hashable).

  antithetic: stratify the (batch x blocks) times as BD3-LM does (lower-variance NELBO estimate).
  t_min, t_max: the clipped time interval; [1e-3, 1] is the unbiased training / evaluation interval.
  ignore_bos: position 0 (BOS) is never masked, so never scored; it still counts as a valid token in
    the denominator of the loss, as in BD3-LM.
  """

  antithetic: bool = True
  t_min: float = 1e-3
  t_max: float = 1.0
  ignore_bos: bool = False

  def __post_init__(self):
    ClippedInterval(self.t_min, self.t_max)  # validates the interval


def sample_block_times(
  key: Array,
  batch: int,
  length: int,
  block_size: int | Int[Array, ""],
  *,
  antithetic: bool = True,
  t_min: float = 1e-3,
  t_max: float = 1.0,
) -> Float[Array, "batch length"]:
  """One time per (example, block), broadcast to the block's positions.

  batch, length: static. block_size: Python int or traced int32 scalar dividing `length`.
  Returns fp32 [batch, length] in [t_min, t_max].

  Since the number of blocks n_b = length // block_size may be traced, `u` is drawn with the largest
  possible shape [batch, length] and block j of example e uses u[e, j]. With `antithetic`, entry
  k = e * n_b + j of the n = batch * n_b used entries is placed in the k-th stratum, t = (u + k) / n
  (BD3-LM `_sample_t`): the strata cover [0, 1) once per step, whatever the block size.
  """
  block_size = jnp.asarray(block_size, jnp.int32)
  n_blocks = length // block_size
  u = jax.random.uniform(key, (batch, length), jnp.float32)
  blk = jnp.arange(length, dtype=jnp.int32) // block_size
  u = jnp.take(u, blk, axis=1)
  if antithetic:
    stratum = jnp.arange(batch, dtype=jnp.int32)[:, None] * n_blocks + blk[None, :]
    # A reciprocal, not a division: XLA simplifies division by a compile-time constant differently,
    # so a static and a traced block size would give times that differ in the last bit.
    inv_n = 1.0 / (batch * n_blocks).astype(jnp.float32)
    u = jnp.minimum((u + stratum.astype(jnp.float32)) * inv_n, 1.0)
  return ClippedInterval(t_min, t_max)(u)


def corrupt(
  key: Array,
  x0: Int[Array, "B L"],
  t: Float[Array, "B L"],
  mask_id: int,
  valid: Bool[Array, "B L"],
) -> Int[Array, "B L"]:
  """x_t: each valid position independently becomes `mask_id` with probability t; others stay x0."""
  move = jax.random.uniform(key, x0.shape, jnp.float32) < SCHEDULE.mask_prob(t)
  return jnp.where(move & valid, jnp.asarray(mask_id, x0.dtype), x0)


def masked_nelbo(
  log_probs: Float[Array, "B L V"],
  x0: Int[Array, "B L"],
  x_t: Int[Array, "B L"],
  t: Float[Array, "B L"],
  mask_id: int,
  valid: Bool[Array, "B L"],
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """MDLM NELBO averaged over valid tokens, and metrics (fp32 scalars), from log-probabilities;
  `nelbo_from_nll` is the same from -log p(x0) alone."""
  nll = -jnp.take_along_axis(log_probs, x0[..., None], axis=-1)[..., 0].astype(jnp.float32)
  return nelbo_from_nll(nll, x_t, t, mask_id, valid)


def nelbo_from_nll(
  nll: Float[Array, "B L"],
  x_t: Int[Array, "B L"],
  t: Float[Array, "B L"],
  mask_id: int,
  valid: Bool[Array, "B L"],
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """MDLM NELBO averaged over valid tokens, and metrics (fp32 scalars), from nll = -log p(x0)
  (read only where x_t is [MASK]).

  metrics: `nelbo` (= loss), `nll_masked` (mean -log p over masked valid tokens, unweighted) and
  `mask_frac` (masked / valid). Positions that are unmasked or invalid contribute exactly zero, value
  and gradient.
  """
  masked = (x_t == mask_id) & valid
  # Both wheres are needed: 1/t at an unselected t = 0 would turn the zero cotangent into NaN.
  weight = jnp.where(masked, SCHEDULE.weight(jnp.where(masked, t, 1.0)), 0.0)
  per_token = jnp.where(masked, nll * weight, 0.0)
  n_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  n_masked = jnp.sum(masked).astype(jnp.float32)
  loss = jnp.sum(per_token) / n_valid
  metrics = {
    "nelbo": loss,
    "nll_masked": jnp.sum(jnp.where(masked, nll, 0.0)) / jnp.maximum(n_masked, 1.0),
    "mask_frac": n_masked / n_valid,
  }
  return loss, metrics


def bd3_inputs(
  x_t: Int[Array, "B L"], x0: Int[Array, "B L"]
) -> tuple[Int[Array, "B 2L"], Int[Array, "B 2L"]]:
  """The 2L training input [x_t ; x0] and its positions (0..L-1 twice: both halves share RoPE)."""
  b, length = x0.shape
  tokens = jnp.concatenate([x_t, x0], axis=1)
  positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), 2)
  return tokens, jnp.broadcast_to(positions, (b, 2 * length))


def bd3_attention_mask(
  valid: Bool[Array, "B L"], block_size: int | Int[Array, ""]
) -> BlockDiffusionMask | Bool[Array, "B 1 2L 2L"]:
  """The 2L canvas's attention mask: structured for a Python-int block size (attention then skips
  the scores it hides, `BlockDiffusionMask`), else the dense `bd3_training_mask` with padding keys
  hidden (a traced block size)."""
  if isinstance(block_size, int):
    return BlockDiffusionMask(valid, block_size)
  valid2 = jnp.concatenate([valid, valid], axis=1)
  return bd3_training_mask(valid.shape[1], block_size)[None, None] & padding_mask(valid2, valid2)


def bd3_forward(
  model: MaskedLM,
  x_t: Int[Array, "B L"],
  x0: Int[Array, "B L"],
  valid: Bool[Array, "B L"],
  block_size: int | Int[Array, ""],
  *,
  rngs: nnx.Rngs | None = None,
) -> Float[Array, "B L V"]:
  """Log-probs (fp32) of the x_t half of the 2L block-diffusion forward; padding keys are hidden.

  For every block b this equals a forward of [clean blocks < b ; noisy block b] under a block-causal
  mask (the KV-cached sampler's view), which is what makes training and sampling agree.
  """
  length = x0.shape[1]
  tokens, positions = bd3_inputs(x_t, x0)
  mask = bd3_attention_mask(valid, block_size)
  log_probs, _ = model(tokens, positions=positions, mask=mask, rngs=rngs, num_outputs=length)
  return log_probs


def _draw_noise(
  key: Array,
  x0: Int[Array, "B L"],
  valid: Bool[Array, "B L"],
  block_size: int | Int[Array, ""],
  mask_id: int,
  noise: NoiseSpec,
) -> tuple[Float[Array, "B L"], Int[Array, "B L"], Array]:
  """(t, x_t, dropout key): the one noise draw shared by `bd3_loss` and `mdlm_loss`."""
  t_key, mask_key, drop_key = jax.random.split(key, 3)
  b, length = x0.shape
  t = sample_block_times(
    t_key,
    b,
    length,
    block_size,
    antithetic=noise.antithetic,
    t_min=noise.t_min,
    t_max=noise.t_max,
  )
  noisable = valid
  if noise.ignore_bos:
    noisable = valid & (jnp.arange(length) > 0)[None, :]
  return t, corrupt(mask_key, x0, t, mask_id, noisable), drop_key


def _dropout_rngs(model: MaskedLM, key: Array) -> nnx.Rngs | None:
  return nnx.Rngs(dropout=key) if model.cfg.dropout else None


def bd3_loss(
  model: MaskedLM,
  x0: Int[Array, "B L"],
  valid: Bool[Array, "B L"],
  key: Array,
  block_size: int | Int[Array, ""],
  *,
  noise: NoiseSpec = NoiseSpec(),
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """Block-diffusion NELBO: block times -> corrupt -> 2L forward -> `masked_nelbo`.

  block_size: Python int or traced int32 scalar dividing L (not checked here: it may be traced).
  """
  t, x_t, drop_key = _draw_noise(key, x0, valid, block_size, model.mask_id, noise)
  tokens, positions = bd3_inputs(x_t, x0)
  nll = model.target_nll(
    tokens,
    x0,
    positions=positions,
    mask=bd3_attention_mask(valid, block_size),
    rngs=_dropout_rngs(model, drop_key),
  )
  return nelbo_from_nll(nll, x_t, t, model.mask_id, valid)


def mdlm_loss(
  model: MaskedLM,
  x0: Int[Array, "B L"],
  valid: Bool[Array, "B L"],
  key: Array,
  *,
  noise: NoiseSpec = NoiseSpec(),
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """MDLM NELBO with an L-length bidirectional forward; the noise is `bd3_loss`'s with B = L, so
  `mdlm_loss(key) == bd3_loss(key, L)` up to fp summation order (and dropout, which differs)."""
  length = x0.shape[1]
  t, x_t, drop_key = _draw_noise(key, x0, valid, length, model.mask_id, noise)
  nll = model.target_nll(
    x_t, x0, mask=padding_mask(valid, valid), rngs=_dropout_rngs(model, drop_key)
  )
  return nelbo_from_nll(nll, x_t, t, model.mask_id, valid)


def mix_scale_block_size(
  key: Array, lam: float | Float[Array, ""], small: int, large: int
) -> Int[Array, ""]:
  """Traced int32 block size: `large` with probability lam, else `small` (one draw per step)."""
  return jnp.where(jax.random.bernoulli(key, lam), large, small).astype(jnp.int32)


def mix_scale_loss(
  model: MaskedLM,
  x0: Int[Array, "B L"],
  valid: Bool[Array, "B L"],
  key: Array,
  *,
  lam: float | Float[Array, ""],
  small: int,
  large: int,
  noise: NoiseSpec = NoiseSpec(),
) -> tuple[Float[Array, ""], dict[str, Array]]:
  """Mix-scale training (SBD): B ~ {large w.p. lam, small otherwise}, then `bd3_loss`.

  The key is split once into (scale_key, noise_key), so lam = 0 is exactly
  `bd3_loss(noise_key, small)` and lam = 1 exactly `bd3_loss(noise_key, large)`, or with large = L
  exactly `mdlm_loss(noise_key)` (which equals `bd3_loss(noise_key, L)` up to fp32 rounding). The
  two sizes are two branches of a `lax.cond`, each with its block size static, so a step runs
  only the drawn one, with the structured 2L attention (`BlockDiffusionMask`); a draw of
  large = L runs `mdlm_loss`, the L-length forward (the x_t half never attends to the x0 half
  then), at half the cost and with the same noise. Gradients with respect to the model's
  parameters are computed inside the drawn branch (`_cond_with_grads`); the loss is not
  differentiable twice, nor in its other arguments.
  metrics: those of `masked_nelbo` plus `block_size` (fp32, the size drawn this step).
  """
  scale_key, noise_key = jax.random.split(key)
  block_size = mix_scale_block_size(scale_key, lam, small, large)

  # The model enters the branches as operands (split, merged inside each branch): an NNX
  # transform inside a branch (`model.remat`) may only update Variables of its own trace level.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_at(size: int):
    def loss(params, operands):
      x0, valid, noise_key, rest = operands
      m = nnx.merge(graphdef, params, rest)
      if size == x0.shape[1]:
        return mdlm_loss(m, x0, valid, noise_key, noise=noise)
      return bd3_loss(m, x0, valid, noise_key, size, noise=noise)

    return loss

  operands = (x0, valid, noise_key, rest)
  # A static lam of 0 or 1 (or one size) always draws the same size: no branch to compile.
  only = small if small == large else None
  if isinstance(lam, int | float) and lam in (0.0, 1.0) and only is None:
    only = large if lam == 1.0 else small
  if only is not None:
    loss, metrics = loss_at(only)(params, operands)
  else:
    pred = block_size == large
    loss, metrics = _cond_with_grads(loss_at(large), loss_at(small), pred, params, operands)
  return loss, {**metrics, "block_size": block_size.astype(jnp.float32)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cond_with_grads(true_fn, false_fn, pred, params, operands):
  """`lax.cond(pred, true_fn, false_fn, params, operands)` -> (loss, metrics), differentiable in
  `params` only, with the drawn branch's gradient computed inside that branch.

  Differentiating through a `lax.cond` makes each branch's forward also write the residuals of the
  other branch (zero-filled) for the backward cond (docs/performance.md, "Results"). Here the
  forward pass runs `value_and_grad` inside the drawn branch, and the backward pass scales those
  gradients by the loss's cotangent (metrics are auxiliary: their cotangents are ignored). Not
  differentiable twice.
  """
  return jax.lax.cond(pred, true_fn, false_fn, params, operands)


def _cond_with_grads_fwd(true_fn, false_fn, pred, params, operands):
  def with_grads(fn):
    return jax.value_and_grad(fn, has_aux=True)

  out, grads = jax.lax.cond(pred, with_grads(true_fn), with_grads(false_fn), params, operands)
  return out, grads


def _cond_with_grads_bwd(true_fn, false_fn, grads, cotangent):
  del true_fn, false_fn
  d_loss = cotangent[0]
  return None, jax.tree.map(lambda g: (g * d_loss).astype(g.dtype), grads), None


_cond_with_grads.defvjp(_cond_with_grads_fwd, _cond_with_grads_bwd)
