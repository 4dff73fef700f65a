"""Training data held as in-memory arrays: one row per example, every field an array of N rows.

Used where the rows are precomputed features rather than text, e.g. the latents of a frozen
autoencoder (LD4LG stage 2 encodes its training sentences once instead of at every step).

Pipeline (every process the same): all N training rows -> MapDataset.range -> shuffle(seed) ->
repeat(num_epochs) -> batch(global batch) -> this process's slice of each global batch ->
to_iter_dataset. So the rows of global batch i do not depend on the process count: a run on 2
processes sees the batches a run on 1 process sees. The iterator state is a position (grain), the
same on every process, so it checkpoints with the model and resumes on another process count.
Evaluation batches are the fixed global batches of the eval rows, in order; the last one is filled
up with the first rows again, so every eval batch has the training shape and holds real rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from lsd.config import ConfigError

Batch = dict[str, np.ndarray]
_SYNCHRONOUS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _check_rows(name: str, arrays: dict[str, np.ndarray]) -> int:
  if not arrays:
    raise ConfigError(f"{name}: no fields")
  lengths = {k: len(v) for k, v in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"{name}: fields have different row counts {lengths}")
  return next(iter(lengths.values()))


@dataclasses.dataclass
class ArrayData:
  """The trainer's data object (see `lsd.train.task.Task.make_data`) over in-memory arrays.

  `train` holds all training rows and `eval` all evaluation rows; every process keeps its part of
  each global batch. Rows computed per process are joined first (`gather_rows`).
  """

  tokenizer: Any
  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  batch_size: int  # global
  seed: int
  process_index: int = 0
  process_count: int = 1
  num_labels: int = 0

  def __post_init__(self):
    if self.batch_size <= 0 or self.batch_size % self.process_count:
      raise ConfigError(
        f"data.batch_size={self.batch_size} must be a positive multiple of the process count "
        f"{self.process_count}"
      )
    n = _check_rows("train rows", self.train)
    if n < self.batch_size:
      raise ConfigError(
        f"data.batch_size={self.batch_size} is larger than the {n} training rows; use a smaller "
        "batch or more data"
      )
    if self.eval:
      _check_rows("eval rows", self.eval)

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def train_iter(self, num_epochs: int | None = None) -> grain.DatasetIterator:
    rows = self.train
    lo = self.process_index * self.local_batch_size
    mine = slice(lo, lo + self.local_batch_size)

    def fetch(idx):  # this process's rows of one global batch of row indices
      return {k: v[idx[mine]] for k, v in rows.items()}

    n = _check_rows("train rows", rows)
    ds = grain.MapDataset.range(n).shuffle(seed=self.seed).repeat(num_epochs)
    ds = ds.batch(self.batch_size, drop_remainder=True).map(fetch)
    return iter(ds.to_iter_dataset(_SYNCHRONOUS))

  def eval_batches(self, num_batches: int = 0) -> list[Batch]:
    """This process's rows of the first `num_batches` global eval batches (0 = all); the last
    batch wraps around to the first rows."""
    if not self.eval:
      return []  # data.eval_fraction=0: nothing held out
    rows = _check_rows("eval rows", self.eval)
    n = -(-rows // self.batch_size)
    if num_batches:
      n = min(n, num_batches)
    local, out = self.local_batch_size, []
    for b in range(n):
      start = b * self.batch_size + self.process_index * local
      idx = np.arange(start, start + local) % rows
      out.append({k: v[idx] for k, v in self.eval.items()})
    return out


def gather_rows(
  local: dict[str, np.ndarray], process_index: int, process_count: int, allgather=None
) -> dict[str, np.ndarray]:
  """All rows, in their global order, from each process's rows [process_index::process_count]
  (computed where they are cheap to split, e.g. encoding sentences to latents): every process
  gets the same arrays. `allgather` (default `multihost_utils.process_allgather`) stacks one
  equally shaped array per process; the shards are padded to equal length for it."""
  if process_count == 1:
    return dict(local)
  if allgather is None:
    from jax.experimental import multihost_utils

    allgather = multihost_utils.process_allgather
  n_local = np.asarray(allgather(np.int64(_check_rows("local rows", local))))  # [P]
  total, m = int(n_local.sum()), int(n_local.max())
  out = {}
  for k, v in local.items():
    padded = np.zeros((m, *v.shape[1:]), v.dtype)
    padded[: len(v)] = v
    stacked = np.asarray(allgather(padded))  # [P, m, ...]: process p holds rows p, p + P, ...
    full = np.zeros((total, *v.shape[1:]), v.dtype)
    for p in range(process_count):
      full[p::process_count] = stacked[p, : int(n_local[p])]
    out[k] = full
  return out
