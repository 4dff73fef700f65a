"""Runs are not tied to their topology: a checkpoint written by N processes resumes on another
process count, and a run trained on a mesh this machine cannot build still loads for sampling."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import lsd.api
from lsd.api import train
from lsd.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat ran on under mat log big small red blue".split()


@pytest.fixture
def config(tmp_path):
  rng = np.random.default_rng(0)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 9)) + "." for _ in range(200)))
  c = load_config_file(str(ROOT / "configs/causal_lm.py:size=test,data=text"))
  c.data.path = str(corpus)
  c.data.tokenizer.vocab_size = 300
  c.train.update(steps=2, ckpt_every=2, log_every=1, num_samples=0, progress=False)
  c.train.lr_decay = "constant"  # the schedule does not depend on train.steps
  return c


def test_a_checkpoint_of_two_processes_resumes_on_one(config, tmp_path, capsys):
  run = tmp_path / "run"
  train(config, run)
  # As two processes would have left it: one data-position file each, the same position.
  folder = run / "checkpoints" / "2" / "data_iter"
  position = (folder / "process_0-of-1.json").read_text()
  (folder / "process_0-of-1.json").unlink()
  for i in (0, 1):
    (folder / f"process_{i}-of-2.json").write_text(position)
  config.train.steps = 4
  resumed = train(config, run, record_every_step=True)
  assert "written by 2 process(es), this run has 1" in capsys.readouterr().out
  assert sorted(resumed.losses) == [3, 4]
  assert (run / "checkpoints" / "2").is_dir()  # not taken for a corrupt checkpoint
  straight = train(config, tmp_path / "straight", record_every_step=True)
  assert resumed.losses[4] == straight.losses[4]


def test_a_run_whose_mesh_does_not_fit_here_loads_data_parallel(config, tmp_path, capsys):
  run = tmp_path / "run"
  train(config, run)
  stored = json.loads((run / "config.json").read_text())
  stored["mesh"].update(data=jax.device_count() * 8, fsdp=1, tensor=1)  # a bigger slice's mesh
  moved = tmp_path / "moved"
  shutil.copytree(run, moved)
  (moved / "config.json").write_text(json.dumps(stored))
  loaded = lsd.api.load(moved)
  assert "loading it data-parallel" in capsys.readouterr().out
  here = lsd.api.load(run)
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(here.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  texts = lsd.api.sample(loaded, jax.random.key(0), 2)
  assert texts == lsd.api.sample(here, jax.random.key(0), 2)
