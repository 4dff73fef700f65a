"""Unmasking orders of the SBD draft (`DraftConfig.order`): each ordered rule against a numpy
reference on fixed logit tables, the random order unchanged, threshold progress, config errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tiny import split_tiny_masked_lm

from lsd.config import ConfigError, apply_override, load_config_file
from lsd.methods.sbd import sampler_config
from lsd.sampling import DraftConfig, SBDSamplerConfig, StageConfig, draft, draft_then_revise
from lsd.sampling.block import BlockState, denoise_block

MASK_ID = 99  # outside the stub vocabularies, so a drawn token is never the mask
ORDERED = ("confidence", "margin", "entropy", "threshold")


# ---------------------------------------------------------------------------------------------------
# A stub denoiser: fixed logits indexed by how many positions of the row are still masked
# ---------------------------------------------------------------------------------------------------
def logit_table(n: int, b: int, v: int, seed: int) -> np.ndarray:
  """float32 [b + 1, n, b, v]: entry [m, r] is row r's logits while m of its positions are masked,
  so the scores change from step to step. Scales differ per position, spreading the scores."""
  rng = np.random.default_rng(seed)
  scale = rng.choice([0.3, 0.8, 1.5, 2.5], size=(b + 1, n, b, 1))
  return (rng.normal(size=(b + 1, n, b, v)) * scale).astype(np.float32)


def run_block(table, key, steps, order, threshold=0.9, top_p=1.0, temperature=1.0, conf="filtered"):
  """`denoise_block` of one all-masked block under the stub denoiser (one jitted call)."""
  _, n, b, _ = table.shape
  t = jnp.asarray(table)

  def logp_fn(blk):
    m = jnp.sum(blk == MASK_ID, axis=-1)
    return jax.nn.log_softmax(t[m, jnp.arange(n)], axis=-1)

  state = BlockState(
    tokens=jnp.full((n, b), MASK_ID, jnp.int32),
    conf=jnp.full((n, b), jnp.inf, jnp.float32),
    unmask_step=jnp.full((n, b), -1, jnp.int32),
    nfe=jnp.zeros((n,), jnp.int32),
  )
  fn = jax.jit(
    lambda k: denoise_block(
      logp_fn,
      k,
      state,
      steps=steps,
      step_offset=0,
      mask_id=MASK_ID,
      top_p=top_p,
      temperature=temperature,
      confidence=conf,
      order=order,
      threshold=threshold,
    )
  )
  return jax.device_get(fn(key))


def ref_probs(logits: np.ndarray, top_p: float, temperature: float) -> np.ndarray:
  """float64 sampling distribution of each row: temperature, then the nucleus by a descending sort
  (the smallest set of most likely tokens whose mass reaches top_p; boundary ties all kept)."""
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  if top_p < 1.0:
    out = np.empty_like(p)
    for j, row in enumerate(p):
      desc = np.sort(row)[::-1]
      cut = desc[(np.cumsum(desc) - desc) < top_p].min()
      kept = np.where(row >= cut, row, 0.0)
      out[j] = kept / kept.sum()
    p = out
  return p


def ref_scores(p: np.ndarray, order: str) -> np.ndarray:
  if order in ("confidence", "threshold"):
    return p.max(-1)
  if order == "margin":
    top = np.sort(p, -1)
    return top[:, -1] - top[:, -2]
  logp = np.log(np.where(p > 0, p, 1.0))
  return np.sum(p * logp, -1)  # minus the entropy


def ref_denoise(table, steps, order, threshold=0.9, top_p=1.0, temperature=1.0, gap=1e-4):
  """The numpy reference: (unmask step [n, b], nfe [n], probs [n, b, v] each position was drawn
  from). Asserts every decision is at least `gap` away from a tie, so fp32 agrees with it."""
  _, n, b, v = table.shape
  step_of = np.full((n, b), -1)
  nfe = np.zeros(n, int)
  drawn_from = np.zeros((n, b, v))
  for i in range(steps):
    for r in range(n):
      masked = np.flatnonzero(step_of[r] == -1)
      m = masked.size
      if m == 0:
        continue
      nfe[r] += 1
      p = ref_probs(table[m, r], top_p, temperature)
      s = ref_scores(p, order)[masked]
      ranked = masked[np.argsort(-s, kind="stable")]  # ties: the lower position first
      if order == "threshold":
        top = p[masked].max(-1)
        assert np.all(np.abs(top - threshold) > gap), "table too close to the threshold"
        pick = masked if i == steps - 1 else np.union1d(ranked[:1], masked[top > threshold])
      else:
        k = math.ceil(m / (steps - i))
        if k < m:
          srt = np.sort(s)[::-1]
          assert srt[k - 1] - srt[k] > gap, "table too close to a tie"
        pick = ranked[:k]
      step_of[r, pick] = i
      drawn_from[r, pick] = p[pick]
  return step_of, nfe, drawn_from


def check_against_reference(table, steps, order, key=0, threshold=0.9, top_p=1.0, temperature=1.0):
  out = run_block(table, jax.random.key(key), steps, order, threshold, top_p, temperature)
  step_of, nfe, drawn_from = ref_denoise(table, steps, order, threshold, top_p, temperature)
  np.testing.assert_array_equal(out.unmask_step, step_of)
  np.testing.assert_array_equal(out.nfe, nfe)
  # Each token comes from the distribution its score was computed from, and its snapshot
  # confidence is its probability there.
  chosen = np.take_along_axis(drawn_from, out.tokens[..., None], -1)[..., 0]
  assert np.all(chosen > 0)
  np.testing.assert_allclose(out.conf, chosen, rtol=1e-5)
  return out, step_of


# ---------------------------------------------------------------------------------------------------
# Each order against the reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERED)
@pytest.mark.parametrize(
  "steps, top_p, temperature",
  [(3, 1.0, 1.0), (4, 0.8, 0.7)],  # B = 8: counts 3, 3, 2 and 2, 2, 2, 2
)
def test_positions_unmasked_per_step_equal_the_numpy_reference(order, steps, top_p, temperature):
  table = logit_table(n=4, b=8, v=12, seed=1)
  _, step_of = check_against_reference(
    table, steps, order, threshold=0.6, top_p=top_p, temperature=temperature
  )
  if order != "threshold":  # the deterministic schedule: ceil(m / (S - i)) per step
    counts = np.stack([(step_of == i).sum(1) for i in range(steps)], 1)
    want = {3: [3, 3, 2], 4: [2, 2, 2, 2]}[steps]
    np.testing.assert_array_equal(counts, np.tile(want, (4, 1)))


def test_orders_disagree_on_this_table():
  # Guard: the table separates the rules (otherwise the reference test could not tell them apart).
  table = logit_table(n=4, b=8, v=12, seed=1)
  firsts = {o: ref_denoise(table, 3, o)[0].tolist() for o in ("confidence", "margin", "entropy")}
  assert len({str(f) for f in firsts.values()}) == 3


def test_more_steps_than_positions_finish_the_block_early():
  # B = 4, S = 6: one position per step, so the block is done after 4 steps and NFE is 4, not 6.
  table = logit_table(n=2, b=4, v=10, seed=2)
  out, step_of = check_against_reference(table, 6, "margin")
  np.testing.assert_array_equal(np.sort(step_of, 1), np.tile(np.arange(4), (2, 1)))
  np.testing.assert_array_equal(out.nfe, [4, 4])


def test_ties_go_to_the_lower_position():
  # Identical logits at every position: every score ties, so positions go left to right.
  table = np.broadcast_to(np.linspace(0, 3, 7, dtype=np.float32), (5, 2, 4, 7)).copy()
  for order in ("confidence", "margin", "entropy"):
    out = run_block(table, jax.random.key(0), 3, order)
    np.testing.assert_array_equal(out.unmask_step, [[0, 0, 1, 2]] * 2)


# ---------------------------------------------------------------------------------------------------
# Threshold
# ---------------------------------------------------------------------------------------------------
def peaked(top: float, v: int = 5) -> np.ndarray:
  """Logits of a distribution whose top token has probability `top`, the rest uniform."""
  p = np.full(v, (1 - top) / (v - 1))
  p[0] = top
  return np.log(p).astype(np.float32)


def test_threshold_commits_every_position_above_it_in_one_step():
  # Row 0: positions 1, 4, 6 above 0.8 -> all three at step 0, then one per step (the most
  # confident), the rest at the last step. Row 1: all above -> the whole block at step 0, NFE 1.
  tops = np.array(
    [[0.5, 0.9, 0.3, 0.6, 0.85, 0.4, 0.95, 0.55], [0.81, 0.9, 0.99, 0.82, 0.85, 0.9, 0.95, 0.83]]
  )
  table = np.stack([[[peaked(t) for t in row] for row in tops]] * 9)  # same at every m
  out = run_block(table, jax.random.key(3), 4, "threshold", threshold=0.8)
  np.testing.assert_array_equal(
    out.unmask_step, [[3, 0, 3, 1, 0, 3, 0, 2], [0, 0, 0, 0, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(out.nfe, [4, 1])
  np.testing.assert_array_equal(out.tokens == MASK_ID, np.zeros((2, 8), bool))


def test_threshold_with_nothing_above_it_still_progresses():
  # Threshold 1.0 is never exceeded: exactly one position per step (the most confident), and
  # the last step commits the rest.
  table = logit_table(n=3, b=8, v=12, seed=4)
  out, step_of = check_against_reference(table, 5, "threshold", threshold=1.0)
  counts = np.stack([(step_of == i).sum(1) for i in range(5)], 1)
  np.testing.assert_array_equal(counts, np.tile([1, 1, 1, 1, 4], (3, 1)))


def test_threshold_reference_on_a_block_that_finishes_early():
  # Scores well above a low threshold: rows finish in fewer steps than S; NFE says how many.
  table = logit_table(n=4, b=8, v=6, seed=5) * 2
  out, _ = check_against_reference(table, 6, "threshold", threshold=0.35)
  assert np.all(out.nfe < 6) and np.all(out.nfe >= 1)


def test_tokens_follow_the_filtered_distribution_of_the_first_position():
  # 4000 rows of one table: the position unmasked first (the same in every row) draws its token
  # from the temperature + nucleus distribution the confidence score was read from.
  row = np.stack([peaked(0.3, 6), peaked(0.6, 6), peaked(0.45, 6)])
  row[1] += np.array([0, 0.4, 0.2, 0, -1, 0], np.float32)
  table = np.broadcast_to(row, (4, 4000, 3, 6)).copy()
  out = run_block(table, jax.random.key(5), 3, "confidence", top_p=0.9, temperature=0.8)
  assert np.all(out.unmask_step[:, 1] == 0)
  p = ref_probs(row[1:2], 0.9, 0.8)[0]
  counts = np.bincount(out.tokens[:, 1], minlength=6)
  assert np.all(counts[p == 0] == 0)
  kept = p > 0
  expected = counts.sum() * p[kept]
  chi2 = float(np.sum((counts[kept] - expected) ** 2 / expected))
  assert chi2 < 20.52, (counts, p)  # chi2(kept - 1 <= 5 dof) at p = 0.001


def test_raw_confidence_is_the_unfiltered_probability():
  table = logit_table(n=3, b=8, v=12, seed=6)
  out = run_block(table, jax.random.key(7), 3, "entropy", top_p=0.8, conf="raw")
  step_of, _, _ = ref_denoise(table, 3, "entropy", top_p=0.8)
  np.testing.assert_array_equal(out.unmask_step, step_of)
  # m before step i of a row is 8 minus the positions unmasked earlier (the same for every row).
  m = 8 - np.array([0, 3, 6])[step_of]
  raw = np.exp(np.asarray(jax.nn.log_softmax(jnp.asarray(table), -1), np.float64))
  probs = raw[m, np.arange(3)[:, None], np.arange(8)]
  want = np.take_along_axis(probs, out.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.conf, want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The random order is unchanged
# ---------------------------------------------------------------------------------------------------
# Recorded from the sampler before the orders were added (same keys, tables and settings).
RANDOM_STUB_TOKENS = [[2, 1, 4, 3, 5, 3, 3, 5], [0, 1, 2, 1, 2, 1, 5, 1], [5, 2, 1, 0, 1, 5, 4, 1]]
RANDOM_STUB_STEPS = [[2, 2, 1, 1, 0, 0, 1, 0], [1, 2, 2, 2, 2, 1, 0, 1], [0, 2, 0, 0, 1, 0, 0, 1]]
RANDOM_DRAFT_TOKENS = [
  [22, 28, 1, 10, 15, 27, 7, 25, 22, 3, 2, 19, 18, 13, 7, 0],
  [26, 30, 22, 20, 3, 7, 25, 21, 9, 1, 15, 9, 22, 26, 3, 28],
  [27, 6, 17, 26, 1, 9, 18, 27, 24, 1, 15, 30, 4, 20, 24, 19],
]
RANDOM_DRAFT_STEPS = [
  [1, 1, 2, 1, 4, 3, 5, 3, 6, 6, 7, 6, 10, 11, 11, 11],
  [2, 1, 2, 0, 5, 4, 3, 4, 7, 8, 6, 8, 11, 11, 10, 11],
  [1, 1, 0, 1, 3, 3, 3, 5, 6, 8, 6, 7, 11, 9, 9, 10],
]


def test_random_order_is_bit_identical_to_the_recorded_sampler():
  table = (np.random.default_rng(0).normal(size=(3, 8, 6)) * 2).astype(np.float32)
  out = run_block(np.broadcast_to(table, (9, 3, 8, 6)), jax.random.key(11), 3, "random", top_p=0.9)
  np.testing.assert_array_equal(out.tokens, RANDOM_STUB_TOKENS)
  np.testing.assert_array_equal(out.unmask_step, RANDOM_STUB_STEPS)
  np.testing.assert_array_equal(out.nfe, [3, 3, 3])


VOCAB, MASK, L, B, N = 32, 31, 16, 4, 3


@pytest.fixture(scope="module")
def split_model():
  return split_tiny_masked_lm(VOCAB, MASK)


def test_random_draft_is_bit_identical_to_the_recorded_sampler(split_model):
  graphdef, state = split_model
  out = draft(graphdef, state, jax.random.key(4), N, L, DraftConfig(B, 3, top_p=0.9))
  np.testing.assert_array_equal(out.tokens, RANDOM_DRAFT_TOKENS)
  np.testing.assert_array_equal(out.unmask_step, RANDOM_DRAFT_STEPS)
  np.testing.assert_array_equal(out.nfe, [11, 12, 11])


# ---------------------------------------------------------------------------------------------------
# Through the model: cached = uncached, and the order reaches draft-then-revise
# ---------------------------------------------------------------------------------------------------
def test_threshold_draft_cached_equals_uncached(split_model):
  graphdef, state = split_model
  cfg = DraftConfig(B, 3, top_p=0.9, order="threshold", threshold=0.2)
  outs = [
    draft(graphdef, state, jax.random.key(4), N, L, dataclasses.replace(cfg, use_cache=c))
    for c in (True, False)
  ]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_array_equal(outs[0].unmask_step, outs[1].unmask_step)
  np.testing.assert_array_equal(outs[0].nfe, outs[1].nfe)
  tokens, step, nfe = (np.asarray(x) for x in (outs[0].tokens, outs[0].unmask_step, outs[0].nfe))
  assert not np.any(tokens == MASK)
  block_of = np.arange(L) // B
  assert np.all((step >= block_of * 3) & (step < (block_of + 1) * 3))
  # NFE = the steps at which a row's block still had masks (at least one per block).
  used = [len({(b, s) for b, s in zip(block_of, step[r], strict=True)}) for r in range(N)]
  np.testing.assert_array_equal(nfe, used)
  assert np.all(nfe >= L // B) and np.all(nfe <= 3 * L // B)


def test_confidence_draft_then_revise_uses_the_order_in_the_draft_only(split_model):
  graphdef, state = split_model
  key = jax.random.key(8)
  dcfg = DraftConfig(B, 3, top_p=0.9, order="confidence")
  cfg = SBDSamplerConfig(dcfg, (StageConfig(L, 0.25, 4, "snapshot"),))
  out = draft_then_revise(graphdef, state, key, N, L, cfg)
  alone = draft(graphdef, state, jax.random.fold_in(key, 0), N, L, dcfg)
  np.testing.assert_array_equal(out.draft_tokens, alone.tokens)
  # B = 4, S = 3: two, one and one position per block step, so every block costs 3 forwards.
  step = np.asarray(alone.unmask_step)
  counts = np.stack([(step == g).sum(1) for g in range(3 * L // B)], 1)
  np.testing.assert_array_equal(counts, np.tile([2, 1, 1], (N, L // B)))
  np.testing.assert_array_equal(out.nfe_per_stage[:, 0], [3 * L // B] * N)
  np.testing.assert_array_equal(out.remasked.sum(-1), [[round(0.25 * L)] * N])
  assert not np.any(np.asarray(out.tokens) == MASK)


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
def test_order_override_reaches_the_sampler_config():
  c = load_config_file("configs/sbd.py:size=test")
  assert sampler_config(c.sample, 32).draft.order == "random"
  apply_override(c, "sample.draft.order", "threshold")
  apply_override(c, "sample.draft.threshold", "0.75")
  d = sampler_config(c.sample, 32).draft
  assert (d.order, d.threshold) == ("threshold", 0.75)
  # A config saved before the fields existed samples with the random order.
  old = c.sample.to_dict()
  del old["draft"]["order"], old["draft"]["threshold"]
  assert sampler_config(ml_collections.ConfigDict(old), 32).draft.order == "random"


@pytest.mark.parametrize(
  "field, value, message",
  [
    (
      "order",
      "best",
      r"^sample.draft.order='best' is not supported; accepted: "
      r"\['random', 'confidence', 'margin', 'entropy', 'threshold'\]$",
    ),
    ("order", 3, r"^sample.draft.order=3 is not supported; accepted: \['random', "),
    ("threshold", 0.0, r"^sample.draft.threshold=0.0 must be a probability in \(0, 1\]$"),
    ("threshold", 1.5, r"^sample.draft.threshold=1.5 must be a probability in \(0, 1\]$"),
    ("threshold", "x", r"^sample.draft.threshold='x' must be a number$"),
    ("threshold", True, r"^sample.draft.threshold=True must be a number$"),
  ],
)
def test_bad_order_or_threshold_is_a_one_line_config_error(field, value, message):
  sample = load_config_file("configs/sbd.py:size=test").sample.to_dict()
  sample["draft"][field] = value  # as a hand-edited config.json would hold it
  with pytest.raises(ConfigError, match=message):
    sampler_config(ml_collections.ConfigDict(sample), 32)
