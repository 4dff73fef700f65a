"""SLD (Segment-Level Diffusion, arXiv 2412.11333): two trainer tasks over the shared latent stack.

Each text (a story's continuation, a dialogue's summary) is cut into at most K segments (sentences
or utterances, `lsd.data.segments`), and each segment gets its own l x d latents.

Stage 1, "sld_ae" (`SLDAutoencoderTask`): the LD4LG autoencoder (`LatentAutoencoderTask`) applied
per segment, trained on the training texts' segments with SLD's representation losses
(`lsd.models.representation`): Gaussian latent noise, adversarial latent noise and a SimCSE
contrastive loss, each weighted by a `config.sld` field (0 = off).
Stage 2, "sld_diffusion" (`SLDDiffusionTask`): the latent denoiser (`LatentDiffusionTask`) over the
K x l latents of a text, with segment position embeddings, the segments' validity mask,
self-conditioning, and cross-attention to a frozen context encoder's states of the prompt or
source (CFG by condition dropout); latents are encoded once by the frozen stage-1 run
(`sld.cache_latents`). Samples are decoded segment by segment in one batch and joined
(`lsd.sampling.segments`); a sample's number of segments is drawn from the training texts' unless
given. Prompt -> continuation and source -> summary are `lsd.api.generate_from_sources`;
`lsd.api.regenerate_segment` inpaints one segment of given texts in latent space.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd.config import ConfigError
from lsd.data.segments import (
  JOIN,
  SegmentConfig,
  build_segment_data,
  load_segmented,
  segment_rows,
  split_segments,
)
from lsd.methods import latent
from lsd.methods.latent import LatentAutoencoderTask, LatentDiffusionTask
from lsd.models.autoencoder import LatentAutoencoder
from lsd.models.denoiser import LatentDenoiser
from lsd.models.representation import RepresentationLosses, representation_loss
from lsd.sampling import segments as seg
from lsd.sampling import text_latent as tl
from lsd.train.task import Batch


@dataclasses.dataclass(frozen=True)
class AutoencoderStage(latent.AutoencoderStage):
  """`config.sld` of stage 1: the representation losses (paper values; 0 = off)."""

  latent_noise_std: float = 0.05  # Gaussian noise on the latents the decoder reads
  adversarial_weight: float = 0.15  # the reference code's default weight of L_adv
  adversarial_epsilon: float = 0.05  # L2 norm of each segment's adversarial move
  contrastive_weight: float = 0.2
  contrastive_temperature: float = 0.05
  contrastive_word_dropout: float = 0.1  # encoder inputs masked in the positive view

  def losses(self) -> RepresentationLosses:
    names = [f.name for f in dataclasses.fields(RepresentationLosses)]
    return RepresentationLosses(**{n: float(getattr(self, n)) for n in names})

  def validate(self) -> None:
    self.losses().validate("sld")


class DiffusionStage(latent.DiffusionStage):
  """`config.sld` of stage 2 (the fields of `LatentDiffusionTask`)."""

  section = "sld"


def check_segments(config) -> SegmentConfig:
  """The data's segmentation fields, validated."""
  return SegmentConfig.from_config(config.data)


class SLDAutoencoderTask(LatentAutoencoderTask):
  """Stage 1: the autoencoder on the training texts' segments, with the representation losses;
  its samples are greedy reconstructions of held-out segments."""

  name = "sld_ae"
  section, stage_config = "sld", AutoencoderStage

  def __init__(self, config):
    super().__init__(config)
    _, _ = self.stage, check_segments(config)  # validated now, before any work
    if config.model.get("latent_noise", 0.0):
      raise ConfigError(
        f"model.latent_noise={config.model.latent_noise}: SLD's Gaussian latent noise is "
        "sld.latent_noise_std (one fixed std); set model.latent_noise=0"
      )

  def sentence_data(self, cfg, workdir, **kw):
    return build_segment_data(cfg, workdir, **kw).sentence_data()  # every segment a sentence

  def encoder(self, model: LatentAutoencoder):
    """(tokens, valid, rngs) -> latents through the model's encoder or its frozen one."""

    def encode(tokens, valid, rngs):
      hidden = tl.frozen_hidden(model, tokens, valid)
      if hidden is None:
        return model.encode(tokens, valid, rngs=rngs)
      return model.encode_hidden(hidden, valid)

    return encode

  def loss(self, model: LatentAutoencoder, batch: Batch, key: jax.Array, train: bool = True):
    loss, metrics = representation_loss(
      model,
      batch["tokens"],
      batch["valid"],
      key,
      self.stage.losses(),
      encode=self.encoder(model),
      mask_id=self.tokenizer.mask_id,
      train=train,
    )
    return loss, dict(metrics, ppl=jnp.exp(metrics["recon"]))

  def held_out_texts(self, n: int) -> list[str]:
    """The first n segments of the held-out texts."""
    return [s for d in load_segmented(self.config.data)[1] for s in d["segments"]][:n]


class SLDDiffusionTask(LatentDiffusionTask):
  """Stage 2: the segment denoiser on the frozen stage-1 run's latents."""

  name = "sld_diffusion"
  section, stage_config = "sld", DiffusionStage
  autoencoder_methods, decoder_method = ("sld_ae",), "sld_ae"
  hints = {"autoencoder_workdir": "(configs/sld.py:stage=ae)"}

  def __init__(self, config):
    super().__init__(config)
    segments = check_segments(config)
    k = config.model.get("num_segments", 0)
    if k != segments.max_segments:
      raise ConfigError(
        f"model.num_segments={k!r} must equal data.max_segments={segments.max_segments}: the "
        "denoiser reads every segment a text may have"
      )
    if self.stage.decoder_workdir:
      raise ConfigError(
        f"sld.decoder_workdir={self.stage.decoder_workdir!r}: SLD has no decoder-tuning stage; "
        "leave it empty (samples are decoded by the sld.autoencoder_workdir run)"
      )
    self._prior = None

  def text_data(self, workdir, process_index, process_count, tokenizer, source_tokenizer):
    """The run's texts cut into segments (`lsd.data.segments`)."""
    return build_segment_data(
      self.config.data,
      workdir,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
      tokenizer=tokenizer,
      source_tokenizer=source_tokenizer,
    )

  def trainer_data(self, data, encode):
    """[K, T] segment rows with their validity, and (encode given) their latents [K * l, d]."""
    return data.array_data(encode, keep_tokens=bool(self.stage.decoding_loss_weight))

  @property
  def separator(self) -> str:
    """What joins a text's segments: a space between sentences, a line between utterances."""
    return JOIN[check_segments(self.config).segment_mode]

  def segment_prior(self) -> tuple[float, ...]:
    """P(k segments), k = 1..K, of the training texts (read once from the data); () when the data
    cannot be read here (then every sample has K segments)."""
    if self._prior is None:
      try:
        counts = load_segmented(self.config.data)[2].counts
      except (ConfigError, OSError) as e:
        print(f"lsd: samples get {self.num_segments} segments: the training texts are not "
              f"readable here ({e})", flush=True)  # fmt: skip
        counts = ()
      total = sum(counts)
      self._prior = tuple(c / total for c in counts) if total else ()
    return self._prior

  def decode(self, latents: jax.Array, latent_valid: jax.Array | None = None) -> list[str]:
    """Latents [N, K * l, d] -> N texts: all N * K segments decoded in one batch by the
    autoencoder run, each text's valid, non-empty segments joined in order."""
    k = self.num_segments
    texts = super().decode(seg.split_segments(latents, k))
    if latent_valid is None:
      segment_valid = np.ones((latents.shape[0], k), bool)
    else:
      segment_valid = np.asarray(latent_valid).reshape(latents.shape[0], k, -1)[..., 0]
    return seg.join_segments(texts, segment_valid, self.separator)

  def sampler(self, model: LatentDenoiser) -> seg.SegmentTextSampler:
    """`LatentDiffusionTask.sampler` with segments: `.samples(key, n, num_segments=None)`,
    `.from_sources(key, sources, num_segments=None)` (None: counts drawn from the training texts'),
    `.inpaint(key, z0, keep_segments, segment_valid, sources=...)`."""
    graphdef, params = nnx.split(model)
    objective, max_source_len = self.stage.objective, self.config.data.max_source_len
    k = self.num_segments
    return seg.SegmentTextSampler(
      graphdef, params, self.sampling, objective, self.schedule, self.decode,
      self.context_encoder, max_source_len, num_segments=k,
      per_segment=model.cfg.num_latents // k, segment_prior=self.segment_prior(),
    )  # fmt: skip

  def held_out_docs(self, n: int) -> list[dict]:
    return load_segmented(self.config.data)[1][:n]

  def encode_segments(self, texts: list[str]) -> tuple[jax.Array, np.ndarray]:
    """Texts -> (latents [N, K * l, d] of their first K segments, encoded by the autoencoder run;
    invalid segments zero, segment_valid [N, K])."""
    ae, cfg = self.autoencoder(), check_segments(self.config)
    lists = [split_segments(t, cfg.segment_mode, cfg.min_words) for t in texts]
    if not all(lists):
      raise ConfigError(f"every text must have a segment ({cfg.segment_mode})")
    encode = lambda t, v: tl.encode_tokens(ae.graphdef, ae.params, jnp.asarray(t), jnp.asarray(v))
    k, t = cfg.max_segments, cfg.max_len
    rows = segment_rows(lists, ae.tokenizer, k, t, encode, keep_tokens=False)
    return jnp.asarray(rows["latents"]), rows["segment_valid"]

  def generate(self, model: LatentDenoiser, key: jax.Array, inputs: list[dict], **options):
    """As `LatentDiffusionTask.generate`, and inputs {"text", "segment", "source"?} regenerate
    segment `segment` (0-based) of `text` given its other segments (`regenerate_segment`); records
    `{**input, "text": the edited text, "original", "nfe"}`. Edits and plain inputs may not mix in
    one call. A "prompt" is the source of a continuation run (ROCStories: sentence 1)."""
    if isinstance(inputs, list) and self.context_encoder is not None:
      inputs = [
        {**{k: v for k, v in x.items() if k != "prompt"}, "source": x["prompt"]}
        if isinstance(x, dict) and "prompt" in x and "source" not in x
        else x
        for x in inputs
      ]
    edits = [isinstance(x, dict) and ("segment" in x or "text" in x) for x in inputs]
    if not any(edits):
      return super().generate(model, key, inputs, **options)
    seq2seq = self.context_encoder is not None
    fields = ("text", "segment", "source") if seq2seq else ("text", "segment")
    if not all(edits):
      raise ConfigError(
        "generate: inputs that edit a segment ({'text', 'segment'}) and inputs that generate "
        "anew cannot mix in one call"
      )
    inputs = self.generation_inputs(inputs, fields)
    unknown = sorted(k for k, v in options.items() if k != "guidance_scale" and v is not None)
    if unknown:
      raise ConfigError(f"generate: options {unknown} are not read by segment edits")
    for i, x in enumerate(inputs):
      j = x.get("segment")
      if not isinstance(x.get("text"), str) or isinstance(j, bool) or not isinstance(j, int):
        raise ConfigError(
          f"generate: input {i} edits a segment: it needs a 'text' string and a 'segment' int "
          f"(0-based); got text={x.get('text')!r}, segment={j!r}"
        )
      if seq2seq and not isinstance(x.get("source"), str):
        raise ConfigError(f"generate: input {i} has no 'source' text (seq2seq run)")
    out: list[dict | None] = [None] * len(inputs)
    nfe = self.sampler(model).nfe(seq2seq)
    for j in sorted({x["segment"] for x in inputs}):  # one batch per edited segment index
      rows = [i for i, x in enumerate(inputs) if x["segment"] == j]
      texts = self.regenerate_segment(
        model,
        jax.random.fold_in(key, j),
        [inputs[i]["text"] for i in rows],
        j,
        sources=[inputs[i]["source"] for i in rows] if seq2seq else None,
        guidance_scale=options.get("guidance_scale"),
      )
      for i, t in zip(rows, texts, strict=True):
        out[i] = {**inputs[i], "original": inputs[i]["text"], "text": t, "nfe": nfe}
    return out

  def regenerate_segment(
    self,
    model: LatentDenoiser,
    key: jax.Array,
    texts: list[str],
    segment: int,
    *,
    sources: list[str] | None = None,
    guidance_scale: float | None = None,
  ) -> list[str]:
    """Each text with its segment `segment` (0-based) regenerated given its other segments (and
    its source, seq2seq): inpainting in latent space; the other segments decode as before."""
    z0, segment_valid = self.encode_segments(texts)
    if not 0 <= segment < self.num_segments or not segment_valid[:, segment].all():
      raise ConfigError(
        f"segment={segment}: every text must have that segment (texts have "
        f"{segment_valid.sum(1).tolist()} segments, counted from 0)"
      )
    keep = np.ones_like(segment_valid)
    keep[:, segment] = False
    _, out = self.sampler(model).inpaint(
      key, z0, keep, segment_valid, sources=sources, guidance_scale=guidance_scale
    )
    return out
