"""Latent diffusion sampling (DDPM / DDIM), editing and interpolation, and decoding latents to tokens.

Each sampler is one jitted call whose time loop is a `lax.scan` over `steps` uniform steps in t from
t_start (1 for sampling) to 0; the last step returns the clean estimate x0_hat itself. The scan carry
holds the previous x0_hat, which feeds self-conditioning. Classifier-free guidance runs the denoiser
with and without its condition and mixes the two outputs (`cfg_combine`). `latent_valid` [B, L]
(None = all) marks the latents that exist (SLD: the segments of each sample); `inpaint` regenerates
some latents while the rest stay fixed.

The denoiser is any NNX module with the call signature of `lsd.models.denoiser.LatentDenoiser`
(z_t, alpha_bar, x0_sc=, sc_valid=, labels=, context=, context_valid=, drop_cond=) and a `cfg` with
`num_latents` and `d_latent`. Shapes: B batch, L latents, D latent width, N steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.diffusion.gaussian import COSINE, CosineSchedule, ddim_step, ddpm_step, q_sample
from lsd.diffusion.latent import estimate_x0
from lsd.nn.layers import normalize_to_sphere

SAMPLERS = ("ddpm", "ddim")
_SAMPLER_STATICS = (
  "graphdef",
  "steps",
  "sampler",
  "eta",
  "objective",
  "schedule",
  "guidance_scale",
  "project",
  "guide",
)


def _check(steps: int, sampler: str) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r} is not supported; accepted: {list(SAMPLERS)}")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps={steps!r} must be an int >= 1")


def _denoise(
  model: nnx.Module,
  key: jax.Array,
  z: Float[Array, "B L D"],
  t_start: Float[Array, ""],
  cond: dict,
  *,
  steps: int,
  sampler: str,
  eta: float,
  objective: str,
  schedule: CosineSchedule,
  guidance_scale: float,
  project: bool,
  guide: Callable[[Array], Array] | None,
  latent_valid: Bool[Array, "B L"] | None = None,
  known: tuple[Array, Array] | None = None,
) -> Float[Array, "B L D"]:
  """The reverse process from z at t_start to t = 0 as one scan; returns the final x0_hat. Each
  step's estimate (`lsd.diffusion.latent.estimate_x0`) is self-conditioned on the previous step's,
  guided by CFG and `guide`, and projected onto the sphere with `project`. `known` = (z0 [B, L, D],
  keep [B, L]): the kept latents are replaced after every step by z0 noised to the step's level
  (fresh noise each step) and are z0 itself at the end; the others are generated around them."""
  b = z.shape[0]
  ts = t_start * (1.0 - jnp.arange(steps + 1, dtype=jnp.float32) / steps)

  def post(x0):  # x0_hat -> guided (classifier guidance), then projected
    x0 = x0 if guide is None else guide(x0)
    return normalize_to_sphere(x0) if project else x0

  def step(carry, i):
    z, x0_prev = carry
    t, s = jnp.full((b,), ts[i]), jnp.full((b,), ts[i + 1])
    ab = schedule.alpha_bar(t)
    _, x0, eps = estimate_x0(
      model,
      z,
      ab,
      objective=objective,
      cond=cond,
      x0_sc=x0_prev,
      sc_valid=jnp.broadcast_to(i > 0, (b,)),
      guidance_scale=guidance_scale,
      project=post if guide is not None or project else None,
      latent_valid=latent_valid,
    )
    k = jax.random.fold_in(key, i)
    if sampler == "ddpm":
      z_s = ddpm_step(k, z, x0, t, s, schedule)
    else:
      z_s = ddim_step(k, z, x0, eps, t, s, eta, schedule)
    if known is not None:  # the kept latents at level s, and their true clean values
      z0, keep = known
      z0_s, _ = q_sample(jax.random.fold_in(key, steps + i), z0, s, schedule)
      z_s = jnp.where(keep[..., None], z0_s, z_s)
      x0 = jnp.where(keep[..., None], z0, x0)
    return (jnp.where(i == steps - 1, x0, z_s), x0), None

  init = (jnp.asarray(z, jnp.float32), jnp.zeros(z.shape, jnp.float32))
  (z, _), _ = jax.lax.scan(step, init, jnp.arange(steps))
  return z


def _cond(labels, context, context_valid) -> dict:  # the condition keywords that are given
  cond = {"labels": labels, "context": context, "context_valid": context_valid}
  return {k: v for k, v in cond.items() if v is not None}


@functools.partial(jax.jit, static_argnames=("num_samples", *_SAMPLER_STATICS))
def sample(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  key: jax.Array,
  num_samples: int,
  *,
  steps: int = 250,
  sampler: str = "ddpm",
  eta: float = 0.0,
  objective: str = "v",
  schedule: CosineSchedule = COSINE,
  guidance_scale: float = 1.0,
  project: bool = False,
  guide: Callable[[Array], Array] | None = None,
  labels: Int[Array, " B"] | None = None,
  context: Float[Array, "B S C"] | None = None,
  context_valid: Bool[Array, "B S"] | None = None,
  latent_valid: Bool[Array, "B L"] | None = None,
) -> Float[Array, "B L D"]:
  """Draws `num_samples` latents from pure noise at t = 1.

  Static: graphdef, num_samples, steps, sampler ("ddpm" | "ddim"), eta (DDIM noise; 0 =
  deterministic), objective (the denoiser's parameterisation), schedule, guidance_scale (CFG w; 1 =
  plain conditional, used only with labels or context), project (x0_hat onto the sqrt(D) sphere at
  every step), guide (x0_hat -> x0_hat, e.g. `lsd.diffusion.guidance.classifier_guide`).
  Conditions (labels [B], context [B, S, C] + context_valid [B, S]) and the latents that exist
  (latent_valid [B, L]; invalid ones hold noise) are traced arrays or None.
  NFE = steps, doubled with CFG. Returns fp32 latents.
  """
  _check(steps, sampler)
  model = nnx.merge(graphdef, params)
  shape = (num_samples, model.cfg.num_latents, model.cfg.d_latent)
  k_init, k_loop = jax.random.split(key)
  z = jax.random.normal(k_init, shape, jnp.float32)
  return _denoise(
    model,
    k_loop,
    z,
    jnp.float32(1.0),
    _cond(labels, context, context_valid),
    steps=steps,
    sampler=sampler,
    eta=eta,
    objective=objective,
    schedule=schedule,
    guidance_scale=guidance_scale,
    project=project,
    guide=guide,
    latent_valid=latent_valid,
  )


@functools.partial(jax.jit, static_argnames=_SAMPLER_STATICS)
def edit(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  key: jax.Array,
  z0: Float[Array, "B L D"],
  t_edit: float | Float[Array, ""],
  *,
  steps: int = 100,
  sampler: str = "ddpm",
  eta: float = 0.0,
  objective: str = "v",
  schedule: CosineSchedule = COSINE,
  guidance_scale: float = 1.0,
  project: bool = False,
  guide: Callable[[Array], Array] | None = None,
  labels: Int[Array, " B"] | None = None,
  context: Float[Array, "B S C"] | None = None,
  context_valid: Bool[Array, "B S"] | None = None,
  latent_valid: Bool[Array, "B L"] | None = None,
) -> Float[Array, "B L D"]:
  """Noises clean latents z0 to level t_edit in (0, 1] (traced: no recompilation per level), then
  denoises them back in `steps` uniform steps from t_edit, optionally under a new condition (e.g. a
  target class with guidance_scale > 1). Small t_edit keeps more of the source. Statics as `sample`.
  """
  _check(steps, sampler)
  model = nnx.merge(graphdef, params)
  k_noise, k_loop = jax.random.split(key)
  t_edit = jnp.asarray(t_edit, jnp.float32)
  z, _ = q_sample(k_noise, z0, jnp.full((z0.shape[0],), t_edit), schedule)
  return _denoise(
    model,
    k_loop,
    z,
    t_edit,
    _cond(labels, context, context_valid),
    steps=steps,
    sampler=sampler,
    eta=eta,
    objective=objective,
    schedule=schedule,
    guidance_scale=guidance_scale,
    project=project,
    guide=guide,
    latent_valid=latent_valid,
  )


@functools.partial(jax.jit, static_argnames=_SAMPLER_STATICS)
def inpaint(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  key: jax.Array,
  z0: Float[Array, "B L D"],
  keep: Bool[Array, "B L"],
  *,
  steps: int = 250,
  sampler: str = "ddpm",
  eta: float = 0.0,
  objective: str = "v",
  schedule: CosineSchedule = COSINE,
  guidance_scale: float = 1.0,
  project: bool = False,
  guide: Callable[[Array], Array] | None = None,
  labels: Int[Array, " B"] | None = None,
  context: Float[Array, "B S C"] | None = None,
  context_valid: Bool[Array, "B S"] | None = None,
  latent_valid: Bool[Array, "B L"] | None = None,
) -> Float[Array, "B L D"]:
  """Regenerates the latents of z0 where `keep` is False, given the kept ones (inpainting in latent
  space, by replacement): from pure noise at t = 1, after every step the kept latents are set to
  z0 noised to that step's level, so the denoiser generates the others around them; the result
  holds z0 itself at the kept positions. Statics and conditions as `sample`."""
  _check(steps, sampler)
  model = nnx.merge(graphdef, params)
  k_init, k_loop = jax.random.split(key)
  z = jax.random.normal(k_init, z0.shape, jnp.float32)
  return _denoise(
    model,
    k_loop,
    z,
    jnp.float32(1.0),
    _cond(labels, context, context_valid),
    steps=steps,
    sampler=sampler,
    eta=eta,
    objective=objective,
    schedule=schedule,
    guidance_scale=guidance_scale,
    project=project,
    guide=guide,
    latent_valid=latent_valid,
    known=(jnp.asarray(z0, jnp.float32), keep),
  )


@functools.partial(jax.jit, static_argnames=("n",))
def interpolate(z_a: Float[Array, "... L D"], z_b: Float[Array, "... L D"], n: int) -> Array:
  """Spherical interpolation (slerp) of every latent vector from z_a to z_b in `n` evenly spaced
  points (both ends included). Returns [n, ..., L, D], each vector of norm sqrt(D)."""
  u = normalize_to_sphere(z_a) / math.sqrt(z_a.shape[-1])
  v = normalize_to_sphere(z_b) / math.sqrt(z_b.shape[-1])
  cos = jnp.clip(jnp.sum(u * v, -1, keepdims=True), -1.0, 1.0)
  omega = jnp.arccos(cos)
  sin = jnp.sin(omega)
  w = jnp.linspace(0.0, 1.0, n).reshape((n,) + (1,) * z_a.ndim)
  # Nearly parallel vectors: sin(omega) -> 0 and slerp tends to lerp, which stays well-defined.
  near = sin < 1e-4
  safe = jnp.where(near, 1.0, sin)
  ca = jnp.where(near, 1.0 - w, jnp.sin((1.0 - w) * omega) / safe)
  cb = jnp.where(near, w, jnp.sin(w * omega) / safe)
  return normalize_to_sphere(ca * u + cb * v)


# ---------------------------------------------------------------------------------------------------
# Latents -> tokens (the autoencoder's decoder, KV-cached)
# ---------------------------------------------------------------------------------------------------
@functools.partial(
  jax.jit, static_argnames=("graphdef", "bos_id", "max_new_tokens", "top_p", "temperature")
)
def decode(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  key: jax.Array,
  latents: Float[Array, "B L D"],
  *,
  bos_id: int,
  max_new_tokens: int,
  top_p: float = 0.0,
  temperature: float = 1.0,
) -> Int[Array, "B N"]:
  """Generates N = max_new_tokens tokens after bos from an `LatentAutoencoder`'s decoder, which
  cross-attends to the memory reconstructed from `latents`. top_p = 0 is greedy (argmax; `key`
  unused); otherwise nucleus sampling at `temperature`. The shared KV-cached loop
  (`lsd.sampling.autoregressive.cached_decode`, the memory as the decoder's `context`). Text ends
  at the first eos (the caller cuts there).
  """
  from lsd.sampling.autoregressive import cached_decode

  model = nnx.merge(graphdef, params)
  b = latents.shape[0]
  bos = jnp.full((b, 1), bos_id, jnp.int32)
  return cached_decode(
    model.decoder,
    key,
    bos,
    max_new_tokens=max_new_tokens,
    top_p=top_p,
    temperature=temperature,
    context=model.reconstruct(latents),
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "graphdef",
    "bos_id",
    "eos_id",
    "max_new_tokens",
    "num_beams",
    "length_penalty",
    "repetition_penalty",
    "no_repeat_ngram",
    "min_new_tokens",
  ),
)
def beam_decode(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  latents: Float[Array, "B L D"],
  *,
  bos_id: int,
  eos_id: int,
  max_new_tokens: int,
  num_beams: int = 4,
  length_penalty: float = 1.0,
  repetition_penalty: float = 1.0,
  no_repeat_ngram: int = 0,
  min_new_tokens: int = 0,
) -> Int[Array, "B N"]:
  """Beam search (`lsd.sampling.beam.beam_search`) over an `LatentAutoencoder`'s decoder, as the
  LD4LG reference decodes (4 beams, no repeated trigram, repetition penalty 1.2). The K beams of a
  row share its reconstructed memory; the KV cache rows follow their beams (the prefill and step of
  `lsd.sampling.autoregressive`, via `beam_step`). Returns [B, N] tokens, eos after the end."""
  from lsd.sampling.autoregressive import beam_step, prefill
  from lsd.sampling.beam import beam_search

  model = nnx.merge(graphdef, params)
  b, k = latents.shape[0], num_beams
  memory = jnp.repeat(model.reconstruct(latents), k, axis=0)  # [B * K, l, E]
  bos = jnp.full((b * k, 1), bos_id, jnp.int32)
  step, cache, logits = prefill(model.decoder, bos, new_tokens=max_new_tokens, context=memory)
  tokens, _ = beam_search(
    beam_step(step),
    cache,
    logits,
    batch=b,
    num_beams=k,
    max_new_tokens=max_new_tokens,
    eos_id=eos_id,
    length_penalty=length_penalty,
    repetition_penalty=repetition_penalty,
    no_repeat_ngram=no_repeat_ngram,
    min_new_tokens=min_new_tokens,
  )
  return tokens
