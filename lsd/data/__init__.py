"""Data: document sources, tokenizers and grain pipelines, wired together by `build_data`.

Typical use (in the trainer)::

  bundle = build_data(cfg.data, workdir, seed=cfg.seed, process_index=jax.process_index(),
                      process_count=jax.process_count())
  train_it = bundle.train_iter()          # checkpoint it with the model (grain.checkpoint)
  for batch in bundle.eval_batches(64): ...
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from lsd.config import ConfigError, check_choice, check_positive
from lsd.data.pipeline import (
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
  check_tokenizer_config,
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


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` section of an lsd config, with its defaults (BBC News, corpus-trained BPE)."""
  return ml_collections.ConfigDict(
    dict(
      source="bbc",  # one of SOURCES
      path="",  # file or glob for text/jsonl/csv
      text_field="text",  # jsonl/csv/tfds field(s); comma-separated fields are joined
      label_field="",  # optional class-label field
      source_field="",  # optional jsonl/csv field with a conditioning source text (seq2seq)
      text_split="line",  # text source: one document per line / paragraph / file
      csv_header=True,  # False: csv fields are 0-based column indices
      csv_delimiter=",",  # "\t" for TSV (then quotes are plain characters)
      encoding="utf-8",  # text/jsonl/csv files; undecodable bytes become U+FFFD, with a warning
      tfds_name="",
      tfds_split="train",
      tfds_data_dir="",
      max_docs=0,  # 0 = all documents
      eval_fraction=0.05,  # held-out documents, never trained on
      split_seed=0,
      seq_len=128,  # canvas length L
      batch_size=16,  # global batch (all processes)
      tokenizer=ml_collections.ConfigDict(dict(kind="bpe", vocab_size=4096, path="")),
    )
  )


def check_data_config(cfg, process_count: int = 1) -> None:
  """Raises ConfigError naming the first unusable field of a data config."""
  check_choice("data.source", cfg.source, SOURCES)
  if cfg.source in ("text", "jsonl", "csv", "prepared") and not cfg.path:
    what = "a `lsd prepare` directory" if cfg.source == "prepared" else "a file path or a glob"
    raise ConfigError(f"data.path is empty; data.source={cfg.source!r} needs {what}")
  if cfg.source == "text":
    check_choice("data.text_split", cfg.text_split, TEXT_SPLITS)
  if cfg.source in ("jsonl", "csv", "tfds") and not str(cfg.text_field).strip():
    raise ConfigError(f"data.text_field is empty; data.source={cfg.source!r} needs a field name")
  delimiter = cfg.csv_delimiter
  if cfg.source == "csv" and (not isinstance(delimiter, str) or len(delimiter) != 1):
    raise ConfigError(f"data.csv_delimiter={delimiter!r} must be one character, e.g. ',' or '\\t'")
  encoding = cfg.get("encoding", "utf-8")  # absent from runs written before the field existed
  try:
    codecs.lookup(encoding)
  except (LookupError, TypeError, ValueError) as e:  # ValueError: a NUL in the name
    raise ConfigError(
      f"data.encoding={encoding!r} is not a text encoding Python knows; accepted: a codec name "
      "such as 'utf-8', 'latin-1' or 'cp1252'"
    ) from e
  if cfg.source == "tfds" and not cfg.tfds_name:
    raise ConfigError("data.tfds_name is empty; data.source='tfds' needs a TFDS dataset name")
  for field in ("max_docs", "split_seed"):
    value = cfg[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ConfigError(f"data.{field}={value!r} must be an int >= 0")
  if not isinstance(cfg.eval_fraction, int | float) or not 0 <= cfg.eval_fraction < 1:
    raise ConfigError(f"data.eval_fraction={cfg.eval_fraction!r} must be a number in [0, 1)")
  for field in ("seq_len", "batch_size"):
    check_positive(f"data.{field}", cfg[field])
    if not isinstance(cfg[field], int):
      raise ConfigError(f"data.{field}={cfg[field]!r} must be an int")
  if cfg.batch_size % process_count:
    raise ConfigError(
      f"data.batch_size={cfg.batch_size} must be divisible by the number of processes "
      f"({process_count}): it is the global batch"
    )
  check_tokenizer_config(cfg.tokenizer)


@dataclasses.dataclass
class DataBundle:
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

  def eval_batches(self, num_batches: int = 0) -> list[dict[str, Any]]:
    """This process's rows of the first `num_batches` fixed eval batches (0 = all canvases); an
    empty list when no document is held out.

    Every batch is {"tokens": int32[B, L], "valid": bool[B, L]} with the training shapes; rows added
    to fill the last global batch are all-invalid, so metrics weighted by `valid` are exact.
    """
    if not self.eval_docs:
      return []  # data.eval_fraction=0 (or a one-document corpus): nothing held out
    tokens, valid = self._eval_canvases
    if num_batches:
      n = num_batches * self.batch_size
      tokens, valid = tokens[:n], valid[:n]
    return local_eval_batches(
      tokens,
      valid,
      pad_id=self.tokenizer.pad_id,
      global_batch_size=self.batch_size,
      process_index=self.process_index,
      process_count=self.process_count,
    )


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
