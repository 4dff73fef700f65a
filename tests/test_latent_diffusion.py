"""The shared latent-diffusion layer (`lsd.diffusion.latent`): the x0 estimate (self-conditioned,
guided, projected), its from-scratch two-pass form, the noised estimates a decoder is tuned on, and
the denoiser's training loss, each against values computed by hand for a toy linear denoiser."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsd.diffusion.gaussian import COSINE, CosineSchedule, q_sample
from lsd.diffusion.latent import (
  diffusion_training_loss,
  estimate_x0,
  noised_estimates,
  self_conditioned_x0,
)
from lsd.nn.layers import normalize_to_sphere


class ToyDenoiser:
  """pred = 0.5 z_t + 0.25 x0_sc (0 where there is none) + (1 + label) unless the class is
  dropped."""

  def __init__(self, dropout: float = 0.0):
    self.cfg = types.SimpleNamespace(dropout=dropout)
    self.calls = []

  def __call__(
    self,
    z_t,
    alpha_bar,
    *,
    x0_sc=None,
    sc_valid=None,
    labels=None,
    context=None,
    context_valid=None,
    drop_cond=None,
    rngs=None,
  ):
    self.calls.append({"x0_sc": x0_sc, "sc_valid": sc_valid, "drop_cond": drop_cond})
    out = 0.5 * z_t
    if x0_sc is not None:
      keep = jnp.ones(z_t.shape[:1], bool) if sc_valid is None else sc_valid
      out = out + 0.25 * jnp.where(keep[:, None, None], x0_sc, 0.0)
    if labels is not None:
      drop = jnp.zeros(labels.shape, bool) if drop_cond is None else drop_cond
      out = out + jnp.where(drop, 0.0, 1.0 + labels)[:, None, None]
    return out


def _x0_eps_from_v(z, v, ab):
  """The v-parameterisation by hand: x0 = sqrt(a) z - sqrt(1 - a) v,
  eps = sqrt(1 - a) z + sqrt(a) v."""
  a = np.asarray(ab)[:, None, None]
  return np.sqrt(a) * z - np.sqrt(1 - a) * v, np.sqrt(1 - a) * z + np.sqrt(a) * v


def _sphere(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True) * np.sqrt(x.shape[-1])


@pytest.fixture
def inputs():
  z = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 8)))
  x0_prev = np.asarray(jax.random.normal(jax.random.key(1), (3, 4, 8)))
  return z, x0_prev, np.array([0.3, 0.6, 0.9], np.float32)  # x0_hat of 0.5 z is never 0


def test_estimate_x0_self_conditioned_and_projected_equals_the_hand_computed(inputs):
  z, x0_prev, ab = inputs
  sc_valid = np.array([True, False, True])
  est = estimate_x0(
    ToyDenoiser(), z, ab, objective="v", x0_sc=x0_prev, sc_valid=jnp.asarray(sc_valid)
  )
  v = 0.5 * z + 0.25 * np.where(sc_valid[:, None, None], x0_prev, 0.0)
  x0, eps = _x0_eps_from_v(z, v, ab)
  np.testing.assert_allclose(est.pred, v, rtol=1e-6)
  np.testing.assert_allclose(est.x0, x0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(est.eps, eps, rtol=1e-5, atol=1e-6)
  # Projected: x0 onto the sqrt(d) sphere, eps recomputed so that z = sqrt(a) x0 + sqrt(1 - a) eps.
  proj = estimate_x0(ToyDenoiser(), z, ab, objective="v", project=normalize_to_sphere)
  x0 = _sphere(_x0_eps_from_v(z, 0.5 * z, ab)[0])
  a = ab[:, None, None]
  np.testing.assert_allclose(proj.x0, x0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(proj.eps, (z - np.sqrt(a) * x0) / np.sqrt(1 - a), rtol=1e-4, atol=1e-5)
  # eps and x0 objectives read the prediction as that quantity.
  np.testing.assert_allclose(estimate_x0(ToyDenoiser(), z, ab, objective="x0").x0, 0.5 * z)
  eps_hat = estimate_x0(ToyDenoiser(), z, ab, objective="eps")
  np.testing.assert_allclose(eps_hat.eps, 0.5 * z)
  np.testing.assert_allclose(eps_hat.x0, (z - np.sqrt(1 - a) * 0.5 * z) / np.sqrt(a), rtol=1e-5)


def test_estimate_x0_with_cfg_mixes_the_conditional_and_the_null_class_outputs(inputs):
  z, _, ab = inputs
  labels = jnp.array([0, 1, 2])
  den = ToyDenoiser()
  est = estimate_x0(den, z, ab, objective="v", cond={"labels": labels}, guidance_scale=3.0)
  # cond = 0.5 z + 1 + label, uncond (null class) = 0.5 z: uncond + 3 (cond - uncond).
  want = 0.5 * z + 3.0 * (1.0 + np.array([0, 1, 2]))[:, None, None]
  np.testing.assert_allclose(est.pred, want, rtol=1e-6)
  assert len(den.calls) == 2 and bool(np.all(den.calls[1]["drop_cond"]))
  # Scale 1, or no condition: one pass.
  den = ToyDenoiser()
  estimate_x0(den, z, ab, objective="v", guidance_scale=3.0)
  assert len(den.calls) == 1


def test_self_conditioned_x0_is_a_first_pass_then_a_pass_reading_it(inputs):
  z, _, ab = inputs
  first = _sphere(_x0_eps_from_v(z, 0.5 * z, ab)[0])
  second = _sphere(_x0_eps_from_v(z, 0.5 * z + 0.25 * first, ab)[0])
  kw = dict(objective="v", project=normalize_to_sphere)
  got = self_conditioned_x0(ToyDenoiser(), z, ab, **kw)
  np.testing.assert_allclose(got, second, rtol=1e-5, atol=1e-5)
  once = self_conditioned_x0(ToyDenoiser(), z, ab, self_condition=False, **kw)
  np.testing.assert_allclose(once, first, rtol=1e-5, atol=1e-5)


def test_noised_estimates_noise_to_t_below_t_max_and_drop_classes():
  x0 = jax.random.normal(jax.random.key(2), (64, 2, 4))
  labels = jnp.arange(64) % 3
  key = jax.random.key(5)
  schedule = CosineSchedule(scale=0.8)
  kw = dict(t_max=0.3, objective="v", schedule=schedule, self_condition=False)
  x0_hat, t = noised_estimates(ToyDenoiser(), x0, key, labels=labels, **kw)
  assert float(t.min()) >= 0.0 and float(t.max()) <= 0.3
  k_t, k_noise, _ = jax.random.split(key, 3)
  np.testing.assert_allclose(t, jax.random.uniform(k_t, (64,)) * 0.3)
  z_t, _ = q_sample(k_noise, x0, t, schedule)
  ab = schedule.alpha_bar(t)
  want = _x0_eps_from_v(z_t, 0.5 * z_t + (1.0 + labels)[:, None, None], ab)[0]
  np.testing.assert_allclose(x0_hat, want, rtol=1e-5, atol=1e-5)
  # Every class dropped: the null-class output, no label offset.
  dropped, _ = noised_estimates(ToyDenoiser(), x0, key, labels=labels, cond_drop_prob=1.0, **kw)
  np.testing.assert_allclose(dropped, _x0_eps_from_v(z_t, 0.5 * z_t, ab)[0], rtol=1e-5, atol=1e-5)


def test_training_loss_is_the_l2_of_the_self_conditioned_second_pass():
  x0 = jax.random.normal(jax.random.key(3), (16, 4, 8))
  key = jax.random.key(7)
  k_t, k_noise = jax.random.split(key, 6)[:2]
  t = jax.random.uniform(k_t, (16,))
  z_t, eps = q_sample(k_noise, x0, t, COSINE)
  a = COSINE.alpha_bar(t)[:, None, None]
  v = jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

  # No self-conditioning: pred = 0.5 z_t.
  loss, metrics = diffusion_training_loss(ToyDenoiser(), x0, key, self_condition_prob=0.0)
  np.testing.assert_allclose(loss, jnp.mean(jnp.square(0.5 * z_t - v)), rtol=1e-5)
  x0_hat = jnp.sqrt(a) * z_t - jnp.sqrt(1 - a) * 0.5 * z_t
  np.testing.assert_allclose(metrics["x0_mse"], jnp.mean(jnp.square(x0_hat - x0)), rtol=1e-5)

  # Always self-conditioned: the first pass's projected estimate feeds the second, whose
  # (unprojected) estimate and t reach x0_loss, which adds to the L2 loss.
  seen = {}

  def x0_loss(x0_hat, t):
    seen["x0_hat"], seen["t"] = x0_hat, t
    return 2.0 * jnp.mean(x0_hat), {"extra": jnp.mean(x0_hat)}

  loss, metrics = diffusion_training_loss(
    ToyDenoiser(),
    x0,
    key,
    self_condition_prob=1.0,
    project_self_cond=normalize_to_sphere,
    x0_loss=x0_loss,
  )
  first = normalize_to_sphere(jnp.sqrt(a) * z_t - jnp.sqrt(1 - a) * 0.5 * z_t)
  pred = 0.5 * z_t + 0.25 * first
  l2 = jnp.mean(jnp.square(pred - v))
  second = jnp.sqrt(a) * z_t - jnp.sqrt(1 - a) * pred
  np.testing.assert_allclose(metrics["l2_loss"], l2, rtol=1e-5)
  np.testing.assert_allclose(seen["x0_hat"], second, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(seen["t"], t)
  np.testing.assert_allclose(loss, l2 + 2.0 * jnp.mean(second), rtol=1e-5)
  np.testing.assert_allclose(metrics["extra"], jnp.mean(second), rtol=1e-5)
