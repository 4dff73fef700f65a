"""Generation past the trained context: a sliding window of W tokens before each block, a KV cache
of W slots that drops its oldest block before a commit ("commit and shift"), and SBD's
`max_new_tokens` past data.seq_len."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from tiny import WordTok, split_tiny_masked_lm, tiny_sbd_task

from lsd.config import ConfigError
from lsd.models.masked_lm import MaskedLM
from lsd.nn import KVCache, TransformerConfig, block_causal_mask
from lsd.nn.attention import dot_product_attention
from lsd.sampling import DraftConfig, SBDSamplerConfig, StageConfig, draft, draft_then_revise

VOCAB, MASK, B = 32, 31, 4
TRAIN = 16  # the "trained" length: window W = TRAIN - B
W = TRAIN - B
L = 4 * TRAIN
DRAFT = DraftConfig(B, 3, top_p=0.9, window=W)
# Posthoc and snapshot stages under the window, the second of the longest block it allows.
STAGES = (StageConfig(8, 0.5, 2, "posthoc"), StageConfig(W + B, 0.25, 2, "snapshot"))
M = MASK


@pytest.fixture(scope="module")
def split_model():
  return split_tiny_masked_lm(VOCAB, MASK)


# ---------------------------------------------------------------------------------------------------
# Building blocks: the cache shift and the windowed mask
# ---------------------------------------------------------------------------------------------------
def test_kv_cache_drop_oldest_matches_numpy():
  rng = np.random.default_rng(0)
  k, v = rng.normal(size=(2, 2, 3, 8, 5)), rng.normal(size=(2, 2, 3, 8, 5))
  cache = KVCache(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), jnp.asarray(6))
  for n in (0, 2, 4):
    out = cache.drop_oldest(n)
    for got, ref in ((out.k, k), (out.v, v)):
      want = np.concatenate([ref[:, :, :, n:], np.zeros_like(ref[:, :, :, :n])], axis=3)
      np.testing.assert_array_equal(np.asarray(got), want.astype(np.float32))
    assert out.size == 8 and int(out.length) == 6 - n
  assert int(cache.drop_oldest(7).length) == 0  # never below 0
  # Traced inside jit (the draft's commit and shift), the shape does not change.
  shifted = jax.jit(lambda c: c.drop_oldest(2).append([(jnp.ones((2, 1, 3, 5)),) * 2] * 2))(cache)
  assert shifted.k.shape == cache.k.shape and int(shifted.length) == 5
  np.testing.assert_array_equal(np.asarray(shifted.k[:, :, :, :4]), k[:, :, :, 2:6].astype("f4"))
  np.testing.assert_array_equal(np.asarray(shifted.k[:, :, :, 4]), np.ones((2, 2, 3, 5)))


def windowed_mask_reference(length: int, block: int, window: int) -> np.ndarray:
  """Query q sees key k iff k's block is at most q's and k is one of the `window` tokens before
  q's block or in it (window 0: every earlier block)."""
  m = np.zeros((length, length), bool)
  for q in range(length):
    start = (q // block) * block
    for k in range(length):
      m[q, k] = k // block <= q // block and (not window or k >= start - window)
  return m


@pytest.mark.parametrize("length,block,window", [(16, 4, 0), (16, 4, 8), (24, 4, 4), (24, 8, 12)])
def test_windowed_block_causal_mask_and_attention_against_a_float64_reference(
  length, block, window
):
  mask = np.asarray(block_causal_mask(length, block, window))
  ref = windowed_mask_reference(length, block, window)
  np.testing.assert_array_equal(mask, ref)
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(1, length, 2, 8)) for _ in range(3))
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
  logits = np.where(ref[None, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)
  got = dot_product_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), mask=mask)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_window_must_be_a_multiple_of_the_block_and_stages_fit_it():
  for bad in (-4, 6):
    with pytest.raises(ValueError, match=r"^draft\.window=.*multiple of draft\.block_size=4"):
      DraftConfig(B, 3, window=bad).validate(L)
  cfg = SBDSamplerConfig(DRAFT, (StageConfig(32, 0.5, 2),))
  with pytest.raises(ValueError, match=r"stages\[0\]\.block_size=32 must be <= .*=16"):
    cfg.validate(L)


# ---------------------------------------------------------------------------------------------------
# The windowed draft and revision
# ---------------------------------------------------------------------------------------------------
# Prompts of 4 (a block boundary), 3 and 6 tokens; the rest generated, 4x the trained length.
ROWS = [[5, 6, 7, 8], [5, 6, 7], [9, 10, 11, 12, 13, 14]]
CANVAS = jnp.asarray([r + [M] * (L - len(r)) for r in ROWS], jnp.int32)


def with_draft(cfg: SBDSamplerConfig, **kw) -> SBDSamplerConfig:
  return dataclasses.replace(cfg, draft=dataclasses.replace(cfg.draft, **kw))


@pytest.fixture(scope="module")
def long_outputs(split_model):
  """Cached and uncached draft-then-revise at 4x the trained length, the same key."""
  graphdef, state = split_model
  cfg = SBDSamplerConfig(DRAFT, STAGES)
  return [
    draft_then_revise(
      graphdef, state, jax.random.key(3), 3, L, with_draft(cfg, use_cache=c), canvas=CANVAS
    )
    for c in (True, False)
  ]


def test_windowed_cached_equals_uncached_at_four_times_the_trained_length(long_outputs):
  cached, plain = long_outputs
  np.testing.assert_array_equal(cached.draft_tokens, plain.draft_tokens)
  np.testing.assert_array_equal(cached.stage_tokens, plain.stage_tokens)
  np.testing.assert_array_equal(cached.tokens, plain.tokens)
  np.testing.assert_array_equal(cached.nfe_per_stage, plain.nfe_per_stage)
  np.testing.assert_allclose(cached.conf, plain.conf, rtol=1e-5)
  tokens = np.asarray(cached.tokens)
  assert tokens.shape == (3, L) and not np.any(tokens == MASK)
  for r, row in enumerate(ROWS):
    np.testing.assert_array_equal(tokens[r, : len(row)], row)
  assert int(cached.commit_forwards) == L // B  # one commit per block, through the window


def test_the_window_changes_the_draft(split_model, long_outputs):
  graphdef, state = split_model
  cfg = SBDSamplerConfig(with_draft(SBDSamplerConfig(DRAFT), window=0).draft, STAGES)
  full = draft_then_revise(graphdef, state, jax.random.key(3), 3, L, cfg, canvas=CANVAS)
  # The first blocks see all their past either way; later blocks see less under the window.
  d, d_full = np.asarray(long_outputs[0].draft_tokens), np.asarray(full.draft_tokens)
  np.testing.assert_array_equal(d[:, : W + B], d_full[:, : W + B])
  assert np.any(d != d_full)


def test_windowed_prefix_cached_equals_uncached(split_model):
  graphdef, state = split_model
  prefix = jnp.tile(jnp.arange(8, dtype=jnp.int32)[None] + 5, (2, 1))
  cached, plain = (
    draft(graphdef, state, jax.random.key(4), 2, L, dataclasses.replace(DRAFT, use_cache=c), prefix)
    for c in (True, False)
  )
  np.testing.assert_array_equal(cached.tokens, plain.tokens)
  np.testing.assert_array_equal(cached.unmask_step, plain.unmask_step)
  np.testing.assert_array_equal(np.asarray(cached.tokens)[:, :8], np.asarray(prefix))
  assert int(cached.commit_forwards) == L // B


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_window_of_at_least_the_canvas_is_the_unwindowed_draft(split_model, use_cache):
  graphdef, state = split_model
  length = 2 * TRAIN
  canvas = CANVAS[:, :length]
  outs = [
    draft(
      graphdef,
      state,
      jax.random.key(7),
      3,
      length,
      dataclasses.replace(DRAFT, use_cache=use_cache, window=w),
      canvas=canvas,
    )
    for w in (0, length - B, length)  # L - B never drops a block that a later block reads
  ]
  for out in outs[1:]:
    np.testing.assert_array_equal(out.tokens, outs[0].tokens)
    np.testing.assert_array_equal(out.unmask_step, outs[0].unmask_step)
    np.testing.assert_array_equal(out.nfe, outs[0].nfe)


def test_learned_positions_cannot_go_past_their_table():
  cfg = TransformerConfig(
    vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, rope_base=0.0, learned_pos=TRAIN
  )
  graphdef, state = nnx.split(MaskedLM(cfg, MASK, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"model\.learned_pos=16.*cannot generate past 16"):
    draft(graphdef, state, jax.random.key(0), 1, 2 * TRAIN, DRAFT)


# ---------------------------------------------------------------------------------------------------
# SBD: max_new_tokens past data.seq_len (the test config trains on 32 tokens)
# ---------------------------------------------------------------------------------------------------


SEQ = 32


def test_generate_four_times_the_training_length_with_eos_stopping():
  task, model = tiny_sbd_task(WordTok(), stages=[], max_new_tokens=4 * SEQ)
  assert task.config.data.seq_len == SEQ
  assert task.sampler_config(4 * SEQ).draft.window == SEQ - 4  # auto window
  tok = WordTok()
  inputs = [{"prompt": "the cat"}, {"prompt": "a big red dog sat on the log"}, {"prompt": "a"}]
  key = jax.random.key(0)
  free = task.generate(model, key, inputs, stop_at_eos=False)
  stop = task.generate(model, key, inputs, stop_at_eos=True)
  ended = 0
  for x, f, s in zip(inputs, free, stop, strict=True):
    given = [tok.bos_id, *tok.encode(x["prompt"])]
    canvas = f["draft_tokens"]  # no stages: the draft is the output, before the cut at EOS
    assert len(canvas) == len(given) + 4 * SEQ and len(f["conf"]) == len(canvas)
    assert canvas[: len(given)] == given and tok.mask_id not in canvas
    # Stopping: the same draft up to the first generated EOS, then padding; both cut at it.
    eos = [j for j, t in enumerate(canvas) if j >= len(given) and t == tok.eos_id]
    end = eos[0] if eos else len(canvas)
    assert f["tokens"] == canvas[:end] and s["tokens"] == canvas[:end]
    assert (
      len(s["draft_tokens"]) == len(canvas) and s["draft_tokens"][: end + 1] == canvas[: end + 1]
    )
    assert set(s["draft_tokens"][end + 1 :]) <= {tok.pad_id}
    ended += bool(eos)
  assert ended >= 1  # EOS stopping was exercised
  # Unconditional samples of max_new_tokens, with the default (windowed) revision stage.
  task, model = tiny_sbd_task(WordTok(), max_new_tokens=4 * SEQ + 2)
  rows = task.sample_text(model, jax.random.key(1), 2)
  assert [len(r["tokens"]) for r in rows] == [4 * SEQ + 2] * 2
  assert all(tok.mask_id not in r["tokens"] for r in rows)


def test_a_learned_position_model_past_its_table_is_a_clear_error():
  from lsd.config import load_config_file
  from lsd.methods import get_task

  c = load_config_file("configs/sbd.py:size=test")
  c.model.rope_base, c.model.learned_pos = 0.0, SEQ
  c.sample.max_new_tokens = 2 * SEQ
  task = get_task(c)
  task.tokenizer = WordTok()
  model = task.build_model(nnx.Rngs(0))
  with pytest.raises(ConfigError, match=r"model\.learned_pos=32.*at most 32 tokens"):
    task.sample_text(model, jax.random.key(0), 1)
  with pytest.raises(ConfigError, match=r"model\.learned_pos=32"):
    task.generate(model, jax.random.key(0), [{"prompt": "the cat"}])


def test_bad_window_and_max_new_tokens_are_clear_errors():
  from lsd.methods.sbd import sampler_config

  task, model = tiny_sbd_task(WordTok())

  def sample(**kw):
    return ml_collections.ConfigDict({**task.config.sample.to_dict(), **kw})

  for bad in (-4, 6, 32, 64, True, "8", 4.0):
    with pytest.raises(ConfigError, match=r"^sample\.window=.* must be 0 \(auto\) or a positive"):
      sampler_config(sample(window=bad), 4 * SEQ, SEQ)
  for bad in (-1, 2.5, "many", True):
    with pytest.raises(ConfigError, match=r"^sample\.max_new_tokens=.* must be an int >= 0"):
      task.max_new_tokens(bad)
  with pytest.raises(ConfigError, match=r"^generate: max_new_tokens=-2 must be an int >= 0"):
    task.generate(model, jax.random.key(0), [{"prompt": "the"}], max_new_tokens=-2)
  # Through the task's validation (what `lsd sample --config.sample.window=6` runs).
  bad_task, _ = tiny_sbd_task(WordTok(), window=6, max_new_tokens=4 * SEQ)
  with pytest.raises(ConfigError, match=r"^sample\.window=6 must be .*block_size=4 at most .*=28"):
    bad_task.validate()
  # A draft block of data.seq_len leaves no room for a window.
  draft = {**task.config.sample.draft.to_dict(), "block_size": SEQ}
  with pytest.raises(ConfigError, match=r"needs draft\.block_size < data\.seq_len"):
    sampler_config(sample(draft=draft, stages=[]), 4 * SEQ, SEQ)
  # An explicit stage block longer than window + draft block is refused; 0 is the longest fitting.
  with pytest.raises(ConfigError, match=r"^sample\.stages\[0\]\.block_size=64 must be <= .*=32"):
    sampler_config(sample(stages=[[64, 0.5, 2]]), 4 * SEQ, SEQ)
  assert sampler_config(sample(stages=[[0, 0.5, 2]]), 4 * SEQ, SEQ).stages[0].block_size == SEQ
  assert sampler_config(sample(stages=[[0, 0.5, 2]]), 132, SEQ).stages[0].block_size == 22
  # Within data.seq_len nothing changes: no window, a global stage of the whole canvas.
  cfg = sampler_config(sample(stages=[[0, 0.5, 2]]), SEQ, SEQ)
  assert cfg.draft.window == 0 and cfg.stages[0].block_size == SEQ
