"""Text <-> latents with a trained sentence autoencoder and a latent denoiser: encode sentences,
decode latents (greedy, nucleus or beam search), interpolate and edit texts, sample latents with a
run's sampler settings, and minimum-Bayes-risk selection among candidate outputs.

Pure functions of a model's (graphdef, params), its tokenizer and the run's config sections read
into `DecodeConfig` / `LatentSampleConfig` (the fields of `config.sample`); `lsd.api` wraps them for
loaded runs. The autoencoder is an `lsd.models.autoencoder.LatentAutoencoder` whose encoder is its
own or a frozen pretrained one (`lsd.convert.encoders`); the denoiser is called through
`lsd.sampling.latent`. Shapes: N texts, T tokens, l latents, d latent width.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.config import ConfigError, check_choice, dataclass_from_config
from lsd.convert.encoders import FrozenEncoder, frozen_encoder, hidden_states
from lsd.data.sentences import encode_sentences
from lsd.diffusion.gaussian import CosineSchedule
from lsd.eval.metrics import MBR_METRICS, mbr_select
from lsd.sampling import latent as latent_sampling


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Latents -> text, from `config.sample`: greedy (top_p = 0) or nucleus sampling at
  `temperature`, or beam search (num_beams > 1) with its length and repetition processors."""

  max_new_tokens: int
  top_p: float
  temperature: float
  num_beams: int = 1  # 1 = greedy / top-p decoding
  length_penalty: float = 1.0
  repetition_penalty: float = 1.0
  no_repeat_ngram: int = 0
  min_new_tokens: int = 0

  @classmethod
  def from_config(cls, cfg) -> DecodeConfig:
    return dataclass_from_config(cls, cfg, "sample")

  def validate(self) -> None:
    if int(self.num_beams) < 1:
      raise ConfigError(
        f"sample.num_beams={self.num_beams} must be >= 1 (1 = greedy / top-p decoding)"
      )


@dataclasses.dataclass(frozen=True)
class LatentSampleConfig:
  """The latent sampler's settings, from `config.sample` (see `lsd.sampling.latent.sample`), and
  for seq2seq the candidates per source and the metric of their MBR choice."""

  steps: int
  sampler: str
  eta: float
  guidance_scale: float  # CFG w; 1 = plain conditional
  project: bool  # x0_hat onto the sqrt(d) sphere at every step
  candidates: int = 1  # 1 = one sample per source, no MBR
  mbr_metric: str = "rouge2"

  @classmethod
  def from_config(cls, cfg) -> LatentSampleConfig:
    return dataclass_from_config(cls, cfg, "sample")

  def validate(self) -> None:
    check_choice("sample.sampler", self.sampler, latent_sampling.SAMPLERS)
    check_choice("sample.mbr_metric", self.mbr_metric, MBR_METRICS)
    k = self.candidates
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ConfigError(
        f"sample.candidates={k!r} must be an integer >= 1 (1 = one sample per source, no MBR)"
      )


# ---------------------------------------------------------------------------------------------------
# Text -> latents
# ---------------------------------------------------------------------------------------------------
def frozen_hidden(model: nnx.Module, tokens: Int[Array, "N T"], valid: Bool[Array, "N T"]):
  """The frozen pretrained encoder's states [N, T, H] for an autoencoder with one (else None)."""
  if model.cfg.pretrained_encoder:
    return hidden_states(frozen_encoder(model.cfg.encoder, "model.encoder"), tokens, valid)
  return None


def encode_latents(
  model: nnx.Module, tokens: Int[Array, "N T"], valid: Bool[Array, "N T"]
) -> Float[Array, "N l d"]:
  """Sentences -> latents through the autoencoder's own encoder or its frozen pretrained one."""
  hidden = frozen_hidden(model, tokens, valid)
  return model.encode(tokens, valid) if hidden is None else model.encode_hidden(hidden, valid)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def encode_tokens(
  graphdef: nnx.GraphDef, params: nnx.State, tokens: Int[Array, "N T"], valid: Bool[Array, "N T"]
) -> Float[Array, "N l d"]:
  """`encode_latents` of the autoencoder (graphdef, params), jitted."""
  return encode_latents(nnx.merge(graphdef, params), tokens, valid)


def encode_texts(
  tokenizer, graphdef: nnx.GraphDef, params: nnx.State, texts: list[str], max_len: int
) -> Float[Array, "N l d"]:
  """Texts -> latents (fp32); texts longer than max_len tokens (bos and eos included) are cut."""
  tokens, valid = encode_sentences(list(texts), tokenizer, max_len)
  return encode_tokens(graphdef, params, jnp.asarray(tokens), jnp.asarray(valid))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _context(graphdef, params, tokens, valid):
  return jax.lax.stop_gradient(nnx.merge(graphdef, params)(tokens, valid))


def encode_sources(
  encoder: FrozenEncoder, sources: list[str], max_len: int
) -> tuple[Float[Array, "N S H"], Bool[Array, "N S"]]:
  """Source texts -> (hidden states, validity) of a frozen encoder: a seq2seq denoiser's context."""
  tokens, valid = encode_sentences(list(sources), encoder.tokenizer, max_len)
  context = _context(encoder.graphdef, encoder.params, jnp.asarray(tokens), jnp.asarray(valid))
  return context, jnp.asarray(valid)


# ---------------------------------------------------------------------------------------------------
# Latents -> text
# ---------------------------------------------------------------------------------------------------
def decode_texts(
  tokenizer,
  graphdef: nnx.GraphDef,
  params: nnx.State,
  latents: Float[Array, "N l d"],
  decoding: DecodeConfig,
  key: jax.Array | None = None,
) -> list[str]:
  """Latents -> texts with the autoencoder's decoder (each cut at its first eos). `key` seeds
  nucleus sampling (default key 0; unused when greedy or beam search)."""
  decoding.validate()
  key = jax.random.key(0) if key is None else key
  if decoding.num_beams > 1:
    tokens = latent_sampling.beam_decode(
      graphdef,
      params,
      latents,
      bos_id=tokenizer.bos_id,
      eos_id=tokenizer.eos_id,
      max_new_tokens=int(decoding.max_new_tokens),
      num_beams=int(decoding.num_beams),
      length_penalty=float(decoding.length_penalty),
      repetition_penalty=float(decoding.repetition_penalty),
      no_repeat_ngram=int(decoding.no_repeat_ngram),
      min_new_tokens=int(decoding.min_new_tokens),
    )
  else:
    tokens = latent_sampling.decode(
      graphdef,
      params,
      key,
      latents,
      bos_id=tokenizer.bos_id,
      max_new_tokens=int(decoding.max_new_tokens),
      top_p=float(decoding.top_p),
      temperature=float(decoding.temperature),
    )
  out = []
  for row in np.asarray(jax.device_get(tokens)).tolist():
    if tokenizer.eos_id in row:
      row = row[: row.index(tokenizer.eos_id)]
    out.append(tokenizer.decode(row))
  return out


def interpolate_texts(
  tokenizer,
  graphdef: nnx.GraphDef,
  params: nnx.State,
  text_a: str,
  text_b: str,
  n: int,
  *,
  max_len: int,
  decoding: DecodeConfig,
) -> list[str]:
  """n texts decoded along the slerp between the latents of text_a and text_b (ends included)."""
  z = encode_texts(tokenizer, graphdef, params, [text_a, text_b], max_len)
  latents = latent_sampling.interpolate(z[0], z[1], n)
  return decode_texts(tokenizer, graphdef, params, latents, decoding)


# ---------------------------------------------------------------------------------------------------
# Latent sampling with a run's settings
# ---------------------------------------------------------------------------------------------------
def sample_latents(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  key: jax.Array,
  num_samples: int,
  settings: LatentSampleConfig,
  *,
  objective: str,
  schedule: CosineSchedule,
  guidance_scale: float | None = None,
  **cond,
) -> Float[Array, "N l d"]:
  """Latents [num_samples, l, d] drawn from noise by the denoiser (graphdef, params) with
  `settings`; `guidance_scale` overrides settings.guidance_scale; cond: labels / context /
  context_valid."""
  return latent_sampling.sample(
    graphdef,
    params,
    key,
    num_samples,
    steps=settings.steps,
    sampler=settings.sampler,
    eta=float(settings.eta),
    objective=objective,
    schedule=schedule,
    guidance_scale=float(settings.guidance_scale if guidance_scale is None else guidance_scale),
    project=bool(settings.project),
    **cond,
  )


def edit_latents(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  key: jax.Array,
  z0: Float[Array, "N l d"],
  t_edit: float,
  settings: LatentSampleConfig,
  *,
  objective: str,
  schedule: CosineSchedule,
  num_classes: int = 0,
  labels: list[int] | None = None,
  guidance_scale: float | None = None,
  steps: int | None = None,
) -> Float[Array, "N l d"]:
  """Noises latents z0 to t_edit in (0, 1] and denoises them with the denoiser (graphdef, params).

  With a class-conditional denoiser (num_classes > 0), `labels` (one per row) is the target class
  of the edit; None denoises unconditionally (the null class). `steps` defaults to settings.steps
  scaled by t_edit, `guidance_scale` to settings.guidance_scale; the rest comes from `settings`."""
  cond = {}
  if num_classes:
    if labels is None:
      cond["labels"] = jnp.full((z0.shape[0],), num_classes, jnp.int32)
    else:
      cond["labels"] = jnp.asarray(labels, jnp.int32)
  return latent_sampling.edit(
    graphdef,
    params,
    key,
    z0,
    t_edit,
    steps=int(steps or max(1, round(settings.steps * t_edit))),
    sampler=settings.sampler,
    eta=float(settings.eta),
    objective=objective,
    schedule=schedule,
    guidance_scale=float(settings.guidance_scale if guidance_scale is None else guidance_scale),
    project=bool(settings.project),
    **cond,
  )


def mbr_choose(texts: list[str], k: int, metric: str = "rouge2") -> list[str]:
  """Texts [N * k], rows [i * k, (i + 1) * k) being input i's candidates -> each input's
  minimum-Bayes-risk choice under `metric` (`lsd.eval.metrics.mbr_select`); k = 1: `texts`."""
  if k == 1:
    return list(texts)
  groups = [texts[i * k : (i + 1) * k] for i in range(len(texts) // k)]
  picks = mbr_select(groups, metric=metric)
  return [g[j] for g, j in zip(groups, picks, strict=True)]


@dataclasses.dataclass(frozen=True)
class LatentTextSampler:
  """Texts from a latent denoiser (graphdef, params): latents drawn with a run's `settings`,
  unconditionally, per class, or (seq2seq) conditioned on a frozen encoder's states of source texts,
  then turned into texts by `decode` (latents -> texts, e.g. an autoencoder's `decode_texts`).
  Given `latent_valid` [N, L] (the latents each sample has, e.g. SLD's segments), the sampler
  passes it to the denoiser and calls `decode(latents, latent_valid)`."""

  graphdef: nnx.GraphDef
  params: nnx.State
  settings: LatentSampleConfig
  objective: str
  schedule: CosineSchedule
  decode: Callable[[Array], list[str]]
  context_encoder: FrozenEncoder | None = None  # seq2seq
  max_source_len: int = 0  # source tokens per row (seq2seq)

  def latents(
    self, key: jax.Array, num_samples: int, guidance_scale: float | None = None, **cond
  ) -> Float[Array, "N l d"]:
    """`sample_latents` with this sampler's denoiser and settings; cond: labels / context."""
    return sample_latents(
      self.graphdef,
      self.params,
      key,
      num_samples,
      self.settings,
      objective=self.objective,
      schedule=self.schedule,
      guidance_scale=guidance_scale,
      **cond,
    )

  def nfe(self, conditional: bool) -> int:
    """Denoiser evaluations per sample: the steps, doubled when CFG guides a condition."""
    guided = conditional and self.settings.guidance_scale != 1
    return self.settings.steps * (2 if guided else 1)

  def decode_valid(self, latents: Array, latent_valid: Array | None) -> list[str]:
    """`decode(latents)`, or `decode(latents, latent_valid)` when the latents have a validity."""
    return self.decode(latents) if latent_valid is None else self.decode(latents, latent_valid)

  def samples(
    self,
    key: jax.Array,
    num_samples: int,
    num_classes: int = 0,
    latent_valid: Bool[Array, "N L"] | None = None,
  ) -> list[dict]:
    """Unconditional samples, or class-conditional ones cycling through the classes:
    [{"text", "nfe", "label"?}]."""
    labels = jnp.arange(num_samples, dtype=jnp.int32) % num_classes if num_classes else None
    valid = {} if latent_valid is None else {"latent_valid": jnp.asarray(latent_valid)}
    latents = self.latents(key, num_samples, labels=labels, **valid)
    texts = self.decode_valid(latents, latent_valid)
    nfe = self.nfe(bool(num_classes))
    if not num_classes:
      return [{"text": t, "nfe": nfe} for t in texts]
    return [{"text": t, "nfe": nfe, "label": i % num_classes} for i, t in enumerate(texts)]

  def from_sources(
    self,
    key: jax.Array,
    sources: list[str],
    guidance_scale: float | None = None,
    candidates: int | None = None,
    latent_valid: Bool[Array, "N L"] | None = None,
  ) -> list[str]:
    """Seq2seq: one output text per source (`guidance_scale` overrides settings.guidance_scale:
    CFG against the null context). With `candidates` k > 1 (default settings.candidates) each
    source gets k samples in one batch and the output is their minimum-Bayes-risk choice under
    settings.mbr_metric, as in the LD4LG reference. `latent_valid`: one row per source."""
    if self.context_encoder is None:
      raise ConfigError("the denoiser has no context encoder: it is not a seq2seq model")
    k = self.settings.candidates if candidates is None else int(candidates)
    if k < 1:
      raise ConfigError(f"candidates={k} must be >= 1 (1 = one sample per source, no MBR)")
    context, valid = encode_sources(self.context_encoder, sources, self.max_source_len)
    if latent_valid is not None:
      latent_valid = jnp.asarray(latent_valid)
    if k > 1:  # rows [i * k, (i + 1) * k) are source i's candidates
      context, valid = jnp.repeat(context, k, axis=0), jnp.repeat(valid, k, axis=0)
      if latent_valid is not None:
        latent_valid = jnp.repeat(latent_valid, k, axis=0)
    extra = {} if latent_valid is None else {"latent_valid": latent_valid}
    latents = self.latents(
      key, len(sources) * k, guidance_scale, context=context, context_valid=valid, **extra
    )
    return mbr_choose(self.decode_valid(latents, latent_valid), k, self.settings.mbr_metric)
