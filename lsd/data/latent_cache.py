"""Latents of a frozen autoencoder, computed once per sentence when a run's data is built.

A latent-diffusion stage whose autoencoder is frozen would otherwise encode every batch again at
every step. Here the sentences of `lsd.data.sentences` data go through an `encode` function
(tokens, valid -> latents, e.g. the frozen autoencoder's jitted encoder) in fixed-size chunks, and
the rows become `ArrayData`: {"latents": fp32[N, l, d], "label"?: int32[N], "tokens"? / "valid"?
(the sentence's own ids, for losses that read them), "source_tokens"? / "source_valid"?
(seq2seq sources, tokenised for their context encoder)}.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from lsd.data.arrays import ArrayData, gather_rows
from lsd.data.sentences import encode_sentences

Encode = Callable[[np.ndarray, np.ndarray], object]  # (tokens [n, T], valid [n, T]) -> [n, l, d]


def encode_in_chunks(
  tokens: np.ndarray, valid: np.ndarray, encode: Encode, chunk: int = 512, bucket: int = 0
) -> np.ndarray:
  """encode(tokens, valid) as fp32 numpy, `chunk` rows per call; the last chunk is padded to the
  same shape (one compiled program) and its padding rows dropped.

  bucket: B > 0 sorts the rows by their number of valid tokens and cuts each chunk's columns to its
  longest row rounded up to a multiple of B: less padding to encode, at most width / B compiled
  programs. Only for an `encode` whose row does not depend on trailing padding (attention masked
  by `valid`, pooling over valid tokens). The rows come back in their input order.
  """
  if bucket < 0:
    raise ValueError(f"bucket={bucket!r} must be >= 0 (0: no bucketing)")
  if bucket:
    order = np.argsort(valid.sum(1), kind="stable")
    parts = []
    for i in range(0, len(order), chunk):
      rows = order[i : i + chunk]
      longest = int(valid[rows].sum(1).max())
      width = min(tokens.shape[1], max(bucket, -(-longest // bucket) * bucket))
      parts.append(encode_in_chunks(tokens[rows, :width], valid[rows, :width], encode, chunk))
    out = np.concatenate(parts)
    out[order] = out.copy()
    return out
  latents = []
  for i in range(0, len(tokens), chunk):
    t, v = tokens[i : i + chunk], valid[i : i + chunk]
    pad = chunk - len(t)
    if pad:
      t = np.concatenate([t, np.repeat(t[-1:], pad, 0)])
      v = np.concatenate([v, np.repeat(v[-1:], pad, 0)])
    latents.append(np.asarray(encode(t, v))[: chunk - pad])
  return np.concatenate(latents).astype(np.float32)


def latent_rows(
  docs: list[dict],
  tokenizer,
  max_len: int,
  encode: Encode,
  *,
  keep_tokens: bool = False,
  source_tokenizer=None,
  max_source_len: int = 0,
  chunk: int = 512,
) -> dict[str, np.ndarray]:
  """Sentence docs ({"text", "label"?, "source"?}) -> rows: their latents (the texts tokenised
  with `tokenizer` to `max_len`, then `encode`d), their labels if any, their tokens with
  `keep_tokens`, and with a `source_tokenizer` their sources tokenised to `max_source_len`."""
  tokens, valid = encode_sentences([d["text"] for d in docs], tokenizer, max_len)
  rows = {"latents": encode_in_chunks(tokens, valid, encode, chunk)}
  if keep_tokens:
    rows["tokens"], rows["valid"] = tokens, valid
  if docs and "label" in docs[0]:
    rows["label"] = np.array([d["label"] for d in docs], np.int32)
  if source_tokenizer is not None:
    rows["source_tokens"], rows["source_valid"] = encode_sentences(
      [d["source"] for d in docs], source_tokenizer, max_source_len
    )
  return rows


def cached_latent_data(data, encode: Encode, *, keep_tokens: bool = False, field: str = ""):
  """`ArrayData` with the rows (`latent_rows`) of sentence data `data` (`lsd.data.sentences`'s
  `SentenceData`: its tokenizer, max_len, source tokenizer, batch and processes): all training
  sentences (each process encodes a share) and all eval sentences. `field` (the config field that asked for the cache)
  ends the timing line process 0 prints."""
  t0 = time.perf_counter()
  kw = dict(keep_tokens=keep_tokens, source_tokenizer=data.source_tokenizer)
  kw.update(max_source_len=data.max_source_len)

  def rows(docs):
    return latent_rows(docs, data.tokenizer, data.max_len, encode, **kw)

  # Each process encodes its share; every process then holds all rows (a process-count
  # independent data order needs them).
  train_rows = gather_rows(
    rows(data.train_docs[data.process_index :: data.process_count]),
    data.process_index,
    data.process_count,
  )
  eval_rows = rows(data.eval_docs) if data.eval_docs else {}
  if data.process_index == 0:
    print(
      f"lsd: encoded {len(train_rows['latents'])} training + {len(data.eval_docs)} eval "
      f"sentences to latents in {time.perf_counter() - t0:.1f} s"
      + (f" ({field})" if field else ""),
      flush=True,
    )
  return ArrayData(
    tokenizer=data.tokenizer,
    train=train_rows,
    eval=eval_rows,
    batch_size=data.batch_size,
    seed=data.seed,
    process_index=data.process_index,
    process_count=data.process_count,
    num_labels=data.num_labels,
  )
