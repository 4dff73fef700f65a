"""FUDGE-style attribute control of autoregressive decoding (Yang & Klein, arXiv 2104.05218): at each
step the LM's top-k next tokens are reweighted by a classifier of the prefix extended by each
candidate, p(x_{i+1} | x_{<=i}, a) ~ p(x_{i+1} | x_{<=i}) p(a | x_{<=i+1})^strength.

The classifier here is linear in the token counts of the text (a bag-of-tokens logistic
regression over the LM's vocabulary, `TokenClassifier`), so the class logits of prefix + candidate
are the prefix's running sum plus the candidate's weight column: every candidate is scored in one
gather, inside the same `lax.scan` as the decoding (`lsd.sampling.autoregressive.prefill`). FUDGE
itself trains an LSTM on prefixes; a linear classifier is the simplest one that reads the
candidate.

Shapes: B batch, P prompt length, V vocabulary, C classes, K candidates, N new tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from lsd.sampling.autoregressive import prefill
from lsd.sampling.categorical import first_argmax, sample_categorical


class TokenClassifier(NamedTuple):
  """Class logits of a token sequence x = bias + sum_j weight[:, x_j]: weight [C, V], bias [C]."""

  weight: Float[Array, "C V"]
  bias: Float[Array, " C"]

  @classmethod
  def from_linear(cls, weight, bias) -> TokenClassifier:
    """From a logistic regression on token counts: binary (weight [V], bias []: logit of class 1)
    becomes two classes with class 0's logit fixed at 0; multi-class (weight [C, V], bias [C])."""
    w, b = jnp.asarray(weight, jnp.float32), jnp.asarray(bias, jnp.float32)
    if w.ndim == 1 and b.ndim == 0:
      return cls(jnp.stack([jnp.zeros_like(w), w]), jnp.stack([jnp.zeros_like(b), b]))
    if w.ndim == 2 and b.shape == w.shape[:1] and w.shape[0] >= 2:
      return cls(w, b)
    raise ValueError(f"weight {w.shape} / bias {b.shape}: expected [V] / [] or [C, V] / [C]")

  def logits(self, tokens: Int[Array, "B T"]) -> Float[Array, "B C"]:
    """The class logits of each row of token ids (every id counts)."""
    return self.bias + jnp.sum(self.weight.T[tokens], axis=1)


def fudge_log_probs(
  log_probs: Float[Array, "B V"],
  class_logits: Float[Array, "B C"],
  classifier: TokenClassifier,
  target: Int[Array, " B"],
  *,
  strength: float,
  top_k: int,
) -> Float[Array, "B V"]:
  """Normalised next-token log-probs: the top_k tokens of `log_probs` scored log p_LM(v) +
  strength * log p(target | prefix + v), where the prefix's class logits are `class_logits`; every
  other token -inf."""
  top, idx = jax.lax.top_k(log_probs.astype(jnp.float32), top_k)  # [B, K]
  cand = class_logits[:, None, :] + classifier.weight.T[idx]  # [B, K, C]
  attr = jnp.take_along_axis(jax.nn.log_softmax(cand, -1), target[:, None, None], -1)[..., 0]
  scores = jax.nn.log_softmax(top + strength * attr, axis=-1)
  rows = jnp.arange(log_probs.shape[0])[:, None]
  return jnp.full(log_probs.shape, -jnp.inf, jnp.float32).at[rows, idx].set(scores)


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "max_new_tokens", "top_k", "top_p", "temperature"),
)
def fudge_generate(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  key: jax.Array,
  prompt: Int[Array, "B P"],
  classifier: TokenClassifier,
  target: Int[Array, " B"],
  *,
  strength: float | Array,
  max_new_tokens: int,
  top_k: int = 20,
  top_p: float = 1.0,
  temperature: float = 1.0,
) -> Int[Array, "B N"]:
  """`max_new_tokens` tokens continuing `prompt` (no padding inside) under FUDGE reweighting
  towards class `target` [B] of `classifier` (the prompt's tokens count towards the class logits).
  Each step draws from `fudge_log_probs` at `temperature` with nucleus `top_p` (top_p = 0:
  greedy); strength 0 with top_k = V is plain decoding. `strength` is traced (one compiled program
  for a sweep of strengths)."""
  model = nnx.merge(graphdef, params)
  step, cache, logits = prefill(model, prompt, new_tokens=max_new_tokens)
  state = classifier.logits(prompt)

  def body(carry, i):
    cache, logits, state = carry
    logp = fudge_log_probs(
      jax.nn.log_softmax(logits.astype(jnp.float32), -1),
      state,
      classifier,
      target,
      strength=strength,
      top_k=top_k,
    )
    if top_p == 0.0:
      token = first_argmax(logp)
    else:
      k = jax.random.fold_in(key, i)
      token, _ = sample_categorical(k, logp, top_p=top_p, temperature=temperature)
    state = state + classifier.weight.T[token]
    logits, cache = step(cache, token)
    return (cache, logits, state), token

  _, tokens = jax.lax.scan(body, (cache, logits, state), jnp.arange(max_new_tokens))
  return tokens.T
