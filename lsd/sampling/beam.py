"""Beam search as one `lax.scan`, with the usual logit processors (repetition penalty, no repeated
n-grams, minimum length).

Model-agnostic: the caller supplies `step(state, tokens, parents) -> (logits, state)`, which first
reorders the rows of its decoding state (e.g. a KV cache) by `parents` (flat row indices into the
B * K beam rows) and then feeds one token per row. Everything is fixed-shape: B batch rows, K beams,
V vocabulary, N = max_new_tokens.

Per step (the scheme of Hugging Face's BeamSearchScorer, vectorised): every live beam extends by every
token, the best 2K candidates are kept; candidates that end in eos and rank in the top K join the
pool of finished hypotheses, scored by sum log p / length ** length_penalty (length = generated
tokens, eos included); the best K candidates that do not end in eos are the next live beams. After N
steps the live beams join the pool as they are, and each row returns its best pool entry. The search
always runs the N steps (no early stop), so its cost is fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

NEG = -1e30  # a finite -inf: keeps top-k and sums free of nan


def _ngram_bans(hist: Int[Array, "R N"], i: Array, n: int, vocab: int) -> Array:
  """[R, V] bool: tokens that would complete an n-gram already present in hist[:, :i]."""
  r, big_n = hist.shape
  if n < 2 or big_n < n:  # n = 1 is the `seen` mask itself (see `process_logits`)
    return jnp.zeros((r, vocab), bool)
  starts = jnp.arange(big_n - n + 1)  # n-gram j = hist[j : j + n]
  # The current (n - 1)-token suffix hist[i - n + 1 : i], compared with each n-gram's prefix.
  suffix = jax.vmap(lambda h: jax.lax.dynamic_slice(h, (jnp.maximum(i - n + 1, 0),), (n - 1,)))(
    hist
  )
  prefixes = jnp.stack([hist[:, starts + m] for m in range(n - 1)], -1)  # [R, J, n-1]
  match = jnp.all(prefixes == suffix[:, None, :], -1)
  match &= (starts[None, :] + n - 1 < i) & (i >= n - 1)  # the whole n-gram lies before i
  nxt = hist[:, starts + n - 1]
  return jnp.zeros((r, vocab), bool).at[jnp.arange(r)[:, None], nxt].max(match)


def process_logits(
  logits: Float[Array, "R V"],
  hist: Int[Array, "R N"],
  seen: Array,
  i: Array,
  *,
  eos_id: int,
  repetition_penalty: float = 1.0,
  no_repeat_ngram: int = 0,
  min_new_tokens: int = 0,
) -> Float[Array, "R V"]:
  """Log-probabilities of token i after the processors. `seen` [R, V] marks tokens generated so far:
  their logits are divided by `repetition_penalty` when positive, multiplied when negative (CTRL);
  tokens completing a repeated `no_repeat_ngram`-gram and eos before `min_new_tokens` get NEG."""
  x = logits.astype(jnp.float32)
  if repetition_penalty != 1.0:
    x = jnp.where(seen, jnp.where(x > 0, x / repetition_penalty, x * repetition_penalty), x)
  logp = jax.nn.log_softmax(x, axis=-1)
  if no_repeat_ngram == 1:
    logp = jnp.where(seen, NEG, logp)
  elif no_repeat_ngram:
    logp = jnp.where(_ngram_bans(hist, i, no_repeat_ngram, x.shape[-1]), NEG, logp)
  if min_new_tokens:
    logp = logp.at[:, eos_id].set(jnp.where(i < min_new_tokens, NEG, logp[:, eos_id]))
  return logp


def beam_search(
  step: Callable[[Any, Array, Array], tuple[Array, Any]],
  state: Any,
  first_logits: Float[Array, "BK V"],
  *,
  batch: int,
  num_beams: int,
  max_new_tokens: int,
  eos_id: int,
  length_penalty: float = 1.0,
  repetition_penalty: float = 1.0,
  no_repeat_ngram: int = 0,
  min_new_tokens: int = 0,
) -> tuple[Int[Array, "B N"], Float[Array, " B"]]:
  """Returns (tokens [B, N], score [B]): each row's best hypothesis (eos-padded after its eos) and its
  length-normalised log-probability (processed). Rows b * K + k of `state` / `first_logits` are
  beam k of batch row b; at the start all K beams of a row must be identical (only beam 0 is live).
  Trace inside `jax.jit`; everything but the arrays is static."""
  b, k, n = batch, num_beams, max_new_tokens
  v = first_logits.shape[-1]
  rows = jnp.arange(b)[:, None]
  flat = lambda parent: (rows * k + parent).reshape(-1)  # [B, K] beam ids -> flat row ids

  def norm(score, length):
    return score / jnp.power(length.astype(jnp.float32), length_penalty)

  def body(carry, i):
    st, logits, scores, hist, seen, pool_s, pool_t = carry
    logp = process_logits(
      logits,
      hist.reshape(b * k, n),
      seen.reshape(b * k, v),
      i,
      eos_id=eos_id,
      repetition_penalty=repetition_penalty,
      no_repeat_ngram=no_repeat_ngram,
      min_new_tokens=min_new_tokens,
    ).reshape(b, k, v)
    cand = (scores[:, :, None] + logp).reshape(b, k * v)
    vals, idx = jax.lax.top_k(cand, 2 * k)  # sorted, best first
    parent, tok = idx // v, (idx % v).astype(jnp.int32)
    cand_hist = jnp.take_along_axis(hist, parent[:, :, None], 1)
    cand_hist = cand_hist.at[:, :, i].set(tok)
    # Finished: eos candidates ranked in the top K join the pool (best K of pool + new kept).
    rank = jnp.arange(2 * k)[None, :]
    fin = (tok == eos_id) & (rank < k) & (vals > NEG / 2)
    fin_s = jnp.where(fin, norm(vals, i + 1), NEG)
    all_s = jnp.concatenate([pool_s, fin_s], 1)
    all_t = jnp.concatenate([pool_t, cand_hist], 1)
    pool_s, keep = jax.lax.top_k(all_s, k)
    pool_t = jnp.take_along_axis(all_t, keep[:, :, None], 1)
    # Live: the best K candidates that do not end in eos (at most K of the 2K do).
    _, live = jax.lax.top_k(jnp.where(tok == eos_id, NEG, vals), k)  # ties: better rank first
    new_scores = jnp.where(
      jnp.take_along_axis(tok, live, 1) == eos_id, NEG, jnp.take_along_axis(vals, live, 1)
    )
    new_parent = jnp.take_along_axis(parent, live, 1)
    new_tok = jnp.take_along_axis(tok, live, 1)
    new_hist = jnp.take_along_axis(cand_hist, live[:, :, None], 1)
    new_seen = jnp.take_along_axis(seen, new_parent[:, :, None], 1)
    new_seen = new_seen.at[rows, jnp.arange(k)[None, :], new_tok].set(True)
    logits, st = step(st, new_tok.reshape(-1), flat(new_parent))
    return (st, logits, new_scores, new_hist, new_seen, pool_s, pool_t), None

  scores = jnp.where(jnp.arange(k)[None, :] == 0, 0.0, NEG) * jnp.ones((b, 1))
  hist = jnp.full((b, k, n), eos_id, jnp.int32)
  seen = jnp.zeros((b, k, v), bool)
  pool_s = jnp.full((b, k), NEG)
  pool_t = jnp.full((b, k, n), eos_id, jnp.int32)
  carry = (state, first_logits, scores, hist, seen, pool_s, pool_t)
  (_, _, scores, hist, _, pool_s, pool_t), _ = jax.lax.scan(body, carry, jnp.arange(n))
  # Unfinished live beams join the pool at full length.
  all_s = jnp.concatenate([pool_s, jnp.where(scores > NEG / 2, norm(scores, jnp.int32(n)), NEG)], 1)
  all_t = jnp.concatenate([pool_t, hist], 1)
  best = jnp.argmax(all_s, 1)
  tokens = jnp.take_along_axis(all_t, best[:, None, None], 1)[:, 0]
  # Everything after the first eos is eos (finished hypotheses carry stale history there).
  after = jnp.cumsum(tokens == eos_id, axis=1) > 0
  return jnp.where(after, eos_id, tokens), jnp.take_along_axis(all_s, best[:, None], 1)[:, 0]
