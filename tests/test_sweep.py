"""lsd.train.sweep: runs keyed by their config, reused when finished, budgets in minutes."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lsd.api import train
from lsd.config import load_config_file
from lsd.train import sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path):
  rng = np.random.default_rng(0)
  words = "the a cat dog sat ran on under mat log".split()
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(200)))
  c = load_config_file(str(ROOT / "configs/causal_lm.py:size=test,data=text"))
  c.data.path = str(corpus)
  c.data.tokenizer.vocab_size = 300
  return sweep.quiet(c, 3, log_every=1)


def test_a_finished_run_is_reused_and_a_changed_config_gets_its_own(config, tmp_path):
  calls = []

  def counting_train(c, workdir):
    calls.append(Path(workdir).name)
    return train(c, workdir)

  a = sweep.train_once(counting_train, config, tmp_path / "runs", "lm", log=lambda m: None)
  assert a.name.startswith("lm-") and sweep.finished_step(a) == 3
  assert sweep.train_once(counting_train, config, tmp_path / "runs", "lm") == a
  assert calls == [a.name]  # the second call trained nothing
  config.train.lr = 2 * config.train.lr
  b = sweep.train_once(counting_train, config, tmp_path / "runs", "lm", log=lambda m: None)
  assert b != a and calls == [a.name, b.name] and sweep.finished_step(b) == 3
  assert sweep.steady_steps_per_s(b) > 0


def test_the_digest_reads_other_runs_by_their_directory_name(config):
  with config.unlocked():
    config.stage = {"autoencoder_workdir": "/one/root/ae-123"}
  here = sweep.config_digest(config, path_fields=["stage.autoencoder_workdir"])
  config.stage.autoencoder_workdir = "/other/root/ae-123"
  assert sweep.config_digest(config, path_fields=["stage.autoencoder_workdir"]) == here
  assert sweep.config_digest(config) != here  # without path_fields the whole path counts
  config.stage.autoencoder_workdir = "/one/root/ae-456"
  assert sweep.config_digest(config, path_fields=["stage.autoencoder_workdir"]) != here
  assert sweep.config_digest(config, salt="tok") != sweep.config_digest(config)


def test_quiet_copies_and_steps_per_s_skips_the_compiling_interval(config, tmp_path):
  q = sweep.quiet(config, 50, log_every=5)
  assert (q.train.steps, q.train.warmup_steps, q.train.num_samples) == (50, 1, 0)
  assert config.train.steps == 3  # a copy
  run = tmp_path / "timed"
  run.mkdir()
  rows = [{"split": "train", "steps_per_s": s} for s in (0.1, 4.0, 6.0, 5.0)]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert sweep.steady_steps_per_s(run) == 5.0
  (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
  with pytest.raises(ValueError, match="fewer than two logged training intervals"):
    sweep.steady_steps_per_s(run)


def test_a_stopped_run_stops_the_sweep(config, tmp_path):
  """A run that SIGTERM stopped returns normally from train(); the sweep must not take it as
  finished (a benchmark would go on to sample a half-trained model)."""

  def stopped_train(c, workdir):
    result = train(sweep.quiet(c, 2, log_every=1), workdir)  # stops short of c.train.steps
    return dataclasses.replace(result, stopped_by="SIGTERM")

  with pytest.raises(sweep.RunStopped, match=r"stopped by SIGTERM at step 2 of 3; rerun"):
    sweep.train_once(stopped_train, config, tmp_path / "runs", "lm", log=lambda m: None)
  # The rerun resumes the stopped run and finishes it.
  run = sweep.train_once(train, config, tmp_path / "runs", "lm", log=lambda m: None)
  assert sweep.finished_step(run) == 3
