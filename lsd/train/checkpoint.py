"""Checkpoints: orbax CheckpointManager with the train state and the data-iterator position.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or kill
mid-save leaves the previous checkpoints intact. `keep` bounds disk use.

On restore, a checkpoint that cannot be read (a truncated, zeroed or missing file, empty metadata)
is told apart from one that does not fit the current config (other array shapes): the first is
moved aside to `<checkpoints>.corrupt/<step>` with a warning and the next older checkpoint is
tried; the second is a `CheckpointMismatch` naming the difference.

The directory may be remote (gs://, ...): orbax takes an `epath.Path` and writes arrays through
tensorstore, which reaches the store itself (on GCS a "rename" is not atomic; orbax then marks a
finished step with a commit file instead).
"""

from __future__ import annotations

import collections
import json
import os
import time
import warnings

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lsd.config import ConfigError
from lsd.fileio import as_path, is_remote, move_tree


class CheckpointMismatch(ConfigError):
  """A readable checkpoint whose arrays do not fit the current config's train state."""


class NoIntactCheckpoint(ConfigError):
  """Every checkpoint of a run failed to read."""


def _shapes(tree) -> collections.Counter:
  return collections.Counter(
    (tuple(int(d) for d in x.shape), np.dtype(x.dtype).name) for x in jax.tree.leaves(tree)
  )


class Checkpointer:
  def __init__(
    self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True, create: bool = True
  ):
    directory = as_path(directory)
    self.directory = directory if is_remote(directory) else epath.Path(os.path.abspath(directory))
    self.restored_step: int | None = None
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(
    self, abstract_state, data_iter=None, step: int | None = None, *, set_aside: bool = True
  ):
    """Restores into the shardings of `abstract_state` (a pytree of arrays or ShapeDtypeStructs
    with `.sharding`); the data iterator's position is restored in place.

    With `step=None`, the newest checkpoint that reads is restored: unreadable newer ones are
    skipped with a warning, and moved aside when `set_aside` (a trainer that will write new
    checkpoints; readers pass False and change nothing). `restored_step` tells which step was
    used. A given `step` that does not exist or does not read is a ConfigError naming the steps
    that exist.
    """
    if step is not None:
      if step not in self.all_steps():
        raise ConfigError(f"step={step}: {self.directory} has checkpoints {self.all_steps()}")
      try:
        return self._restore(step, abstract_state, data_iter)
      except CheckpointMismatch:
        raise
      except Exception as e:
        raise ConfigError(
          f"checkpoint step {step} in {self.directory / str(step)} cannot be read ({_first(e)}); "
          f"steps that exist: {self.all_steps()}"
        ) from e
    steps = self.all_steps()
    if not steps:
      raise ConfigError(f"{self.directory} holds no checkpoint")
    for step in reversed(steps):
      try:
        state = self._restore(step, abstract_state, data_iter)
      except CheckpointMismatch:
        raise
      except Exception as e:
        where = self.directory / str(step)
        fate = f"was moved to {self._set_aside(step)}" if set_aside else "was skipped"
        warnings.warn(
          f"checkpoint step {step} in {where} is corrupt and {fate} ({_first(e)}); trying the "
          "next older checkpoint",
          RuntimeWarning,
          stacklevel=2,
        )
        continue
      self.restored_step = step
      return state
    raise NoIntactCheckpoint(
      f"no checkpoint in {self.directory} could be read (steps {steps} are all corrupt); start "
      "over with a new --workdir"
    )

  def _restore(self, step: int, abstract_state, data_iter):
    try:
      meta = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
      stored = jax.tree.leaves(getattr(meta, "tree", meta))
    except Exception as e:
      raise OSError(f"its metadata does not read: {_first(e)}") from e
    want = _shapes(abstract_state)
    have = _shapes(stored)
    if want != have:
      only_ckpt = sorted((have - want).elements())[:3]
      only_cfg = sorted((want - have).elements())[:3]
      raise CheckpointMismatch(
        f"the checkpoint at step {step} in {self.directory} does not fit the current config: it "
        f"holds {sum(have.values())} arrays, the config's train state {sum(want.values())}; "
        f"(shape, dtype) only in the checkpoint: {only_ckpt}, only in the config: {only_cfg}. "
        "Model or optimiser fields (model.*, train.ema_decay, train.freeze, ...) differ from the "
        "run that wrote it: launch with its own config, or use a new --workdir"
      )
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    if data_iter is not None:
      data_iter.set_state(self._data_position(step))
    return restored["state"]

  def _data_position(self, step: int) -> dict:
    """The data iterator's state at `step`. Each process writes its own file (grain's handler),
    but the position is the same on every process (the batches do not depend on the process
    count), so a run resumed on another process count reads process 0's."""
    folder = self.directory / str(step) / "data_iter"
    index, count = jax.process_index(), jax.process_count()
    mine = folder / f"process_{index}-of-{count}.json"
    if not mine.exists():
      written = sorted(folder.glob("process_0-of-*.json"))
      if not written:
        raise OSError(f"it holds no data position ({mine.name} is missing)")
      mine = written[0]
      if index == 0:
        print(
          f"lsd: the checkpoint at step {step} was written by "
          f"{mine.stem.split('-of-')[1]} process(es), this run has {count}: the data position "
          "is shared, so it resumes",
          flush=True,
        )
    return json.loads(mine.read_text())

  def _set_aside(self, step: int) -> epath.Path:
    """Moves an unreadable step directory out of the manager's view (it is kept for inspection,
    and a later save of the same step must not collide with it)."""
    aside = as_path(f"{self.directory}.corrupt")
    aside.mkdir(exist_ok=True)
    dest = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    move_tree(self.directory / str(step), dest)  # on an object store: a copy, then a delete
    self.manager.reload()
    return dest

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first(e: BaseException) -> str:
  lines = [line for line in str(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
