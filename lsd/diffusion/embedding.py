"""Diffusion over one sentence embedding per text (DGLM's semantic proposals): per-dimension
standardisation with corpus statistics, the inverse back onto the encoder's unit sphere, and the
split of the E-wide vector into L tokens of E / L for a transformer denoiser.

  embedding [B, E] --standardize--> [B, E] --to_tokens--> [B, L, E / L]  (the denoiser's x0)
  x0_hat [B, L, E / L] --from_tokens--> [B, E] --unstandardize--> unit-norm embedding [B, E]

The statistics are saved in a run's workdir as a safetensors file (`save_stats` / `load_stats`,
written atomically; no pickle), so every later stage un-standardises exactly as training did.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from lsd.fileio import atomic_write, local_copy

STATS_FILE = "embedding_stats.safetensors"


class EmbeddingStats(NamedTuple):
  mean: Float[Array, " E"]  # per-dimension mean over the training corpus
  std: Float[Array, " E"]  # per-dimension standard deviation (floored at `min_std`)


def embedding_stats(embeddings: Float[Array, "N E"], min_std: float = 1e-6) -> EmbeddingStats:
  """Per-dimension mean and std of corpus embeddings [N, E] (accumulated in float64, stored as
  float32); a std below `min_std` (a constant dimension) is floored so standardising stays finite."""
  x = np.asarray(embeddings, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"embeddings have shape {x.shape}; need [N, E] with N >= 2")
  if not np.all(np.isfinite(x)):
    raise ValueError("embeddings hold NaN or Inf; cannot compute standardisation statistics")
  std = np.maximum(x.std(axis=0), min_std)
  return EmbeddingStats(x.mean(axis=0).astype(np.float32), std.astype(np.float32))


def standardize(stats: EmbeddingStats, x: Float[Array, "B E"]) -> Float[Array, "B E"]:
  """(x - mean) / std, fp32."""
  return (jnp.asarray(x, jnp.float32) - stats.mean) / stats.std


def unstandardize(
  stats: EmbeddingStats, z: Float[Array, "B E"], *, normalize: bool = True
) -> Float[Array, "B E"]:
  """z * std + mean, then (`normalize`) projected to unit L2 norm, where the encoder's embeddings
  live; fp32."""
  x = jnp.asarray(z, jnp.float32) * stats.std + stats.mean
  if normalize:
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x


def to_tokens(x: Float[Array, "B E"], num_tokens: int) -> Float[Array, "B L D"]:
  """[B, E] -> [B, L, E / L]: consecutive dimensions form one token."""
  b, e = x.shape
  if e % num_tokens:
    raise ValueError(f"embedding width {e} is not divisible by num_tokens={num_tokens}")
  return jnp.reshape(x, (b, num_tokens, e // num_tokens))


def from_tokens(x: Float[Array, "B L D"]) -> Float[Array, "B E"]:
  """[B, L, D] -> [B, L * D], the inverse of `to_tokens`."""
  return jnp.reshape(x, (x.shape[0], x.shape[1] * x.shape[2]))


def save_stats(path: str | os.PathLike, stats: EmbeddingStats) -> None:
  """Writes the statistics to a safetensors file, atomically."""
  from safetensors.numpy import save_file

  arrays = {
    "mean": np.ascontiguousarray(stats.mean, np.float32),
    "std": np.ascontiguousarray(stats.std, np.float32),
  }
  atomic_write(path, lambda tmp: save_file(arrays, tmp))


def load_stats(path: str | os.PathLike, width: int | None = None) -> EmbeddingStats:
  """Reads statistics written by `save_stats`; `width`, if given, is the embedding width they must
  have."""
  from safetensors.numpy import load_file

  with local_copy(path) as local:
    arrays = load_file(local)
  missing = {"mean", "std"} - set(arrays)
  if missing:
    raise ValueError(f"{path}: missing {sorted(missing)}; not an embedding statistics file")
  mean, std = arrays["mean"], arrays["std"]
  if mean.ndim != 1 or mean.shape != std.shape:
    raise ValueError(f"{path}: mean {mean.shape} and std {std.shape} must be equal [E] vectors")
  if width is not None and mean.shape[0] != width:
    raise ValueError(f"{path}: statistics of width {mean.shape[0]}, the encoder gives {width}")
  if not np.all(std > 0):
    raise ValueError(f"{path}: std must be > 0 in every dimension")
  return EmbeddingStats(mean.astype(np.float32), std.astype(np.float32))
