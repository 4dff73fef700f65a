"""Fuzzed inputs end in success or the one-line error: random overrides of every field of the shipped
configs, random samples files for `lsd eval`, overrides on a finished run (an error leaves it
byte-identical) and random bytes as training text. The fuzz targets are those of
benchmarks/faults.py (which runs hundreds of cases); here a few seeded examples each, plus one
regression test for every bug the fuzzing found."""

import json
import math
import random
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsd.config import ConfigError, apply_override, load_config_file
from lsd.main import main as lsd_main
from lsd.methods import get_task
from lsd.train.state import validate_train_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import faults  # noqa: E402

FAST = settings(
  max_examples=30,
  deadline=None,
  derandomize=True,
  database=None,
  suppress_health_check=list(HealthCheck),
)
_, RAW, TYPED = faults.strategies()
FIELDS = [(s, d) for s in faults.SHIPPED for d in faults.leaves(faults.base_config(s))]


def test_the_walk_reaches_every_section_of_every_shipped_config():
  sections = {(s.split(":")[0], d.split(".")[0]) for s, d in FIELDS}
  for spec in faults.SHIPPED:
    config = load_config_file(str(ROOT / spec.split(":")[0]) + ":" + spec.split(":")[1])
    assert {(spec.split(":")[0], k) for k in config.keys()} <= sections
  assert ("configs/sbd.py", "sample.draft.top_p") in {(s.split(":")[0], d) for s, d in FIELDS}


@FAST
@given(st.sampled_from(FIELDS), st.booleans(), st.data())
def test_random_overrides_pass_or_raise_a_config_error(spec_field, typed, data):
  spec, dotted = spec_field
  value = data.draw(TYPED if typed else RAW)
  out = faults.check_config_case(spec, dotted, value, typed)
  assert out.ok, out


@FAST
@given(*faults.eval_content_strategy())
def test_random_samples_files_evaluate_or_fail_in_one_line(tmp_path_factory, content, metrics):
  out = faults.check_eval_case(tmp_path_factory.mktemp("eval"), content, metrics)
  assert out.ok, out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fuzz")
  corpus = faults.write_corpus(tmp / "corpus.txt")
  return faults.finished_run(corpus, tmp), tmp


# Cases chosen to cover the outcomes: a wrong type, a model change the checkpoint refuses, a
# value that passes (the finished run restores and evaluates), a hand-edited config.json with a
# float step count.
@pytest.mark.parametrize(
  "items",
  [
    [("train.lr", "abc", False)],
    [("model.d_model", "48", False)],
    [("train.log_every", "2", False)],
    [("train.steps", 2.5, True)],
    [("sample.top_p", "x", False), ("data.seq_len", 0, True)],
  ],
)
def test_overrides_on_a_finished_run_succeed_or_leave_it_unchanged(finished, items):
  run, tmp = finished
  out = faults.check_run_override(run, tmp, items)
  assert out.ok, out
  assert out.result.startswith("ok" if items == [("train.log_every", "2", False)] else "error 2")


def test_random_bytes_as_training_text_train_or_fail_in_one_line(tmp_path):
  # One case here (a training run costs seconds); the benchmark draws its cases with hypothesis.
  content = random.Random(0).randbytes(600) + b"\n\xff caf\xc3\xa9 \x00 the cat sat\n" * 20
  out = faults.check_text_case(tmp_path, content, "line", "utf-8")
  assert out.ok and out.result == "ok", out


# ------------------------------------------------------------------------------ regressions


def _config(spec="configs/sbd.py:size=test,data=text"):
  return faults.base_config(spec)


@pytest.mark.parametrize(
  "dotted, raw, message",
  [
    ("train.freeze", "3", r"--config.train.freeze='3' is a int; the field holds a tuple"),
    ("mesh.rules", "false", r"--config.mesh.rules='false' is a bool; the field holds a list"),
    ("sample.stages", "0", r"--config.sample.stages='0' is a int; the field holds a list"),
  ],
)
def test_a_json_override_of_the_wrong_type_is_a_config_error(dotted, raw, message):
  # ConfigDict refuses to change a field's type with a TypeError (it was a traceback).
  with pytest.raises(ConfigError, match=message):
    apply_override(_config(), dotted, raw)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("freeze", 5, r"train.freeze=5 must be a list of parameter path prefixes"),
    ("steps", 2.5, r"train.steps=2.5 must be an int >= 1"),
    ("ckpt_every", "10", r"train.ckpt_every='10' must be an int >= 1"),
    ("num_samples", -1, r"train.num_samples=-1 must be an int >= 0"),
    ("eval_every", None, r"train.eval_every=None must be an int >= 0"),
  ],
)
def test_train_fields_of_the_wrong_type_are_config_errors(field, value, message):
  # From a hand-edited config.json: a float step count crashed range(), freeze=5 iterated an int.
  config = faults.json_edit(_config(), f"train.{field}", value)
  with pytest.raises(ConfigError, match=message):
    validate_train_config(config.train)


@pytest.mark.parametrize(
  "dotted, value, message",
  [
    ("model.dropout", None, r"dropout=None must be a number \(field 'dropout' of Transformer"),
    ("model.n_kv_heads", "9", r"n_kv_heads='9' must be an int \(field 'n_kv_heads'"),
    ("model.qk_norm", 1, r"qk_norm=1 must be true or false"),
    ("model.d_ff", -1, r"model.d_ff=-1 must be a number >= 0"),
    ("model.head_dim", -8, r"model.head_dim=-8 must be a number >= 0"),
    ("sample.draft.temperature", [], r"sample.draft.temperature=\[\] must be a number"),
    (
      "sample.draft.steps_per_block",
      {"a": 1},
      r"(?s)sample.draft.steps_per_block=.* must be an int",
    ),
    ("sample.stages", 0, r"sample.stages=0 must be a list of \[block_size, gamma, steps"),
    ("sample.stages", [1, 2], r"sample.stages\[0\]=1 must be \[block_size, gamma, steps"),
    ("sample.stages", [[0, "x", 32]], r"sample.stages\[0\]\[1\]='x' must be a number"),
    ("sample.draft.block_size", math.inf, r"sample.draft.block_size=inf must be an int"),
  ],
)
def test_model_and_sampler_fields_of_the_wrong_type_are_config_errors(dotted, value, message):
  # They reached arithmetic (TypeError tracebacks) in TransformerConfig.validate / sampler_config.
  task = get_task(faults.json_edit(_config(), dotted, value))
  with pytest.raises(ConfigError, match=message):
    task.validate()


def test_a_stage_config_of_the_wrong_type_is_a_config_error():
  config = faults.json_edit(
    _config("configs/ld4lg_yelp.py:size=test,stage=decoder"), "ld4lg.tune_t_max", []
  )
  config.ld4lg.autoencoder_workdir = config.ld4lg.denoiser_workdir = "runs/x"
  with pytest.raises(ConfigError, match=r"tune_t_max=\[\] must be a number"):
    get_task(config).validate()


@pytest.mark.parametrize(
  "record, message",
  [
    ({"text": "a b", "nfe": "@"}, r"record 1: nfe='@' must be a number"),
    ({"text": "a b", "tokens": ["x"]}, r"record 1: tokens=\['x'\] must be a list of token ids"),
    ({"text": "a b", "tokens": 3}, r"record 1: tokens=3 must be a list of token ids"),
  ],
)
def test_eval_samples_with_bad_optional_fields_fail_in_one_line(tmp_path, capsys, record, message):
  # A string "nfe" reached np.mean (a numpy TypeError traceback).
  samples = tmp_path / "s.jsonl"
  samples.write_text(json.dumps(record) + "\n")
  assert lsd_main(["eval", "--samples", str(samples), "--out", str(tmp_path / "r")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and re.search(message, err[0]), err


def test_a_multi_line_message_is_printed_on_one_line(tmp_path, capsys):
  # A ConfigDict value in a message prints as several YAML lines; the CLI error stays one line.
  run = tmp_path / "run"
  run.mkdir()
  config = faults.json_edit(_config(), "sample.draft.steps_per_block", {"a": 1, "b": 2})
  (run / "config.json").write_text(json.dumps(config.to_dict()))
  assert lsd_main(["train", "--workdir", str(run)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["lsd train: error: sample.draft.steps_per_block=a: 1 b: 2 must be an int"]


@pytest.mark.parametrize(
  "dotted, value, message",
  [
    ("mesh.rules", 31, r"mesh.rules=31 must be a list of \[logical_axis, mesh_axis"),
    ("mesh.rules", [["embed", 5]], r"mesh.rules entry \['embed', 5\] must be one of the"),
    ("mesh.rules", [None], r"mesh.rules entry None must be one of the"),
    ("mesh.fsdp", "2", r"mesh.fsdp='2' must be a positive integer or -1"),
  ],
)
def test_mesh_fields_of_the_wrong_shape_are_config_errors(dotted, value, message):
  # An int in mesh.rules was iterated (TypeError at launch); a string size went through int().
  config = faults.json_edit(_config(), dotted, value)
  with pytest.raises(ConfigError, match=message):
    faults.validate_launch(config)


@pytest.mark.parametrize(
  "dotted, value, message",
  [
    ("sample.top_p", -1.0, r"sample.top_p=-1.0 must be a number in \[0.0, 1.0\]"),
    ("sample.temperature", 0.0, r"sample.temperature=0.0 must be a number > 0"),
    ("sample.max_new_tokens", 0, r"sample.max_new_tokens=0 must be an int >= 1"),
  ],
)
def test_causal_lm_sample_fields_are_checked_before_training(dotted, value, message):
  # sample.top_p=-1 passed the launch, trained the whole run, then failed in the sampler with a
  # ValueError traceback, after config.json had been rewritten with it.
  config = faults.json_edit(_config("configs/causal_lm.py:size=test,data=text"), dotted, value)
  with pytest.raises(ConfigError, match=message):
    get_task(config).validate()


def test_an_encoding_name_with_a_nul_is_a_config_error():
  # codecs.lookup raises ValueError (not LookupError) for a name holding a NUL.
  config = faults.json_edit(_config(), "data.encoding", "utf\x00-8")
  with pytest.raises(ConfigError, match=r"data.encoding='utf\\x00-8' is not a text encoding"):
    faults.validate_launch(config)
