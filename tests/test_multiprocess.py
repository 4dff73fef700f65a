"""Two processes x 4 simulated CPU devices (jax.distributed on localhost): the run finishes (final
eval and samples included: it used to hang at the end), one checkpoint is written by both processes
and restored by both, the second launch resumes where the first stopped, and every step's loss
equals that of one process x 8 devices (the data order does not depend on the process count)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(corpus: Path, workdir: Path, steps: int, devices: int, processes: int) -> list[str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  argv = [
    sys.executable,
    "-m",
    "lsd.main",
    "train",
    "--config",
    str(ROOT / "configs/sbd.py:size=test,data=text"),
    "--workdir",
    str(workdir),
    f"--config.data.path={corpus}",
    "--config.data.tokenizer.vocab_size=300",
    f"--config.train.steps={steps}",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=2",
    "--config.train.num_samples=2",
    "--config.train.progress=false",
    # The schedule must not depend on train.steps: the 2-process run is launched twice.
    "--config.train.lr_decay=constant",
  ]
  if processes == 1:
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, timeout=900)
    return [done.stdout]
  port = _free_port()
  procs = [
    subprocess.Popen(
      [*argv, "--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  try:
    outs = [p.communicate(timeout=900)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs, strict=True):
    assert p.returncode == 0, out[-3000:]
  return outs


def _train_losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _eval_loss(workdir: Path) -> float:
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in rows if r["split"] == "eval"][-1]


@pytest.mark.timeout(2400)
def test_two_processes_finish_checkpoint_and_resume(tmp_path):
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(300)]
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(lines))
  two = tmp_path / "two"
  outs = []
  for steps in (2, 4):  # the second launch resumes from the first one's checkpoint at step 2
    outs.append(_launch(corpus, two, steps, devices=4, processes=2))
  # Process 0 reports the restore; process 1 restored too, or the collectives would not match.
  assert "resuming at step 2" in outs[1][0]
  losses = _train_losses(two)
  assert sorted(losses) == [1, 2, 3, 4] and np.all(np.isfinite(list(losses.values())))
  assert np.isfinite(_eval_loss(two))  # the final eval ran on both processes
  # One checkpoint, written by both processes (each its array shards and its data position).
  step4 = two / "checkpoints" / "4"
  assert sorted(p.name for p in (step4 / "data_iter").glob("process_*")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
  positions = [
    json.loads((step4 / "data_iter" / f"process_{i}-of-2.json").read_text()) for i in (0, 1)
  ]
  assert positions[0] != {} and positions[1] != {}
  samples = [json.loads(x) for x in (two / "samples.jsonl").read_text().splitlines()]
  assert len(samples) == 2 and all(isinstance(s["text"], str) for s in samples)
  # One process x 8 devices, the same config and seed: the same batches, the same losses (up to
  # the order of the cross-process reductions).
  one = tmp_path / "one"
  _launch(corpus, one, 4, devices=8, processes=1)
  single = _train_losses(one)
  np.testing.assert_allclose(
    [losses[s] for s in range(1, 5)], [single[s] for s in range(1, 5)], rtol=1e-5
  )
  assert _eval_loss(two) == pytest.approx(_eval_loss(one), rel=1e-5)
