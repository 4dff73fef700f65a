"""Segmented documents, for segment-level latent diffusion (SLD): each text becomes at most K
segments (sentences or utterances) of at most T tokens each, with a validity mask over the segments.

  text --split (segment_mode)--> segments --the first K--> each [bos] ids [eos], cut / padded to T
  -> tokens int32[K, T], valid bool[K, T], segment_valid bool[K]

Modes (`data.segment_mode`):
  - "sentences" (stories, news, summaries): cut at line breaks and after . ! ? (as
    `lsd.data.sentences.split_into_sentences`);
  - "utterances" (dialogue): a line that starts with a speaker tag (`#Person1#:`, `Cat:`) begins a
    turn, any other line continues the turn before it (DialogSum dialogues, DeliData group chats
    read by `read_delidata`).
A segment longer than T keeps its first T - 2 ids and still ends in eos, and a text with more than
K segments keeps its first K: both are counted in the `SegmentReport` printed when the data is
built (never dropped silently), as are texts left with no segment.

`data.prompt_segments` = n > 0 makes the first n segments of each text its source (the prompt,
e.g. ROCStories' first sentence) and the rest its target; otherwise the source, if any, is the
`data.source_field` of each record (DialogSum: the dialogue, the summary being the text).

The documents are split into training and held-out ones (`data.eval_fraction`, `data.split_seed`)
before they are segmented, so every stage of a run holds out the same texts: the autoencoder
trains on the training texts' segments as sentences (`SegmentData.sentence_data`), the denoiser on
the training texts' [K, T] rows (`SegmentData.array_data`, optionally with their latents).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from lsd.config import ConfigError, check_choice, dataclass_from_config
from lsd.data.arrays import ArrayData
from lsd.data.config import check_data_config
from lsd.data.latent_cache import encode_in_chunks
from lsd.data.sentences import (
  SentenceData,
  default_sentence_data_config,
  encode_sentences,
  split_into_sentences,
)
from lsd.data.sources import load_documents, split_documents
from lsd.data.tokenizer import TOKENIZER_FILE, Tokenizer, build_tokenizer
from lsd.fileio import as_path

SEGMENT_MODES = ("sentences", "utterances")
JOIN = {"sentences": " ", "utterances": "\n"}  # how a mode's segments are put back together
# A speaker tag: "#Person1#:" or a name of at most three words before a colon ("Cat:").
_SPEAKER = re.compile(r"^\s*(#[^#\n]{1,40}#|[^\s#:]+(?: [^\s#:]+){0,2}):")

Encode = Callable[[np.ndarray, np.ndarray], object]  # (tokens [n, T], valid [n, T]) -> [n, l, d]


def default_segment_data_config() -> ml_collections.ConfigDict:
  """The sentence data config (`max_len` = T, tokens per segment with bos and eos) plus the
  segment fields."""
  cfg = default_sentence_data_config()
  cfg.segment_mode = "sentences"  # one of SEGMENT_MODES
  cfg.max_segments = 4  # K
  cfg.prompt_segments = 0  # > 0: the first n segments of each text are its source
  return cfg


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
  """The segmentation fields of a data config."""

  max_len: int  # T
  segment_mode: str = "sentences"
  max_segments: int = 4  # K
  prompt_segments: int = 0
  min_words: int = 1

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> SegmentConfig:
    return dataclass_from_config(cls, cfg, "data")

  def validate(self) -> None:
    check_choice("data.segment_mode", self.segment_mode, SEGMENT_MODES)
    if self.max_len < 3:
      raise ConfigError(f"data.max_len={self.max_len} must be >= 3 (bos, one token, eos)")
    if self.max_segments < 1:
      raise ConfigError(f"data.max_segments={self.max_segments} must be >= 1 (K)")
    if self.prompt_segments < 0:
      raise ConfigError(
        f"data.prompt_segments={self.prompt_segments} must be >= 0 (0 = no prompt segments)"
      )


def split_utterances(text: str) -> list[str]:
  """Dialogue turns: a line that starts with a speaker tag begins one, other lines continue it."""
  out: list[str] = []
  for line in text.splitlines():
    line = " ".join(line.split())
    if not line:
      continue
    if out and not _SPEAKER.match(line):
      out[-1] += " " + line
    else:
      out.append(line)
  return out


def split_segments(text: str, mode: str, min_words: int = 1) -> list[str]:
  """The segments of a text in `mode` (one of SEGMENT_MODES)."""
  check_choice("data.segment_mode", mode, SEGMENT_MODES)
  if mode == "sentences":
    return split_into_sentences(text, min_words)
  return [u for u in split_utterances(text) if len(u.split()) >= min_words]


@dataclasses.dataclass
class SegmentReport:
  """What segmentation did to a set of texts."""

  texts: int = 0
  segments: int = 0  # kept
  truncated_segments: int = 0  # longer than T tokens: cut to T
  dropped_segments: int = 0  # beyond the first K of a text
  empty_texts: int = 0  # no segment left (no target after the prompt segments)
  counts: tuple[int, ...] = ()  # counts[k - 1] = texts with k segments, k = 1..K

  def __str__(self) -> str:
    return (
      f"{self.texts} texts -> {self.segments} segments; {self.truncated_segments} segments "
      f"longer than data.max_len cut; {self.dropped_segments} segments beyond "
      f"data.max_segments dropped; {self.empty_texts} texts with no segment; segments per text "
      f"{dict(enumerate(self.counts, 1))}"
    )


def segment_documents(
  docs: Sequence[dict[str, Any]], cfg: SegmentConfig
) -> tuple[list[dict[str, Any]], SegmentReport]:
  """Documents {"text", "source"?} -> {"segments": [at most K texts], "source"?, "text"} (the
  prompt segments, if any, become "source"; "text" is the kept target segments joined), and the
  report of what was cut (token truncation is counted by `encode_segments`)."""
  out, report = [], SegmentReport()
  k, n = cfg.max_segments, cfg.prompt_segments
  counts = np.zeros(k, np.int64)
  for doc in docs:
    segments = split_segments(doc["text"], cfg.segment_mode, cfg.min_words)
    row = {key: v for key, v in doc.items() if key not in ("text", "segments")}
    if n:
      row["source"] = JOIN[cfg.segment_mode].join(segments[:n])
      segments = segments[n:]
    report.texts += 1
    report.dropped_segments += max(0, len(segments) - k)
    segments = segments[:k]
    if not segments:
      report.empty_texts += 1
      continue
    counts[len(segments) - 1] += 1
    report.segments += len(segments)
    out.append({**row, "segments": segments, "text": JOIN[cfg.segment_mode].join(segments)})
  report.counts = tuple(int(c) for c in counts)
  return out, report


def encode_segments(
  segment_lists: Sequence[Sequence[str]], tokenizer: Tokenizer, max_segments: int, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Rows of segments: tokens int32[N, K, T] ([bos] ids [eos], pad after), valid bool[N, K, T],
  segment_valid bool[N, K] (the first len(segments) of each row), and the number of segments
  longer than T (cut: they keep their first T - 2 ids and end in eos). Invalid segments are all
  padding."""
  n, k = len(segment_lists), max_segments
  tokens = np.full((n, k, max_len), tokenizer.pad_id, np.int32)
  valid = np.zeros((n, k, max_len), bool)
  segment_valid = np.zeros((n, k), bool)
  flat = [s for segs in segment_lists for s in segs[:k]]
  truncated = 0
  if flat:
    lengths = [len(ids) + 2 for ids in tokenizer.encode_batch(flat)]
    truncated = sum(length > max_len for length in lengths)
    rows, row_valid = encode_sentences(flat, tokenizer, max_len)
    i = 0
    for r, segs in enumerate(segment_lists):
      m = min(len(segs), k)
      tokens[r, :m], valid[r, :m] = rows[i : i + m], row_valid[i : i + m]
      segment_valid[r, :m] = True
      i += m
  return tokens, valid, segment_valid, int(truncated)


def segment_rows(
  segment_lists: Sequence[Sequence[str]],
  tokenizer: Tokenizer,
  max_segments: int,
  max_len: int,
  encode: Encode | None = None,
  *,
  keep_tokens: bool = True,
) -> dict[str, np.ndarray]:
  """Rows of segmented texts: "segment_valid" [N, K]; "tokens" / "valid" [N, K, T] (always without
  `encode`, else with `keep_tokens`); with `encode` (a frozen autoencoder's: tokens [n, T], valid
  [n, T] -> latents [n, l, d]) "latents" [N, K * l, d], the valid segments encoded in fixed-size
  chunks and the invalid ones zero."""
  tokens, valid, segment_valid, _ = encode_segments(segment_lists, tokenizer, max_segments, max_len)
  out = {"segment_valid": segment_valid}
  if encode is None or keep_tokens:
    out["tokens"], out["valid"] = tokens, valid
  if encode is not None:
    n, k = segment_valid.shape
    picked = segment_valid.reshape(-1)
    flat = lambda x: x.reshape(n * k, -1)[picked]
    z = encode_in_chunks(flat(tokens), flat(valid), encode)
    latents = np.zeros((n * k, *z.shape[1:]), np.float32)
    latents[picked] = z
    out["latents"] = latents.reshape(n, k * z.shape[1], z.shape[2])
  return out


@dataclasses.dataclass
class SegmentData:
  """Segmented training and held-out texts with their tokenizer(s), from which a stage builds
  its data object: `sentence_data()` (the segments as sentences: the autoencoder) or
  `array_data()` (the [K, T] rows, optionally with latents: the denoiser)."""

  tokenizer: Tokenizer
  train_docs: list[dict[str, Any]]  # {"segments", "text", "source"?}
  eval_docs: list[dict[str, Any]]
  max_len: int  # T
  max_segments: int  # K
  segment_mode: str
  batch_size: int  # global
  seed: int
  process_index: int = 0
  process_count: int = 1
  source_tokenizer: Tokenizer | None = None  # tokenises each text's "source" (the context)
  max_source_len: int = 64
  report: SegmentReport | None = None  # of the training texts
  num_labels: int = 0

  def sentence_data(self) -> SentenceData:
    """Every segment of the training / held-out texts as one sentence row."""
    flat = lambda docs: [{"text": s} for d in docs for s in d["segments"]]
    return SentenceData(
      tokenizer=self.tokenizer,
      train_docs=flat(self.train_docs),
      eval_docs=flat(self.eval_docs),
      max_len=self.max_len,
      batch_size=self.batch_size,
      seed=self.seed,
      process_index=self.process_index,
      process_count=self.process_count,
    )

  def rows(
    self, docs: Sequence[dict], encode: Encode | None = None, *, keep_tokens: bool = True
  ) -> dict[str, np.ndarray]:
    """`segment_rows` of texts, with a source tokenizer also "source_tokens" / "source_valid"
    [N, max_source_len]."""
    out = segment_rows(
      [d["segments"] for d in docs],
      self.tokenizer,
      self.max_segments,
      self.max_len,
      encode,
      keep_tokens=keep_tokens,
    )
    if self.source_tokenizer is not None:
      out["source_tokens"], out["source_valid"] = encode_sentences(
        [d["source"] for d in docs], self.source_tokenizer, self.max_source_len
      )
    return out

  def array_data(self, encode: Encode | None = None, *, keep_tokens: bool = True) -> ArrayData:
    """The trainer's data object over `rows` of all training and held-out texts."""
    train = self.rows(self.train_docs, encode, keep_tokens=keep_tokens)
    held_out = self.rows(self.eval_docs, encode, keep_tokens=keep_tokens) if self.eval_docs else {}
    return ArrayData(
      tokenizer=self.tokenizer,
      train=train,
      eval=held_out,
      batch_size=self.batch_size,
      seed=self.seed,
      process_index=self.process_index,
      process_count=self.process_count,
    )


def load_segmented(cfg: ml_collections.ConfigDict) -> tuple[list[dict], list[dict], SegmentReport]:
  """(training texts, held-out texts, the training texts' report) of a segment data config: the
  documents are split first, then segmented."""
  seg = SegmentConfig.from_config(cfg)
  docs = load_documents(cfg)
  train, held_out = split_documents(docs, cfg.eval_fraction, cfg.split_seed)
  train, report = segment_documents(train, seg)
  held_out, _ = segment_documents(held_out, seg)
  if not train:
    raise ConfigError(
      f"data.segment_mode={seg.segment_mode!r}, data.prompt_segments={seg.prompt_segments}: no "
      "training text has a segment to generate"
    )
  return train, held_out, report


def build_segment_data(
  cfg: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  tokenizer: Tokenizer | None = None,
  source_tokenizer: Tokenizer | None = None,
) -> SegmentData:
  """Loads, splits and segments the texts of `cfg` and builds the tokenizer on the training
  segments (saved to workdir/tokenizer.json), or saves the `tokenizer` given (a frozen
  autoencoder's). Process 0 prints the report of the training texts' segmentation."""
  check_data_config(cfg, process_count)
  train, held_out, report = load_segmented(cfg)
  if source_tokenizer is not None and not all("source" in d for d in train + held_out):
    raise ConfigError(
      "a context encoder needs a source for every text: set data.source_field (the jsonl/csv "
      "field holding it) or data.prompt_segments (the leading segments of each text)"
    )
  if tokenizer is None:
    texts = [s for d in train for s in d["segments"]]
    tokenizer = build_tokenizer(cfg.tokenizer, texts, save_dir=workdir)
  else:
    tokenizer.save(as_path(workdir) / TOKENIZER_FILE)
  report.truncated_segments = encode_segments(
    [d["segments"] for d in train], tokenizer, cfg.max_segments, cfg.max_len
  )[3]
  if process_index == 0:
    print(f"lsd: segments: {report}", flush=True)
  return SegmentData(
    tokenizer=tokenizer,
    train_docs=train,
    eval_docs=held_out,
    max_len=cfg.max_len,
    max_segments=cfg.max_segments,
    segment_mode=cfg.segment_mode,
    batch_size=cfg.batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    source_tokenizer=source_tokenizer,
    max_source_len=cfg.max_source_len,
    report=report,
  )


def read_delidata(path: str | os.PathLike, max_groups: int = 0) -> list[dict[str, str]]:
  """DeliData group chats (a folder of TSV files, one per group) as dialogue documents: {"text":
  one "speaker: message" line per participant message, in order} (system rows and submissions
  are left out); `max_groups` > 0 reads the first that many files in sorted order."""
  files = sorted(p for p in Path(path).iterdir() if p.is_file())
  if not files:
    raise ConfigError(f"DeliData folder {str(path)!r} holds no files")
  docs = []
  for file in files[: max_groups or None]:
    with open(file, newline="", encoding="utf-8") as f:
      rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
      lines = [
        f"{r['origin']}: {' '.join(r['clean_text'].split())}"
        for r in rows
        if r.get("message_type") == "MESSAGE" and r.get("clean_text", "").strip()
      ]
    if lines:
      docs.append({"text": "\n".join(lines), "group": file.name})
  return docs
