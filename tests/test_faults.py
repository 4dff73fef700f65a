"""Fault injection (benchmarks/faults.py): killed runs resume with identical losses and lose no
checkpoint, a corrupt newest checkpoint is set aside and the run resumes from the one before.

The slow test is the benchmark's three-kill version; the full run (20 kills, 10 corruptions, 600+
fuzz cases) writes benchmarks/results/faults.json.
"""

import json
import sys
from pathlib import Path

import pytest

from lsd.api import train
from lsd.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import faults  # noqa: E402


@pytest.mark.slow
def test_three_kills_and_a_corruption_lose_nothing(tmp_path):
  m = faults.run_all(3, 1, (10, 10, 0, 0), seed=0, tmp=tmp_path)
  kills, corruptions = m["kills"], m["corruptions"]
  assert kills["runs"] == 3 and kills["by_signal"] == {"SIGKILL": 2, "SIGTERM": 1}
  assert kills["resumed_identical"] == 3, kills["details"]
  assert kills["checkpoints_lost"] == 0, kills["details"]
  assert corruptions["detected"] == corruptions["recovered"] == 1, corruptions["details"]
  assert m["fuzz"]["cases"] == 20 and m["fuzz"]["failures"] == 0, m["fuzz"]


def test_a_run_started_over_logs_each_step_once(tmp_path):
  # A run killed before its first checkpoint starts over: the killed attempt's rows (and a line
  # the kill tore) must not stay in metrics.jsonl beside the new ones. They did: only resumed
  # runs dropped rows.
  run = tmp_path / "run"
  run.mkdir()
  rows = [{"step": s, "split": "train", "time": 0.0, "loss": 9.0} for s in (1, 2)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "split": "tr'
  (run / "metrics.jsonl").write_text(text)
  corpus = faults.write_corpus(tmp_path / "corpus.txt")
  config = load_config_file(str(ROOT / faults.CONFIG))
  config.data.path = str(corpus)
  config.data.tokenizer.vocab_size = 300
  config.train.update(steps=2, log_every=1, num_samples=0, progress=False)
  train(config, run)
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
  assert all(r["loss"] != 9.0 for r in records)
