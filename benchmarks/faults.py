"""Fault injection: killed runs, corrupt checkpoints and fuzzed inputs against the run-safety rules.

    python benchmarks/faults.py [--quick] [--seed 0] [--fuzz_cases 600]

1. Kills. A tiny causal LM (configs/causal_lm.py:size=test,data=text on a generated corpus) is
   trained uninterrupted once as the reference. Then each of `--kills` runs (SIGKILL for 3/4,
   SIGTERM for 1/4) is launched as `python -m lsd.main train ...` and signalled at a seeded random
   moment: during start-up, at a random time in training, or the moment orbax's temporary directory
   of a checkpoint appears (a kill mid-write). The same command then resumes it to completion.
   Per run: the step it resumed from, whether every finished checkpoint at the kill survived (keep-N
   deletion of older steps is not loss), and whether metrics.jsonl holds each step once with the
   reference's loss, bit for bit.
2. Corruptions. The reference run is copied and one file of its newest checkpoint that the restore
   reads (found by access times: commit markers and the per-process b-tree files that orbax's
   merged root no longer references are never read) is damaged: an array file truncated, a file
   truncated to at most half its length (orbax does not read the last bytes of a data file), a
   file zeroed or deleted (not the optional _sharding / array_metadatas, without which orbax
   restores the same arrays), `_METADATA` emptied. The same command must warn, move the checkpoint to
   checkpoints.corrupt/, resume from the one before and replay the reference's losses.
3. Fuzz (hypothesis, seeded). Random overrides of every field of the shipped configs (command-line
   strings, and wrong-typed values as a hand-edited config.json holds them) through the launch
   validation in-process; a subset end to end through `lsd.main.main` on copies of a finished run
   (an error must leave the copy byte-identical); random samples files for `lsd eval`; random bytes
   as training text. Each case must end in success or the one-line error (exit 2 bad input, 3
   divergence, 1 disk/OS; no traceback, no hang).

Writes benchmarks/results/faults.json (kills, corruptions, fuzz, with per-run details).
`--quick` runs 3 kills, 1 corruption and a few fuzz cases (the slow test's version).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/causal_lm.py:size=test,data=text"
WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()
TMP_MARK = ".orbax-checkpoint-tmp"
# The training run under test: 60 logged steps, a checkpoint every 3 (so a kill often lands in a
# write), the three newest kept.
STEPS, CKPT_EVERY = 60, 3


def write_corpus(path: Path, n: int = 300, seed: int = 0) -> Path:
  rng = random.Random(seed)
  lines = [" ".join(rng.choices(WORDS, k=rng.randint(5, 14))) + "." for _ in range(n)]
  path.write_text("\n".join(lines))
  return path


def train_argv(corpus: Path, workdir: Path, *extra: str) -> list[str]:
  """`lsd train` arguments of the run under test (after the verb)."""
  return [
    "--config",
    str(ROOT / CONFIG),
    "--workdir",
    str(workdir),
    f"--config.data.path={corpus}",
    "--config.data.tokenizer.vocab_size=300",
    f"--config.train.steps={STEPS}",
    f"--config.train.ckpt_every={CKPT_EVERY}",
    "--config.train.keep_checkpoints=3",
    "--config.train.log_every=1",
    "--config.train.warmup_steps=5",
    "--config.train.num_samples=0",
    "--config.train.progress=false",
    *extra,
  ]


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("LSD_DEBUG", None)
  return env


# ------------------------------------------------------------------------------ run inspection


def finished_steps(workdir: Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def tmp_checkpoints(workdir: Path) -> list[str]:
  d = workdir / "checkpoints"
  try:
    return [n for n in os.listdir(d) if TMP_MARK in n]
  except FileNotFoundError:
    return []


def corrupt_entries(workdir: Path) -> list[str]:
  d = Path(f"{workdir / 'checkpoints'}.corrupt")
  return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def train_losses(workdir: Path) -> list[tuple[int, float]]:
  """(step, loss) of every train row of metrics.jsonl, in file order; a torn line is skipped."""
  path = workdir / "metrics.jsonl"
  rows = []
  if not path.exists():
    return rows
  for line in path.read_text().splitlines():
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    if r.get("split") == "train":
      rows.append((int(r["step"]), float(r["loss"])))
  return rows


def compare_losses(workdir: Path, reference: dict[int, float], after: int) -> dict:
  """metrics.jsonl of a finished run against the reference: every step once, equal losses."""
  rows = train_losses(workdir)
  steps = [s for s, _ in rows]
  mismatched = [s for s, loss in rows if reference.get(s) != loss]
  return {
    "metrics_steps_once": steps == sorted(reference),
    "duplicated_steps": sorted({s for s in steps if steps.count(s) > 1}),
    "mismatched_steps": mismatched,
    "losses_after_resume_identical": all(reference.get(s) == loss for s, loss in rows if s > after)
    and sorted({s for s in steps if s > after}) == [s for s in sorted(reference) if s > after],
  }


class Launch:
  """`python -m lsd.main train ...` with its stdout read line by line in a thread."""

  def __init__(self, argv: list[str]):
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "lsd.main", "train", *argv],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    self.t0 = time.monotonic()
    self.lines: list[tuple[float, str]] = []
    self.err = ""
    self._out = threading.Thread(target=self._read_out, daemon=True)
    self._err = threading.Thread(target=self._read_err, daemon=True)
    self._out.start()
    self._err.start()

  def _read_out(self):
    for line in self.proc.stdout:
      self.lines.append((time.monotonic() - self.t0, line.rstrip("\n")))

  def _read_err(self):
    self.err = self.proc.stderr.read()

  def started_at(self) -> float | None:
    """Seconds to the "fresh run" / "resuming at step" line (the loop starts right after)."""
    for t, line in self.lines:
      if line.startswith("lsd: ") and " | workdir " in line:
        return t
    return None

  def wait_started(self, timeout: float = 600) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      if self.started_at() is not None:
        return True
      if self.proc.poll() is not None:
        return False
      time.sleep(0.01)
    return False

  def wait(self, timeout: float = 900) -> int:
    rc = self.proc.wait(timeout)
    self._out.join(10)
    self._err.join(10)
    return rc

  @property
  def stdout(self) -> str:
    return "\n".join(line for _, line in self.lines)


def run_to_end(argv: list[str], timeout: float = 900) -> tuple[int, str, str, float]:
  t = time.monotonic()
  p = subprocess.run(
    [sys.executable, "-m", "lsd.main", "train", *argv],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return p.returncode, p.stdout, p.stderr, time.monotonic() - t


def resumed_from(stdout: str) -> int | None:
  """The step a launch resumed at (0 for a fresh start); None if it printed neither."""
  m = re.search(r"resuming at step (\d+)", stdout)
  if m:
    return int(m.group(1))
  return 0 if "| fresh run |" in stdout else None


# ------------------------------------------------------------------------------ 1. kills


@dataclasses.dataclass
class Reference:
  workdir: Path
  losses: dict[int, float]
  start_s: float  # launch -> the loop starts
  train_s: float  # loop start -> exit


def reference_run(corpus: Path, tmp: Path) -> Reference:
  workdir = tmp / "reference"
  launch = Launch(train_argv(corpus, workdir))
  rc = launch.wait()
  if rc != 0:
    raise RuntimeError(f"the reference run failed ({rc}): {launch.err[-2000:]}")
  start = launch.started_at()
  total = launch.lines[-1][0] if launch.lines else start
  return Reference(workdir, dict(train_losses(workdir)), start, max(total - start, 1.0))


def kill_run(i: int, sig: signal.Signals, mode: str, rng: random.Random, corpus, tmp, ref) -> dict:
  """One killed-then-resumed run; returns its record."""
  workdir = tmp / f"kill{i:02d}"
  argv = train_argv(corpus, workdir)
  launch = Launch(argv)
  rec = {"run": i, "signal": sig.name, "mode": mode}
  if mode == "startup":  # before the loop: data, tokenizer, model, compilation
    time.sleep(rng.uniform(0.2, 0.9) * ref.start_s)
  else:
    launch.wait_started()
    if mode == "random":
      time.sleep(rng.uniform(0.05, 0.9) * ref.train_s)
    else:  # "save": after a random number of finished checkpoints, the moment a write begins
      after = rng.randint(1, STEPS // CKPT_EVERY - 3)
      end = time.monotonic() + 600
      while len(finished_steps(workdir)) < min(after, 3) and launch.proc.poll() is None:
        time.sleep(0.002)
      seen = len(finished_steps(workdir))
      while launch.proc.poll() is None and time.monotonic() < end:
        if tmp_checkpoints(workdir):
          if seen >= after:
            break
          seen += 1
          while tmp_checkpoints(workdir) and launch.proc.poll() is None:
            time.sleep(0.0005)
        time.sleep(0.0005)
  rec["tmp_dirs_at_kill"] = tmp_checkpoints(workdir)
  rec["exited_before_kill"] = launch.proc.poll() is not None
  logged = train_losses(workdir)
  rec["last_step_logged_at_kill"] = logged[-1][0] if logged else 0  # STEPS: the loop had ended
  rec["kill_time_s"] = round(time.monotonic() - launch.t0, 3)
  if launch.proc.poll() is None:
    launch.proc.send_signal(sig)
  rc = launch.wait()
  rec["killed_rc"] = rc
  m = re.search(r"stopped at step (\d+)", launch.stdout)
  rec["sigterm_saved_step"] = int(m.group(1)) if m else None
  at_kill = finished_steps(workdir)
  rec["checkpoints_at_kill"] = at_kill
  # Resume with the same command.
  rc, out, err, _ = run_to_end(argv)
  rec["resume_rc"] = rc
  start = resumed_from(out)
  rec["resumed_from"] = start
  rec["stderr_tail"] = err.strip().splitlines()[-1:] if rc else []
  final = finished_steps(workdir)
  rec["checkpoints_at_end"] = final
  rec["corrupt_set_aside"] = corrupt_entries(workdir)
  # A finished checkpoint is lost when the resume did not start from the newest one that existed
  # at the kill, or one was set aside as corrupt.
  newer = [s for s in at_kill if start is None or s > start]
  rec["lost_checkpoints"] = newer + rec["corrupt_set_aside"]
  rec.update(compare_losses(workdir, ref.losses, start or 0))
  rec["resumed"] = rc == 0 and start is not None and STEPS in final
  rec["resumed_identical"] = bool(
    rec["resumed"] and rec["metrics_steps_once"] and not rec["mismatched_steps"]
  )
  shutil.rmtree(workdir, ignore_errors=True)
  return rec


def kill_plan(n: int, rng: random.Random) -> list[tuple[signal.Signals, str]]:
  """SIGKILL for 3/4 of the runs, SIGTERM for the rest; moments spread over start-up, random
  times in training and checkpoint writes (about half the kills land in a write)."""
  n_term = max(1, n // 4) if n > 1 else 0
  plan = []
  for j in range(n):
    sig = signal.SIGTERM if j >= n - n_term else signal.SIGKILL
    plan.append((sig, ["save", "random", "save", "random", "startup", "save"][j % 6]))
  rng.shuffle(plan)
  return plan


# ------------------------------------------------------------------------------ 2. corruptions


def files_read_by_restore(ref: Reference, corpus: Path, tmp: Path) -> list[str]:
  """Files of the newest checkpoint that a resume reads (their access times move): corrupting
  any other file (commit markers, per-process b-tree nodes the merged root no longer references)
  cannot change what is restored."""
  probe = tmp / "probe"
  shutil.copytree(ref.workdir, probe)
  newest = probe / "checkpoints" / str(STEPS)
  files = [p for p in newest.rglob("*") if p.is_file()]
  for p in files:
    os.utime(p, (0, p.stat().st_mtime))
  rc, _, err, _ = run_to_end(train_argv(corpus, probe))
  if rc != 0:
    raise RuntimeError(f"the restore probe failed: {err[-2000:]}")
  read = sorted(
    str(p.relative_to(newest))
    for p in files
    if p.exists() and p.stat().st_atime > 0 and p.name != "commit_success.txt"
  )
  shutil.rmtree(probe, ignore_errors=True)
  return [r for r in read if r.startswith(("state/", "data_iter/"))]


CORRUPTIONS = ("truncate_array_file", "zero_file", "delete_file", "empty_metadata")
OPTIONAL_FILES = ("state/_sharding", "state/array_metadatas/")


def corrupt(ckpt: Path, kind: str, read: list[str], rng: random.Random) -> str:
  """Damages one file of checkpoint directory `ckpt`; returns its path inside the checkpoint."""
  if kind == "empty_metadata":
    target = "state/_METADATA"
  elif kind == "truncate_array_file":
    arrays = [r for r in read if "/d/" in r]  # ocdbt data files hold the arrays
    target = rng.choice(arrays)
  elif kind == "delete_file":
    # Orbax restores without the optional _sharding and array_metadatas files (the target's own
    # shardings and shapes stand in): deleting one is no damage, so only needed files are deleted.
    target = rng.choice([r for r in read if not r.startswith(OPTIONAL_FILES)])
  else:
    target = rng.choice(read)
  path = ckpt / target
  size = path.stat().st_size
  if kind == "truncate_array_file":
    # At most half the file: the restore does not read the last bytes of an OCDBT data file (a
    # cut of a few tail bytes restores the same arrays, measured), which is no damage to detect.
    with open(path, "r+b") as f:
      f.truncate(rng.randint(0, size // 2))
  elif kind == "zero_file":
    path.write_bytes(b"\0" * size)
  elif kind == "delete_file":
    path.unlink()
  else:
    path.write_bytes(b"")
  return target


def corruption_run(i: int, kind: str, rng: random.Random, read, corpus, tmp, ref) -> dict:
  workdir = tmp / f"corrupt{i:02d}"
  shutil.copytree(ref.workdir, workdir)
  target = corrupt(workdir / "checkpoints" / str(STEPS), kind, read, rng)
  rc, out, err, _ = run_to_end(train_argv(corpus, workdir))
  previous = finished_steps(ref.workdir)[-2]
  aside = corrupt_entries(workdir)
  warned = bool(re.search(rf"checkpoint step {STEPS} in \S+ is corrupt and was moved to", out))
  rec = {
    "run": i,
    "kind": kind,
    "file": target,
    "resume_rc": rc,
    "warning": next((line for line in out.splitlines() if "is corrupt" in line), "")[:300],
    "set_aside": aside,
    "resumed_from": resumed_from(out),
    "previous_checkpoint": previous,
    "stderr_tail": err.strip().splitlines()[-1:] if rc else [],
  }
  rec["detected"] = warned and len(aside) == 1 and aside[0].startswith(f"{STEPS}-")
  cmp = compare_losses(workdir, ref.losses, previous)
  rec["losses_identical"] = cmp["metrics_steps_once"] and not cmp["mismatched_steps"]
  rec["recovered"] = bool(
    rc == 0
    and rec["resumed_from"] == previous
    and rec["losses_identical"]
    and STEPS in finished_steps(workdir)
  )
  shutil.rmtree(workdir, ignore_errors=True)
  return rec


# ------------------------------------------------------------------------------ 3. fuzz

# Shipped configs whose every field is fuzzed (tiny sizes: the values, not the scale, matter).
SHIPPED = (
  "configs/causal_lm.py:size=test,data=text",
  "configs/sbd.py:size=test,data=text",
  "configs/sbd.py:size=test,data=text,variant=mdlm",
  "configs/ld4lg_yelp.py:size=test",
  "configs/ld4lg_yelp.py:size=test,stage=diffusion",
  "configs/ld4lg_yelp.py:size=test,stage=decoder",
  "configs/ld4lg_e2e.py:size=test,stage=diffusion",
)


@dataclasses.dataclass
class Outcome:
  ok: bool
  kind: str  # which fuzz target
  case: str  # the input, shortened
  result: str  # "ok", "error 2: <message>", or what went wrong


def _short(x, n: int = 200) -> str:
  s = repr(x)
  return s if len(s) <= n else s[: n - 3] + "..."


def _bug(e: BaseException) -> str:
  """An exception that escaped as a traceback: its type, message and innermost lsd frame."""
  frames = [f for f in traceback.extract_tb(e.__traceback__) if "/lsd/" in f.filename]
  where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
  first = (str(e).strip().splitlines() or [""])[0][:200]
  return f"traceback {type(e).__name__}: {first}{where}"


_BASE: dict[str, dict] = {}


def base_config(spec: str):
  """The shipped config `spec` (a fresh copy each call; files are executed once)."""
  import ml_collections

  from lsd.config import load_config_file

  if spec not in _BASE:
    config = load_config_file(str(ROOT / spec.split(":")[0]) + ":" + spec.split(":")[1])
    # A launch names its corpus: with data.path empty every case would stop at that one error.
    config.data.path = config.data.path or "corpus.txt"
    for field in ("autoencoder_workdir", "denoiser_workdir"):  # later stages name earlier runs
      if field in config.get("ld4lg", {}) and not config.ld4lg[field]:
        config.ld4lg[field] = f"runs/{field.split('_')[0]}"
    validate_launch(config)  # the unmodified config passes, so each case tests its one field
    _BASE[spec] = config
  return ml_collections.ConfigDict(copy.deepcopy(_BASE[spec].to_dict()))


def leaves(node, prefix: str = "") -> list[str]:
  """Dotted paths of every leaf of a ConfigDict (lists and tuples are leaves)."""
  import ml_collections

  out = []
  for k in sorted(node.keys()):
    v = node[k]
    path = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict | dict):
      out += leaves(v, path + ".")
    else:
      out.append(path)
  return out


def json_edit(config, dotted: str, value):
  """`config` as a hand-edited config.json with `dotted` set to `value` would load."""
  import ml_collections

  from lsd.config import to_json

  d = json.loads(to_json(config))
  *parents, leaf = dotted.split(".")
  node = d
  for p in parents:
    node = node[p]
  node[leaf] = value
  return ml_collections.ConfigDict(json.loads(json.dumps(d)))


def validate_launch(config) -> None:
  """Everything `lsd train` checks before it touches a workdir or data, plus the data and mesh
  sections (checked once data loading starts)."""
  import jax

  from lsd.data import check_data_config
  from lsd.methods import get_task
  from lsd.parallel import rules_from_config
  from lsd.parallel.mesh import mesh_shape
  from lsd.train.state import validate_train_config

  validate_train_config(config.train)
  task = get_task(config)
  task.validate()
  check_data_config(config.data)
  mesh_shape(config.mesh, jax.device_count())
  rules_from_config(config.mesh)


def check_config_case(spec: str, dotted: str, value, typed: bool) -> Outcome:
  """One override of a shipped config through the launch validation, in-process: it passes, or
  it is a ConfigError (the CLI's exit 2)."""
  from lsd.config import ConfigError, apply_override

  case = f"{spec} {dotted}={_short(value, 120)}{' (config.json)' if typed else ''}"
  config = base_config(spec)
  try:
    if typed:
      config = json_edit(config, dotted, value)
    else:
      apply_override(config, dotted, value)
    validate_launch(config)
  except ConfigError as e:
    return Outcome(True, "config", case, f"error 2: {str(e)[:200]}")
  except Exception as e:
    return Outcome(False, "config", case, _bug(e))
  return Outcome(True, "config", case, "ok")


def run_main(argv: list[str], timeout: float = 300) -> tuple[int | None, str, str]:
  """`lsd.main.main(argv)` in this process with stdout/stderr captured; rc None when an exception
  escaped (a traceback), with the error in `err`. A SIGALRM bounds the time (a hang)."""
  from lsd.main import main

  out, err = io.StringIO(), io.StringIO()

  def alarm(signum, frame):
    raise TimeoutError(f"no exit within {timeout:.0f} s")

  previous = signal.signal(signal.SIGALRM, alarm)
  outer, _ = signal.getitimer(signal.ITIMER_REAL)  # e.g. pytest-timeout's: restored after
  t0 = time.monotonic()
  signal.setitimer(signal.ITIMER_REAL, timeout)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      rc = main(argv)
  except SystemExit as e:  # argparse
    rc = e.code if isinstance(e.code, int) else 2
  except BaseException as e:
    return None, out.getvalue(), err.getvalue() + "\n" + _bug(e)
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
    if outer:
      signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - t0), 1e-3))
  return rc, out.getvalue(), err.getvalue()


def judge_cli(kind: str, case: str, rc, err: str) -> Outcome:
  """Success, or the one-line error (`lsd VERB: error: ...`, exit 2/1/3, no traceback). Warnings
  and log lines may precede the error; nothing but the LSD_DEBUG hint of exit 1 may follow it."""
  lines = [line for line in err.strip().splitlines() if line.strip()]
  if any("Traceback" in line for line in lines) or rc not in (0, 1, 2, 3):
    return Outcome(False, kind, case, f"rc {rc}: {(lines or [''])[-1][:300]}")
  if rc == 0:
    return Outcome(True, kind, case, "ok")
  at = [i for i, line in enumerate(lines) if re.match(r"lsd \w+: error: ", line)]
  result = f"error {rc}: {(lines[at[-1]] if at else (lines or [''])[-1])[:240]}"
  after = lines[at[-1] + 1 :] if at else []
  one_line = len(at) == 1 and all(line.startswith("(set LSD_DEBUG=1") for line in after)
  if not one_line:
    result += f" (not one line: {lines[-3:]})"
  return Outcome(one_line, kind, case, result)


def snapshot(directory: Path) -> dict[str, bytes]:
  return {
    str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
  }


def check_run_override(run: Path, tmp: Path, spec_items: list[tuple[str, object, bool]]) -> Outcome:
  """`lsd train --workdir COPY --config.a=b ...` (or a COPY whose config.json was edited) on a copy
  of a finished run: success, or a one-line error that left every file of the copy unchanged."""
  work = Path(tempfile.mkdtemp(dir=tmp))
  copy_dir = work / "run"
  shutil.copytree(run, copy_dir)
  argv = ["train", "--workdir", str(copy_dir)]
  typed = [(d, v) for d, v, t in spec_items if t]
  if typed:
    config = json.loads((copy_dir / "config.json").read_text())
    import ml_collections

    cd = ml_collections.ConfigDict(config)
    for dotted, value in typed:
      cd = json_edit(cd, dotted, value)
    (copy_dir / "config.json").write_text(json.dumps(cd.to_dict()))
  argv += [f"--config.{d}={v}" for d, v, t in spec_items if not t]
  case = " ".join(f"{d}={_short(v, 80)}{'(json)' if t else ''}" for d, v, t in spec_items)
  before = snapshot(copy_dir)
  rc, _, err = run_main(argv)
  out = judge_cli("train_existing_run", case, rc, err)
  if rc != 0:
    after = snapshot(copy_dir)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
      out = Outcome(False, out.kind, case, f"{out.result}; but it changed {changed[:5]}")
  shutil.rmtree(work, ignore_errors=True)
  return out


def check_eval_case(tmp: Path, content: bytes, metrics: str) -> Outcome:
  work = Path(tempfile.mkdtemp(dir=tmp))
  samples = work / "samples.jsonl"
  samples.write_bytes(content)
  argv = ["eval", "--samples", str(samples), "--out", str(work / "report"), "--metrics", metrics]
  rc, _, err = run_main(argv, timeout=120)
  shutil.rmtree(work, ignore_errors=True)
  return judge_cli("eval_samples", f"--metrics {metrics} samples={_short(content, 160)}", rc, err)


def check_text_case(tmp: Path, content: bytes, split: str, encoding: str) -> Outcome:
  """Random bytes as the training corpus of a fresh 2-step run."""
  work = Path(tempfile.mkdtemp(dir=tmp))
  corpus = work / "corpus.txt"
  corpus.write_bytes(content)
  argv = [
    "train",
    "--config",
    str(ROOT / CONFIG),
    "--workdir",
    str(work / "run"),
    f"--config.data.path={corpus}",
    "--config.data.tokenizer.vocab_size=300",
    f"--config.data.text_split={split}",
    f"--config.data.encoding={encoding}",
    "--config.train.steps=2",
    "--config.train.num_samples=0",
    "--config.train.progress=false",
  ]
  rc, _, err = run_main(argv)
  shutil.rmtree(work, ignore_errors=True)
  case = f"text_split={split} encoding={encoding} bytes={_short(content, 160)}"
  return judge_cli("training_text", case, rc, err)


def finished_run(corpus: Path, where: Path) -> Path:
  """A finished 2-step run of the tiny causal LM (the target of `train_existing_run` cases)."""
  run = where / "finished"
  rc, _, err = run_main(
    [
      "train",
      "--config",
      str(ROOT / CONFIG),
      "--workdir",
      str(run),
      f"--config.data.path={corpus}",
      "--config.data.tokenizer.vocab_size=300",
      "--config.train.steps=2",
      "--config.train.ckpt_every=1",
      "--config.train.num_samples=0",
      "--config.train.progress=false",
    ]
  )
  if rc != 0:
    raise RuntimeError(f"the finished run for the fuzz cases failed ({rc}): {err[-2000:]}")
  return run


# Hypothesis strategies ------------------------------------------------------------------------


def strategies():
  """The fuzz strategies (built lazily: hypothesis is a test dependency)."""
  from hypothesis import strategies as st

  edge_ints = st.sampled_from([0, 1, -1, 2, 3, 7, -2, 2**31, -(2**31), 2**63, 10**30])
  edge_floats = st.sampled_from(
    [0.0, -0.0, 0.5, 1.0, 1.5, -1e-9, 1e-300, 1e308, math.inf, -math.inf]
  )
  words = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
  # Command-line strings: parse as the field's type or not.
  raw = st.one_of(
    st.sampled_from(
      [
        "0",
        "1",
        "-1",
        "2",
        "-0",
        "0.5",
        "1e3",
        "1e309",
        "-1e309",
        "inf",
        "nan",
        "-inf",
        "",
        " ",
        "true",
        "false",
        "True",
        "null",
        "None",
        "[]",
        "{}",
        "[1, 2]",
        '[[0, 1.5, 32, "x"]]',
        '"text"',
        "abc",
        "99999999999999999999",
        "0x10",
        "1_000",
        "\x00",
        "é",
        "../..",
        "/",
      ]
    ),  # fmt: skip
    edge_ints.map(str),
    st.integers(-1000, 1000).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    words,
  )
  json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    edge_ints,
    st.integers(-100, 100),
    edge_floats,
    st.floats(-10, 10),
    words,
  )
  # Values a hand-edited config.json may hold: wrong types, out of range, edge values.
  typed = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=4),
    st.dictionaries(st.sampled_from(["a", "text", "0"]), json_scalars, max_size=2),
  )
  return st, raw, typed


def eval_content_strategy():
  from hypothesis import strategies as st

  scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30)
  )  # fmt: skip
  record = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=60)}),
    st.fixed_dictionaries(
      {"text": st.text(max_size=60)},
      optional={
        "tokens": st.one_of(
          st.lists(st.integers(-5, 10**6), max_size=8), st.lists(scalar, max_size=3), scalar
        ),
        "nfe": st.one_of(st.integers(-3, 100), scalar),
        "pred_label": scalar,
        "label": scalar,
      },
    ),
    st.dictionaries(st.text(max_size=6), scalar, max_size=3),
    st.fixed_dictionaries({"text": scalar}),
    scalar,
    st.lists(scalar, max_size=3),
  )
  line = st.one_of(
    record.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"   ", b"{", b"{}", b'{"text": "a"', b"\xff\xfe", b"[]"]),
  )
  content = st.lists(line, max_size=8).map(lambda ls: b"\n".join(ls))
  metrics = st.lists(
    st.sampled_from(["entropy", "dist_n", "diversity", "attribute_accuracy", "rouge", "bleu", "x"]),
    max_size=3,
  ).map(",".join)
  return content, metrics


def text_content_strategy():
  from hypothesis import strategies as st

  content = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from(WORDS + ["\n", "\n\n", "\xe9", "\ufffd", "\x00"]), max_size=200).map(
      lambda ws: " ".join(ws).encode("utf-8")
    ),
  )
  split = st.sampled_from(["line", "paragraph", "file"])
  encoding = st.sampled_from(["utf-8", "latin-1", "utf-16", "ascii", "cp1252"])
  return content, split, encoding


def fuzz(tmp: Path, corpus: Path, n_config: int, n_eval: int, n_run: int, n_text: int, seed: int):
  """Runs the fuzz targets under hypothesis (seeded, no shrinking database), recording every case
  instead of stopping at the first failure. Returns the outcomes."""
  from hypothesis import HealthCheck, given, settings
  from hypothesis import seed as hseed

  st, raw, typed = strategies()
  outcomes: list[Outcome] = []
  common = dict(
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=["generate"],
    derandomize=False,
  )
  specs = {s: leaves(base_config(s)) for s in SHIPPED}
  field = st.sampled_from([(s, d) for s, ds in specs.items() for d in ds])

  @hseed(seed)
  @settings(max_examples=max(n_config, 1), **common)
  @given(field, st.booleans(), st.data())
  def config_cases(spec_field, is_typed, data):
    spec, dotted = spec_field
    value = data.draw(typed if is_typed else raw)
    outcomes.append(check_config_case(spec, dotted, value, is_typed))

  content, metrics = eval_content_strategy()

  @hseed(seed + 1)
  @settings(max_examples=max(n_eval, 1), **common)
  @given(content, metrics)
  def eval_cases(c, m):
    outcomes.append(check_eval_case(tmp, c, m))

  run = finished_run(corpus, tmp) if n_run else None
  causal = leaves(base_config(CONFIG))
  small_raw = st.one_of(
    st.sampled_from(["0", "1", "-1", "2", "3", "0.5", "nan", "inf", "", "true", "x", "[]", "1e3"]),
    st.integers(-3, 40).map(str),
  )
  small_typed = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(-2, 2), st.sampled_from(["", "x"])
  )

  @hseed(seed + 2)
  @settings(max_examples=max(n_run, 1), **common)
  @given(
    st.lists(st.tuples(st.sampled_from(causal), st.booleans()), min_size=1, max_size=2), st.data()
  )
  def run_cases(fields, data):
    items = [(d, data.draw(small_typed if t else small_raw), t) for d, t in fields]
    outcomes.append(check_run_override(run, tmp, items))

  text, split, encoding = text_content_strategy()

  @hseed(seed + 3)
  @settings(max_examples=max(n_text, 1), **common)
  @given(text, split, encoding)
  def text_cases(c, s, e):
    outcomes.append(check_text_case(tmp, c, s, e))

  for target, n in ((config_cases, n_config), (eval_cases, n_eval), (run_cases, n_run),
                    (text_cases, n_text)):  # fmt: skip
    if n:
      t = time.monotonic()
      before = len(outcomes)
      target()
      print(
        f"fuzz {target.__name__}: {len(outcomes) - before} cases, "
        f"{sum(not o.ok for o in outcomes[before:])} failures ({time.monotonic() - t:.0f} s)",
        flush=True,
      )
  return outcomes


# ------------------------------------------------------------------------------ driver


def run_kills(n: int, rng, corpus, tmp, ref) -> list[dict]:
  records = []
  for i, (sig, mode) in enumerate(kill_plan(n, rng)):
    rec = kill_run(i, sig, mode, rng, corpus, tmp, ref)
    records.append(rec)
    print(
      f"kill {i}: {sig.name} {mode} at {rec['kill_time_s']} s, ckpts {rec['checkpoints_at_kill']}"
      f" tmp {len(rec['tmp_dirs_at_kill'])} -> resumed from {rec['resumed_from']}, identical "
      f"{rec['resumed_identical']}, lost {rec['lost_checkpoints']}",
      flush=True,
    )
  return records


def run_corruptions(n: int, rng, corpus, tmp, ref) -> tuple[list[dict], list[str]]:
  read = files_read_by_restore(ref, corpus, tmp)
  records = []
  kinds = [CORRUPTIONS[j % len(CORRUPTIONS)] for j in range(n)]
  rng.shuffle(kinds)
  for i, kind in enumerate(kinds):
    rec = corruption_run(i, kind, rng, read, corpus, tmp, ref)
    records.append(rec)
    print(
      f"corruption {i}: {kind} {rec['file']} -> detected {rec['detected']}, resumed from "
      f"{rec['resumed_from']}, recovered {rec['recovered']}",
      flush=True,
    )
  return records, read


def run_all(
  kills: int, corruptions: int, fuzz_sizes: tuple[int, int, int, int], seed: int, tmp: Path
) -> dict:
  rng = random.Random(seed)
  corpus = write_corpus(tmp / "corpus.txt", seed=seed)
  t = time.monotonic()
  ref = reference_run(corpus, tmp)
  print(f"reference: start-up {ref.start_s:.1f} s, loop {ref.train_s:.1f} s", flush=True)
  kill_records = run_kills(kills, rng, corpus, tmp, ref)
  corruption_records, read = run_corruptions(corruptions, rng, corpus, tmp, ref)
  t_fuzz = time.monotonic()
  outcomes = fuzz(tmp, corpus, *fuzz_sizes, seed=seed)
  by_kind: dict[str, dict[str, int]] = {}
  for o in outcomes:
    k = by_kind.setdefault(o.kind, {"cases": 0, "failures": 0, "errors": 0})
    k["cases"] += 1
    k["failures"] += not o.ok
    k["errors"] += o.ok and o.result != "ok"
  return {
    "kills": {
      "runs": len(kill_records),
      "resumed": sum(r["resumed"] for r in kill_records),
      "resumed_identical": sum(r["resumed_identical"] for r in kill_records),
      "checkpoints_lost": sum(len(r["lost_checkpoints"]) for r in kill_records),
      "killed_during_checkpoint_write": sum(bool(r["tmp_dirs_at_kill"]) for r in kill_records),
      "by_signal": {s: sum(r["signal"] == s for r in kill_records) for s in ("SIGKILL", "SIGTERM")},
      "details": kill_records,
    },
    "corruptions": {
      "runs": len(corruption_records),
      "detected": sum(r["detected"] for r in corruption_records),
      "recovered": sum(r["recovered"] for r in corruption_records),
      "files_read_by_restore": read,
      "details": corruption_records,
    },
    "fuzz": {
      "cases": len(outcomes),
      "failures": sum(not o.ok for o in outcomes),
      "by_target": by_kind,
      "failure_details": [dataclasses.asdict(o) for o in outcomes if not o.ok],
      "error_examples": [dataclasses.asdict(o) for o in outcomes if o.ok and o.result != "ok"][
        :: max(1, len(outcomes) // 40)
      ],
    },
    "reference": {"start_s": round(ref.start_s, 1), "loop_s": round(ref.train_s, 1)},
    "wall_s": {"total": round(time.monotonic() - t), "fuzz": round(time.monotonic() - t_fuzz)},
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="3 kills, 1 corruption, a few fuzz cases")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--kills", type=int, default=20)
  p.add_argument("--corruptions", type=int, default=10)
  p.add_argument("--fuzz", type=int, nargs=4, default=[480, 100, 40, 30],
                 metavar=("CONFIG", "EVAL", "RUN", "TEXT"),
                 help="fuzz cases per target: config validation, eval samples, overrides on a "
                 "finished run, training text")  # fmt: skip
  p.add_argument("--out", default="faults", help="result name (benchmarks/results/NAME.json)")
  args = p.parse_args()
  if args.quick:
    args.kills, args.corruptions, args.fuzz = 3, 1, [20, 10, 2, 2]
  with tempfile.TemporaryDirectory(prefix="lsd-faults-") as tmp:
    metrics = run_all(args.kills, args.corruptions, tuple(args.fuzz), args.seed, Path(tmp))
    # Error messages quote the temporary run files; the result names them relative to it.
    metrics = json.loads(re.sub(re.escape(tmp) + r"/[^/\s\"']+/?", "<tmp>/", json.dumps(metrics)))
  from common import write_result

  config = {
    "train_config": CONFIG,
    "steps": STEPS,
    "ckpt_every": CKPT_EVERY,
    "keep_checkpoints": 3,
    "seed": args.seed,
    "kills": args.kills,
    "corruptions": args.corruptions,
    "fuzz_cases_per_target": dict(zip(("config", "eval", "run", "text"), args.fuzz, strict=True)),
    "command": "python benchmarks/faults.py" + (" --quick" if args.quick else ""),
  }
  summary = {
    k: v for k, v in metrics.items() if k in ("kills", "corruptions", "fuzz")
  }  # fmt: skip
  with contextlib.redirect_stdout(io.StringIO()):  # its one-line summary would print every detail
    path = write_result(
      args.out, summary | {k: metrics[k] for k in ("reference", "wall_s")}, config
    )
  k, c, f = metrics["kills"], metrics["corruptions"], metrics["fuzz"]
  print(
    f"{args.out}: kills {k['resumed_identical']}/{k['runs']} resumed identical, "
    f"{k['checkpoints_lost']} checkpoints lost; corruptions {c['detected']}/{c['runs']} detected, "
    f"{c['recovered']}/{c['runs']} recovered; fuzz {f['failures']} failures in {f['cases']} "
    f"cases -> {path}"
  )


if __name__ == "__main__":
  main()
