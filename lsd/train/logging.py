"""Metrics to JSONL and TensorBoard, a progress bar, and the loss-curve PNG.

The workdir may be remote (gs://, ...; see lsd.fileio). Object stores cannot append, so there
metrics.jsonl is rewritten whole at each logged step (one upload of a few hundred bytes per row
logged); TensorBoard events go through tensorboardX's own gs:// / s3:// writers, and a workdir they
cannot reach keeps metrics.jsonl only, with a warning.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import time
import warnings

import numpy as np
from etils import epath

from lsd.fileio import as_path, atomic_write_text, is_remote, one_line, scheme


class MetricWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.path = as_path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    self.remote = is_remote(self.path)
    self._text: str | None = None  # remote: the file's text, uploaded whole on each write
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter

      logdir = str(self.path.parent / "tensorboard")
      try:
        if self.remote:
          _check_tensorboard_client(logdir)
        self._tb = SummaryWriter(logdir)
      except Exception as e:
        if not self.remote:
          raise
        warnings.warn(
          f"{logdir}: no TensorBoard events ({one_line(e)}); metrics.jsonl has every logged value",
          RuntimeWarning,
          stacklevel=2,
        )

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": prefix, "time": time.time()}
    record.update({k: float(v) for k, v in metrics.items()})
    line = json.dumps(record) + "\n"
    if self.remote:
      if self._text is None:
        self._text = self.path.read_text() if self.path.exists() else ""
      self._text += line
      self.path.write_text(self._text)
    else:
      with open(self.path, "a") as f:
        f.write(line)
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

  def truncate_after(self, step: int) -> None:
    """Drops the records of steps after `step` (a resumed run replays and logs them again), by an
    atomic rewrite of metrics.jsonl."""
    if not self.enabled or not self.path.exists():
      return
    lines = self.path.read_text().splitlines()
    steps = [_step_of(line) for line in lines]
    keep = [line for line, s in zip(lines, steps, strict=True) if s is not None and s <= step]
    if len(keep) != len(lines):
      atomic_write_text(self.path, "".join(line + "\n" for line in keep))
    self._text = None

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


# tensorboardX writes remote event files itself, with these client libraries.
_TENSORBOARD_CLIENTS = {"gs": "google.cloud.storage", "s3": "boto3"}


def _check_tensorboard_client(logdir: str) -> None:
  module = _TENSORBOARD_CLIENTS.get(scheme(logdir) or "")
  if module is None:
    raise ValueError(f"tensorboardX writes no {scheme(logdir)}:// event files")
  try:
    found = importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package (google.cloud) is missing
    found = False
  if not found:
    raise ModuleNotFoundError(f"tensorboardX needs {module} for {scheme(logdir)}:// event files")


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a line a kill tore mid-write (or a blank one)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  path = as_path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  return [json.loads(line) for line in lines if _step_of(line) is not None]


def plot_loss_curve(
  workdir: str | os.PathLike, out: str | os.PathLike | None = None
) -> epath.Path | None:
  """Writes `loss_curve.png` (train and eval loss against step); None if nothing was logged."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out = as_path(out or as_path(workdir) / "loss_curve.png")
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for split in ("train", "eval"):
    pts = [(r["step"], r["loss"]) for r in records if r.get("split") == split and "loss" in r]
    if pts:
      steps, losses = np.array(pts).T
      ax.plot(steps, losses, label=split, marker="o" if split == "eval" else None)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png")
  plt.close(fig)
  out.write_bytes(png.getvalue())
  return out


class Progress:
  """tqdm bar showing loss, tokens/s and ETA; a no-op when disabled."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self.bar = None
    if enabled:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, n: int, **postfix) -> None:
    if self.bar is not None:
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)
      self.bar.update(n)

  def write(self, msg: str) -> None:
    if self.bar is not None:
      self.bar.write(msg)
    else:
      print(msg, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_total: float) -> float:
  """Model FLOP utilisation: the task's analytic training FLOPs per token x tokens per second (all
  devices) over the peak FLOP/s of all devices."""
  return flops_per_token * tokens_per_s / peak_flops_total


def peak_flops_total(configured: float, devices) -> float | None:
  """Peak FLOP/s of `devices` for MFU: `train.peak_flops` per device when set (> 0), else the
  known dense bf16 peak of their kind (lsd.train.aot.DEVICE_SPECS); None when unknown (CPU)."""
  from lsd.train.aot import peak_flops

  per_device = float(configured or 0.0) or peak_flops(devices[0].device_kind)
  return per_device * len(devices) if per_device else None


class ProfileWindow:
  """A `jax.profiler` trace of the steps i with start <= i < stop (0-based: the trace begins before
  step `start` runs and ends once step stop - 1 has finished) into `directory`, for TensorBoard's
  profile plugin or Perfetto; a no-op for `steps` = () or a window the run does not reach.

  With `program` (a function giving the HLO text of the traced step's compiled program), the window
  also writes `top_costs.json` beside the trace: the source lines whose ops cost the most per step
  (`lsd.train.profile.top_costs`), and `log`s them. A summary that fails only warns."""

  def __init__(self, directory: str | os.PathLike, steps, program=None, log=print):
    steps = tuple(int(s) for s in steps)
    self.directory, self.window, self.active = as_path(directory), steps, False
    self.program, self.log = program, log

  def before(self, step: int) -> None:
    if self.window and step == self.window[0] and not self.active:
      import jax

      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
      self.active = True

  def after(self, done: int, outputs) -> None:
    if self.active and done >= self.window[1]:
      import jax

      jax.block_until_ready(outputs)  # the traced steps' device work ends inside the trace
      self.close()
      if self.program is not None:
        self.summarize()

  def summarize(self, k: int = 5) -> None:
    from lsd.train.profile import top_costs

    try:
      if is_remote(self.directory):
        raise ValueError("the trace is not on a local disk")
      costs = top_costs(self.directory, self.program(), self.window[1] - self.window[0], k=k)
    except Exception as e:  # the trace itself is written; a summary is a convenience
      warnings.warn(
        f"no top_costs.json for the profile in {self.directory}: {one_line(e)}", stacklevel=2
      )
      return
    rows = [c.as_dict() for c in costs]
    atomic_write_text(self.directory / "top_costs.json", json.dumps(rows, indent=1))
    self.log(f"profile of steps {self.window[0]}..{self.window[1] - 1}, top {len(rows)} costs:")
    for c in costs:
      self.log(
        f"  {c.ms_per_step:9.2f} ms/step {c.share:6.1%}  {c.source}  {', '.join(c.kinds[:3])}"
      )

  def close(self) -> None:
    if self.active:
      import jax

      jax.profiler.stop_trace()
      self.active = False
