"""launch/tpu_pod.sh and launch/slurm.sbatch against stub gcloud / srun / sbatch executables that
record every call: the exact commands each script issues."""

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Records its argv as one JSON line; `queued-resources describe` prints the next state from
# $STUB_STATES (a line "NOT_FOUND" = the resource does not exist: exit 1).
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
if sys.argv[1:4] == ["compute", "tpus", "queued-resources"] and sys.argv[4] == "describe":
  path = os.environ["STUB_STATES"]
  states = open(path).read().split()
  state, rest = (states[0], states[1:]) if states else ("ACTIVE", [])
  open(path, "w").write("\\n".join(rest))
  if state == "NOT_FOUND":
    print("ERROR: NOT_FOUND", file=sys.stderr)
    sys.exit(1)
  print(state)
"""


@pytest.fixture
def stubs(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "srun", "sbatch"):
    (bin_dir / name).write_text(STUB)
    (bin_dir / name).chmod(0o755)
  log, states = tmp_path / "calls.jsonl", tmp_path / "states"
  env = {
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "HOME": str(tmp_path),
    "STUB_LOG": str(log),
    "STUB_STATES": str(states),
  }

  def run(script, args, states_list=(), **extra):
    states.write_text("\n".join(states_list))
    log.write_text("")
    proc = subprocess.run(
      ["bash", str(ROOT / "launch" / script), *args],
      env={**env, **extra},
      capture_output=True,
      text=True,
      timeout=60,
    )
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    return proc, calls

  return run


TPU_ENV = dict(
  REPO_URL="https://example.org/lsd.git",
  COMMIT="abc123",
  TPU_NAME="lsd-v5e16",
  ZONE="us-west4-a",
  ACCELERATOR_TYPE="v5litepod-16",
  RUNTIME_VERSION="v2-alpha-tpuv5-lite",
  WORKDIR="/mnt/runs/sbd base",
  POLL_SECONDS="0",
)
ARGS = ["configs/sbd.py:size=base", "--config.model.remat=full", "--config.train.grad_accum=2"]
DESCRIBE = [
  "gcloud", "compute", "tpus", "queued-resources", "describe", "lsd-v5e16", "--zone",
  "us-west4-a", "--format=value(state.state)",
]  # fmt: skip
CREATE = [
  "gcloud", "compute", "tpus", "queued-resources", "create", "lsd-v5e16", "--node-id",
  "lsd-v5e16", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-16",
  "--runtime-version", "v2-alpha-tpuv5-lite",
]  # fmt: skip
DELETE = [
  "gcloud", "compute", "tpus", "queued-resources", "delete", "lsd-v5e16", "--zone",
  "us-west4-a", "--force", "--quiet",
]  # fmt: skip
SSH = [
  "gcloud", "compute", "tpus", "tpu-vm", "ssh", "lsd-v5e16", "--zone", "us-west4-a",
  "--worker=all", "--command",
]  # fmt: skip


def _words(line: str) -> list[str]:
  """A printed command line's words, as bash reads them (--dry-run quotes with printf %q)."""
  out = subprocess.run(
    ["bash", "-c", 'eval "set -- $LINE"; printf "%s\\0" "$@"'],
    env={"LINE": line, "PATH": os.environ["PATH"]},
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  return out.split("\0")[:-1]


def _check_remote_commands(install: str, start: str):
  assert (
    "= abc123 ]; then" in install
    and "git clone --quiet https://example.org/lsd.git ~/lsd" in (install)
  )
  assert "git checkout --quiet --detach abc123" in install and "echo abc123 > .installed" in install
  assert ".venv/bin/pip install --quiet -e '.[tpu,gcs]'" in install
  # The training command, its arguments quoted for the remote shell, under nohup, one log per host.
  line = next(x for x in start.splitlines() if x.startswith("nohup "))
  words = shlex.split(line)
  assert words[:4] == ["nohup", ".venv/bin/lsd", "train", "--distributed"]
  assert words[4:12] == [
    "--config", "configs/sbd.py:size=base", "--workdir", "/mnt/runs/sbd base",
    "--config.model.remat=full", "--config.train.grad_accum=2", ">>", "$log",
  ]  # fmt: skip
  assert "log=~/lsd_logs/sbd\\ base.$(hostname).log" in start
  assert 'kill -0 "$(cat "$pid")"' in start  # a run still going is left alone


def test_tpu_pod_queues_a_missing_slice_waits_installs_and_starts(stubs):
  proc, calls = stubs(
    "tpu_pod.sh", ARGS, ["NOT_FOUND", "WAITING_FOR_RESOURCES", "ACTIVE"], **TPU_ENV
  )
  assert proc.returncode == 0, proc.stderr
  assert calls[:4] == [DESCRIBE, CREATE, DESCRIBE, DESCRIBE]
  assert [c[:10] for c in calls[4:]] == [SSH, SSH] and len(calls) == 6
  _check_remote_commands(calls[4][10], calls[5][10])


def test_tpu_pod_reuses_an_active_slice_and_requeues_a_preempted_one(stubs):
  proc, calls = stubs("tpu_pod.sh", ARGS, ["ACTIVE"], **TPU_ENV)
  assert proc.returncode == 0, proc.stderr
  assert [c[:10] for c in calls] == [DESCRIBE, SSH, SSH]
  proc, calls = stubs("tpu_pod.sh", ARGS, ["SUSPENDED", "ACTIVE"], **TPU_ENV, SPOT="1")
  assert proc.returncode == 0, proc.stderr
  assert calls[:4] == [DESCRIBE, DELETE, [*CREATE, "--spot"], DESCRIBE]
  assert [c[:10] for c in calls[4:]] == [SSH, SSH]


def test_tpu_pod_dry_run_only_queries(stubs):
  proc, calls = stubs("tpu_pod.sh", ["--dry-run", *ARGS], ["NOT_FOUND"], **TPU_ENV)
  assert proc.returncode == 0, proc.stderr
  assert calls == [DESCRIBE]
  printed = [_words(x) for x in proc.stdout.strip().split("\n") if x.startswith("gcloud")]
  assert printed[0] == CREATE
  assert [p[:10] for p in printed[1:]] == [SSH, SSH]
  _check_remote_commands(printed[1][10], printed[2][10])


@pytest.mark.parametrize("missing", ["REPO_URL", "COMMIT"])
def test_tpu_pod_requires_a_repository_and_a_commit(stubs, missing):
  env = {k: v for k, v in TPU_ENV.items() if k != missing}
  proc, calls = stubs("tpu_pod.sh", ARGS, ["ACTIVE"], **env)
  assert proc.returncode != 0 and missing in proc.stderr and calls == []


def test_tpu_pod_passes_a_gs_workdir_through(stubs):
  proc, calls = stubs("tpu_pod.sh", ARGS, ["ACTIVE"], **{**TPU_ENV, "WORKDIR": "gs://b/run"})
  assert proc.returncode == 0, proc.stderr
  assert [c[:10] for c in calls] == [DESCRIBE, SSH, SSH]
  assert "--workdir gs://b/run " in calls[2][10] and "lsd_logs/run." in calls[2][10]


def test_slurm_installs_once_then_submits_and_trains_with_srun(stubs, tmp_path):
  home = tmp_path / "shared lsd"
  env = dict(REPO_URL="https://example.org/lsd.git", COMMIT="abc123", LSD_HOME=str(home), NODES="4")
  args = ["configs/sbd.py:size=base", "/mnt/runs/sbd", "--config.train.grad_accum=2"]
  # Not installed yet, dry run: the install and submit commands are printed, nothing runs.
  proc, calls = stubs("slurm.sbatch", ["--dry-run", *args], **env)
  assert proc.returncode == 0, proc.stderr
  assert calls == [] and not home.exists()
  printed = [_words(line) for line in proc.stdout.strip().split("\n")]
  logs = f"{home}/logs"
  assert printed == [
    ["git", "clone", "--quiet", "https://example.org/lsd.git", str(home)],
    ["git", "-C", str(home), "fetch", "--quiet", "origin"],
    ["git", "-C", str(home), "checkout", "--quiet", "--detach", "abc123"],
    ["python3", "-m", "venv", f"{home}/.venv"],
    [f"{home}/.venv/bin/pip", "install", "--quiet", "-e", f"{home}[gpu]"],
    ["mkdir", "-p", logs],
    ["sbatch", "--nodes", "4", "--output", f"{logs}/%x-%j.out", "--export",
     f"ALL,LSD_HOME={home},LOG_DIR={logs}", f"{home}/launch/slurm.sbatch", *args],
  ]  # fmt: skip
  # Installed at this commit: no install, one sbatch call.
  home.mkdir()
  (home / ".installed").write_text("abc123\n")
  proc, calls = stubs("slurm.sbatch", args, **env, SBATCH_ARGS="--partition gpu")
  assert proc.returncode == 0, proc.stderr
  assert "already installed" in proc.stderr
  assert calls == [
    ["sbatch", "--nodes", "4", "--output", f"{logs}/%x-%j.out", "--partition", "gpu", "--export",
     f"ALL,LSD_HOME={home},LOG_DIR={logs}", f"{home}/launch/slurm.sbatch", *args],
  ]  # fmt: skip
  # In the allocation: srun with a log per node.
  proc, calls = stubs("slurm.sbatch", args, LSD_HOME=str(home), SLURM_JOB_ID="42")
  assert proc.returncode == 0, proc.stderr
  assert calls == [
    ["srun", "--kill-on-bad-exit=1", "--output", f"{logs}/%x-%j-%N.log", f"{home}/.venv/bin/lsd",
     "train", "--distributed", "--config", args[0], "--workdir", args[1], args[2]],
  ]  # fmt: skip
  assert (home / "logs").is_dir()
