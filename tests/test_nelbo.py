"""Held-out likelihood (lsd.eval.likelihood, `lsd eval --nelbo`): the masked-diffusion NELBO against
a float64 recomputation, its zero for a perfect model, the causal LM's exact NLL by hand, block size
L against the MDLM forward, and the CLI with its errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsd.config import ConfigError
from lsd.eval import likelihood as lk
from lsd.models.masked_lm import MaskedLM
from lsd.nn import Transformer, TransformerConfig, causal_mask

VOCAB, MASK, L = 11, 10, 16


@pytest.fixture(scope="module")
def model() -> MaskedLM:
  cfg = TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2)
  return MaskedLM(cfg, MASK, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
  x0 = jax.random.randint(jax.random.key(1), (3, L), 0, MASK, jnp.int32)
  valid = jnp.ones((3, L), bool).at[2, 11:].set(False)  # one row ends in padding
  return {"tokens": x0, "valid": valid, "row": jnp.arange(3, dtype=jnp.int32)}


def _reference_nelbo(model, batch, key, block_size, k_samples):
  """float64 numpy: mean over draws of sum over masked valid tokens of -log p(x0) / t, per row."""
  x0, valid = batch["tokens"], batch["valid"]
  total = np.zeros(x0.shape[0])
  for k in range(k_samples):
    t, x_t = lk.eval_noise(key, batch["row"], x0, valid, block_size, k, k_samples, MASK)
    from lsd.diffusion.masked import bd3_forward

    logp = np.asarray(bd3_forward(model, x_t, x0, valid, block_size), np.float64)
    x0n, x_tn, tn = np.asarray(x0), np.asarray(x_t), np.asarray(t, np.float64)
    masked = (x_tn == MASK) & np.asarray(valid)
    nll = -np.take_along_axis(logp, x0n[..., None], axis=-1)[..., 0]
    total += np.where(masked, nll / tn, 0.0).sum(axis=1)
  return total / k_samples


def test_nelbo_matches_float64_reference_on_the_same_draws(model, batch):
  key, k_samples = jax.random.key(5), 8
  nll, tokens = lk.nelbo_sums(model, batch, key, block_size=4, num_samples=k_samples)
  ref = _reference_nelbo(model, batch, key, 4, k_samples)
  np.testing.assert_allclose(np.asarray(nll, np.float64), ref, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokens), [16, 16, 11])
  assert np.all(ref > 0)


def test_times_are_stratified_per_block(batch):
  """The K draws of each (canvas, block) fall one in each stratum of [0, 1), shared by the block's
  positions; padding is never masked."""
  key, k_samples = jax.random.key(2), 4
  ts = []
  for k in range(k_samples):
    t, x_t = lk.eval_noise(
      key, batch["row"], batch["tokens"], batch["valid"], 4, k, k_samples, MASK, t_min=0.0
    )
    assert not np.any(np.asarray(x_t)[2, 11:] == MASK)
    ts.append(np.asarray(t))
  ts = np.stack(ts)  # [K, B, L]
  per_block = ts.reshape(k_samples, 3, L // 4, 4)
  assert np.all(per_block == per_block[..., :1])  # one t per block
  strata = np.floor(per_block[..., 0] * k_samples)
  np.testing.assert_array_equal(strata, np.arange(k_samples)[:, None, None] * np.ones((1, 3, 4)))


class PerfectModel:
  """Log-probs with probability 1 on the true token everywhere (finite log 0 elsewhere)."""

  mask_id = MASK

  def __init__(self, x0):
    self.x0 = x0
    self.cfg = type("Cfg", (), {"dropout": 0.0})()

  def __call__(self, tokens, *, positions=None, mask=None, rngs=None, num_outputs=None, **kw):
    n = num_outputs or tokens.shape[1]
    onehot = jax.nn.one_hot(self.x0[:, :n], VOCAB, dtype=jnp.float32)
    return jnp.where(onehot > 0, 0.0, -1e9), None


def test_perfect_model_has_zero_nelbo(batch):
  stub = PerfectModel(batch["tokens"])
  for block_size in (4, L):
    nll, tokens = lk.nelbo_sums(stub, batch, jax.random.key(0), block_size=block_size, num_samples=3)
    np.testing.assert_array_equal(np.asarray(nll), 0.0)
    assert float(jnp.sum(tokens)) == 43.0


def test_causal_lm_exact_nll_by_hand(batch):
  cfg = TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2)
  lm = Transformer(cfg, rngs=nnx.Rngs(3))
  nll, tokens = lk.causal_nll_sums(lm, batch)
  x, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid"])
  logits = np.asarray(lm(batch["tokens"][:, :-1], mask=causal_mask(L - 1))[0], np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  want, count = np.zeros(3), np.zeros(3)
  for b in range(3):
    for pos in range(1, L):
      if valid[b, pos] and valid[b, pos - 1]:
        want[b] -= logp[b, pos - 1, x[b, pos]]
        count[b] += 1
  np.testing.assert_allclose(np.asarray(nll, np.float64), want, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokens), count)
  assert count.tolist() == [15, 15, 10]


def test_block_size_l_with_context_equals_mdlm_forward(model, batch):
  """B = L: the 2L forward [x_t ; x0] (x_t never sees x0) equals the L-length MDLM forward on the
  same draws of t and the mask."""
  key = jax.random.key(11)
  two_l, _ = lk.nelbo_sums(model, batch, key, block_size=L, num_samples=4, full_context=True)
  mdlm, _ = lk.nelbo_sums(model, batch, key, block_size=L, num_samples=4, full_context=False)
  np.testing.assert_allclose(np.asarray(two_l), np.asarray(mdlm), rtol=1e-5)
  small, _ = lk.nelbo_sums(model, batch, key, block_size=4, num_samples=4)
  assert not np.allclose(np.asarray(small), np.asarray(mdlm))  # block size matters


def test_evaluate_does_not_depend_on_batching(model, batch):
  """Per-canvas keys: the totals are the same whatever the batch size."""
  import functools

  fn = functools.partial(lk.nelbo_sums, block_size=4, num_samples=2)
  graphdef, params = nnx.split(model)
  tokens, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid"])
  a = lk.evaluate(fn, graphdef, params, tokens, valid, jax.random.key(4), batch_size=2)
  b = lk.evaluate(fn, graphdef, params, tokens, valid, jax.random.key(4), batch_size=3)
  assert a["tokens"] == b["tokens"] == 43 and a["canvases"] == 3
  np.testing.assert_allclose(a["nats_per_token"], b["nats_per_token"], rtol=1e-6)
  np.testing.assert_allclose(a["ppl"], np.exp(a["nats_per_token"]), rtol=1e-12)
