"""Shared benchmark plumbing: every benchmark writes `benchmarks/results/<name>.json` with the same
provenance fields and prints one summary line."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import numpy as np

from lsd.fileio import atomic_write_text
from lsd.train.sweep import check_stopped, quiet  # noqa: F401 (for the scripts)

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
  atomic_write_text(path, json.dumps(record, indent=2) + "\n")  # a kill never truncates it
  summary = " ".join(
    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
  )
  print(f"{name}: {summary} -> {path.relative_to(RESULTS_DIR.parent.parent)}")
  return path


# ------------------------------------------------------------------------- training and features
def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cached_features(judge, folder: Path, texts: list[str]) -> np.ndarray:
  """judge.hidden_features(texts) (`lsd.eval.genppl.GenPPL`), kept in `folder` under a hash of the
  texts and the judge's truncation, so fixed text sets are embedded once across runs."""
  key = json.dumps([judge.max_len, list(texts)]).encode()
  f = Path(folder) / f"{hashlib.sha256(key).hexdigest()[:20]}.npy"
  if f.exists():
    return np.load(f)
  x = np.asarray(judge.hidden_features(texts))
  f.parent.mkdir(parents=True, exist_ok=True)
  np.save(f.with_suffix(".tmp.npy"), x)
  f.with_suffix(".tmp.npy").replace(f)  # atomic: a killed run never leaves a truncated file
  return x


def cached(path: Path, make) -> dict:
  """The record in JSON file `path`, or `make()` (a dict with "texts" and "seconds"), saved there."""
  if path.exists():
    return json.loads(path.read_text())
  rec = make()
  atomic_write_text(path, json.dumps(rec))
  log(f"{path.stem}: {len(rec['texts'])} texts in {rec['seconds']:.0f} s, e.g. {rec['texts'][:2]}")
  return rec
