"""Shared benchmark plumbing: every benchmark writes `benchmarks/results/<name>.json` with the same
provenance fields and prints one summary line."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import jax

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
  """HEAD of the repository holding this file, or "unknown" (no git, not a checkout); with a
  "+dirty" suffix when tracked code (anything but benchmarks/results) differs from HEAD, since
  then HEAD alone does not name the code that produced a result."""
  root = Path(__file__).resolve().parents[1]

  def git(*args):
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)

  try:
    head = git("rev-parse", "HEAD").stdout.strip()
    changed = git("diff", "--name-only", "HEAD", "--", ".", ":(exclude)benchmarks/results").stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  if not head:
    return "unknown"
  return head + ("+dirty" if changed.strip() else "")


def machine() -> dict:
  devices = jax.devices()
  return {
    "platform": platform.platform(),
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "jax_backend": jax.default_backend(),
    "device_kinds": sorted({d.device_kind for d in devices}),
    "n_devices": len(devices),
    "jax_version": jax.__version__,
  }


def train_seconds(run: Path) -> float:
  """Training compute time of an lsd run directory: the sum over its train log records of (steps
  since the previous record) / steps_per_s, so pauses between a stop and a resume are not counted."""
  recs = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
  total, prev = 0.0, 0
  for r in recs:
    if r["split"] == "train":
      total += (r["step"] - prev) / r["steps_per_s"]
      prev = r["step"]
  return total


def write_result(name: str, metrics: dict, config: dict) -> Path:
  """Writes results/<name>.json ({metrics, config, git_commit, machine, date}) and prints a
  one-line summary of `metrics`; returns the path."""
  RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  record = {
    "metrics": metrics,
    "config": config,
    "git_commit": git_commit(),
    "machine": machine(),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
  }
  path = RESULTS_DIR / f"{name}.json"
  path.write_text(json.dumps(record, indent=2) + "\n")
  summary = " ".join(
    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
  )
  print(f"{name}: {summary} -> {path.relative_to(RESULTS_DIR.parent.parent)}")
  return path
