"""Prepared data: a corpus tokenised once (`lsd prepare`) into ArrayRecord shards, read back by
random access so that each process reads only the documents its rows of a batch need.

A prepared directory holds
  data-SSSSS-of-NNNNN.array_record  one record per document, in source order: the int32
                                    little-endian bytes of [bos] ids [eos] (as `tokenize_documents`)
  lengths.npy                       int32[N]: the token count of every record
  tokenizer.json                    the tokenizer the records were encoded with
  manifest.json                     written last: format version, counts, shard files, the data
                                    config fields that produced them, the tokenizer's config
A directory without manifest.json is an unfinished prepare and is never read.

Training (`data.source='prepared'`, `data.path=DIR`) gives the batches of the raw corpus with the
same config: the same held-out split (`split_documents` of the record indices), the same shuffle
(grain's `MapDataset.shuffle` permutes positions by (length, seed) alone) and the same wrap packing.
The packing is planned from `lengths.npy` alone: every process plans the same global batch
(document positions and offsets, no tokens), then reads through grain's `ArrayRecordDataSource`
only the records that overlap its own rows. The iterator state is the packer's (index-stream
position before the current document, offset in it): a small JSON dict, the same on every process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from lsd.config import ConfigError
from lsd.data.pipeline import FixedEvalBatches, PackIterDataset, _check_sharding
from lsd.data.tokenizer import TOKENIZER_FILE, Tokenizer
from lsd.fileio import as_path, atomic_write, atomic_write_text, is_remote

FORMAT = "lsd-prepared"
VERSION = 1
MANIFEST = "manifest.json"
LENGTHS = "lengths.npy"
DTYPE = "<i4"  # int32, little-endian, on every machine
_SYNCHRONOUS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# Data config fields that decide which documents (and so which records) a prepare writes.
SOURCE_FIELDS = (
  "source",
  "path",
  "text_field",
  "label_field",
  "source_field",
  "text_split",
  "csv_header",
  "csv_delimiter",
  "encoding",
  "tfds_name",
  "tfds_split",
  "tfds_data_dir",
  "max_docs",
)
# Fields a training run must share with the prepare (the BPE is trained on the training split).
SPLIT_FIELDS = ("eval_fraction", "split_seed")
TOKENIZER_FIELDS = ("kind", "vocab_size", "path")


def shard_name(index: int, count: int) -> str:
  return f"data-{index:05d}-of-{count:05d}.array_record"


def encode_record(tokens: np.ndarray) -> bytes:
  return np.asarray(tokens, dtype=DTYPE).tobytes()


def decode_record(raw: bytes) -> np.ndarray:
  return np.frombuffer(raw, dtype=DTYPE).astype(np.int32)


def _tokenizer_fields(cfg) -> dict[str, Any]:
  """The `data.tokenizer` fields that decide the tokenizer (vocab_size only matters for bpe)."""
  out = {"kind": cfg.kind, "path": cfg.get("path", "")}
  if cfg.kind == "bpe":
    out["vocab_size"] = cfg.vocab_size
  return out


def prepare_spec(cfg) -> dict[str, Any]:
  """What a prepare of data config `cfg` depends on: equal specs give equal directories."""
  return {
    "data": {f: cfg.get(f) for f in SOURCE_FIELDS},
    "split": {f: cfg[f] for f in SPLIT_FIELDS},
    "tokenizer": _tokenizer_fields(cfg.tokenizer),
  }


# -------------------------------------------------------------------------------------------------
# Writing: `lsd prepare`
# -------------------------------------------------------------------------------------------------


_CHUNK = 4096  # documents tokenised at once


class _TrainTexts:
  """The training texts, re-read from the source on each iteration (a Sequence for the BPE
  trainer: its length and one pass over the texts, never a list of them)."""

  def __init__(self, cfg, is_train: np.ndarray):
    self._cfg = cfg
    self._is_train = is_train

  def __len__(self) -> int:
    return int(self._is_train.sum())

  def __iter__(self) -> Iterator[str]:
    from lsd.data.sources import iter_documents

    for doc, keep in zip(iter_documents(self._cfg), self._is_train, strict=False):
      if keep:
        yield doc["text"]


def prepare(cfg, out: str | os.PathLike, *, shards: int = 1, log=print) -> dict[str, Any]:
  """Tokenises the corpus of data config `cfg` once into `shards` ArrayRecord files in `out`.

  The tokenizer is built as `lsd train` builds it (a BPE trained on the training split) and saved
  as `out/tokenizer.json`. Returns the manifest. A finished directory of the same spec is kept as it
  is; one of another spec is refused (ConfigError), as is a directory holding other files.
  """
  from lsd.data.config import check_data_config
  from lsd.data.pipeline import tokenize_documents
  from lsd.data.sources import iter_documents, split_documents
  from lsd.data.tokenizer import build_tokenizer

  if cfg.source == "prepared":
    raise ConfigError(
      "data.source='prepared' reads a prepared directory; `lsd prepare` needs the raw corpus "
      "(accepted: bbc, text, jsonl, csv, tfds)"
    )
  if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
    raise ConfigError(f"--shards={shards!r} must be an int >= 1")
  check_data_config(cfg)
  spec = prepare_spec(cfg)
  out_path = as_path(out)
  manifest_path = out_path / MANIFEST
  if manifest_path.is_file():
    old = json.loads(manifest_path.read_text())
    if old.get("spec") == spec and len(old.get("shards", [])) == shards:
      log(f"lsd prepare: {out_path} already holds this data ({old['records']} documents)")
      return old
    diff = _first_difference(old.get("spec", {}), spec)
    raise ConfigError(
      f"--out {str(out_path)!r} already holds other prepared data ({diff or 'another shard count'});"
      " use another --out or delete it first"
    )
  if out_path.is_dir():
    ours = {TOKENIZER_FILE, LENGTHS}
    foreign = sorted(
      p.name
      for p in out_path.iterdir()
      if p.name not in ours and not p.name.startswith(("data-", "."))
    )
    if foreign:
      raise ConfigError(
        f"--out {str(out_path)!r} holds other files ({', '.join(foreign[:3])}); accepted: a new "
        "or empty directory, or one an unfinished `lsd prepare` left"
      )
  out_path.mkdir(parents=True, exist_ok=True)

  # Streamed: the corpus is read a document at a time, three times (count, BPE, tokenise), so
  # only the token ids of one chunk and the int32 lengths are ever held.
  n = sum(1 for _ in iter_documents(cfg))
  if not n:
    raise ConfigError(f"data.source={cfg.source!r} (data.path={cfg.path!r}) yielded no documents")
  # `split_documents` depends on the count, fraction and seed only: the raw pipeline's split.
  if shards > n:
    raise ConfigError(f"--shards={shards} is more than the {n} documents; accepted: 1 to {n}")
  train_ids, eval_ids = split_documents(list(range(n)), cfg.eval_fraction, cfg.split_seed)
  is_train = np.zeros(n, bool)
  is_train[train_ids] = True
  log(f"lsd prepare: {n} documents ({len(train_ids)} train, {len(eval_ids)} held out)")
  (out_path / TOKENIZER_FILE).unlink(missing_ok=True)  # an unfinished prepare's is not trusted
  texts = _TrainTexts(cfg, is_train)
  tokenizer = build_tokenizer(cfg.tokenizer, texts, save_dir=out_path)
  log(f"lsd prepare: tokenizer {cfg.tokenizer.kind!r}, {tokenizer.vocab_size} ids")

  bounds = np.linspace(0, n, shards + 1).round().astype(int)
  lengths = np.zeros(n, np.int32)
  files = []
  docs = iter_documents(cfg)
  for s in range(shards):
    lo, hi = int(bounds[s]), int(bounds[s + 1])
    name = shard_name(s, shards)

    def write(tmp: str, lo=lo, hi=hi) -> None:
      from array_record.python.array_record_module import ArrayRecordWriter

      # group_size:1: every record its own chunk, as grain's random access wants.
      writer = ArrayRecordWriter(tmp, "group_size:1")
      for start in range(lo, hi, _CHUNK):  # the Rust tokenizer encodes each chunk in parallel
        chunk = list(itertools.islice(docs, min(hi, start + _CHUNK) - start))
        for i, ids in enumerate(tokenize_documents(chunk, tokenizer)):
          lengths[start + i] = len(ids)
          writer.write(encode_record(ids))
      writer.close()

    atomic_write(out_path / name, write)
    files.append({"file": name, "records": hi - lo})
    log(
      f"lsd prepare: shard {s + 1}/{shards}: {hi - lo} documents, "
      f"{int(lengths[lo:hi].sum())} tokens -> {name}"
    )
  if next(docs, None) is not None or (lengths == 0).any():
    raise ConfigError(
      f"data.source={cfg.source!r} (data.path={cfg.path!r}) gave other documents on a second "
      "reading; lsd prepare reads the corpus three times. Accepted: a source whose files do not "
      "change while it runs"
    )

  def write_lengths(tmp: str) -> None:
    with open(tmp, "wb") as f:
      np.save(f, lengths)

  atomic_write(out_path / LENGTHS, write_lengths)
  manifest = {
    "format": FORMAT,
    "version": VERSION,
    "records": n,
    "tokens": int(lengths.sum(dtype=np.int64)),
    "dtype": "int32",
    "framing": "[bos] ids [eos]",
    "shards": files,
    "lengths": LENGTHS,
    "tokenizer": {
      "file": TOKENIZER_FILE,
      "vocab_size": tokenizer.vocab_size,
      "sha256": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest(),
    },
    "spec": spec,
  }
  atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")  # last: now it is done
  log(f"lsd prepare: {manifest['records']} documents, {manifest['tokens']} tokens -> {out_path}")
  return manifest


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      found = _first_difference(a, b, f"{prefix}{key}.")
      if found:
        return found
    elif a != b:
      name = f"data.{prefix}{key}".replace("data.data.", "data.").replace("data.split.", "data.")
      return f"{name}={a!r} there, {b!r} here"
  return ""


# -------------------------------------------------------------------------------------------------
# Reading: `data.source='prepared'`
# -------------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
  """The manifest of prepared directory `path`; ConfigError when there is none (not prepared, or a
  prepare that did not finish) or its format is not this version's."""
  if not str(path):
    raise ConfigError("data.path is empty; data.source='prepared' needs a `lsd prepare` directory")
  file = as_path(path) / MANIFEST
  if not file.is_file():
    raise ConfigError(
      f"data.path={str(path)!r} holds no {MANIFEST}; data.source='prepared' accepts a directory "
      "written by a finished `lsd prepare --out DIR`"
    )
  manifest = json.loads(file.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ConfigError(
      f"data.path={str(path)!r}: {MANIFEST} is format {manifest.get('format')!r} version "
      f"{manifest.get('version')!r}; accepted: {FORMAT!r} version {VERSION} (prepare it again)"
    )
  return manifest


def check_prepared_config(cfg, manifest: dict[str, Any]) -> None:
  """Raises ConfigError when the run's tokenizer or split fields differ from the prepare's."""
  spec = manifest["spec"]
  want = spec["tokenizer"]
  have = _tokenizer_fields(cfg.tokenizer)
  for field in TOKENIZER_FIELDS:
    if field in want and have.get(field) != want[field]:
      raise ConfigError(
        f"data.tokenizer.{field}={have.get(field)!r} does not match the prepared data in "
        f"data.path={cfg.path!r}; accepted: {want[field]!r} (its tokenizer), or `lsd prepare` "
        "again with this tokenizer"
      )
  for field in SPLIT_FIELDS:
    if cfg[field] != spec["split"][field]:
      raise ConfigError(
        f"data.{field}={cfg[field]!r} does not match the prepared data in data.path={cfg.path!r} "
        f"(its tokenizer was trained on that split); accepted: {spec['split'][field]!r}"
      )
  prepared_max = spec["data"].get("max_docs") or 0
  if cfg.max_docs not in (0, prepared_max):
    raise ConfigError(
      f"data.max_docs={cfg.max_docs!r} does not match the prepared data in data.path={cfg.path!r};"
      f" accepted: 0 or {prepared_max!r} (all {manifest['records']} prepared documents)"
    )


class PreparedRecords:
  """Random access to the token arrays of a prepared directory (grain `ArrayRecordDataSource`).

  `reads` counts the records read, so a test can check that a process reads only what it needs.
  """

  def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]):
    if is_remote(path):
      # The open-source array_record opens local files only (its riegeli layer has no GCS
      # reader), and given a gs:// name its reader blocks instead of failing: refuse up front.
      raise ConfigError(
        f"data.path={str(path)!r}: prepared shards are read with array_record, which opens local "
        "files only; accepted: a local directory, or the bucket mounted as one (e.g. gcsfuse)"
      )
    files = [str(as_path(path) / s["file"]) for s in manifest["shards"]]
    self._source = grain.sources.ArrayRecordDataSource(files)
    if len(self._source) != manifest["records"]:
      raise ConfigError(
        f"data.path={str(path)!r}: the shards hold {len(self._source)} records, {MANIFEST} says "
        f"{manifest['records']}; prepare it again"
      )
    self.reads = 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    self.reads += 1
    return decode_record(self._source[int(index)])

  def read_many(self, indices: Sequence[int]) -> list[np.ndarray]:
    self.reads += len(indices)
    return [decode_record(r) for r in self._source.__getitems__([int(i) for i in indices])]


class _PlannedPackIterator(grain.DatasetIterator):
  """This process's rows of global batches of wrap-packed canvases, planned from lengths alone.

  The plan is `PackIterDataset` + `batch(global, drop_remainder=True)` over the documents at the
  positions the parent yields (positions into `ids`, records `ids[k]`); only the records that fill
  this process's rows are read.
  """

  def __init__(self, parent, data: PreparedData, rows: slice):
    super().__init__(parent)
    self._data = data
    self._rows = rows
    self._len = 0  # tokens of the document being packed (0: none partly consumed)
    self._pos = -1  # its position in the parent stream's values
    self._offset = 0
    self._doc_state: dict[str, Any] | None = None

  def _canvas(self) -> list[tuple[int, int, int]]:
    """(record, start, stop) pieces of the next canvas; [] when the stream has ended."""
    seq_len, pieces, filled = self._data.seq_len, [], 0
    while filled < seq_len:
      if not self._len:
        state = self._parent.get_state()
        try:
          pos = next(self._parent)
        except StopIteration:
          break
        self._pos, self._offset, self._doc_state = int(pos), 0, state
        self._len = int(self._data.lengths[self._data.train_ids[self._pos]])
      take = min(seq_len - filled, self._len - self._offset)
      pieces.append((int(self._data.train_ids[self._pos]), self._offset, self._offset + take))
      filled += take
      self._offset += take
      if self._offset == self._len:
        self._len = 0
    return pieces

  def __next__(self) -> dict[str, np.ndarray]:
    plan = []
    for _ in range(self._data.batch_size):
      pieces = self._canvas()
      if not pieces:
        raise StopIteration  # an incomplete last global batch is dropped, as `lm_dataset` does
      plan.append(pieces)
    mine = plan[self._rows]
    needed = sorted({r for pieces in mine for r, _, _ in pieces})
    docs = dict(zip(needed, self._data.records.read_many(needed), strict=True))
    seq_len, pad = self._data.seq_len, self._data.tokenizer.pad_id
    tokens = np.full((len(mine), seq_len), pad, np.int32)
    valid = np.zeros((len(mine), seq_len), bool)
    for row, pieces in enumerate(mine):
      filled = 0
      for record, start, stop in pieces:
        tokens[row, filled : filled + stop - start] = docs[record][start:stop]
        filled += stop - start
      valid[row, :filled] = True
    return {"tokens": tokens, "valid": valid}

  def get_state(self) -> dict[str, Any]:
    if not self._len:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": self._doc_state, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._len = 0
    if state["offset"]:
      self._doc_state = state["parent"]
      self._pos = int(next(self._parent))
      self._len = int(self._data.lengths[self._data.train_ids[self._pos]])
      self._offset = state["offset"]


class _PlannedPackDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, data: PreparedData, rows: slice):
    super().__init__(parent)
    self._data = data
    self._rows = rows

  def __iter__(self) -> grain.DatasetIterator:
    return _PlannedPackIterator(self._parent.__iter__(), self._data, self._rows)


@dataclasses.dataclass
class PreparedData(FixedEvalBatches):
  """The trainer's data object (`Task.make_data`) over a prepared directory: the interface of
  `lsd.data.DataBundle` (tokenizer, train_iter, eval_batches) without documents in memory."""

  tokenizer: Tokenizer
  records: PreparedRecords
  lengths: np.ndarray  # int32[N], every record
  train_ids: np.ndarray  # record indices of the training documents, in source order
  eval_ids: np.ndarray
  seq_len: int
  batch_size: int  # global
  seed: int
  process_index: int = 0
  process_count: int = 1

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def train_iter(self, num_epochs: int | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of this process's {"tokens": int32[B, L], "valid": bool[B, L]}."""
    local = _check_sharding(self.batch_size, self.process_index, self.process_count)
    positions = grain.MapDataset.range(len(self.train_ids)).shuffle(seed=self.seed)
    it = positions.repeat(num_epochs).to_iter_dataset(_SYNCHRONOUS)
    rows = slice(self.process_index * local, (self.process_index + 1) * local)
    return iter(_PlannedPackDataset(it, self, rows))

  @functools.cached_property
  def _eval_canvases(self) -> tuple[np.ndarray, np.ndarray]:
    ds = grain.MapDataset.source(self.records.read_many(self.eval_ids))
    canvases = list(
      PackIterDataset(
        ds.to_iter_dataset(_SYNCHRONOUS), seq_len=self.seq_len, pad_id=self.tokenizer.pad_id
      )
    )
    return np.stack([c["tokens"] for c in canvases]), np.stack([c["valid"] for c in canvases])

  @property
  def _has_eval(self) -> bool:
    return bool(len(self.eval_ids))

  def documents(self, ids: Sequence[int]) -> Iterator[np.ndarray]:
    """The token arrays of records `ids` (for inspection and tests)."""
    for i in ids:
      yield self.records[i]


def load_prepared(
  cfg,
  workdir: str | os.PathLike | None,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> PreparedData:
  """The data object of a run with `data.source='prepared'`: checks the manifest against the run's
  config, reads `lengths.npy` and the tokenizer, and opens the shards (nothing else is read).
  The prepared tokenizer is saved as `workdir/tokenizer.json`; a run that already has a different
  one is refused."""
  from lsd.data.sources import split_documents

  manifest = read_manifest(cfg.path)
  check_prepared_config(cfg, manifest)
  root = as_path(cfg.path)
  tokenizer = Tokenizer.load(root / manifest["tokenizer"]["file"])
  if workdir is not None:
    saved = as_path(workdir) / TOKENIZER_FILE
    if not saved.is_file():
      tokenizer.save(saved)
    elif Tokenizer.load(saved).backend.to_str() != tokenizer.backend.to_str():
      raise ConfigError(
        f"data.path={cfg.path!r}: its tokenizer differs from the run's {saved}; accepted: the "
        "prepared data this run started with, or a new --workdir"
      )
  lengths = np.load(io.BytesIO((root / manifest["lengths"]).read_bytes()))
  n = manifest["records"]
  if len(lengths) != n:
    raise ConfigError(
      f"data.path={cfg.path!r}: {manifest['lengths']} has {len(lengths)} entries, "
      f"{MANIFEST} says {n} records; prepare it again"
    )
  ids = np.arange(n)
  # The raw pipeline's split (`split_documents` depends on the count, fraction and seed only).
  train, evals = split_documents(list(ids), cfg.eval_fraction, cfg.split_seed)
  return PreparedData(
    tokenizer=tokenizer,
    records=PreparedRecords(root, manifest),
    lengths=lengths,
    train_ids=np.asarray(train, np.int64),
    eval_ids=np.asarray(evals, np.int64),
    seq_len=cfg.seq_len,
    batch_size=cfg.batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )
