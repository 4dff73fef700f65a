"""Plug-and-play attribute control of an embedding diffusion model (DGLM): linear (logistic)
classifiers on the encoder's embedding space, composed as a weighted sum of log-probabilities, turned
into a sampler `guide` (`lsd.diffusion.guidance.classifier_guide`) that moves the denoiser's clean
estimate up the gradient of that sum.

  x0_hat [B, L, D] (standardised tokens) -> embedding [B, E] (un-standardised, unit norm)
  -> sum_i scale_i log p_i(target_i | embedding) -> x0_hat + grad

The reference moves the noise estimate with the gradient of a Monte-Carlo estimate around x0_hat
taken through z_t; here the gradient is taken at x0_hat itself, the hook the shared samplers have.

A classifier is kept as a safetensors file with its class names (`save_classifier` /
`load_classifier`, written atomically; no pickle), so a run's config can name it with a target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lsd.diffusion.embedding import EmbeddingStats, from_tokens, unstandardize
from lsd.diffusion.guidance import LogProbFn, classifier_guide
from lsd.fileio import atomic_write, local_copy


class LinearClassifier:
  """A logistic classifier on embeddings: binary (weight [E], bias []) with log p(1 | x) =
  log sigmoid(x . w + b), or multi-class (weight [C, E], bias [C]) with a log-softmax."""

  def __init__(self, weight, bias):
    self.weight = jnp.asarray(weight, jnp.float32)
    self.bias = jnp.asarray(bias, jnp.float32)
    w, b = self.weight.shape, self.bias.shape
    if not ((len(w) == 1 and b == ()) or (len(w) == 2 and b == w[:1] and w[0] >= 2)):
      raise ValueError(f"weight {w} / bias {b}: expected [E] / [] or [C, E] / [C] with C >= 2")

  @property
  def num_classes(self) -> int:
    return 2 if self.weight.ndim == 1 else self.weight.shape[0]

  def log_probs(self, x: Float[Array, "B E"]) -> Float[Array, "B C"]:
    """Log-probabilities of every class, fp32 [B, C]."""
    x = jnp.asarray(x, jnp.float32)
    if self.weight.ndim == 1:
      logit = x @ self.weight + self.bias
      return jnp.stack([jax.nn.log_sigmoid(-logit), jax.nn.log_sigmoid(logit)], axis=-1)
    return jax.nn.log_softmax(x @ self.weight.T + self.bias, axis=-1)

  def log_prob(self, target: int) -> LogProbFn:
    """x [B, E] -> log p(target | x) [B]."""
    if not isinstance(target, int) or not 0 <= target < self.num_classes:
      raise ValueError(f"target={target!r} must be a class index in [0, {self.num_classes})")
    return lambda x: self.log_probs(x)[:, target]


def composed_log_prob(terms: Sequence[tuple[LogProbFn, float]]) -> LogProbFn:
  """x -> sum_i scale_i log p_i(x) for terms [(log_prob_fn, scale), ...] (several attributes at
  once; a scale is that attribute's guidance strength)."""
  terms = tuple(terms)
  if not terms:
    raise ValueError("composed_log_prob needs at least one (log_prob_fn, scale) term")

  def log_prob(x: Array) -> Array:
    return sum(float(s) * jnp.asarray(fn(x), jnp.float32) for fn, s in terms)

  return log_prob


def embedding_log_prob(stats: EmbeddingStats, log_prob_fn: LogProbFn) -> LogProbFn:
  """A log-prob on embeddings as one on the denoiser's x0 [B, L, D] (standardised tokens):
  the tokens are joined, un-standardised and put on the unit sphere first."""
  return lambda x0: log_prob_fn(unstandardize(stats, from_tokens(x0)))


def attribute_guide(
  stats: EmbeddingStats, terms: Sequence[tuple[LogProbFn, float]]
) -> Callable[[Array], Array]:
  """The sampler `guide` (x0_hat -> x0_hat + grad sum_i scale_i log p_i) for classifiers on the
  embedding space; build it once per set of terms (a jitted sampler takes it as a static)."""
  return classifier_guide(embedding_log_prob(stats, composed_log_prob(terms)), 1.0)


def save_classifier(
  path: str | os.PathLike, classifier: LinearClassifier, classes: Sequence[str]
) -> None:
  """Writes `classifier` and its class names (class index i is `classes[i]`) to a safetensors
  file, atomically."""
  from safetensors.numpy import save_file

  names = [str(c) for c in classes]
  if len(names) != classifier.num_classes or len(set(names)) != len(names):
    raise ValueError(
      f"classes={names}: need {classifier.num_classes} distinct names, one per class"
    )
  arrays = {
    "weight": np.ascontiguousarray(classifier.weight, np.float32),
    "bias": np.ascontiguousarray(np.asarray(classifier.bias, np.float32).reshape(-1)),
  }
  meta = {"classes": json.dumps(names)}
  atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=meta))


def load_classifier(path: str | os.PathLike) -> tuple[LinearClassifier, list[str]]:
  """(classifier, class names) from a file written by `save_classifier`."""
  from safetensors import safe_open

  with local_copy(path) as local, safe_open(local, framework="numpy") as f:
    meta, keys = f.metadata() or {}, set(f.keys())
    if keys != {"weight", "bias"} or "classes" not in meta:
      raise ValueError(f"{path}: not a classifier file (weight, bias and class names expected)")
    weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
  classes = json.loads(meta["classes"])
  clf = LinearClassifier(weight, bias[0] if weight.ndim == 1 else bias)
  if len(classes) != clf.num_classes:
    raise ValueError(f"{path}: {len(classes)} class names for {clf.num_classes} classes")
  return clf, [str(c) for c in classes]
