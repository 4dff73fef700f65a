"""Sentence-level data: one padded sentence per row (with its class label), for text autoencoders
and latent diffusion over whole sentences (LD4LG).

Pipeline (per process):
  sentences -> this process's shard -> MapDataset.source -> shuffle(seed) -> repeat(num_epochs)
  -> map(tokenise: [bos] ids [eos], truncated / padded to max_len) -> batch -> to_iter_dataset

Rows are {"tokens": int32[max_len], "valid": bool[max_len]} plus "label": int32 when the sentences
have labels, and "source_tokens" / "source_valid" ([max_source_len], tokenised with the source
tokenizer, e.g. a frozen context encoder's) when they have a conditioning "source" text (seq2seq:
`data.source_field`). A sentence longer than max_len keeps its first max_len - 2 ids and still ends in eos, so
the decoder always learns to stop. Unlike the packed LM pipeline, tokenisation is lazy (in `map`):
sentences are short, and grain's MapDataset iterator state is then just a position, so the iterator
checkpoints with the model (get_state / set_state, or orbax via grain.checkpoint).

Length buckets (`data.length_buckets`, training only): short sentences padded to max_len waste most
of a step's compute (Yelp: 13 of 32 tokens on average). With buckets, each batch holds sentences of
one length bucket and is only as wide as that bucket; the batches of an epoch are planned up front
from (seed, epoch) by `_BucketPlan` and batch i is still a pure function of i. Each distinct width
compiles the train step once.

Sources (fields of the `data` config; the base fields are those of `lsd.data.default_data_config`):
  - any `lsd.data` source (`load_documents`); with `split_sentences=True` every document is cut into
    sentences (at line breaks and after . ! ?) that inherit its label: BBC News articles become
    ~40k labelled news sentences, available offline on a fresh machine.
  - `label_per_file=True`: `path` is a glob of text files with one sentence per line, and a file's
    label is its index in sorted path order (Yelp's sentiment.*.0 / .1 -> labels 0 / 1).
  `max_docs` > 0 keeps a seeded random subset of that many sentences (after splitting), so a
  one-class-per-file corpus stays balanced.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from lsd.config import ConfigError, check_positive
from lsd.data.config import check_data_config, default_data_config
from lsd.data.sources import load_documents, split_documents
from lsd.data.tokenizer import TOKENIZER_FILE, Tokenizer, build_tokenizer
from lsd.fileio import as_path, glob_files

Batch = dict[str, np.ndarray]

_SYNCHRONOUS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def default_sentence_data_config() -> ml_collections.ConfigDict:
  """`lsd.data.default_data_config()` plus the sentence fields (see the module docstring)."""
  cfg = default_data_config()
  cfg.max_len = 64  # tokens per row, bos and eos included
  cfg.split_sentences = False
  cfg.min_words = 1  # split sentences with fewer words are dropped (headline fragments, "Mr.")
  cfg.label_per_file = False
  cfg.max_source_len = 64  # tokens per source row (seq2seq), bos and eos included
  # Training batches grouped by length: () = every row max_len wide; e.g. (16, 24) = each batch
  # holds sentences of one bucket (<= 16, <= 24 or <= max_len tokens) padded only to its width.
  cfg.length_buckets = ()
  return cfg


def check_length_buckets(buckets: Sequence[int], max_len: int, field="data.length_buckets"):
  """The bucket widths (strictly increasing, in [2, max_len]) with max_len appended as the last;
  ConfigError naming the field otherwise."""
  widths = [int(w) for w in buckets]
  if any(w < 2 or w > max_len for w in widths) or widths != sorted(set(widths)):
    raise ConfigError(
      f"{field}={tuple(buckets)}: widths must be strictly increasing integers in [2, "
      f"data.max_len={max_len}] (bos and eos take two tokens); () turns bucketing off"
    )
  return tuple(widths) if widths and widths[-1] == max_len else (*widths, max_len)


def split_into_sentences(text: str, min_words: int = 1) -> list[str]:
  """Cuts text at line breaks and after sentence-final punctuation; drops pieces < min_words."""
  out = []
  for piece in _SENTENCE_END.split(text):
    piece = " ".join(piece.split())
    if piece and len(piece.split()) >= min_words:
      out.append(piece)
  return out


def load_sentences(cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The sentences {"text", "label"?} described by a sentence data config, in a deterministic order."""
  if cfg.source in ("text", "jsonl", "csv") and not cfg.path:
    raise ConfigError(
      f"data.path is empty; data.source={cfg.source!r} needs the sentence files, e.g. "
      "--config.data.path='/data/yelp/sentiment.*' (one sentence per line, one file per class "
      "with data.label_per_file=True)"
    )
  check_positive("data.max_len", cfg.max_len)
  if cfg.max_len < 3:
    raise ConfigError(f"data.max_len={cfg.max_len} must be >= 3 (bos, one token, eos)")
  full = copy.deepcopy(cfg)
  full.max_docs = 0
  if cfg.label_per_file:
    if cfg.source != "text":
      raise ConfigError(f"data.label_per_file=True needs data.source='text', not {cfg.source!r}")
    files = glob_files(cfg.path)  # local or remote (gs://, ...)
    if not files:
      raise ConfigError(f"data.path={cfg.path!r} matches no files")
    docs = []
    for label, file in enumerate(files):
      one = copy.deepcopy(full)
      one.path = str(file)
      docs += [{"text": d["text"], "label": label} for d in load_documents(one)]
  else:
    docs = load_documents(full)
  if cfg.split_sentences:
    docs = [
      {"text": s, **{k: d[k] for k in ("label", "source") if k in d}}
      for d in docs
      for s in split_into_sentences(d["text"], cfg.min_words)
    ]
  if not docs:
    raise ConfigError(f"data.source={cfg.source!r} yielded no sentences")
  if any("label" in d for d in docs) and not all("label" in d for d in docs):
    raise ConfigError("some sentences have a label and some do not; check data.label_field")
  if cfg.max_docs and cfg.max_docs < len(docs):
    keep = np.sort(np.random.default_rng(cfg.split_seed).permutation(len(docs))[: cfg.max_docs])
    docs = [docs[i] for i in keep]
  return docs


def _row(tokenizer: Tokenizer, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  ids = tokenizer.encode(text)[: max_len - 2]
  row = [tokenizer.bos_id, *ids, tokenizer.eos_id]
  tokens = np.full(max_len, tokenizer.pad_id, np.int32)
  tokens[: len(row)] = row
  return tokens, np.arange(max_len) < len(row)


class _Tokenize:
  """doc -> {"tokens": int32[max_len], "valid": bool[max_len], "label"?: int32,
  "source_tokens"?: int32[max_source_len], "source_valid"?: bool[max_source_len]}."""

  def __init__(
    self,
    tokenizer: Tokenizer,
    max_len: int,
    source_tokenizer: Tokenizer | None = None,
    max_source_len: int = 64,
  ):
    self._tok = tokenizer
    self._max_len = max_len
    self._src_tok = source_tokenizer
    self._max_src = max_source_len

  def __call__(self, doc: dict[str, Any]) -> Batch:
    tokens, valid = _row(self._tok, doc["text"], self._max_len)
    out = {"tokens": tokens, "valid": valid}
    if "label" in doc:
      out["label"] = np.int32(doc["label"])
    if self._src_tok is not None:
      if "source" not in doc:
        raise ValueError("a source tokenizer was given but a sentence has no 'source' text")
      out["source_tokens"], out["source_valid"] = _row(self._src_tok, doc["source"], self._max_src)
    return out


def encode_sentences(
  texts: Sequence[str], tokenizer: Tokenizer, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Rows for a list of texts: (tokens int32[N, max_len], valid bool[N, max_len])."""
  rows = [_row(tokenizer, t, max_len) for t in texts]
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def sentence_dataset(
  docs: Sequence[dict[str, Any]],
  tokenizer: Tokenizer,
  *,
  max_len: int,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  shuffle: bool = True,
  num_epochs: int | None = None,
  source_tokenizer: Tokenizer | None = None,
  max_source_len: int = 64,
  length_buckets: Sequence[int] = (),
) -> grain.IterDataset:
  """This process's stream of batches {"tokens": int32[B, max_len], "valid": bool[B, max_len],
  "label"?: int32[B]}, B = global_batch_size // process_count. Every process passes the same `docs`
  and plans the same global batches, keeping its slice of each (tokenising only those rows), so
  the batches do not depend on the process count. shuffle draws a new permutation per epoch from
  `seed`; num_epochs=None repeats forever, a finite count drops the incomplete last batch.

  With `length_buckets` (see `check_length_buckets`) every batch holds sentences of one bucket and
  is that bucket's width wide instead of max_len (`_BucketPlan`)."""
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive multiple of "
      f"process_count={process_count}"
    )
  tokenize = _Tokenize(tokenizer, max_len, source_tokenizer, max_source_len)
  if length_buckets:
    plan = _BucketPlan(
      docs,
      tokenizer,
      check_length_buckets(length_buckets, max_len),
      global_batch_size,
      seed,
      shuffle,
    )
    local = global_batch_size // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    ds = grain.MapDataset.range(plan.batches_per_epoch).repeat(num_epochs)
    ds = ds.map_with_index(lambda i, _: plan.batch(i, rows, tokenize))
    return ds.to_iter_dataset(_SYNCHRONOUS)
  if not docs:
    raise ValueError("sentence_dataset needs at least one sentence")
  local = global_batch_size // process_count
  mine = slice(process_index * local, (process_index + 1) * local)

  def collate(idx):  # this process's rows of one global batch of sentence indices
    rows = [tokenize(docs[i]) for i in idx[mine]]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  ds = grain.MapDataset.range(len(docs))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).batch(global_batch_size, drop_remainder=True).map(collate)
  return ds.to_iter_dataset(_SYNCHRONOUS)


class _BucketPlan:
  """Length-bucketed global batches: which sentences make batch i, and how wide it is.

  Each sentence goes to the narrowest bucket that holds its [bos] ids [eos] row. An epoch draws a
  permutation (from (seed, epoch)), cuts each bucket's sentences in that order into global batches
  (a bucket's incomplete last batch is left out of the epoch, so every epoch has the same number
  of batches) and shuffles the batches. The plan depends only on the arguments, so every process
  computes the same one and takes its own rows of each global batch: all processes' batches at
  step i have the same width. Batch i is a pure function of i, so the iterator state stays a
  position.
  """

  def __init__(self, docs, tokenizer, widths, global_batch_size, seed, shuffle):
    self.docs, self.widths, self.batch_size = list(docs), widths, global_batch_size
    self.seed, self.shuffle = seed, shuffle
    lengths = np.array([len(ids) + 2 for ids in tokenizer.encode_batch([d["text"] for d in docs])])
    self.bucket = np.searchsorted(np.array(widths), np.minimum(lengths, widths[-1]))
    counts = np.bincount(self.bucket, minlength=len(widths))
    self.batches_per_epoch = int(sum(c // global_batch_size for c in counts))
    if self.batches_per_epoch == 0:
      raise ConfigError(
        f"data.length_buckets={widths}: no bucket holds a full batch of "
        f"data.batch_size={global_batch_size} of the {len(docs)} sentences (bucket sizes "
        f"{counts.tolist()}); use fewer buckets or a smaller batch"
      )
    self._cached: tuple[int, list] | None = None

  def epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
    """[(width, global row indices)] of epoch e, in order."""
    if self._cached is None or self._cached[0] != e:
      rng = np.random.default_rng([self.seed, e])
      order = rng.permutation(len(self.docs)) if self.shuffle else np.arange(len(self.docs))
      out = []
      for b, width in enumerate(self.widths):
        idx = order[self.bucket[order] == b]
        for k in range(len(idx) // self.batch_size):
          out.append((width, idx[k * self.batch_size : (k + 1) * self.batch_size]))
      if self.shuffle:
        out = [out[j] for j in rng.permutation(len(out))]
      self._cached = (e, out)
    return self._cached[1]

  def batch(self, i: int, rows: slice, tokenize: _Tokenize) -> Batch:
    width, idx = self.epoch(i // self.batches_per_epoch)[i % self.batches_per_epoch]
    out = [tokenize(self.docs[j]) for j in idx[rows]]
    batch = {k: np.stack([r[k] for r in out]) for k in out[0]}
    batch["tokens"], batch["valid"] = batch["tokens"][:, :width], batch["valid"][:, :width]
    return batch


@dataclasses.dataclass
class SentenceData:
  """The trainer's data object for sentence tasks (see `lsd.train.task.Task.make_data`)."""

  tokenizer: Tokenizer
  train_docs: list[dict[str, Any]]
  eval_docs: list[dict[str, Any]]
  max_len: int
  batch_size: int  # global
  seed: int
  process_index: int = 0
  process_count: int = 1
  source_tokenizer: Tokenizer | None = None  # seq2seq: tokenises each sentence's "source"
  max_source_len: int = 64
  length_buckets: tuple[int, ...] = ()  # training batches only; eval rows stay max_len wide

  @property
  def num_labels(self) -> int:
    """1 + the largest label (0 when the sentences are unlabelled)."""
    labels = [d["label"] for d in self.train_docs + self.eval_docs if "label" in d]
    return max(labels) + 1 if labels else 0

  def train_iter(self, num_epochs: int | None = None) -> grain.DatasetIterator:
    return iter(
      sentence_dataset(
        self.train_docs,
        self.tokenizer,
        max_len=self.max_len,
        global_batch_size=self.batch_size,
        seed=self.seed,
        process_index=self.process_index,
        process_count=self.process_count,
        num_epochs=num_epochs,
        source_tokenizer=self.source_tokenizer,
        max_source_len=self.max_source_len,
        length_buckets=self.length_buckets,
      )
    )

  def eval_batches(self, num_batches: int = 0) -> list[Batch]:
    """This process's rows of the first `num_batches` fixed eval batches (0 = all), in order.

    The last global batch is filled with all-invalid rows (label 0), so `valid`-weighted metrics
    are exact and shapes match training.
    """
    if not self.eval_docs:
      return []  # data.eval_fraction=0 (or one sentence): nothing held out
    tokenize = _Tokenize(self.tokenizer, self.max_len, self.source_tokenizer, self.max_source_len)
    docs = self.eval_docs
    if num_batches:
      docs = docs[: num_batches * self.batch_size]
    rows = [tokenize(d) for d in docs]
    pad = -len(rows) % self.batch_size
    blank = {k: np.zeros_like(v) for k, v in rows[0].items()}
    blank["tokens"] = np.full(self.max_len, self.tokenizer.pad_id, np.int32)
    if "source_tokens" in blank:
      blank["source_tokens"] = np.full(self.max_source_len, self.source_tokenizer.pad_id, np.int32)
    rows += [blank] * pad
    local = self.batch_size // self.process_count
    out = []
    for start in range(0, len(rows), self.batch_size):
      mine = rows[start + self.process_index * local : start + (self.process_index + 1) * local]
      out.append({k: np.stack([r[k] for r in mine]) for k in mine[0]})
    return out


def build_sentence_data(
  cfg: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  tokenizer: Tokenizer | None = None,
  source_tokenizer: Tokenizer | None = None,
) -> SentenceData:
  """Loads and splits sentences (`eval_fraction`, `split_seed`) and builds the tokenizer on the
  training sentences (saved to workdir/tokenizer.json; a resumed run reloads it). Pass `tokenizer`
  to reuse an existing one (e.g. the autoencoder's): it is then saved to the workdir as is.
  `source_tokenizer` (seq2seq) tokenises each sentence's "source" to `cfg.max_source_len`."""
  docs = load_sentences(cfg)
  check_data_config(cfg, process_count)
  buckets = tuple(cfg.get("length_buckets", ()) or ())
  if buckets:
    buckets = check_length_buckets(buckets, cfg.max_len)
  if source_tokenizer is not None:
    check_positive("data.max_source_len", cfg.max_source_len)
    if not all("source" in d for d in docs):
      raise ConfigError(
        f"data.source_field={cfg.get('source_field', '')!r}: seq2seq needs a source text for "
        "every sentence (set data.source_field to the jsonl/csv field holding it)"
      )
  train_docs, eval_docs = split_documents(docs, cfg.eval_fraction, cfg.split_seed)
  if tokenizer is None:
    tokenizer = build_tokenizer(cfg.tokenizer, [d["text"] for d in train_docs], save_dir=workdir)
  else:
    tokenizer.save(as_path(workdir) / TOKENIZER_FILE)
  return SentenceData(
    tokenizer=tokenizer,
    train_docs=train_docs,
    eval_docs=eval_docs,
    max_len=cfg.max_len,
    batch_size=cfg.batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    source_tokenizer=source_tokenizer,
    max_source_len=cfg.max_source_len,
    length_buckets=buckets,
  )
