"""Generative perplexity under a fixed judge LM (BD3-LM / MDLM protocol) and judge text features.

Decoded samples are retokenised with the judge's own tokenizer (never our model's ids), truncated to
`max_len` judge tokens, prefixed with a beginning-of-document token when the judge has one (so the
first word is scored too), and scored by teacher forcing. Per sample: mean NLL over its scored
tokens -> PPL.
Reported: the mean of per-sample PPLs (`gen_ppl`, what BD3-LM tables show) and the corpus PPL
exp(token-weighted mean NLL) (`gen_ppl_corpus`, less dominated by a few degenerate samples).

Texts are packed several to a row (best-fit decreasing): each attends only within its own segment,
at positions restarting from 0, so its values are those of scoring it alone, and short texts are
not padded to a fixed length. The row length is the power of two (at least 32, at most `max_len`)
that holds the longest text; a call takes `batch_size` rows, the last one the power of two that
holds the rest, so scoring compiles a few programs per row length.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np
import tokenizers

from lsd.models.llama import LlamaLM

_MIN_BUCKET = 32
_DOC_SEPARATOR = "<|endoftext|>"


class GenPPL:
  """Scores texts with a judge LM.

  Args:
    judge: the judge model; None loads the default (SmolLM2-135M-Instruct, `load_judge`).
    tokenizer: the judge's tokenizer; required when `judge` is given.
    max_len: judge tokens per sample, BOS included; longer texts are truncated.
    batch_size: rows per compiled call (each row packs as many texts as fit).
    bos_id: the id put before every text; None for none; "auto" takes the tokenizer's
      "<|endoftext|>" (the document separator GPT-2-family judges were pretrained with) if it has
      one, else the judge's BOS. SmolLM2-Instruct's BOS is the chat token "<|im_start|>", which
      no plain text follows in training (natural-text PPL 66 vs 28 after "<|endoftext|>").
  """

  def __init__(
    self,
    judge: LlamaLM | None = None,
    tokenizer: tokenizers.Tokenizer | None = None,
    *,
    max_len: int = 1024,
    batch_size: int = 8,
    bos_id: int | None | str = "auto",
  ):
    if judge is None:
      from lsd.convert.gguf import load_judge

      judge, tokenizer, _ = load_judge()
    if tokenizer is None:
      raise ValueError("GenPPL(judge=...) also needs the judge's tokenizer=")
    if max_len < 2 or batch_size < 1:
      raise ValueError(f"GenPPL needs max_len >= 2 and batch_size >= 1: {max_len}, {batch_size}")
    if bos_id == "auto":
      bos_id = tokenizer.token_to_id(_DOC_SEPARATOR)
      bos_id = judge.bos_id if bos_id is None else bos_id
    elif bos_id is not None and not isinstance(bos_id, int):
      raise ValueError(f"GenPPL bos_id={bos_id!r}: accepted an int, None or 'auto'")
    self.judge, self.tokenizer, self.bos_id = judge, tokenizer, bos_id
    self.max_len, self.batch_size = max_len, batch_size
    pad = judge.pad_id if judge.pad_id is not None else judge.eos_id
    self.pad_id = 0 if pad is None else pad

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Judge token ids per text: [BOS] + tokens, truncated to `max_len`."""
    prefix = [] if self.bos_id is None else [self.bos_id]
    encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [(prefix + e.ids)[: self.max_len] for e in encodings]

  def _bucket(self, n: int) -> int:
    return min(self.max_len, max(_MIN_BUCKET, 1 << (n - 1).bit_length()))

  def _batches(self, ids: list[list[int]]):
    """Yields (placements, tokens, valid, positions, segments), each array [rows, R]: the texts
    packed into rows of R tokens (best-fit decreasing), segment k + 1 the k-th text of a row (0 =
    padding); placements are (text index, row, offset) of every text with at least one id."""
    todo = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
    if not todo:
      return
    width = self._bucket(len(ids[todo[0]]))
    rows: list[list[int]] = []  # per row: the texts in it
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in todo:
      n = len(ids[i])
      k = bisect.bisect_left(free, (n, -1))  # the fullest row it fits in
      if k < len(free):
        room, r = free.pop(k)
      else:
        room, r = width, len(rows)
        rows.append([])
      rows[r].append(i)
      if room - n > 0:
        bisect.insort(free, (room - n, r))
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start : start + self.batch_size]
      n_rows = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
      tokens = np.full((n_rows, width), self.pad_id, np.int32)
      positions = np.zeros((n_rows, width), np.int32)
      segments = np.zeros((n_rows, width), np.int32)
      placements = []
      for r, texts in enumerate(chunk):
        offset = 0
        for k, i in enumerate(texts):
          n = len(ids[i])
          tokens[r, offset : offset + n] = ids[i]
          positions[r, offset : offset + n] = np.arange(n)
          segments[r, offset : offset + n] = k + 1
          placements.append((i, r, offset))
          offset += n
      yield placements, tokens, segments > 0, positions, segments

  def token_nlls(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Per text, the judge NLL (nats, float64) of each scored token: [len(ids) - 1] each."""
    return self._nlls(self.encode(texts))

  def _nlls(self, ids: list[list[int]]) -> list[np.ndarray]:
    out: list[np.ndarray] = [np.zeros(0)] * len(ids)
    for placements, tokens, valid, positions, segments in self._batches(ids):
      nll = self.judge.next_token_nll(tokens, valid, positions=positions, segments=segments)
      nll = np.asarray(nll, np.float64)  # B R-1: entry t scores token t + 1
      for i, r, offset in placements:
        out[i] = nll[r, offset : offset + len(ids[i]) - 1]
    return out

  def per_sample(self, texts: Sequence[str]) -> list[float]:
    """Perplexity of each text under the judge (nan for a text with no scored token)."""
    return [math.exp(n.mean()) if n.size else float("nan") for n in self.token_nlls(texts)]

  def conditional_per_sample(self, prompts: Sequence[str], texts: Sequence[str]) -> list[float]:
    """Perplexity of each text given its prompt: the judge reads [BOS] prompt + " " + text and
    only the text's tokens are scored (the text is cut to fit `max_len`; nan for a text with no
    token left)."""
    if len(prompts) != len(texts):
      raise ValueError(f"{len(prompts)} prompts for {len(texts)} texts")
    prefix = [] if self.bos_id is None else [self.bos_id]
    enc = lambda xs: self.tokenizer.encode_batch(list(xs), add_special_tokens=False)
    heads = [prefix + e.ids for e in enc(prompts)]
    ids = [
      (h + e.ids)[: self.max_len] for h, e in zip(heads, enc(" " + t for t in texts), strict=True)
    ]
    out = []
    for h, n in zip(heads, self._nlls(ids), strict=True):
      scored = n[len(h) - 1 :]  # nll[j] is that of token j + 1
      out.append(math.exp(scored.mean()) if scored.size else float("nan"))
    return out

  def __call__(self, texts: Sequence[str]) -> dict:
    """{"gen_ppl", "gen_ppl_corpus", "n_samples", "n_tokens", "judge"}; texts with no scored token
    (empty text and no BOS) are left out and counted in "n_empty"."""
    nlls = [n for n in self.token_nlls(texts) if n.size]
    if not nlls:
      raise ValueError(f"none of the {len(texts)} texts has a token the judge can score")
    per_sample = np.array([math.exp(n.mean()) for n in nlls])
    total = np.concatenate(nlls)
    return {
      "gen_ppl": float(per_sample.mean()),
      "gen_ppl_corpus": float(math.exp(total.mean())),
      "n_samples": len(nlls),
      "n_empty": len(texts) - len(nlls),
      "n_tokens": int(total.size),
      "judge": self.judge.name,
    }

  def hidden_features(self, texts: Sequence[str]) -> np.ndarray:
    """[N, E] float32: final hidden states mean-pooled over each text's tokens (BOS excluded, since
    it is the same in every text), e.g. as MAUVE or attribute-classifier features."""
    ids = self.encode(texts)
    skip = 0 if self.bos_id is None else 1
    out = np.zeros((len(ids), self.judge.cfg.d_model), np.float32)
    for placements, tokens, valid, positions, segments in self._batches(ids):
      hidden = self.judge.hidden(tokens, valid, positions=positions, segments=segments)
      hidden = np.asarray(hidden)  # B R E
      for i, r, offset in placements:
        span = hidden[r, offset + skip : offset + len(ids[i])]
        if len(span):
          out[i] = span.mean(0)
    return out
