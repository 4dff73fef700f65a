"""Texts made of segments (SLD): a text's latents are K segments of l latents each, [N, K * l, d],
and `segment_valid` [N, K] says which segments it has (the first ones; a text shorter than K
segments is padded). The K segments of every text are decoded in parallel as one batch of N * K
segment latents [N * K, l, d]; each text is its valid, non-empty segments joined in order.

`SegmentTextSampler` is the `LatentTextSampler` of a segment denoiser: each sample's number of
segments is given or drawn from a prior (the training texts' distribution), and `inpaint`
regenerates chosen segments of given texts while the others stay fixed (inpainting in latent
space, `lsd.sampling.latent.inpaint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from lsd.config import ConfigError
from lsd.sampling import latent as latent_sampling
from lsd.sampling.text_latent import LatentTextSampler, encode_sources


def latent_valid(segment_valid: Bool[Array, "N K"], per_segment: int) -> Bool[Array, "N L"]:
  """The validity of each of the K * l latents: that of its segment."""
  return jnp.repeat(jnp.asarray(segment_valid, bool), per_segment, axis=1)


def segment_valid_from_counts(counts: Sequence[int], num_segments: int) -> np.ndarray:
  """bool [N, K]: the first counts[i] segments of text i."""
  counts = np.asarray(counts)
  if counts.ndim != 1 or np.any(counts < 1) or np.any(counts > num_segments):
    raise ConfigError(f"segment counts {counts.tolist()} must be in [1, {num_segments}]")
  return np.arange(num_segments)[None, :] < counts[:, None]


def split_segments(latents: Float[Array, "N L D"], num_segments: int) -> Float[Array, "M l D"]:
  """[N, K * l, d] -> [N * K, l, d], text i's segment j at row i * K + j."""
  n, length, d = latents.shape
  if length % num_segments:
    raise ValueError(f"{length} latents are not {num_segments} segments of equal length")
  return latents.reshape(n * num_segments, length // num_segments, d)


def join_segments(
  texts: Sequence[str], segment_valid: Bool[Array, "N K"], separator: str = " "
) -> list[str]:
  """Segment texts [N * K] (row i * K + j = text i's segment j) -> N texts: each text's valid,
  non-empty segments joined in order by `separator`."""
  valid = np.asarray(segment_valid, bool)
  n, k = valid.shape
  if len(texts) != n * k:
    raise ValueError(f"{len(texts)} segment texts for {n} texts of {k} segments")
  out = []
  for i in range(n):
    parts = [texts[i * k + j].strip() for j in range(k) if valid[i, j]]
    out.append(separator.join(p for p in parts if p))
  return out


def draw_counts(key: jax.Array, n: int, prior: Sequence[float], num_segments: int) -> np.ndarray:
  """n segment counts in [1, K] drawn from `prior` (P(1), ..., P(K)); () = always K."""
  if not len(prior):
    return np.full(n, num_segments)
  p = np.asarray(prior, np.float64)
  if len(p) != num_segments or np.any(p < 0) or p.sum() <= 0:
    raise ConfigError(f"segment prior {list(prior)} must be {num_segments} weights >= 0")
  logits = jnp.log(jnp.asarray(p / p.sum(), jnp.float32))
  return np.asarray(jax.random.categorical(key, logits, shape=(n,))) + 1


@dataclasses.dataclass(frozen=True)
class SegmentTextSampler(LatentTextSampler):
  """A `LatentTextSampler` whose latents are `num_segments` segments of `per_segment` latents; its
  `decode(latents, latent_valid)` decodes and joins them. Without a `latent_valid`, each sample's
  segment count is `num_segments=` (an int or one per sample) or drawn from `segment_prior`."""

  num_segments: int = 1
  per_segment: int = 0
  segment_prior: tuple[float, ...] = ()  # P(1 segment), ..., P(K segments); () = always K

  def segment_valid(self, key: jax.Array, n: int, num_segments=None) -> np.ndarray:
    """bool [n, K] for `num_segments` (None: drawn from the prior with `key`)."""
    k = self.num_segments
    if num_segments is None:
      counts = draw_counts(key, n, self.segment_prior, k)
    else:
      counts = np.broadcast_to(np.asarray(num_segments), (n,))
    return segment_valid_from_counts(counts, k)

  def _latent_valid(self, key, n, num_segments, given):
    if given is not None:
      return given
    return latent_valid(self.segment_valid(key, n, num_segments), self.per_segment)

  def samples(
    self,
    key: jax.Array,
    num_samples: int,
    num_classes: int = 0,
    latent_valid: Bool[Array, "N L"] | None = None,
    num_segments=None,
  ) -> list[dict]:
    """`LatentTextSampler.samples` with each sample's segments given or drawn."""
    k_count, k_sample = jax.random.split(key)
    valid = self._latent_valid(k_count, num_samples, num_segments, latent_valid)
    return super().samples(k_sample, num_samples, num_classes, valid)

  def from_sources(
    self,
    key: jax.Array,
    sources: list[str],
    guidance_scale: float | None = None,
    candidates: int | None = None,
    latent_valid: Bool[Array, "N L"] | None = None,
    num_segments=None,
  ) -> list[str]:
    """`LatentTextSampler.from_sources` with each output's segments given or drawn."""
    k_count, k_sample = jax.random.split(key)
    valid = self._latent_valid(k_count, len(sources), num_segments, latent_valid)
    return super().from_sources(k_sample, sources, guidance_scale, candidates, valid)

  def inpaint(
    self,
    key: jax.Array,
    z0: Float[Array, "N L D"],
    keep_segments: Bool[Array, "N K"],
    segment_valid: Bool[Array, "N K"],
    *,
    sources: list[str] | None = None,
    guidance_scale: float | None = None,
  ) -> tuple[Float[Array, "N L D"], list[str]]:
    """Regenerates the segments of texts z0 where `keep_segments` is False, given the kept ones
    (and, seq2seq, the `sources`): (latents, texts). The kept segments' latents are z0's."""
    s = self.settings
    cond = {}
    if self.context_encoder is not None:
      if sources is None:
        raise ConfigError("the denoiser is seq2seq: inpainting needs the source of each text")
      cond["context"], cond["context_valid"] = encode_sources(
        self.context_encoder, list(sources), self.max_source_len
      )
    valid = latent_valid(segment_valid, self.per_segment)
    keep = latent_valid(keep_segments, self.per_segment) | ~valid
    z = latent_sampling.inpaint(
      self.graphdef,
      self.params,
      key,
      jnp.asarray(z0, jnp.float32),
      keep,
      steps=s.steps,
      sampler=s.sampler,
      eta=float(s.eta),
      objective=self.objective,
      schedule=self.schedule,
      guidance_scale=float(s.guidance_scale if guidance_scale is None else guidance_scale),
      project=bool(s.project),
      latent_valid=valid,
      **cond,
    )
    return z, self.decode_valid(z, valid)
