"""Data: document sources, tokenizers and grain pipelines, wired together by `build_data`.

Typical use (in the trainer)::

  bundle = build_data(cfg.data, workdir, seed=cfg.seed, process_index=jax.process_index(),
                      process_count=jax.process_count())
  train_it = bundle.train_iter()          # checkpoint it with the model (grain.checkpoint)
  for batch in bundle.eval_batches(64): ...
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import grain
import numpy as np

from lsd.data.config import check_data_config, default_data_config
from lsd.data.pipeline import (
  FixedEvalBatches,
  PackIterDataset,
  eval_canvases,
  lm_dataset,
  local_eval_batches,
  tokenize_documents,
)
from lsd.data.prepared import PreparedData, load_prepared, prepare
from lsd.data.sources import SOURCES, TEXT_SPLITS, load_documents, split_documents
from lsd.data.tokenizer import (
  SPECIAL_TOKENS,
  TOKENIZER_FILE,
  Tokenizer,
  build_tokenizer,
  gpt2_from_files,
  train_bpe,
)

__all__ = [
  "SOURCES",
  "SPECIAL_TOKENS",
  "TEXT_SPLITS",
  "TOKENIZER_FILE",
  "DataBundle",
  "PackIterDataset",
  "PreparedData",
  "Tokenizer",
  "build_data",
  "build_tokenizer",
  "check_data_config",
  "default_data_config",
  "eval_canvases",
  "gpt2_from_files",
  "lm_dataset",
  "load_documents",
  "local_eval_batches",
  "prepare",
  "split_documents",
  "tokenize_documents",
  "train_bpe",
]


@dataclasses.dataclass
class DataBundle(FixedEvalBatches):
  """Everything the trainer and evaluators need from the data side of a run.

  Attributes:
    tokenizer: the run's tokenizer (saved as `workdir/tokenizer.json`).
    train_docs, eval_docs: disjoint document lists ({"text": str, "label": int?, ...}).
    seq_len, batch_size: canvas length and *global* batch size.
    seed: seed of the training shuffle.
    process_index, process_count: this process's place among the data-loading processes.
  """

  tokenizer: Tokenizer
  train_docs: list[dict[str, Any]]
  eval_docs: list[dict[str, Any]]
  seq_len: int
  batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def train_iter(self, num_epochs: int | None = None) -> grain.DatasetIterator:
    """A fresh, checkpointable iterator of {"tokens": int32[B, L], "valid": bool[B, L]} batches.

    B is the local batch (batch_size // process_count). Restore a saved position with
    `grain.checkpoint.CheckpointRestore(it)` (orbax) or `it.set_state(...)`.
    """
    ds = lm_dataset(
      self.train_docs,
      self.tokenizer,
      seq_len=self.seq_len,
      global_batch_size=self.batch_size,
      seed=self.seed,
      process_index=self.process_index,
      process_count=self.process_count,
      num_epochs=num_epochs,
    )
    return iter(ds)

  @functools.cached_property
  def _eval_canvases(self) -> tuple[np.ndarray, np.ndarray]:
    # Tokenised once per bundle: evaluation runs many times with the same documents.
    return eval_canvases(self.eval_docs, self.tokenizer, self.seq_len)

  @property
  def _has_eval(self) -> bool:
    return bool(self.eval_docs)  # data.eval_fraction=0 (or a one-document corpus): none held out


def build_data(
  cfg, workdir: str | os.PathLike, *, seed: int, process_index: int = 0, process_count: int = 1
) -> DataBundle | PreparedData:
  """Validates `cfg` (a data config), loads and splits documents and builds the tokenizer.

  The tokenizer is trained on the training documents only and saved to `workdir/tokenizer.json`;
  a resumed run loads that file instead of building a new one. Every process computes the same
  split (it depends only on the documents, `eval_fraction` and `split_seed`).
  """
  check_data_config(cfg, process_count)
  if cfg.source == "prepared":  # tokenised once by `lsd prepare`: read by record, never whole
    return load_prepared(
      cfg, workdir, seed=seed, process_index=process_index, process_count=process_count
    )
  docs = load_documents(cfg)
  train_docs, eval_docs = split_documents(docs, cfg.eval_fraction, cfg.split_seed)
  train_texts = [d["text"] for d in train_docs]
  tokenizer = build_tokenizer(cfg.tokenizer, train_texts, save_dir=workdir)
  return DataBundle(
    tokenizer=tokenizer,
    train_docs=train_docs,
    eval_docs=eval_docs,
    seq_len=cfg.seq_len,
    batch_size=cfg.batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )
