"""grain input pipelines: documents -> packed token canvases -> per-process batches.

Training (`lm_dataset`):
  documents -> tokenise once: [bos] ids [eos]
  -> MapDataset.source -> shuffle(seed) -> repeat(num_epochs) -> to_iter_dataset
  -> wrap-pack into canvases of seq_len (`PackIterDataset`) -> batch(global_batch)
  -> this process's rows of each global batch

Design choices:
- Every process builds the same global stream and keeps its rows of each global batch: a run's
  batches, and so its losses, do not depend on the process count, and its iterator state resumes
  on another process count. The price is that every host tokenises and packs the whole corpus
  (`lsd prepare`, `lsd.data.prepared`, tokenises it once; each process then reads its records).
- Tokenisation happens once, up front (the Rust tokenizer batches it in parallel). lsd's corpora
  are small (~1M tokens for BBC News, i.e. a few MB of int32), so keeping token arrays in memory
  is cheaper than re-tokenising every document in every epoch.
- `shuffle` comes before `repeat`: grain's MapDataset shuffle draws a fresh permutation for every
  epoch from (seed + epoch) when indices run past one epoch, so this gives a new, deterministic
  order per epoch without ever mixing two epochs (shuffling after an infinite repeat would not).
- "Wrap" packing: documents are concatenated and cut every seq_len tokens; a document cut at a
  canvas end continues at the start of the next canvas. No tokens are wasted; the only padding is
  the tail of the last canvas when `num_epochs` is finite (there `valid` is False and tokens are
  `pad_id`).
- The packer is our own (`PackIterDataset`, ~40 lines), not grain's ConcatThenSplitIterDataset:
  grain 0.2.18's packer keeps tuples in its state, which its own JSON checkpoint handler turns into
  lists; restoring a state saved with no partly packed document then drops a document. Ours keeps
  only (parent state before the current document, offset in it), which survives JSON unchanged.
- Reads are synchronous (no prefetch threads): after up-front tokenisation every step is a few numpy
  copies, and the iterator state stays a small dict that orbax checkpoints with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from lsd.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]

_SYNCHRONOUS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def tokenize_documents(docs: Sequence[dict[str, Any]], tokenizer: Tokenizer) -> list[np.ndarray]:
  """Token ids of each document's text framed as [bos] ids [eos]; a list of int32[len_i]."""
  ids = tokenizer.encode_batch([d["text"] for d in docs])
  return [np.asarray([tokenizer.bos_id, *x, tokenizer.eos_id], dtype=np.int32) for x in ids]


def _check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive multiple of "
      f"process_count={process_count}"
    )
  return global_batch_size // process_count


class _PackIterator(grain.DatasetIterator):
  """Concatenates 1-D token arrays from the parent and cuts them into canvases of seq_len."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id
    self._doc: np.ndarray | None = None  # the document being packed, if one is partly consumed
    self._offset = 0  # tokens of `_doc` already emitted
    self._doc_state: dict[str, Any] | None = None  # parent state from just before `_doc` was read

  def __next__(self) -> Batch:
    tokens = np.full(self._seq_len, self._pad_id, dtype=np.int32)
    filled = 0
    while filled < self._seq_len:
      if self._doc is None:
        state = self._parent.get_state()
        try:
          doc = next(self._parent)
        except StopIteration:
          break
        self._doc, self._offset, self._doc_state = doc, 0, state
      take = min(self._seq_len - filled, len(self._doc) - self._offset)
      tokens[filled : filled + take] = self._doc[self._offset : self._offset + take]
      filled += take
      self._offset += take
      if self._offset == len(self._doc):
        self._doc = None
    if filled == 0:
      raise StopIteration
    return {"tokens": tokens, "valid": np.arange(self._seq_len) < filled}

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": self._doc_state, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc = None
    if state["offset"]:
      # Re-read the partly emitted document; the parent is deterministic, so it is the same one.
      self._doc_state = state["parent"]
      self._doc = next(self._parent)
      self._offset = state["offset"]


class PackIterDataset(grain.IterDataset):
  """Wrap packing: int32[len_i] documents -> {"tokens": int32[L], "valid": bool[L]} canvases.

  Documents are concatenated and cut every `seq_len` tokens; a document cut at the end of a canvas
  continues at the start of the next one. Only the tail of the last canvas of a finite stream is
  padding (`pad_id`, valid False). The iterator state is a JSON-friendly dict.
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._pad_id = pad_id

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)


def lm_dataset(
  docs: Sequence[dict[str, Any]],
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  shuffle: bool = True,
  num_epochs: int | None = None,
) -> grain.IterDataset:
  """The training pipeline for this process (see the module docstring for its stages).

  Args:
    docs: all documents (every process passes the same list and packs the same global stream).
    tokenizer: gives ids and bos/eos/pad.
    seq_len: canvas length L.
    global_batch_size: canvases per step over all processes; must be divisible by process_count.
    seed: shuffle seed in [0, 2**32); the stream is a deterministic function of (docs, seed, ...).
    process_index, process_count: this process keeps rows [index * B, (index + 1) * B) of every
      global batch, so the global batches do not depend on the process count.
    shuffle: shuffle documents (a new permutation each epoch); False keeps source order.
    num_epochs: None repeats forever; a finite count ends the stream (the short last canvas is
      padded, an incomplete last batch is dropped).

  Returns:
    An IterDataset of {"tokens": int32[B, L], "valid": bool[B, L]} with B = global_batch_size //
    process_count. `iter(ds)` gives a checkpointable iterator (get_state / set_state).
  """
  local_batch = _check_sharding(global_batch_size, process_index, process_count)
  if seq_len <= 0:
    raise ValueError(f"seq_len={seq_len} must be > 0")
  if not docs:
    raise ValueError("lm_dataset needs at least one document")
  ds = grain.MapDataset.source(tokenize_documents(list(docs), tokenizer))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  it = ds.repeat(num_epochs).to_iter_dataset(_SYNCHRONOUS)
  it = PackIterDataset(it, seq_len=seq_len, pad_id=tokenizer.pad_id)
  it = it.batch(global_batch_size, drop_remainder=True)
  if process_count == 1:
    return it
  mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
  return it.map(lambda batch: {k: v[mine] for k, v in batch.items()})


def eval_canvases(
  docs: Sequence[dict[str, Any]], tokenizer: Tokenizer, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Fixed evaluation canvases: [bos] doc [eos] for every document in order, wrap-packed.

  Returns:
    (tokens int32[N, L], valid bool[N, L]) with N = ceil(total tokens / L); only the tail of the
    last canvas is padding (pad_id, valid False). Deterministic: no shuffling, no process sharding.
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len={seq_len} must be > 0")
  if not docs:
    raise ValueError("eval_canvases needs at least one document")
  ds = grain.MapDataset.source(tokenize_documents(docs, tokenizer)).to_iter_dataset(_SYNCHRONOUS)
  canvases = list(PackIterDataset(ds, seq_len=seq_len, pad_id=tokenizer.pad_id))
  return (
    np.stack([c["tokens"] for c in canvases]),
    np.stack([c["valid"] for c in canvases]),
  )


def local_eval_batches(
  tokens: np.ndarray,
  valid: np.ndarray,
  *,
  pad_id: int,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> list[Batch]:
  """Splits fixed canvases into global batches and returns this process's rows of each.

  The canvases are padded with all-invalid rows up to a multiple of global_batch_size, so every
  batch has the static shape [global_batch_size // process_count, L] that a jitted eval step wants,
  and the processes' rows of batch i together form global batch i.

  Args:
    tokens, valid: int32[N, L] and bool[N, L] from `eval_canvases`.
    pad_id: token of the padding rows.
  Returns:
    A list of {"tokens": int32[B, L], "valid": bool[B, L]}, B = global_batch_size // process_count.
  """
  local_batch = _check_sharding(global_batch_size, process_index, process_count)
  n, seq_len = tokens.shape
  n_batches = -(-n // global_batch_size)
  pad = n_batches * global_batch_size - n
  tokens = np.concatenate([tokens, np.full((pad, seq_len), pad_id, np.int32)])
  valid = np.concatenate([valid, np.zeros((pad, seq_len), bool)])
  lo = process_index * local_batch
  out = []
  for b in range(n_batches):
    rows = slice(b * global_batch_size + lo, b * global_batch_size + lo + local_batch)
    out.append({"tokens": tokens[rows], "valid": valid[rows]})
  return out


class FixedEvalBatches:
  """`eval_batches` for a data object that has `_eval_canvases` (int32[N, L], bool[N, L]),
  `_has_eval`, `batch_size` (global), `tokenizer`, `process_index` and `process_count`."""

  @property
  def held_out_canvases(self) -> tuple[np.ndarray, np.ndarray]:
    """All held-out canvases (int32[N, L] tokens, bool[N, L] valid), every process's rows."""
    return self._eval_canvases

  def eval_batches(self, num_batches: int = 0) -> list[Batch]:
    """This process's rows of the first `num_batches` fixed eval batches (0 = all canvases); an
    empty list when nothing is held out.

    Every batch is {"tokens": int32[B, L], "valid": bool[B, L]} with the training shapes; rows added
    to fill the last global batch are all-invalid, so metrics weighted by `valid` are exact.
    """
    if not self._has_eval:
      return []
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
