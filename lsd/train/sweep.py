"""Runs of a sweep or benchmark: one directory per distinct config, reused once finished, and
training budgets in minutes converted to steps.

A sweep trains many variants whose stages are often shared (two denoiser variants on one
autoencoder). `train_once` keys a run's directory by a digest of its config, so an identical
config finds its finished run instead of training it again, a changed one never resumes a run of
another config, and an interrupted one resumes from its checkpoint. The trainer is passed in
(`lsd.api.train`): this module knows no method.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_collections
import numpy as np

from lsd.fileio import as_path, atomic_write

TrainFn = Callable[[ml_collections.ConfigDict, Path], object]


class RunStopped(RuntimeError):
  """A sweep's run stopped before its last step (SIGTERM / SIGINT / preemption, which save a
  checkpoint and return): the sweep must stop too, not go on with a half-trained run."""


def check_stopped(result: object, run: str | Path, steps: int) -> None:
  """Raises RunStopped when `result` (what `lsd.api.train` returns) says the run was stopped."""
  stopped = getattr(result, "stopped_by", None)
  if stopped:
    step = getattr(result, "final_step", "?")
    raise RunStopped(
      f"{run}: stopped by {stopped} at step {step} of {steps}; rerun the same command to resume"
    )


def digest(*parts) -> str:
  """12 hex digits of JSON-able parts."""
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def config_digest(
  config: ml_collections.ConfigDict, salt: str = "", path_fields: Iterable[str] = ()
) -> str:
  """The digest of a run config. `path_fields` are dotted fields that name other runs' directories
  (e.g. "ld4lg.autoencoder_workdir"): only the directory's name counts, which `train_once` makes
  carry that run's digest, so the digest does not depend on where the sweep's root is."""
  d = json.loads(config.to_json())
  for dotted in path_fields:
    *parents, leaf = dotted.split(".")
    node = d
    for p in parents:
      node = node.get(p, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and node.get(leaf):
      node[leaf] = Path(node[leaf]).name
  return digest(d, salt)


def finished_step(run: Path) -> int | None:
  """The newest checkpoint step of run directory `run` (None: no checkpoint)."""
  from lsd.train.checkpoint import Checkpointer

  if not (as_path(run) / "checkpoints").is_dir():
    return None
  ckpt = Checkpointer(as_path(run) / "checkpoints", async_save=False, create=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def train_once(
  train: TrainFn,
  config: ml_collections.ConfigDict,
  root: str | Path,
  name: str,
  *,
  tokenizer: str | Path | None = None,
  path_fields: Iterable[str] = (),
  log: Callable[[str], None] = print,
) -> Path:
  """Trains `config` in `root/<name>-<digest>` unless that run has finished (its newest checkpoint
  is at `config.train.steps`), and returns the directory. An unfinished run resumes.
  `tokenizer`: a tokenizer.json the run starts with (copied in; its folder's name joins the
  digest, so runs on different tokenizers never share a directory)."""
  salt = Path(tokenizer).parent.name if tokenizer else ""
  run = as_path(root) / f"{name}-{config_digest(config, salt, path_fields)}"
  if finished_step(run) == int(config.train.steps):
    log(f"{run.name}: reusing the finished {config.train.steps}-step run")
    return run
  run.mkdir(parents=True, exist_ok=True)
  if tokenizer is not None and not (run / "tokenizer.json").exists():
    data = as_path(tokenizer).read_bytes()
    atomic_write(run / "tokenizer.json", lambda tmp: Path(tmp).write_bytes(data))
  log(f"training {run.name} ({config.train.steps} steps)")
  check_stopped(train(config, run), run, int(config.train.steps))
  return run


def quiet(config: ml_collections.ConfigDict, steps: int, log_every: int = 100):
  """A copy of run config `config` for `steps` steps (warmup at most a tenth of them), logging
  every `log_every`, without end-of-run samples or a progress bar."""
  c = copy.deepcopy(config)
  c.train.steps = int(steps)
  c.train.warmup_steps = min(c.train.warmup_steps, max(1, int(steps) // 10))
  c.train.ckpt_every = 500
  c.train.log_every = log_every
  c.train.num_samples = 0
  c.train.progress = False
  return c


def steady_steps_per_s(run: Path) -> float:
  """The median training speed of a run's logged intervals after the first (which holds the
  compilation), from its metrics.jsonl."""
  recs = [json.loads(x) for x in (as_path(run) / "metrics.jsonl").read_text().splitlines()]
  speeds = [r["steps_per_s"] for r in recs if r.get("split") == "train"][1:]
  if not speeds:
    raise ValueError(f"{run}: fewer than two logged training intervals to time")
  return float(np.median(speeds))


def steps_for_minutes(
  train: TrainFn,
  config: ml_collections.ConfigDict,
  root: str | Path,
  name: str,
  minutes: float,
  *,
  probe_steps: int = 80,
  log: Callable[[str], None] = print,
  **train_once_kw,
) -> int:
  """The training steps of `config` that fit `minutes` on this machine: the steady speed of a
  `probe_steps`-step probe run (`train_once`, so a sweep times each config once). Load on the
  machine during the probe changes the result; during the real run only its wall time."""
  probe = quiet(config, probe_steps, log_every=max(1, probe_steps // 8))
  probe.train.eval_batches = 1
  run = train_once(train, probe, root, f"probe_{name}", log=log, **train_once_kw)
  sps = steady_steps_per_s(run)
  steps = int(minutes * 60 * sps)
  log(f"{name}: {sps:.2f} steps/s -> {steps} steps in {minutes} min")
  return steps
