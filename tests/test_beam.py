"""Beam search (`lsd.sampling.beam`): with enough beams it is exhaustive, so its answer must equal
the best of all hypotheses enumerated by brute force, with each logit processor re-implemented here
in plain numpy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsd.sampling.beam import beam_search

V, N, EOS = 4, 4, 0


def np_logp(logits, prefix, *, rp, ngram, min_new):
  """Reference processors for one prefix (a list of generated ids) -> processed log-probs [V]."""
  x = np.array(logits, np.float64)
  if rp != 1.0:
    for t in set(prefix):
      x[t] = x[t] / rp if x[t] > 0 else x[t] * rp
  logp = x - np.log(np.sum(np.exp(x - x.max()))) - x.max()
  if ngram:
    i = len(prefix)
    for j in range(i - ngram + 1):
      if ngram == 1 or prefix[j : j + ngram - 1] == prefix[i - ngram + 1 :]:
        logp[prefix[j + ngram - 1]] = -np.inf
  if len(prefix) < min_new:
    logp[EOS] = -np.inf
  return logp


def brute_force(table, *, lp, rp, ngram, min_new):
  """Best (score, tokens) over every sequence that ends in eos within N tokens or runs to N;
  table [N, V, V]: token 0's logits are table[0, 1], token i's are table[i, token i - 1]."""
  best = (-np.inf, None)
  for length in range(1, N + 1):
    for seq in itertools.product(range(V), repeat=length):
      if EOS in seq[:-1] or (length < N and seq[-1] != EOS):
        continue
      total, prev = 0.0, None
      for i, t in enumerate(seq):
        logits = table[0, 1] if i == 0 else table[i, prev]  # token i's logits
        total += np_logp(logits, list(seq[:i]), rp=rp, ngram=ngram, min_new=min_new)[t]
        prev = t
      score = total / length**lp
      if score > best[0] + 1e-6:
        best = (score, list(seq) + [EOS] * (N - length))
  return best


@pytest.mark.parametrize(
  "lp,rp,ngram,min_new",
  [
    (1.0, 1.0, 0, 0),
    (0.0, 1.0, 0, 0),
    (2.0, 1.0, 0, 0),
    (1.0, 1.3, 0, 0),
    (1.0, 1.0, 2, 0),
    (1.0, 1.0, 1, 0),
    (1.0, 1.2, 2, 3),
  ],
)
def test_exhaustive_beam_equals_brute_force(lp, rp, ngram, min_new):
  batch, k = 3, 128  # 128 beams hold every hypothesis of a 4-token, 4-symbol space
  rng = np.random.default_rng(int(10 * lp + 100 * rp + ngram + min_new))
  tables = rng.normal(0, 2.0, (batch, N, V, V)).astype(np.float32)  # [row, position, prev, next]
  # The first token's logits: position 0 with a fixed "previous" token 1.
  first = jnp.repeat(jnp.asarray(tables[:, 0, 1]), k, axis=0)
  row_of = jnp.repeat(jnp.arange(batch), k)

  def step(pos, tokens, parents):
    logits = jnp.asarray(tables)[row_of, jnp.minimum(pos + 1, N - 1), tokens]
    return logits, pos + 1

  tokens, scores = jax.jit(
    lambda: beam_search(
      step,
      jnp.int32(0),
      first,
      batch=batch,
      num_beams=k,
      max_new_tokens=N,
      eos_id=EOS,
      length_penalty=lp,
      repetition_penalty=rp,
      no_repeat_ngram=ngram,
      min_new_tokens=min_new,
    )
  )()
  for b in range(batch):
    want_score, want_tokens = brute_force(tables[b], lp=lp, rp=rp, ngram=ngram, min_new=min_new)
    assert np.asarray(tokens[b]).tolist() == want_tokens, b
    assert float(scores[b]) == pytest.approx(want_score, rel=1e-4, abs=1e-4)


def test_a_few_beams_never_repeat_an_ngram_and_rows_stay_independent():
  # A chain that always wants to continue 1 -> 2 -> 3 -> 1: with no_repeat_ngram=2 the beams
  # must leave it; row 1 has the same model with a shifted cycle.
  k, n, v = 3, 10, 6
  bias = np.full((v, v), -4.0, np.float32)
  for a, c in [(1, 2), (2, 3), (3, 1), (4, 5), (5, 4)]:
    bias[a, c] = 4.0
  bias[:, EOS] = -8.0
  table = jnp.asarray(bias)
  first = jnp.asarray(np.stack([bias[3]] * k + [bias[5]] * k))

  def step(state, tokens, parents):
    return table[tokens], state

  tokens, _ = jax.jit(
    lambda: beam_search(
      step,
      jnp.int32(0),
      first,
      batch=2,
      num_beams=k,
      max_new_tokens=n,
      eos_id=EOS,
      no_repeat_ngram=2,
    )
  )()
  for row in np.asarray(tokens).tolist():
    body = row[: row.index(EOS)] if EOS in row else row
    bigrams = list(zip(body, body[1:], strict=False))
    assert len(bigrams) == len(set(bigrams)), row
  assert np.asarray(tokens)[0, 0] == 1 and np.asarray(tokens)[1, 0] == 4  # each row its own chain
