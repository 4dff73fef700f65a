"""The held-out post-hoc remask score ("posthoc_heldout"): split, scores, remasking, NFE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import split_tiny_masked_lm

from lsd.nn import block_causal_mask
from lsd.sampling import (
  DraftConfig,
  SBDSamplerConfig,
  StageConfig,
  draft_then_revise,
  heldout_scores,
  heldout_split,
  remask,
)

VOCAB, MASK, L, B, N = 32, 31, 16, 4, 2
DRAFT = DraftConfig(B, 2, top_p=0.9)


@pytest.fixture(scope="module")
def split_model():
  return split_tiny_masked_lm(VOCAB, MASK)


def _canvas() -> tuple[np.ndarray, np.ndarray]:
  """A fixed [N, L] canvas of tokens and its valid (generated) positions: a 3-token prompt, fixed
  text in the middle and padding at the end, different per row."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, MASK, (N, L)).astype(np.int32)
  valid = np.ones((N, L), bool)
  valid[:, :3] = False
  valid[0, 7:9] = False
  valid[1, 13:] = False
  return tokens, valid


def _reference(model, tokens, held_sets, mask=None) -> np.ndarray:
  """float64 p(token_i) with the positions of each held set masked, one direct model call per set:
  the backbone's logits, [MASK] excluded, log-softmax in float64; +inf where nothing is held."""
  out = np.full(tokens.shape, np.inf)
  for held in held_sets:
    logits, _ = model.backbone(jnp.asarray(np.where(held, MASK, tokens)), mask=mask)
    z = np.asarray(logits, np.float64)
    z[..., MASK] = -np.inf
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0])
    out = np.where(held, p, out)
  return out


@pytest.mark.parametrize("splits", [1, 3, 5, 40])
def test_split_deals_every_generated_position_exactly_once(splits):
  _, valid = _canvas()
  split = np.asarray(heldout_split(jax.random.key(3), jnp.asarray(valid), splits))
  np.testing.assert_array_equal(split < 0, ~valid)  # fixed positions are in no subset
  assert split.max() < splits
  for row, v in zip(split, valid, strict=True):
    counts = np.bincount(row[v], minlength=splits)
    assert counts.sum() == v.sum() and counts.max() - counts.min() <= 1  # near-equal sizes
  other = np.asarray(heldout_split(jax.random.key(4), jnp.asarray(valid), splits))
  if 1 < splits < valid.sum(-1).min():
    assert not np.array_equal(split, other)  # the split depends on the key


@pytest.mark.parametrize("windowed", [False, True])
def test_scores_equal_a_float64_reference_of_the_masked_forwards(split_model, windowed):
  graphdef, state = split_model
  model = nnx.merge(graphdef, state)
  tokens, valid = _canvas()
  k = 3
  mask = block_causal_mask(L, 8, 4) if windowed else None
  split = heldout_split(jax.random.key(5), jnp.asarray(valid), k)
  got = jax.jit(lambda t, s: heldout_scores(model, t, s, k, mask))(jnp.asarray(tokens), split)
  split = np.asarray(split)
  ref = _reference(model, tokens, [split == j for j in range(k)], mask)
  got = np.asarray(got)
  assert np.all(np.isinf(got[~valid])) and np.all(np.isfinite(got[valid]))
  np.testing.assert_allclose(got[valid], ref[valid], rtol=2e-5, atol=0)
  # A held-out score is not the visible-position read-out ("posthoc").
  logp, _ = model(jnp.asarray(tokens), subs=False)
  visible = np.exp(np.take_along_axis(np.asarray(logp), tokens[..., None], -1)[..., 0])
  assert not np.allclose(got[valid], visible[valid], rtol=1e-3)


def test_one_position_per_forward_is_masking_each_position_alone(split_model):
  graphdef, state = split_model
  model = nnx.merge(graphdef, state)
  tokens, valid = _canvas()
  k = int(valid.sum(-1).max())  # every subset of the fuller row holds one position
  split = heldout_split(jax.random.key(6), jnp.asarray(valid), k)
  got = np.asarray(heldout_scores(model, jnp.asarray(tokens), split, k))
  alone = []
  for i in range(L):
    held = np.zeros((N, L), bool)
    held[:, i] = valid[:, i]
    alone.append(held)
  ref = _reference(model, tokens, alone)
  np.testing.assert_allclose(got[valid], ref[valid], rtol=2e-5, atol=0)


def test_stages_remask_the_lowest_heldout_scores_never_fixed_and_count_nfe(split_model):
  graphdef, state = split_model
  model = nnx.merge(graphdef, state)
  tokens, valid = _canvas()
  canvas = jnp.asarray(np.where(valid, MASK, tokens))  # generate the valid positions
  n_valid = valid.sum(-1)
  steps = 2
  stages = (
    StageConfig(L, 0.5, steps, "posthoc_heldout", heldout_splits=3),
    StageConfig(8, 1.0, steps, "posthoc_heldout", heldout_splits=int(n_valid.max())),
  )
  key = jax.random.key(7)
  cfg = SBDSamplerConfig(DRAFT, stages)
  out = draft_then_revise(graphdef, state, key, N, L, cfg, canvas=canvas)
  remasked, nfe, fixed = map(np.asarray, (out.remasked, out.nfe_per_stage, out.fixed))
  np.testing.assert_array_equal(fixed, ~valid)
  assert not remasked[:, fixed].any()  # fixed positions are never remasked
  np.testing.assert_array_equal(np.asarray(out.tokens)[fixed], tokens[fixed])
  # Stage 0 remasks the lowest round(gamma * n) held-out scores, split with the stage's score key.
  score_key = jax.random.fold_in(jax.random.fold_in(key, 1), 0)
  split = heldout_split(score_key, jnp.asarray(valid), 3)
  scores = heldout_scores(model, out.draft_tokens, split, 3)
  _, expected = remask(out.draft_tokens, scores, 0.5, MASK, jnp.asarray(valid))
  np.testing.assert_array_equal(remasked[0], expected)
  np.testing.assert_array_equal(remasked[0].sum(-1), np.round(0.5 * n_valid))
  # gamma = 1 remasks every generated position and nothing else.
  np.testing.assert_array_equal(remasked[1], valid)
  # NFE: the k scoring forwards, then `steps` forwards per revised block with masks.
  assert np.all((nfe[:, 1] >= 3 + 1) & (nfe[:, 1] <= 3 + steps))
  assert np.all((nfe[:, 2] >= n_valid.max() + 2) & (nfe[:, 2] <= n_valid.max() + 2 * steps))


def test_a_windowed_stage_scores_under_the_windowed_mask(split_model):
  graphdef, state = split_model
  model = nnx.merge(graphdef, state)
  draft = DraftConfig(B, 2, top_p=0.9, window=8)
  stage = StageConfig(8, 0.5, 1, "posthoc_heldout", heldout_splits=2)
  key = jax.random.key(8)
  out = draft_then_revise(graphdef, state, key, N, L, SBDSamplerConfig(draft, (stage,)))
  valid = jnp.ones((N, L), bool)
  split = heldout_split(jax.random.fold_in(jax.random.fold_in(key, 1), 0), valid, 2)
  mask = block_causal_mask(L, 8, 8)
  scores = heldout_scores(model, out.draft_tokens, split, 2, mask)
  _, expected = remask(out.draft_tokens, scores, 0.5, MASK, valid)
  np.testing.assert_array_equal(out.remasked[0], expected)
  assert np.all(np.asarray(out.nfe_per_stage[:, 1]) == 2 + 2)  # 2 scoring + 1 step per block


@pytest.mark.parametrize(
  ("stage", "match"),
  [
    (StageConfig(8, 0.5, 2, "posthoc_heldout", heldout_splits=0), r"stages\[1\]\.heldout_splits=0"),
    (StageConfig(8, 0.5, 2, "posthoc_heldout", heldout_splits=2.0), r"stages\[1\]\.heldout_splits"),
    (StageConfig(8, 0.5, 2, "heldout"), r"stages\[1\]\.score='heldout'.*posthoc_heldout"),
  ],
)
def test_validation_names_the_field(stage, match):
  with pytest.raises(ValueError, match=match):
    stage.validate(L, "stages[1]")
  StageConfig(8, 0.5, 2, "posthoc_heldout", heldout_splits=1).validate(L, "stages[1]")
