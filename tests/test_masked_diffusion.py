"""Masked-diffusion math (lsd.diffusion.masked), masking schedules and the SBD training task.

The 2L mask itself is tested in test_nn.py; here: the losses built on it, their noise, gradients,
exactness against the KV-cache view, and one compiled program for every block size.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_masked_lm

from lsd.config import ConfigError
from lsd.diffusion import masked as md
from lsd.diffusion.schedules import ClippedInterval, LogLinear
from lsd.methods.sbd import SBDTask, default_sbd_config, sbd_model_from_config
from lsd.models.masked_lm import MaskedLM
from lsd.nn import block_causal_mask

VOCAB, MASK, L = 11, 10, 16


@pytest.fixture(scope="module")
def model() -> MaskedLM:
  return tiny_masked_lm(VOCAB, MASK)


@pytest.fixture(scope="module")
def batch():
  x0 = jax.random.randint(jax.random.key(1), (3, L), 0, MASK, jnp.int32)
  valid = jnp.ones((3, L), bool).at[2, 11:].set(False)  # one row ends in padding
  return x0, valid


def test_log_linear_schedule_and_interval():
  t = jnp.array([0.1, 0.5, 1.0])
  sched = LogLinear(eps=1e-3)
  np.testing.assert_allclose(sched.mask_prob(t), 1 - sched.alpha(t), rtol=1e-6)
  np.testing.assert_allclose(sched.mask_prob(t), (1 - 1e-3) * t, rtol=1e-6)
  # weight = dsigma / expm1(sigma) (MDLM) equals 1/t for every eps.
  dsigma = jax.vmap(jax.grad(sched.sigma))(t)
  np.testing.assert_allclose(dsigma / jnp.expm1(sched.sigma(t)), sched.weight(t), rtol=1e-5)
  np.testing.assert_allclose(ClippedInterval(0.2, 0.7)(jnp.array([0.0, 0.5])), [0.2, 0.45])
  with pytest.raises(ConfigError, match="t_min"):
    ClippedInterval(0.8, 0.3)


def test_mix_scale_endpoints_equal_bd3_and_mdlm(model, batch):
  """(a) lam = 0 is bd3_loss(B_small); lam = 1 with B_large = L is the MDLM loss (the same noise)."""
  x0, valid = batch
  key = jax.random.key(7)
  noise_key = jax.random.split(key)[1]
  loss0, m0 = md.mix_scale_loss(model, x0, valid, key, lam=0.0, small=4, large=L)
  ref0, r0 = md.bd3_loss(model, x0, valid, noise_key, 4)
  # The drawn size runs as a branch of a lax.cond, compiled as one program: equal to the op-by-op
  # call up to the last bit of fp32.
  np.testing.assert_allclose(loss0, ref0, rtol=1e-6)
  assert float(m0["block_size"]) == 4.0
  assert float(m0["mask_frac"]) == float(r0["mask_frac"])

  loss1, m1 = md.mix_scale_loss(model, x0, valid, key, lam=1.0, small=4, large=L)
  ref1, _ = md.bd3_loss(model, x0, valid, noise_key, L)
  mdlm, mm = md.mdlm_loss(model, x0, valid, noise_key)
  np.testing.assert_allclose(loss1, mdlm, rtol=1e-6)
  assert float(m1["block_size"]) == float(L)
  assert float(m1["mask_frac"]) == float(mm["mask_frac"])
  np.testing.assert_allclose(loss1, ref1, rtol=1e-5, atol=1e-5)
  assert float(loss0) != float(loss1)  # the two block sizes really differ


def test_mix_scale_branches_equal_the_loss_at_the_drawn_size(model, batch):
  """With 0 < lam < 1 the two sizes are lax.cond branches: each step's loss is bd3_loss at the
  drawn size (B_small) or mdlm_loss (B_large = L), with the same noise key."""
  x0, valid = batch
  seen = set()
  for k in range(6):
    key = jax.random.key(k)
    noise_key = jax.random.split(key)[1]
    loss, m = md.mix_scale_loss(model, x0, valid, key, lam=0.5, small=4, large=L)
    size = int(m["block_size"])
    seen.add(size)
    if size == L:
      ref = md.mdlm_loss(model, x0, valid, noise_key)[0]
    else:
      ref = md.bd3_loss(model, x0, valid, noise_key, size)[0]
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
  assert seen == {4, L}


@pytest.mark.parametrize("k", [0, 3])  # key 0 draws B = 4, key 3 B = L (asserted)
def test_mix_scale_gradient_is_the_drawn_branchs_gradient(model, batch, k):
  """The gradient is computed inside the drawn lax.cond branch (`_cond_with_grads`): it equals
  the gradient of that size's loss, and scales with the loss's cotangent."""
  x0, valid = batch
  graphdef, params = nnx.split(model)
  key = jax.random.key(k)
  noise_key = jax.random.split(key)[1]

  def mixed(params, scale=1.0):
    out = md.mix_scale_loss(nnx.merge(graphdef, params), x0, valid, key, lam=0.5, small=4, large=L)
    return scale * out[0], out[1]

  (_, m), grads = jax.value_and_grad(mixed, has_aux=True)(params)
  size = int(m["block_size"])
  assert size == {0: 4, 3: L}[k]

  def direct(params):
    model = nnx.merge(graphdef, params)
    if size == L:
      return md.mdlm_loss(model, x0, valid, noise_key)[0]
    return md.bd3_loss(model, x0, valid, noise_key, size)[0]

  ref = jax.grad(direct)(params)
  doubled, _ = jax.grad(lambda p: mixed(p, 2.0), has_aux=True)(params)
  for g, r, d in zip(*(jax.tree.leaves(t) for t in (grads, ref, doubled)), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)  # compiled branch vs op-by-op
    np.testing.assert_allclose(d, 2 * g, rtol=1e-6, atol=1e-8)


def test_mix_scale_block_size_frequency():
  keys = jax.random.split(jax.random.key(0), 4000)
  sizes = jax.vmap(lambda k: md.mix_scale_block_size(k, 0.3, 4, 64))(keys)
  assert set(np.unique(sizes).tolist()) == {4, 64} and sizes.dtype == jnp.int32
  frac = float(jnp.mean(sizes == 64))
  assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 4000)  # 5 binomial standard deviations


def test_unmasked_canvas_has_zero_loss(model, batch):
  """(b) t = 0 masks nothing, so the NELBO is exactly 0, through the model and directly."""
  x0, valid = batch
  loss, metrics = md.bd3_loss(
    model, x0, valid, jax.random.key(3), 4, noise=md.NoiseSpec(t_min=0.0, t_max=0.0)
  )
  assert float(loss) == 0.0 and float(metrics["mask_frac"]) == 0.0
  log_probs = jax.random.normal(jax.random.key(4), (3, L, VOCAB))
  loss, _ = md.masked_nelbo(log_probs, x0, x0, jnp.full((3, L), 0.5), MASK, valid)
  assert float(loss) == 0.0


def test_gradient_only_from_masked_valid_positions(batch):
  """(c) d loss / d log_probs is zero at unmasked and invalid positions (even if [MASK] there),
  and -1 / (t * n_valid) on the target entry of every masked valid position."""
  x0, valid = batch
  pos = jnp.arange(L)
  x_t = jnp.where((pos % 3 == 0)[None, :], MASK, x0)
  x_t = x_t.at[2, 12].set(MASK)  # a [MASK] on padding must still be ignored
  t = jnp.where(pos % 3 == 0, 0.4, 0.0)[None, :].repeat(3, 0)  # t = 0 off the masked positions
  log_probs = jax.nn.log_softmax(jax.random.normal(jax.random.key(5), (3, L, VOCAB)))
  grad = jax.grad(lambda lp: md.masked_nelbo(lp, x0, x_t, t, MASK, valid)[0])(log_probs)
  assert bool(jnp.all(jnp.isfinite(grad)))
  masked = np.asarray((x_t == MASK) & valid)
  assert masked.sum() > 0 and (~masked).sum() > 0
  np.testing.assert_array_equal(grad[~masked], 0.0)
  on_target = np.asarray(jnp.take_along_axis(grad, x0[..., None], axis=-1)[..., 0])
  np.testing.assert_allclose(on_target[masked], -1.0 / (0.4 * float(jnp.sum(valid))), rtol=1e-6)
  off_target = jnp.where(jax.nn.one_hot(x0, VOCAB, dtype=bool), 0.0, grad)
  np.testing.assert_array_equal(off_target, 0.0)


def test_block_times_structure_and_strata():
  """(d) constant inside a block, one distinct value per block, one per stratum when antithetic."""
  b, length, t_min, t_max = 6, 32, 0.1, 0.9
  for block in (1, 4, 32):
    n_blocks = length // block
    t = md.sample_block_times(jax.random.key(2), b, length, block, t_min=t_min, t_max=t_max)
    per_block = np.asarray(t).reshape(b, n_blocks, block)
    np.testing.assert_array_equal(per_block, per_block[..., :1].repeat(block, -1))
    assert all(len(np.unique(row)) == n_blocks for row in np.asarray(t))
    # Entry k = e * n_blocks + j lies in stratum k of n = b * n_blocks.
    frac = (per_block[..., 0].reshape(-1) - t_min) / (t_max - t_min)
    k = np.arange(b * n_blocks)
    n = b * n_blocks
    assert np.all(frac >= k / n - 1e-6) and np.all(frac <= (k + 1) / n + 1e-6)
    iid = md.sample_block_times(jax.random.key(2), b, length, block, antithetic=False)
    assert all(len(np.unique(row)) == n_blocks for row in np.asarray(iid))
  # Under jit, a traced block size gives bit-identical times to a static one.
  traced = jax.jit(lambda bs: md.sample_block_times(jax.random.key(2), b, length, bs))(4)
  static = jax.jit(lambda: md.sample_block_times(jax.random.key(2), b, length, 4))()
  np.testing.assert_array_equal(traced, static)


def test_mask_fraction_matches_t():
  """(d) per t-bin, the masked fraction is t within 5 binomial standard deviations."""
  b, length = 256, 512
  t = md.sample_block_times(jax.random.key(8), b, length, 16)
  x0 = jnp.zeros((b, length), jnp.int32)
  valid = jnp.ones((b, length), bool).at[:, -8:].set(False)
  x_t = md.corrupt(jax.random.key(9), x0, t, MASK, valid)
  masked = np.asarray(x_t == MASK)
  assert not masked[:, -8:].any()
  t, masked = np.asarray(t)[:, :-8], masked[:, :-8]
  bins = np.digitize(t, np.linspace(0, 1, 6)[1:-1])
  for i in range(5):
    sel = bins == i
    p, n = t[sel], sel.sum()
    tol = 5 * math.sqrt(np.sum(p * (1 - p))) / n
    assert abs(masked[sel].mean() - p.mean()) < tol, (i, masked[sel].mean(), p.mean(), tol)


def test_ignore_bos_never_masks_position_zero(model, batch):
  x0, valid = batch
  full = md.NoiseSpec(t_min=1.0, t_max=1.0)
  _, m = md.bd3_loss(model, x0, valid, jax.random.key(0), 4, noise=full)
  assert float(m["mask_frac"]) == 1.0
  bos = md.NoiseSpec(t_min=1.0, t_max=1.0, ignore_bos=True)
  _, m = md.bd3_loss(model, x0, valid, jax.random.key(0), 4, noise=bos)
  n_valid = float(jnp.sum(valid))
  # BOS is counted as a valid token but never masked.
  assert float(m["mask_frac"]) == pytest.approx((n_valid - 3) / n_valid, rel=1e-6)


def test_bd3_inputs():
  x_t = jnp.arange(8).reshape(2, 4)
  tokens, positions = md.bd3_inputs(x_t, x_t + 100)
  np.testing.assert_array_equal(tokens[1], [4, 5, 6, 7, 104, 105, 106, 107])
  np.testing.assert_array_equal(positions, [[0, 1, 2, 3, 0, 1, 2, 3]] * 2)


def test_bd3_forward_equals_block_causal_prefix_forward(model, batch):
  """(e) Block b of the 2L forward equals a forward of [clean blocks < b ; noisy block b]."""
  x0, _ = batch
  block = 4
  valid = jnp.ones_like(x0, bool)
  x_t = jnp.where((jnp.arange(L) % 2 == 0)[None, :], MASK, x0)
  full = md.bd3_forward(model, x_t, x0, valid, block)
  for b in range(L // block):
    lo, hi = b * block, (b + 1) * block
    seq = jnp.concatenate([x0[:, :lo], x_t[:, lo:hi]], axis=1)
    ref, _ = model(seq, mask=block_causal_mask(hi, block))
    np.testing.assert_allclose(full[:, lo:hi], ref[:, lo:], atol=1e-5, rtol=1e-5)


def test_loss_from_target_nll_equals_loss_from_log_probs(model, batch):
  """The training losses read `target_nll` under the structured 2L mask; that equals the NELBO of
  the full log-probabilities (subs, dense mask) of `bd3_forward` at a traced block size, and of the
  L-length forward for MDLM: values and gradients."""
  x0, valid = batch
  key = jax.random.key(3)
  graphdef, params = nnx.split(model)
  t, x_t, _ = md._draw_noise(key, x0, valid, 4, MASK, md.NoiseSpec())

  def via_log_probs(params):
    m = nnx.merge(graphdef, params)
    log_probs = md.bd3_forward(m, x_t, x0, valid, jnp.int32(4))  # traced: the dense mask
    return md.masked_nelbo(log_probs, x0, x_t, t, MASK, valid)[0]

  def via_nll(params):
    return md.bd3_loss(nnx.merge(graphdef, params), x0, valid, key, 4)[0]

  (v_ref, g_ref), (v, g) = (jax.value_and_grad(f)(params) for f in (via_log_probs, via_nll))
  np.testing.assert_allclose(v, v_ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

  tokens, _ = md.bd3_inputs(x_t, x0)
  nll = model.target_nll(tokens[:, :L], x0)
  logp, _ = model(tokens[:, :L], subs=False)
  np.testing.assert_allclose(nll, -jnp.take_along_axis(logp, x0[..., None], -1)[..., 0], rtol=1e-5)


def test_traced_block_size_compiles_once(model, batch):
  """(f) one trace serves two block sizes, and each matches the eager loss."""
  x0, valid = batch
  graphdef, params = nnx.split(model)
  traces = []

  @jax.jit
  def loss_fn(params, key, block_size):
    traces.append(1)  # runs only while tracing
    return md.bd3_loss(nnx.merge(graphdef, params), x0, valid, key, block_size)[0]

  key = jax.random.key(11)
  l4 = loss_fn(params, key, jnp.int32(4))
  l8 = loss_fn(params, key, jnp.int32(8))
  assert len(traces) == 1
  np.testing.assert_allclose(l4, md.bd3_loss(model, x0, valid, key, 4)[0], rtol=1e-5)
  np.testing.assert_allclose(l8, md.bd3_loss(model, x0, valid, key, 8)[0], rtol=1e-5)
  assert float(l4) != float(l8)


# ---------------------------------------------------------------------------------------------------
# SBD task
# ---------------------------------------------------------------------------------------------------
class FakeTokenizer:
  vocab_size, mask_id = VOCAB, MASK

  def decode(self, ids):
    return " ".join(map(str, ids))


def sbd_config(**sbd) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(
    {
      "method": "sbd",
      "seed": 0,
      "data": {"seq_len": L},
      "model": {"d_model": 16, "n_layers": 2, "n_heads": 2},
      "sbd": default_sbd_config(),
    }
  )
  cfg.sbd.update(sbd)
  return cfg


@pytest.mark.parametrize(
  "override, field",
  [
    ({"block_small": 3}, "sbd.block_small"),
    ({"block_small": 0}, "sbd.block_small"),
    ({"block_large": 5}, "sbd.block_large"),
    ({"mix_lambda": 1.5}, "sbd.mix_lambda"),
    ({"t_min": 0.5, "t_max": 0.2}, "sbd.t_min"),
  ],
)
def test_sbd_config_errors_name_the_field(override, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    SBDTask(sbd_config(**override))


def test_sbd_task_loss_and_flops(batch):
  x0, valid = batch
  task = SBDTask(sbd_config(mix_lambda=0.0))
  task.tokenizer = FakeTokenizer()
  model = task.build_model(nnx.Rngs(0))
  assert model.mask_id == MASK and model.cfg.vocab_size == VOCAB
  key = jax.random.key(5)
  loss, metrics = task.loss(model, {"tokens": x0, "valid": valid}, key)
  ref, _ = md.bd3_loss(model, x0, valid, jax.random.split(key)[1], 4)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)  # a lax.cond branch: equal up to the last bit
  assert float(metrics["block_size"]) == 4.0
  same = sbd_model_from_config(task.config, VOCAB, MASK, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(
    md.bd3_loss(same, x0, valid, key, 4)[0], md.bd3_loss(model, x0, valid, key, 4)[0]
  )

  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  # Tied head: every parameter is a matmul weight; 2L input, 2 forward tokens per canvas token;
  # each query scores L + B / 2 keys on average (structured attention, block 4).
  expected = 2 * (6 * n_params + 6 * 2 * (L + 2) * 16)
  assert task.flops_per_token() == pytest.approx(expected)
  # Mix-scale: the expectation over the draw; a global (B = L) step is the L-length forward.
  mixed = SBDTask(sbd_config(mix_lambda=0.25))
  mixed.tokenizer = FakeTokenizer()
  mdlm = 6 * n_params + 6 * 2 * L * 16
  assert mixed.flops_per_token() == pytest.approx(0.75 * expected + 0.25 * mdlm)
