"""The `data` section of an lsd config: its defaults and its checks.

Kept apart from `lsd.data` so that every data module (documents, prepared directories, sentence and
segment pipelines) can check a config without importing the package that re-exports them.
"""

from __future__ import annotations

import codecs

import ml_collections

from lsd.config import ConfigError, check_choice, check_positive
from lsd.data.sources import SOURCES, TEXT_SPLITS
from lsd.data.tokenizer import check_tokenizer_config


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
