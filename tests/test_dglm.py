"""DGLM pieces: standardised sentence-embedding latents (statistics, round trip, the split into
denoiser tokens, the stats file), a denoiser training step on them, and plug-and-play attribute
guidance (finite-difference gradients, the composition sum)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lsd.diffusion import embedding as emb
from lsd.diffusion.attribute_guidance import (
  LinearClassifier,
  attribute_guide,
  composed_log_prob,
  embedding_log_prob,
)
from lsd.diffusion.latent import diffusion_training_loss
from lsd.models.denoiser import DenoiserConfig, LatentDenoiser


def _unit_rows(key, n, e):
  x = jax.random.normal(key, (n, e)) * jnp.linspace(0.5, 3.0, e) + jnp.linspace(-1.0, 1.0, e)
  return np.asarray(x / jnp.linalg.norm(x, axis=-1, keepdims=True))


def test_stats_standardise_the_corpus_per_dimension():
  x = _unit_rows(jax.random.key(0), 500, 12)
  stats = emb.embedding_stats(x)
  np.testing.assert_allclose(stats.mean, x.mean(0), atol=1e-6)
  np.testing.assert_allclose(stats.std, x.std(0), rtol=1e-5)
  z = np.asarray(emb.standardize(stats, x))
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)


def test_standardisation_round_trip_returns_the_unit_embeddings():
  x = _unit_rows(jax.random.key(1), 64, 384)
  stats = emb.embedding_stats(x)
  tokens = emb.to_tokens(emb.standardize(stats, x), 8)
  assert tokens.shape == (64, 8, 48)
  # token j holds dimensions [48 j, 48 j + 48)
  np.testing.assert_allclose(tokens[:, 1, :], np.asarray(emb.standardize(stats, x))[:, 48:96])
  back = emb.unstandardize(stats, emb.from_tokens(tokens))
  np.testing.assert_allclose(back, x, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(back, axis=-1), 1.0, atol=1e-6)
  raw = emb.unstandardize(stats, jnp.zeros((1, 384)), normalize=False)
  np.testing.assert_allclose(raw[0], stats.mean)


def test_constant_dimension_gets_a_floored_std_and_bad_input_is_refused():
  x = np.ones((10, 3), np.float32)
  x[:, 0] = np.arange(10)
  stats = emb.embedding_stats(x)
  assert stats.std[1] == pytest.approx(1e-6) and np.isfinite(emb.standardize(stats, x)).all()
  with pytest.raises(ValueError, match="N >= 2"):
    emb.embedding_stats(x[:1])
  with pytest.raises(ValueError, match="NaN"):
    emb.embedding_stats(np.full((4, 3), np.nan))
  with pytest.raises(ValueError, match="not divisible by num_tokens=5"):
    emb.to_tokens(jnp.zeros((2, 384)), 5)


def test_stats_file_round_trip(tmp_path):
  stats = emb.embedding_stats(_unit_rows(jax.random.key(2), 32, 16))
  path = tmp_path / "run" / emb.STATS_FILE
  emb.save_stats(path, stats)
  assert [p.name for p in path.parent.iterdir()] == [emb.STATS_FILE]  # no temporary file left
  loaded = emb.load_stats(path, width=16)
  np.testing.assert_array_equal(loaded.mean, stats.mean)
  np.testing.assert_array_equal(loaded.std, stats.std)
  with pytest.raises(ValueError, match="width 16, the encoder gives 384"):
    emb.load_stats(path, width=384)
  emb.save_stats(path, emb.EmbeddingStats(stats.mean, np.zeros(16, np.float32)))
  with pytest.raises(ValueError, match="std must be > 0"):
    emb.load_stats(path)


def test_prefix_conditioned_denoiser_trains_on_embedding_tokens():
  """The shared latent denoiser on 384-d embeddings as 8 tokens of 48, conditioned on prefix
  encoder states (cross-attention context), v-prediction, self-conditioning, CFG dropout."""
  cfg = DenoiserConfig(num_latents=8, d_latent=48, d_model=32, n_layers=2, n_heads=2, d_context=16)
  model = LatentDenoiser(cfg, rngs=nnx.Rngs(0))
  x = _unit_rows(jax.random.key(3), 4, 384)
  stats = emb.embedding_stats(_unit_rows(jax.random.key(4), 64, 384))
  x0 = emb.to_tokens(emb.standardize(stats, x), 8)
  context = jax.random.normal(jax.random.key(5), (4, 5, 16))
  valid = jnp.arange(5)[None, :] < jnp.array([[5], [3], [1], [4]])
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, key):
    def loss_fn(m):
      return diffusion_training_loss(m, x0, key, context=context, context_valid=valid)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, jax.random.key(0))) for _ in range(30)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------------------------
# Plug-and-play attribute guidance
# ---------------------------------------------------------------------------------------------
def _classifiers():
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  binary = LinearClassifier(jax.random.normal(k1, (384,)) * 3, 0.2)
  topic = LinearClassifier(jax.random.normal(k2, (4, 384)) * 3, jax.random.normal(k3, (4,)))
  return binary, topic


def test_linear_classifier_log_probs():
  binary, topic = _classifiers()
  x = _unit_rows(jax.random.key(8), 3, 384)
  logit = x @ np.asarray(binary.weight) + 0.2
  np.testing.assert_allclose(binary.log_prob(1)(x), -np.log1p(np.exp(-logit)), rtol=1e-5)
  np.testing.assert_allclose(binary.log_prob(0)(x), -np.log1p(np.exp(logit)), rtol=1e-5)
  logits = x @ np.asarray(topic.weight).T + np.asarray(topic.bias)
  ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(topic.log_prob(2)(x), ref[:, 2], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"target=4 must be a class index in \[0, 4\)"):
    topic.log_prob(4)
  with pytest.raises(ValueError, match="expected"):
    LinearClassifier(np.zeros((3, 4)), np.zeros(4))


def test_composition_is_the_scaled_sum_of_log_probs():
  binary, topic = _classifiers()
  x = _unit_rows(jax.random.key(9), 5, 384)
  composed = composed_log_prob([(binary.log_prob(1), 5.0), (topic.log_prob(3), 2.0)])
  want = 5.0 * binary.log_prob(1)(x) + 2.0 * topic.log_prob(3)(x)
  np.testing.assert_allclose(composed(x), want, rtol=1e-6)
  with pytest.raises(ValueError, match="at least one"):
    composed_log_prob([])


def test_guide_gradient_matches_finite_differences():
  """The guide's step is scale x grad of the composed log-prob through tokens -> un-standardised
  -> unit-norm embedding; checked coordinate-wise by central differences in float64."""
  binary, topic = _classifiers()
  stats = emb.embedding_stats(_unit_rows(jax.random.key(10), 64, 384))
  terms = [(binary.log_prob(1), 5.0), (topic.log_prob(0), 2.0)]
  guide = attribute_guide(stats, terms)
  x0 = emb.to_tokens(emb.standardize(stats, _unit_rows(jax.random.key(11), 2, 384)), 8)
  step = np.asarray(guide(x0) - x0)
  f = embedding_log_prob(stats, composed_log_prob(terms))
  mean, std = np.float64(stats.mean), np.float64(stats.std)
  w1, b1 = np.float64(binary.weight), np.float64(binary.bias)
  w2, b2 = np.float64(topic.weight), np.float64(topic.bias)

  def f64(x):  # the same log-prob in numpy float64
    e = x.reshape(x.shape[0], -1) * std + mean
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    logit = e @ w1 + b1
    logits = e @ w2.T + b2
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return 5.0 * -np.log1p(np.exp(-logit)) + 2.0 * log_softmax[:, 0]

  x64, h = np.float64(x0), 1e-6
  for b, j, d in [(0, 0, 0), (0, 3, 17), (1, 7, 47), (1, 2, 5)]:
    dx = np.zeros_like(x64)
    dx[b, j, d] = h
    fd = (f64(x64 + dx)[b] - f64(x64 - dx)[b]) / (2 * h)
    assert step[b, j, d] == pytest.approx(fd, rel=1e-3, abs=1e-5)
  # the float32 log-prob the guide differentiates agrees with the float64 reference
  np.testing.assert_allclose(f(x0), f64(x64), rtol=1e-4)
