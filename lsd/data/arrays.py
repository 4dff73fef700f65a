"""Training data held as in-memory arrays: one row per example, every field an array of N rows.

Used where the rows are precomputed features rather than text, e.g. the latents of a frozen
autoencoder (LD4LG stage 2 encodes its training sentences once instead of at every step).

Pipeline (per process): this process's rows [process_index::process_count] -> MapDataset.range ->
shuffle(seed) -> repeat(num_epochs) -> map(index -> row) -> batch(local batch) -> to_iter_dataset.
The iterator state is a position (grain), so it checkpoints with the model like the text pipelines.
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

  `train` holds this process's training rows (callers shard before building, see `shard_rows`);
  `eval` holds all evaluation rows (every process keeps its part of each global eval batch).
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
    if n < self.local_batch_size:
      raise ConfigError(
        f"data.batch_size={self.batch_size}: process {self.process_index} has only {n} training "
        f"rows, fewer than its batch of {self.local_batch_size}"
      )
    if self.eval:
      _check_rows("eval rows", self.eval)

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def train_iter(self, num_epochs: int | None = None) -> grain.DatasetIterator:
    rows = self.train

    def fetch(i):
      return {k: v[i] for k, v in rows.items()}

    n = _check_rows("train rows", rows)
    ds = grain.MapDataset.range(n).shuffle(seed=self.seed).repeat(num_epochs).map(fetch)
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
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


def shard_rows(arrays: dict[str, np.ndarray], process_index: int, process_count: int) -> dict:
  """This process's rows [process_index::process_count] of every field."""
  return {k: v[process_index::process_count] for k, v in arrays.items()}
