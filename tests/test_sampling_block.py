"""Categorical sampling, the stage-1 block draft, remasking and draft-then-revise (SBD)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsd.models.masked_lm import MaskedLM
from lsd.nn import TransformerConfig, block_causal_mask
from lsd.sampling import (
  DraftConfig,
  SBDSamplerConfig,
  StageConfig,
  draft,
  draft_then_revise,
  mdlm_sample,
  nucleus_log_probs,
  posthoc_scores,
  remask,
  sample_categorical,
)
from lsd.sampling.categorical import first_argmax, log_exponential, random_words

VOCAB, MASK, L, B, N = 32, 31, 16, 4, 3
# One draft setting shared by the tests, so its program compiles once (XLA:CPU compiles are slow).
DRAFT = DraftConfig(B, 3, top_p=0.9)


@pytest.fixture(scope="module")
def split_model():
  cfg = TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2)
  build = lambda: MaskedLM(cfg, MASK, rngs=nnx.Rngs(0))  # noqa: E731
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  return graphdef, jax.jit(lambda: nnx.state(build()))()  # one compile instead of eager init ops


@pytest.fixture(scope="module")
def prefixed_drafts(split_model):
  """(prefix [N, 4], cached draft, uncached draft) with the same key: one compile of each path."""
  graphdef, state = split_model
  prefix = jnp.tile(jnp.arange(4, dtype=jnp.int32)[None] + 5, (N, 1))
  outs = [
    draft(graphdef, state, jax.random.key(4), N, L, dataclasses.replace(DRAFT, use_cache=c), prefix)
    for c in (True, False)
  ]
  return prefix, *outs


# ---------------------------------------------------------------------------------------------------
# Categorical sampling
# ---------------------------------------------------------------------------------------------------
def naive_gumbel_sample(key, log_probs):
  """What `jax.random.categorical` does: fp32 Gumbel noise from a 23-bit uniform."""
  u = jax.random.uniform(key, log_probs.shape, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
  return jnp.argmax(log_probs - jnp.log(-jnp.log(u)), axis=-1)


def tail_log_probs(n_tail: int, ratio: float) -> jax.Array:
  """Token 0 holds almost all the mass; n_tail tokens each have `ratio` times its probability."""
  logits = jnp.concatenate([jnp.zeros(1), jnp.full(n_tail, np.log(ratio))]).astype(jnp.float32)
  return jax.nn.log_softmax(logits)


def count_tail(sampler, key, log_probs, chunks: int, rows: int) -> int:
  """Number of draws (chunks x rows, one jitted lax.map) that did not pick token 0."""

  @jax.jit
  def run(key):
    def chunk(k):
      draws = sampler(k, jnp.broadcast_to(log_probs, (rows, log_probs.shape[-1])))
      return jnp.sum(draws != 0)

    return jnp.sum(jax.lax.map(chunk, jax.random.split(key, chunks)))

  return int(run(key))


def ours(key, log_probs):
  return sample_categorical(key, log_probs)[0]


def test_exponential_noise_cdf_is_exact_deep_in_the_tail():
  # P(E < x) of our noise, counted exactly over all 2^64 bit patterns: log E is monotone in
  # m = hi * 2^32 + lo for u < 2^-8, so a binary search finds how many patterns fall below x.
  xs = np.logspace(-16, -3, 14)
  thresholds = np.log(xs).astype(np.float32)
  f = jax.jit(log_exponential)
  lo = np.zeros(xs.size, np.uint64)
  hi = np.full(xs.size, np.uint64(2**56))
  for _ in range(56):
    mid = lo + (hi - lo) // np.uint64(2)
    words = (
      (mid >> np.uint64(32)).astype(np.uint32),
      (mid & np.uint64(0xFFFFFFFF)).astype(np.uint32),
    )
    below = np.asarray(f(*words)) < thresholds
    lo = np.where(below, mid + np.uint64(1), lo)
    hi = np.where(below, hi, mid)
  count = lo.astype(np.float64)
  cdf = count / 2.0**64
  expected = -np.expm1(-np.exp(thresholds.astype(np.float64)))
  np.testing.assert_array_less(np.abs(cdf / expected - 1), 1e-5 + 2 / count)
  # The fp32 Gumbel noise of the naive sampler has a hard ceiling: its largest possible value is
  # below -log(4e-8), so a token at ratio 4e-8 to the top one needs luck on both noises to win,
  # whereas ours reaches -log E ~ 44 (checked above down to E = 1e-16).
  u_max = jnp.float32(1.0) - jnp.float32(2.0**-23)
  assert float(-jnp.log(-jnp.log(u_max))) < 16.0 < -np.log(4e-8)


@pytest.mark.parametrize("n", [1, 7, 4096, 100_003])
def test_random_words_are_jax_random_bits(n):
  # The unrolled threefry gives jax's own words: samples do not change with it.
  keys = [jax.random.key(0), jax.random.fold_in(jax.random.key(3), 99), jax.random.PRNGKey(5)]
  for key in keys:
    want = np.asarray(jax.random.bits(key, (n,), jnp.uint32))
    np.testing.assert_array_equal(jax.jit(random_words, static_argnums=1)(key, n), want)
  rbg = jax.random.key(1, impl="rbg")  # another generator: jax's own path
  np.testing.assert_array_equal(random_words(rbg, n), jax.random.bits(rbg, (n,), jnp.uint32))


def test_first_argmax_is_argmax_with_ties_and_infinities():
  r = np.random.default_rng(0)
  x = r.integers(0, 4, (50, 9)).astype(np.float32)  # many ties: argmax takes the first
  x[3] = -np.inf  # an all -inf row: index 0, as argmax
  x[4, 5] = np.inf
  np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), np.argmax(x, -1))
  y = r.normal(size=(2, 3, 4100)).astype(np.float32)
  np.testing.assert_array_equal(jax.jit(first_argmax)(jnp.asarray(y)), np.argmax(y, -1))


def test_rare_tail_frequency_affordable_scale():
  # 1000 tail tokens at ratio 5e-6: tail mass 5e-3, 20k draws -> ~100 expected. The ratio-4e-8
  # tail needs 2.5e9 noise values (the slow test below); the exact CDF test covers it by default.
  logp = tail_log_probs(1000, 5e-6)
  draws = 10 * 2000
  p_tail = 1 - float(jnp.exp(logp[0]))
  hits = count_tail(ours, jax.random.key(0), logp, 10, 2000)
  mean, sd = draws * p_tail, np.sqrt(draws * p_tail * (1 - p_tail))
  assert abs(hits - mean) < 4 * sd, (hits, mean, sd)


@pytest.mark.slow
def test_rare_tail_frequency_at_ratio_4e8_and_naive_gumbel_misses_it():
  # The brief's setting: 10,000 tokens at ratio 4e-8 (tail mass ~4e-4), 250k draws (~100 hits).
  # 2.5e9 noise values: minutes on a CPU, hence slow.
  logp = tail_log_probs(10_000, 4e-8)
  draws, p_tail = 250 * 1000, 1 - float(jnp.exp(logp[0]))
  mean, sd = draws * p_tail, np.sqrt(draws * p_tail)
  hits = count_tail(ours, jax.random.key(1), logp, 250, 1000)
  naive = count_tail(naive_gumbel_sample, jax.random.key(1), logp, 250, 1000)
  assert abs(hits - mean) < 4 * sd, (hits, mean, sd)
  assert naive < mean - 4 * sd, (naive, mean, sd)


jit_sample = jax.jit(sample_categorical, static_argnames=("top_p", "temperature", "confidence"))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
  expected = counts.sum() * probs
  return float(np.sum((counts - expected) ** 2 / expected))


def test_small_distribution_frequencies_and_temperature():
  probs = np.array([0.03, 0.5, 0.07, 0.25, 0.15])
  logp = jnp.log(jnp.asarray(probs, jnp.float32))
  rows = jnp.broadcast_to(logp, (40_000, probs.size))
  for temperature in (1.0, 0.5):
    tok, prob = jit_sample(jax.random.key(2), rows, temperature=temperature)
    target = probs ** (1 / temperature) / np.sum(probs ** (1 / temperature))
    counts = np.bincount(np.asarray(tok), minlength=probs.size)
    assert chi_square(counts, target) < 18.47  # chi2(4 dof) at p = 0.001
    np.testing.assert_allclose(np.asarray(prob), target[np.asarray(tok)], rtol=1e-5)


def test_top_p_excludes_tail_and_reports_filtered_or_raw_probability():
  probs = np.array([0.06, 0.3, 0.04, 0.4, 0.2])  # nucleus 0.8 = {0.4, 0.3, 0.2}
  logp = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (20_000, probs.size))
  key = jax.random.key(3)
  tok, filt = jit_sample(key, logp, top_p=0.8)
  tok_raw, raw = jit_sample(key, logp, top_p=0.8, confidence="raw")
  tok, tok_raw = np.asarray(tok), np.asarray(tok_raw)
  np.testing.assert_array_equal(tok, tok_raw)
  counts = np.bincount(tok, minlength=probs.size)
  assert counts[0] == counts[2] == 0
  kept = np.array([1, 3, 4])
  assert chi_square(counts[kept], probs[kept] / 0.9) < 13.82  # chi2(2 dof) at p = 0.001
  np.testing.assert_allclose(np.asarray(filt), probs[tok] / 0.9, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(raw), probs[tok], rtol=1e-5)
  # Tokens tied at the nucleus boundary are all kept.
  tied = jnp.log(jnp.array([0.2, 0.4, 0.2, 0.2]))
  assert np.all(np.isfinite(np.asarray(nucleus_log_probs(tied, 0.5))))


@pytest.mark.parametrize("cap", [3, 16])  # 3: the gathered path; 16 = B: all positions
def test_sampling_only_unmasking_positions_keeps_the_distribution(cap):
  from lsd.sampling.block import _sample_unmasking

  n, b = 4000, 16
  probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.05, 0.05, 0.9]])
  pos_dist = np.arange(b) % 3  # position i draws from probs[i % 3]
  logp = jnp.broadcast_to(jnp.log(jnp.asarray(probs[pos_dist], jnp.float32)), (n, b, 3))
  rng = np.random.default_rng(0)
  unmask = np.zeros((n, b), bool)
  for r in range(n):  # 1 to 3 unmasking positions per row, anywhere in the block
    unmask[r, rng.choice(b, rng.integers(1, 4), replace=False)] = True
  fn = jax.jit(lambda k, lp, u: _sample_unmasking(k, lp, u, cap, top_p=1.0))
  tok, prob = map(np.asarray, fn(jax.random.key(0), logp, jnp.asarray(unmask)))
  for d in range(3):
    sel = unmask & (pos_dist == d)[None]
    counts = np.bincount(tok[sel], minlength=3)
    assert chi_square(counts, probs[d]) < 18.42  # chi2(2 dof) at p = 1e-4 (6 tests here)
    np.testing.assert_allclose(prob[sel], probs[d][tok[sel]], rtol=1e-5)
  # A row with more than `cap` unmasking positions sends the whole batch to the dense branch.
  unmask[0] = True
  tok, prob = map(np.asarray, fn(jax.random.key(0), logp, jnp.asarray(unmask)))
  np.testing.assert_allclose(prob[0], probs[pos_dist][np.arange(b), tok[0]], rtol=1e-5)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_nucleus_equals_the_sorted_cumulative_mass_rule(top_p):
  """The bisection picks exactly the set a descending sort + exclusive cumsum picks (float64 numpy
  reference), over peaked and flat rows, with ties (quantised logits) and -inf entries."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(300, 257)) * rng.choice([0.3, 2.0, 6.0], size=(300, 1))
  logits[:100] = np.round(logits[:100] * 2) / 2  # many exact ties
  logits[::7, :50] = -np.inf
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
  got = np.isfinite(np.asarray(nucleus_log_probs(logp, top_p)))
  probs = np.exp(np.asarray(logp, np.float64))
  for row, keep in zip(probs, got, strict=True):
    desc = np.sort(row)[::-1]
    exclusive = np.cumsum(desc) - desc
    threshold = desc[exclusive < top_p].min()
    want = row >= threshold
    # fp32 vs fp64 sums may disagree only for a token whose exclusive mass is within 1e-5 of top_p
    near = np.abs(np.sum(np.where(row > row[:, None], row, 0.0), -1) - top_p) < 1e-5
    assert np.array_equal(keep[~near], want[~near])


# ---------------------------------------------------------------------------------------------------
# Stage-1 draft
# ---------------------------------------------------------------------------------------------------
def test_cached_and_uncached_drafts_are_identical(prefixed_drafts):
  prefix, cached, plain = prefixed_drafts
  p = prefix.shape[1]
  np.testing.assert_array_equal(cached.tokens, plain.tokens)
  np.testing.assert_array_equal(cached.unmask_step, plain.unmask_step)
  np.testing.assert_array_equal(cached.nfe, plain.nfe)
  np.testing.assert_allclose(cached.conf, plain.conf, rtol=1e-5)
  blocks, steps = (L - p) // B, DRAFT.steps_per_block
  assert int(cached.commit_forwards) == blocks + 1 and int(plain.commit_forwards) == 0
  tokens, conf, step = map(np.asarray, (cached.tokens, cached.conf, cached.unmask_step))
  assert not np.any(tokens == MASK)
  np.testing.assert_array_equal(tokens[:, :p], np.asarray(prefix))
  assert np.all(np.isinf(conf[:, :p])) and np.all(step[:, :p] == -1)
  assert np.all((conf[:, p:] > 0) & (conf[:, p:] <= 1))
  # Each token is unmasked during its own block's steps; NFE counts steps with masks left.
  block_of = np.arange(p, L) // B
  assert np.all((step[:, p:] >= block_of * steps) & (step[:, p:] < (block_of + 1) * steps))
  assert np.all((np.asarray(cached.nfe) >= blocks) & (np.asarray(cached.nfe) <= steps * blocks))


def test_segment_ends_grow_geometrically_and_skip_small_caches():
  from lsd.sampling.block import segment_ends

  assert segment_ends(0, 256, 4, 4) == [32, 64, 128, 256]  # L = 1024: caches 128 ... 1024 slots
  assert segment_ends(0, 32, 4, 4) == [32]  # L = 128: one fixed cache
  assert segment_ends(0, 64, 4, 4) == [32, 64]  # the 64- and 32-slot caches merged away
  assert segment_ends(40, 256, 4, 4) == [64, 128, 256]  # a prompt past the first end
  assert segment_ends(0, 256, 4, 1) == [256]


def test_growing_cache_segments_give_the_same_draft(split_model, prefixed_drafts, monkeypatch):
  import lsd.sampling.block as block

  graphdef, state = split_model
  prefix, _, plain = prefixed_drafts
  monkeypatch.setattr(block, "MIN_SEGMENT", B)  # L = 16 splits into caches of 8 and 16 slots
  assert block.segment_ends(1, L // B, B, 4) == [2, 4]
  # A fresh jit (not `draft`'s cache) so the patched MIN_SEGMENT is traced.
  fn = jax.jit(lambda st, k, p: block.draft_blocks(nnx.merge(graphdef, st), k, N, L, DRAFT, p))
  seg = fn(state, jax.random.key(4), prefix)
  np.testing.assert_array_equal(seg.tokens, plain.tokens)
  np.testing.assert_array_equal(seg.unmask_step, plain.unmask_step)
  np.testing.assert_allclose(seg.conf, plain.conf, rtol=1e-5)
  assert int(seg.commit_forwards) == (L - prefix.shape[1]) // B + 1


def test_snapshot_confidence_is_the_probability_at_the_unmask_step(split_model, prefixed_drafts):
  graphdef, state = split_model
  out, p = prefixed_drafts[1], prefixed_drafts[0].shape[1]

  @jax.jit
  def replay(state, tokens, step):
    # The canvas before global step g holds exactly the tokens unmasked at steps < g; the
    # uncached block-causal forward of it is the model's view at that step.
    # The prompt (step -1) is always visible.
    g = jnp.arange(L // B * DRAFT.steps_per_block)[:, None, None]
    canvases = jnp.where(step[None] < g, tokens[None], MASK).reshape(-1, L)
    model = nnx.merge(graphdef, state)
    logp, _ = model(canvases, mask=block_causal_mask(L, B))
    logp = nucleus_log_probs(logp.reshape(g.shape[0], N, L, VOCAB), DRAFT.top_p)
    at_step = jnp.take_along_axis(logp, jnp.maximum(step, 0)[None, :, :, None], axis=0)[0]
    at_step = jnp.exp(jnp.take_along_axis(at_step, tokens[..., None], axis=-1)[..., 0])
    return at_step, posthoc_scores(model, tokens)

  expected, final_view = (x[:, p:] for x in replay(state, out.tokens, out.unmask_step))
  conf = np.asarray(out.conf)[:, p:]
  np.testing.assert_allclose(conf, expected, rtol=1e-4)
  # Not the copy-through probability (1) nor the model's later opinion of the finished canvas.
  assert np.all(conf < 0.5)
  assert not np.allclose(conf, final_view, rtol=1e-2)


# ---------------------------------------------------------------------------------------------------
# Remasking
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.25, 0.3, 1.0])
def test_remask_picks_the_lowest_scores_with_positional_ties(gamma):
  rng = np.random.default_rng(6)
  s = rng.integers(0, 4, (N, L)).astype(np.float32)  # many ties
  s[0, 3], s[1, :4], s[1, 4:8] = np.inf, 0.0, -0.0  # never drafted; signed zeros must tie
  tokens = np.arange(N * L, dtype=np.int32).reshape(N, L) % MASK
  jit_remask = jax.jit(remask, static_argnames=("gamma", "mask_id"))
  out, chosen = map(np.asarray, jit_remask(tokens, s, gamma=gamma, mask_id=MASK))
  assert np.all(chosen.sum(1) == round(gamma * L))
  np.testing.assert_array_equal(out, np.where(chosen, MASK, tokens))
  for row, c in zip(s, chosen, strict=True):
    assert c.all() or row[c].max() <= row[~c].min()
    if not c.all():  # among scores tied at the boundary, the lowest positions go first
      tied = np.flatnonzero(row == row[c].max())
      assert np.all(np.diff(c[tied].astype(int)) <= 0)
  # Valid positions only: a 4-token prompt is never remasked; k follows the valid count.
  valid = np.arange(L) >= 4
  chosen = np.asarray(jit_remask(tokens, s, gamma=gamma, mask_id=MASK, valid=valid)[1])
  assert not chosen[:, :4].any() and np.all(chosen.sum(1) == round(gamma * (L - 4)))
  for row, c in zip(s[:, 4:], chosen[:, 4:], strict=True):
    assert c.all() or row[c].max() <= row[~c].min()


# ---------------------------------------------------------------------------------------------------
# Draft then revise
# ---------------------------------------------------------------------------------------------------
def test_gamma_one_global_stage_equals_mdlm(split_model):
  graphdef, state = split_model
  key = jax.random.key(8)
  cfg = SBDSamplerConfig(DRAFT, (StageConfig(L, 1.0, 6),))
  out = draft_then_revise(graphdef, state, key, N, L, cfg)
  ref = mdlm_sample(graphdef, state, key, N, L, 6, top_p=DRAFT.top_p)
  assert np.all(out.remasked)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.conf, ref.conf)
  np.testing.assert_array_equal(out.nfe_per_stage[:, 1], ref.nfe_per_stage[:, 1])
  assert not np.any(np.asarray(ref.tokens) == MASK)


def test_gamma_zero_then_posthoc_random_and_snapshot_stages_with_a_prompt(split_model):
  # One program for several invariants (each sampler config is one slow XLA:CPU compile).
  graphdef, state = split_model
  p = 4
  prefix = jnp.tile(jnp.array([[1, 2, 3, 4]], jnp.int32), (N, 1))
  stages = (
    StageConfig(L, 0.0, 3),
    StageConfig(8, 0.5, 2, "posthoc"),
    StageConfig(L, 0.25, 2, "random"),
    StageConfig(L, 0.25, 3, "snapshot"),
  )
  cfg = SBDSamplerConfig(DRAFT, stages)
  out = draft_then_revise(graphdef, state, jax.random.key(9), N, L, cfg, prefix)
  staged, remasked, nfe = map(np.asarray, (out.stage_tokens, out.remasked, out.nfe_per_stage))
  draft_tokens = np.asarray(out.draft_tokens)
  # gamma = 0: the draft comes back unchanged, at no cost.
  np.testing.assert_array_equal(staged[0], draft_tokens)
  assert not remasked[0].any() and not nfe[:, 1].any()
  # Every stage remasks exactly round(gamma * 12) generated positions, never the prompt, and
  # changes nothing else; no masks survive.
  np.testing.assert_array_equal(remasked.sum(-1), [[0] * N, [6] * N, [3] * N, [3] * N])
  assert not remasked[:, :, :p].any() and not np.any(staged == MASK)
  before = np.concatenate([draft_tokens[None], staged[:-1]])
  np.testing.assert_array_equal(np.where(remasked, 0, staged), np.where(remasked, 0, before))
  np.testing.assert_array_equal(staged[-1], out.tokens)
  np.testing.assert_array_equal(staged[:, :, :p], np.broadcast_to(prefix, (4, N, p)))
  # Post-hoc remasks the lowest p(token | whole canvas); its scoring forward is counted.
  scores = posthoc_scores(nnx.merge(graphdef, state), out.draft_tokens)
  _, expected = remask(out.draft_tokens, scores, 0.5, MASK, jnp.arange(L) >= p)
  np.testing.assert_array_equal(remasked[1], expected)
  assert np.all((nfe[:, 2] >= 2) & (nfe[:, 2] <= 1 + 2 * 2)) and np.all(nfe[:, 3:] <= 3)
  # Revised tokens carry fresh snapshot confidences (the same `denoise_block` as the draft).
  conf = np.asarray(out.conf)[:, p:]
  assert np.all((conf > 0) & (conf <= 1))


def _walk(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _walk(inner)


def test_sampler_program_does_not_grow_with_steps_or_length(split_model):
  graphdef, state = split_model

  def program(steps: int, length: int) -> list[str]:
    cfg = SBDSamplerConfig(
      DraftConfig(B, steps),
      (StageConfig(8, 0.25, steps, "posthoc"), StageConfig(length, 0.5, steps)),
    )
    fn = lambda st, k: draft_then_revise(graphdef, st, k, 2, length, cfg)  # noqa: E731
    return [e.primitive.name for e in _walk(jax.make_jaxpr(fn)(state, jax.random.key(0)).jaxpr)]

  # Steps >= 8 keep every global stage in the sparse-sampling regime (one structural switch
  # at a static threshold, not growth), so the three programs must be the same size.
  small = program(8, L)
  assert "scan" in small or "while" in small
  assert "cond" in small  # the sparse / all-positions sampling switch
  assert len(small) == len(program(32, L)) == len(program(8, 2 * L))
