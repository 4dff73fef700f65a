"""SBD prompts, infilling and EOS-aware stopping: fixed positions survive the draft and every
revision stage, token for token; rows of a batch are independent."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import WORDS, WordTok, split_tiny_masked_lm, tiny_sbd_task

from lsd.config import ConfigError
from lsd.sampling import DraftConfig, SBDSamplerConfig, StageConfig, draft, draft_then_revise

VOCAB, MASK, L, B = 32, 31, 16, 4
# B = 4 with 3 steps and every stage below sample all positions of a block at once (no sparse /
# dense switch that depends on the whole batch), so each row's tokens depend on its own canvas only.
DRAFT = DraftConfig(B, 3, top_p=0.9)
STAGES = (
  StageConfig(8, 0.5, 2, "posthoc"),
  StageConfig(L, 0.25, 2, "random"),
  StageConfig(L, 0.5, 3, "snapshot"),
)
M = MASK


@pytest.fixture(scope="module")
def split_model():
  return split_tiny_masked_lm(VOCAB, MASK)


def canvas_of(rows):
  """Left-aligned rows: given tokens, M where to generate, padded with M to L."""
  return jnp.asarray([r + [M] * (L - len(r)) for r in rows], jnp.int32)


# Prompts of 4 (a block boundary), 3 and 6 tokens, and an infill row (text, span, text, span, text).
MIXED = canvas_of(
  [
    [5, 6, 7, 8],
    [5, 6, 7],
    [9, 10, 11, 12, 13, 14],
    [1, 2, M, M, M, 20, 21, 22, M, M, 23, 24, 25, 26, 27, 28],
  ]
)


@pytest.fixture(scope="module")
def mixed_outputs(split_model):
  graphdef, state = split_model
  cfg = SBDSamplerConfig(DRAFT, STAGES)
  key = jax.random.key(3)
  return [
    draft_then_revise(
      graphdef,
      state,
      key,
      4,
      L,
      dataclasses.replace(cfg, draft=dataclasses.replace(DRAFT, use_cache=c)),
      canvas=MIXED,
    )
    for c in (True, False)
  ]


def test_prompts_and_infill_text_unchanged_by_draft_and_every_stage(mixed_outputs):
  cached, plain = mixed_outputs
  canvas = np.asarray(MIXED)
  fixed = canvas != M
  np.testing.assert_array_equal(cached.fixed, fixed)
  # Cached and uncached drafts (and the stages after them) agree token for token.
  np.testing.assert_array_equal(cached.tokens, plain.tokens)
  np.testing.assert_array_equal(cached.stage_tokens, plain.stage_tokens)
  for out in (cached, plain):
    canvases = [np.asarray(out.draft_tokens), *np.asarray(out.stage_tokens)]
    for tokens in canvases:  # the draft, then each revision stage
      np.testing.assert_array_equal(tokens[fixed], canvas[fixed])
      assert not np.any(tokens == M)  # every generated position, the infill spans included
    remasked = np.asarray(out.remasked)
    assert not remasked[:, fixed].any()
    # Each stage remasks round(gamma * n) of the row's n generated positions, nothing else changes.
    n_gen = (~fixed).sum(1)
    for k, stage in enumerate(STAGES):
      np.testing.assert_array_equal(remasked[k].sum(1), np.round(stage.gamma * n_gen))
      before = canvases[k]
      np.testing.assert_array_equal(
        np.where(remasked[k], 0, canvases[k + 1]), np.where(remasked[k], 0, before)
      )
    conf = np.asarray(out.conf)
    assert np.all(np.isinf(conf[fixed])) and np.all((conf[~fixed] > 0) & (conf[~fixed] <= 1))


def test_partial_prompt_block_is_drafted_with_the_prompt_fixed(split_model):
  graphdef, state = split_model
  key = jax.random.key(3)
  out = draft(graphdef, state, jax.random.fold_in(key, 0), 4, L, DRAFT, canvas=MIXED)
  tokens, step = np.asarray(out.tokens), np.asarray(out.unmask_step)
  canvas = np.asarray(MIXED)
  fixed = canvas != M
  np.testing.assert_array_equal(tokens[fixed], canvas[fixed])
  assert np.all(step[fixed] == -1)
  # A generated position is unmasked during its own block's steps: the 3-token prompt's block 0
  # has one generated position (3), the 6-token prompt's block 1 two (6, 7).
  blocks = np.broadcast_to(np.arange(L) // B, (4, L))
  s = DRAFT.steps_per_block
  gen = ~fixed
  assert np.all((step[gen] >= blocks[gen] * s) & (step[gen] < (blocks[gen] + 1) * s))
  assert step[1, 3] in range(0, s) and step[2, 6] in range(s, 2 * s)
  # NFE counts only steps of blocks with something to draft: the 4-token prompt's row skips block 0.
  nfe = np.asarray(out.nfe)
  assert nfe[0] <= 3 * s and nfe[1] <= 4 * s and nfe[1] >= 4
  # The same draft from `draft_then_revise` (key fold 0).
  np.testing.assert_array_equal(
    tokens,
    draft_then_revise(graphdef, state, key, 4, L, SBDSamplerConfig(DRAFT, ()), canvas=MIXED).tokens,
  )


def test_block_aligned_canvas_prompt_equals_the_prefix_draft(split_model):
  graphdef, state = split_model
  prompt = jnp.tile(jnp.asarray([[5, 6, 7, 8]], jnp.int32), (3, 1))
  cfg = dataclasses.replace(DRAFT, use_cache=False)
  key = jax.random.key(4)
  a = draft(graphdef, state, key, 3, L, cfg, prompt)
  b = draft(graphdef, state, key, 3, L, cfg, canvas=canvas_of([[5, 6, 7, 8]] * 3))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.unmask_step, b.unmask_step)
  np.testing.assert_array_equal(a.nfe, b.nfe)
  np.testing.assert_array_equal(a.fixed, b.fixed)


def test_a_row_does_not_depend_on_the_other_rows_prompts(split_model, mixed_outputs):
  # Same key and batch size, row 1's prompt changed from 3 tokens to 9: rows 0, 2 and 3 keep their
  # tokens through the draft and every stage. (A row alone in a batch of one does not in general
  # give the same tokens: the noise of a step is drawn for the whole [N, B] block at once, so a
  # row's noise depends on its index in the batch.)
  graphdef, state = split_model
  changed = MIXED.at[1, :9].set(jnp.arange(9, dtype=jnp.int32) + 3)
  out = draft_then_revise(
    graphdef, state, jax.random.key(3), 4, L, SBDSamplerConfig(DRAFT, STAGES), canvas=changed
  )
  ref = mixed_outputs[0]
  keep = np.asarray([0, 2, 3])
  np.testing.assert_array_equal(
    np.asarray(out.draft_tokens)[keep], np.asarray(ref.draft_tokens)[keep]
  )
  np.testing.assert_array_equal(
    np.asarray(out.stage_tokens)[:, keep], np.asarray(ref.stage_tokens)[:, keep]
  )
  np.testing.assert_array_equal(np.asarray(out.tokens)[1, :9], np.arange(9) + 3)


# ---------------------------------------------------------------------------------------------------
# EOS-aware stopping
# ---------------------------------------------------------------------------------------------------
N_EOS = 8
EOS_CANVAS = canvas_of([[5]] * N_EOS)  # a one-token prompt: block 0 has 3 generated positions


def first_block_of(tokens, t):
  """Per row: the block of the first generated occurrence of t (positions >= 1), or -1."""
  out = []
  for row in tokens:
    hits = np.flatnonzero(row[1:] == t)
    out.append(int((hits[0] + 1) // B) if hits.size else -1)
  return np.asarray(out)


@pytest.fixture(scope="module")
def eos_case(split_model):
  """(key, eos id, no-stop output, stopping output): an EOS id that some row drafts first in block
  0, some row first in the last block and some row never, found from the no-stop draft."""
  graphdef, state = split_model
  cfg = SBDSamplerConfig(DRAFT, STAGES)
  for seed in range(20):
    key = jax.random.key(seed)
    ref = draft_then_revise(graphdef, state, key, N_EOS, L, cfg, canvas=EOS_CANVAS)
    d = np.asarray(ref.draft_tokens)
    for t in range(VOCAB - 2):  # not MASK, not the pad id 30
      first = first_block_of(d, t)
      if {0, L // B - 1, -1} <= set(first.tolist()):
        stop = dataclasses.replace(cfg, draft=dataclasses.replace(DRAFT, eos_id=t, pad_id=30))
        out = draft_then_revise(graphdef, state, key, N_EOS, L, stop, canvas=EOS_CANVAS)
        return t, ref, out
  raise AssertionError("no EOS id with rows ending in the first block, the last, and never")


def test_eos_ends_each_row_independently_and_revision_leaves_padding_alone(eos_case):
  t, ref, out = eos_case
  d_ref, d = np.asarray(ref.draft_tokens), np.asarray(out.draft_tokens)
  first = first_block_of(d_ref, t)
  fixed = np.asarray(out.fixed)
  for r in range(N_EOS):
    if first[r] < 0:  # no EOS: the row is the no-stop draft, token for token
      np.testing.assert_array_equal(d[r], d_ref[r])
      assert fixed[r].tolist() == [True] + [False] * (L - 1)
      continue
    e = 1 + int(np.flatnonzero(d_ref[r, 1:] == t)[0])
    np.testing.assert_array_equal(d[r, : e + 1], d_ref[r, : e + 1])  # up to and with its EOS
    assert np.all(d[r, e + 1 :] == 30)  # then padding
    assert fixed[r].tolist() == [True] + [False] * (e - 1) + [True] * (L - e)
  cases = {0: "first block", L // B - 1: "last block", -1: "none"}
  assert set(cases) <= set(first.tolist())
  # Revision: frozen positions (prompt, EOS, padding) never remasked nor changed by any stage.
  stages, remasked = np.asarray(out.stage_tokens), np.asarray(out.remasked)
  assert not remasked[:, fixed].any()
  for k, stage in enumerate(STAGES):
    np.testing.assert_array_equal(stages[k][fixed], d[fixed])
    np.testing.assert_array_equal(remasked[k].sum(1), np.round(stage.gamma * (~fixed).sum(1)))
  assert not np.any(np.asarray(out.tokens) == MASK)
  # A row that ended in block 0 drafts nothing after it: its draft NFE is at most block 0's steps.
  nfe = np.asarray(out.nfe_per_stage)[:, 0]
  assert np.all(nfe[first == 0] <= DRAFT.steps_per_block)


def test_eos_stopping_without_any_eos_is_the_plain_sampler(split_model):
  graphdef, state = split_model
  cfg = SBDSamplerConfig(DRAFT, STAGES)
  key = jax.random.key(5)
  ref = draft_then_revise(graphdef, state, key, 3, L, cfg, canvas=EOS_CANVAS[:3])
  drawn = set(np.asarray(ref.stage_tokens).ravel().tolist()) | set(
    np.asarray(ref.draft_tokens).ravel().tolist()
  )
  unused = [t for t in range(VOCAB - 2) if t not in drawn]
  assert unused, "every token was drawn; pick another key"
  stop = dataclasses.replace(cfg, draft=dataclasses.replace(DRAFT, eos_id=unused[0], pad_id=30))
  out = draft_then_revise(graphdef, state, key, 3, L, stop, canvas=EOS_CANVAS[:3])
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.stage_tokens, ref.stage_tokens)


# ---------------------------------------------------------------------------------------------------
# Infill templates and the task's generate
# ---------------------------------------------------------------------------------------------------
def test_parse_infill_pieces_and_errors():
  from lsd.methods.sbd import parse_infill

  assert parse_infill("The [MASK:3] sat on the [MASK:12].") == ["The ", 3, " sat on the ", 12, "."]
  assert parse_infill("[MASK:2]") == [2]
  for bad, why in [
    ("a [MASK:0] b", r"span '\[MASK:0\]' is not valid"),
    ("a [MASK] b", r"span '\[MASK\]' is not valid"),
    ("a [MASK:x] b", r"span '\[MASK:x\]' is not valid"),
    ("a [MASK:3 b", r"unclosed"),
    ("no spans", r"has no span"),
  ]:
    with pytest.raises(ConfigError, match=r"^--infill '.*'.*" + why + r".*accepted: text with"):
      parse_infill(bad, "--infill")


def tiny_task(**sample):
  return tiny_sbd_task(WordTok(), **sample)


def test_generate_prompts_of_different_lengths_and_infill_in_one_call():
  task, model = tiny_task(stages=[[0, 0.5, 4, "snapshot"]])
  inputs = [
    {"prompt": "the cat"},
    {"prompt": "a big red dog sat on the log"},
    {"infill": "the [MASK:3] sat on the [MASK:2] quickly"},
  ]
  rows = task.generate(model, jax.random.key(0), inputs)
  assert [r.get("prompt", r.get("infill")) for r in rows] == [
    x.get("prompt", x.get("infill")) for x in inputs
  ]
  tok = WordTok()
  for r, x in zip(rows[:2], inputs[:2], strict=True):
    given = [tok.bos_id, *tok.encode(x["prompt"])]
    assert r["tokens"][: len(given)] == given and r["draft_tokens"][: len(given)] == given
    assert r["text"].startswith(x["prompt"]) and tok.mask_id not in r["tokens"]
    # Snapshot confidences: none for the given tokens (JSON-safe), a probability for the rest.
    assert r["conf"][: len(given)] == [None] * len(given)
    assert 0.0 < r["conf"][len(given)] <= 1.0
  fill = rows[2]["tokens"]
  assert len(fill) == 1 + 1 + 3 + 3 + 2 + 1  # <bos> the [3] sat on the [2] quickly
  assert fill[:2] == [tok.bos_id, 0] and fill[5:8] == [4, 6, 0] and fill[10] == 14
  assert tok.mask_id not in fill
  for canvas in (rows[2]["draft_tokens"], rows[2]["tokens"] + rows[2]["draft_tokens"][11:]):
    assert canvas[11] == tok.eos_id  # the template's closing <eos>, then padding
    assert set(canvas[12:]) == {tok.pad_id}


def test_generate_errors_name_the_flag_and_what_is_accepted():
  task, model = tiny_task()
  too_long = " ".join(["the"] * 31)  # 32 tokens with <bos>: no room on a 32-token canvas
  with pytest.raises(
    ConfigError, match=r"--prompt 'the the .*' \(input 0\) is 32 tokens .*at most 31"
  ):
    task.generate(model, jax.random.key(0), [{"prompt": too_long}])
  with pytest.raises(ConfigError, match=r"--infill .*is 34 tokens.*at most data.seq_len=32"):
    task.generate(model, jax.random.key(0), [{"infill": "the [MASK:31] cat"}])
  with pytest.raises(ConfigError, match=r"--infill 'a \[MASK:0\]'"):
    task.generate(model, jax.random.key(0), [{"infill": "a [MASK:0]"}])
  with pytest.raises(ConfigError, match=r"exactly one of 'prompt'"):
    task.generate(model, jax.random.key(0), [{"prompt": "a", "infill": "[MASK:2]"}])


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  from lsd.main import main

  tmp = tmp_path_factory.mktemp("sbd_prompts")
  rng = np.random.default_rng(0)
  corpus = tmp / "corpus.txt"
  corpus.write_text(
    "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(300))
  )
  workdir = tmp / "sbd"
  rc = main(
    [
      "train",
      "--config",
      "configs/sbd.py:size=test,data=text",
      "--workdir",
      str(workdir),
      f"--config.data.path={corpus}",
      "--config.data.tokenizer.vocab_size=300",
      "--config.train.steps=10",
      "--config.train.progress=false",
      "--config.train.num_samples=0",
      '--config.sample.stages=[[0, 0.5, 4, "snapshot"]]',
    ]
  )
  assert rc == 0
  return workdir


@pytest.mark.slow
def test_cli_prompts_prompts_file_and_infill(tiny_run, tmp_path, capsys):
  import json

  from lsd.data.tokenizer import Tokenizer
  from lsd.main import main

  tok = Tokenizer.load(tiny_run / "tokenizer.json")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a big red dog sat on the\n")
  out = tmp_path / "out.jsonl"
  template = "the [MASK:3] sat on the [MASK:2] mat."
  argv = ["sample", "--workdir", str(tiny_run), "--out", str(out), "--prompt", "the cat"]
  argv += ["--prompts", str(prompts), "--infill", template, "--config.sample.stop_at_eos=true"]
  capsys.readouterr()
  assert main(argv) == 0
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r.get("prompt") for r in rows] == ["the cat", "a big red dog sat on the", None]
  for r in rows[:2]:
    given = [tok.bos_id, *tok.encode(r["prompt"])]
    assert r["draft_tokens"][: len(given)] == given and r["tokens"][: len(given)] == given
    assert tok.mask_id not in r["tokens"]
  # The infill: fixed text token for token around two filled spans.
  pieces = [[tok.bos_id], tok.encode("the "), 3, tok.encode(" sat on the "), 2, tok.encode(" mat.")]
  pos, got = 0, rows[2]["tokens"]
  for p in pieces:
    if isinstance(p, int):
      assert tok.mask_id not in got[pos : pos + p]
      pos += p
    else:
      assert got[pos : pos + len(p)] == p
      pos += len(p)
  assert len(got) == pos and rows[2]["draft_tokens"][pos] == tok.eos_id
  # Bad input: one line naming the flag, exit code 2.
  assert main(["sample", "--workdir", str(tiny_run), "--infill", "a [MASK:0] b"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--infill 'a [MASK:0] b'" in err[0] and "[MASK:n]" in err[0]
  long_prompt = " ".join(["the cat"] * 40)
  assert main(["sample", "--workdir", str(tiny_run), "--prompt", long_prompt]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--prompt 'the cat the cat" in err[0] and "at most 31" in err[0]


def test_cli_input_errors_come_before_the_run_is_loaded(tmp_path, capsys):
  from lsd.main import main

  missing = str(tmp_path / "no_run")
  cases = [
    (["--infill", "a [MASK:0] b"], "--infill 'a [MASK:0] b': span '[MASK:0]' is not valid"),
    (["--infill", "a [MASK b"], "--infill 'a [MASK b': unclosed '[MASK'"),
    (["--prompts", str(tmp_path / "none.txt")], "--prompts '"),
  ]
  for flags, expected in cases:
    assert main(["sample", "--workdir", missing, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.parametrize("order", ["confidence", "threshold"])
def test_ordered_drafts_keep_prompts_and_infill_text_and_stop_at_eos(split_model, order):
  graphdef, state = split_model
  key = jax.random.key(3)
  cfg = dataclasses.replace(DRAFT, order=order, threshold=0.2)
  ref = draft(graphdef, state, key, 4, L, cfg, canvas=MIXED)
  tokens, canvas = np.asarray(ref.tokens), np.asarray(MIXED)
  fixed = canvas != M
  np.testing.assert_array_equal(tokens[fixed], canvas[fixed])
  assert not np.any(tokens == M) and np.all(np.asarray(ref.unmask_step)[fixed] == -1)
  # EOS stopping with the first token row 0 drafted as EOS: row 0 ends there, padding after it.
  e = 4
  t = int(tokens[0, e])
  stop = dataclasses.replace(cfg, eos_id=t, pad_id=30)
  out = draft(graphdef, state, key, 4, L, stop, canvas=MIXED)
  got = np.asarray(out.tokens)
  np.testing.assert_array_equal(got[0, : e + 1], tokens[0, : e + 1])
  assert np.all(got[0, e + 1 :] == 30) and np.all(np.asarray(out.fixed)[0, e:])
  np.testing.assert_array_equal(got[fixed], canvas[fixed])
