"""The latent-diffusion stages a latent method is built from (LD4LG, SLD).

`LatentAutoencoderTask`: a `LatentAutoencoder` trained on teacher-forced reconstruction, its encoder
from scratch or a frozen pretrained one, its decoder optionally started from a causal-LM run.
`LatentDiffusionTask`: a denoiser on the latents of a frozen `LatentAutoencoder` run (encoded once
per sentence when the stage caches them), optionally plus a decoding loss, sampling texts that the
autoencoder (or a tuned decoder run) decodes; seq2seq with a frozen encoder's source states as the
denoiser's context. `DecoderTuningMixin`: tunes the autoencoder's reconstruction network and decoder
to read a frozen denoiser's estimates of the latents.

A method binds each to its config section (`section`; the task reads it through `stage`, a frozen
dataclass `stage_config` with the fields used here) and to the run methods its workdir fields may
name; `lsd.methods.ld4lg` is the example. The math, the stage runs, the latent cache and text <->
latents are the layers below: `lsd.diffusion.latent`, `lsd.train.stages`, `lsd.data.latent_cache`,
`lsd.sampling.text_latent`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lsd.config import (
  ConfigError,
  check_choice,
  check_positive,
  check_range,
  dataclass_from_config,
)
from lsd.convert.encoder_specs import describe, encoder_spec
from lsd.convert.encoders import frozen_encoder, hidden_states
from lsd.data import split_documents
from lsd.data.latent_cache import cached_latent_data
from lsd.data.sentences import build_sentence_data, load_sentences
from lsd.data.tokenizer import is_encoder_kind
from lsd.diffusion.gaussian import OBJECTIVES, CosineSchedule
from lsd.diffusion.latent import diffusion_training_loss, noised_estimates
from lsd.methods import get_task
from lsd.models.autoencoder import AutoencoderConfig, LatentAutoencoder, reconstruction_loss
from lsd.models.denoiser import DenoiserConfig, LatentDenoiser
from lsd.nn.layers import normalize_to_sphere
from lsd.sampling import text_latent as tl
from lsd.train import stages
from lsd.train.task import Batch, Task

SHARED_AE = "the runs must share one stage-1 autoencoder"


@dataclasses.dataclass(frozen=True)
class AutoencoderStage:
  """`config.<section>` of an autoencoder stage (`LatentAutoencoderTask`; absent from runs that
  predate it)."""

  decoder_init: str = ""  # a causal-LM run whose weights start the decoder; "" = random init

  def validate(self) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class DiffusionStage:
  """`config.<section>` of a latent-diffusion stage (the fields of `LatentDiffusionTask`); a method
  subclasses it to name its section in errors. The defaults are for runs that predate a field."""

  section: ClassVar[str] = "latent"  # the config section, for error messages

  autoencoder_workdir: str
  objective: str
  self_condition_prob: float
  cond_drop_prob: float
  schedule_scale: float
  context_encoder: str = ""  # seq2seq: the frozen encoder of the sources (data.source_field)
  cache_latents: bool = False
  decoder_workdir: str = ""  # a decoder-tuning run to decode with; "" = the autoencoder run
  decoding_loss_weight: float = 0.0
  decoding_loss_t_max: float = 1.0

  def validate(self) -> None:
    s = self.section
    check_choice(f"{s}.objective", self.objective, OBJECTIVES)
    if self.context_encoder:  # a frozen pretrained encoder's registry name
      encoder_spec(self.context_encoder, f"{s}.context_encoder")
    for name in ("self_condition_prob", "cond_drop_prob"):
      check_range(f"{s}.{name}", getattr(self, name), 0.0, 1.0)
    check_positive(f"{s}.schedule_scale", self.schedule_scale)
    check_positive(f"{s}.decoding_loss_weight", self.decoding_loss_weight, allow_zero=True)
    if not isinstance(self.cache_latents, bool):
      raise ConfigError(f"{s}.cache_latents={self.cache_latents!r} must be true or false")
    t_max = self.decoding_loss_t_max
    if isinstance(t_max, bool) or not isinstance(t_max, int | float) or not 0 < t_max <= 1:
      raise ConfigError(f"{s}.decoding_loss_t_max={t_max!r} must be in (0, 1]")


def held_out_sentences(cfg, n: int) -> list[dict]:
  """The first n held-out sentences (the eval split of sentence data config `cfg`)."""
  return split_documents(load_sentences(cfg), cfg.eval_fraction, cfg.split_seed)[1][:n]


def sphere(normalize: bool):
  """The projection of estimates onto the latents' sphere (None when they are not normalised)."""
  return normalize_to_sphere if normalize else None


class LatentAutoencoderTask(Task):
  """A `LatentAutoencoder` trained on teacher-forced reconstruction (word dropout and latent noise
  in training); its encoder is trained from scratch or is a frozen pretrained one
  (`model.encoder`), its decoder optionally starts from a causal-LM run (`<section>.decoder_init`).
  Its samples are greedy reconstructions of held-out sentences.

  Stage fields (`stage_config`, read from `config.<section>`, which may be absent): decoder_init.
  """

  section: ClassVar[str]  # the config section of the stage fields
  stage_config: ClassVar[type]  # its frozen dataclass

  @property
  def stage(self) -> Any:
    return dataclass_from_config(
      self.stage_config, self.config.get(self.section) or {}, self.section
    )

  def validate(self) -> None:
    self.check_encoder(load=False)

  def make_data(self, workdir, *, process_index: int, process_count: int):
    self.check_encoder()
    data = self.sentence_data(
      self.config.data,
      workdir,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
      tokenizer=self.data_tokenizer(),
    )
    self.tokenizer = data.tokenizer
    return data

  def sentence_data(self, cfg, workdir, **kw):
    """The training sentences (`build_sentence_data`'s `SentenceData`); a method whose texts are
    cut into segments returns the segments as sentences."""
    return build_sentence_data(cfg, workdir, **kw)

  def check_encoder(self, load: bool = True) -> None:
    """A frozen pretrained encoder (`model.encoder`, a registry name) reads its own tokenizer's
    ids and gives states of its own width; `load`: it is loaded now, outside any trace."""
    m, kind = self.config.model, self.config.data.tokenizer.kind
    if m.encoder in ("scratch", "external"):
      return
    spec = encoder_spec(m.encoder, "model.encoder")
    if not is_encoder_kind(kind) or encoder_spec(kind, "data.tokenizer.kind").name != spec.name:
      raise ConfigError(
        f"data.tokenizer.kind={kind!r}: model.encoder={m.encoder!r} reads the ids of its own "
        f"tokenizer; set --config.data.tokenizer.kind={m.encoder}"
      )
    if m.d_encoder != spec.width:
      raise ConfigError(
        f"model.d_encoder={m.d_encoder}: model.encoder={m.encoder!r} gives {spec.width}-wide states"
      )
    if load:
      frozen_encoder(m.encoder, "model.encoder")

  def data_tokenizer(self):
    """The `decoder_init` LM's tokenizer (the decoder starts from its weights, so the ids must
    mean the same); None = train one on the training split."""
    run = self.decoder_init_run()
    return None if run is None else run.tokenizer

  def decoder_init_run(self):
    """The causal-LM run named by `<section>.decoder_init` (None when unset), loaded once."""
    path, field = self.stage.decoder_init, f"{self.section}.decoder_init"
    if path and getattr(self, "_decoder_init", None) is None:
      hint = "(configs/causal_lm.py)"
      run = stages.load_stage_run(field, path, get_task, "causal_lm", hint)
      kind, lm_kind = self.config.data.tokenizer.kind, run.config.data.tokenizer.kind
      if kind != lm_kind:
        raise ConfigError(
          f"{field}={path!r} was trained with data.tokenizer.kind={lm_kind!r}, this run "
          f"has data.tokenizer.kind={kind!r}: the decoder and the LM must share one tokenizer"
        )
      self._decoder_init = run
    return self._decoder_init if path else None

  def initial_params(self, params):
    """The random init, with every decoder weight but the cross-attention to the latents from the
    `decoder_init` LM if set (as the LD4LG paper fine-tunes BART's decoder)."""
    run, path = self.decoder_init_run(), self.stage.decoder_init
    if run is None:
      return params
    kw = dict(field=f"{self.section}.decoder_init", path=path, names=("LM", "AE decoder"))
    stages.check_fields_match(
      source=run.task.model_config(),
      target=dataclasses.replace(
        self.model_config().decoder_config(), cross_attention=False, d_context=0
      ),
      what="its model is not the AE decoder without cross-attention",
      hint="train the LM with the decoder's sizes (model.d_model, model.decoder_layers, "
      "model.n_heads, model.mlp, model.norm)",
      ignore=("dropout", "dtype"),
      **kw,
    )
    out, fresh = stages.copy_params(params, run.params, into=("decoder",), **kw)
    if jax.process_index() == 0:
      n = len(jax.tree.leaves(run.params))
      msg = f"{n} tensors copied, {len(fresh)} cross-attention tensors fresh"
      print(f"lsd: AE decoder initialised from {path} (step {run.step}): {msg}", flush=True)
    return out

  def model_config(self) -> AutoencoderConfig:
    cfg = AutoencoderConfig.from_config(self.config.model, vocab_size=self.tokenizer.vocab_size)
    if cfg.max_len < self.config.data.max_len:
      raise ConfigError(
        f"model.max_len={cfg.max_len} must be >= data.max_len={self.config.data.max_len}"
      )
    if cfg.encoder == "external":
      raise ConfigError(
        f"model.encoder='external': {self.name} trains with 'scratch' or a frozen pretrained "
        f"encoder ({describe()}); any other encoder's hidden states go through "
        "LatentAutoencoder.encode_hidden / reconstruction_loss(hidden=...)"
      )
    return cfg

  def build_model(self, rngs: nnx.Rngs) -> LatentAutoencoder:
    return LatentAutoencoder(self.model_config(), rngs=rngs)

  def reconstruction(self, model, batch: Batch, key: jax.Array, train: bool, **kw):
    """`reconstruction_loss` of the batch, with dropout, word dropout and latent noise in
    training; metrics with the perplexity."""
    loss, metrics = reconstruction_loss(
      model,
      batch["tokens"],
      batch["valid"],
      rngs=nnx.Rngs(dropout=key) if train and model.cfg.dropout else None,
      word_dropout_key=jax.random.fold_in(key, 1) if train else None,
      mask_id=self.tokenizer.mask_id,
      latent_noise_key=jax.random.fold_in(key, 2) if train else None,
      **kw,
    )
    return loss, dict(metrics, ppl=jnp.exp(loss))

  def loss(self, model: LatentAutoencoder, batch: Batch, key: jax.Array, train: bool = True):
    hidden = tl.frozen_hidden(model, batch["tokens"], batch["valid"])
    valid = None if hidden is None else batch["valid"]
    return self.reconstruction(model, batch, key, train, hidden=hidden, hidden_valid=valid)

  def eval_loss(self, model: LatentAutoencoder, batch: Batch, key: jax.Array):
    """The loss without dropout, word dropout or latent noise."""
    return self.loss(model, batch, key, train=False)[0]

  def held_out_texts(self, n: int) -> list[str]:
    """The first n held-out sentences, which `sample_text` reconstructs."""
    return [d["text"] for d in held_out_sentences(self.config.data, n)]

  def sample_text(self, model: LatentAutoencoder, key: jax.Array, num_samples: int) -> list[dict]:
    """Reconstructions of the first held-out sentences."""
    tok = self.tokenizer
    sources = self.held_out_texts(num_samples)
    graphdef, params = nnx.split(model)
    latents = tl.encode_texts(tok, graphdef, params, sources, self.config.data.max_len)
    decoding = tl.DecodeConfig.from_config(self.config.sample)
    outs = tl.decode_texts(tok, graphdef, params, latents, decoding)
    recon = [tok.decode(tok.encode(s)) for s in sources]
    return [
      {"text": o, "source": s, "exact": o == r}
      for o, s, r in zip(outs, sources, recon, strict=True)
    ]


class LatentDiffusionTask(Task):
  """A `LatentDenoiser` on the latents of the frozen autoencoder run that the stage field
  `<section>.autoencoder_workdir` names.

  Stage fields (`stage_config`): autoencoder_workdir, objective, self_condition_prob,
  cond_drop_prob, schedule_scale, context_encoder ("" or a frozen encoder's name: seq2seq),
  cache_latents, decoder_workdir ("" = decode with the autoencoder run), decoding_loss_weight and
  decoding_loss_t_max. The sampler settings are `config.sample` (`tl.LatentSampleConfig`,
  `tl.DecodeConfig`).

  A text's latents may be K segments of the autoencoder's l latents each (`model.num_segments` = K
  > 1, SLD): the denoiser's `model.num_latents` is then K * l, a batch's "tokens" / "valid" are
  [B, K, T] and "segment_valid" [B, K] marks the segments a text has (its latents alone count in
  the denoiser's attention and loss). A method with segments builds such data (`text_data`,
  `trainer_data`) and decodes them (`decode`).
  """

  section: ClassVar[str]  # the config section of the stage fields
  stage_config: ClassVar[type]  # its frozen dataclass
  autoencoder_methods: ClassVar[tuple[str, ...]]  # the run methods autoencoder_workdir may name
  decoder_method: ClassVar[str]  # the run method decoder_workdir may name
  hints: ClassVar[dict[str, str]] = {}  # workdir field -> how to train that run, for errors

  def __init__(self, config):
    super().__init__(config)
    ctx, _ = self.stage.context_encoder, self.sampling  # validated now, before any work
    width = encoder_spec(ctx, f"{self.section}.context_encoder").width if ctx else 0
    if ctx and config.model.d_context != width:
      raise ConfigError(
        f"model.d_context={config.model.d_context}: {self.section}.context_encoder={ctx!r} gives "
        f"{width}-wide states"
      )
    if not ctx and config.model.d_context:
      raise ConfigError(
        f"model.d_context={config.model.d_context} needs a context: set "
        f"{self.section}.context_encoder ({describe()}) and data.source_field"
      )
    self.context_encoder = frozen_encoder(ctx) if ctx else None
    self._autoencoder = self._decoder = None  # the frozen runs, loaded on first use

  @property
  def stage(self) -> Any:
    return dataclass_from_config(self.stage_config, self.config[self.section], self.section)

  @property
  def sampling(self) -> tl.LatentSampleConfig:
    return tl.LatentSampleConfig.from_config(self.config.sample)

  @property
  def schedule(self) -> CosineSchedule:
    return CosineSchedule(scale=float(self.stage.schedule_scale))

  @property
  def num_segments(self) -> int:
    """K, the segments a text's latents are made of (1 = the whole text is one)."""
    return max(1, int(self.config.model.get("num_segments", 0) or 0))

  def _load(self, field: str, methods) -> stages.LoadedRun:
    path, hint = getattr(self.stage, field), self.hints.get(field, "")
    return stages.load_stage_run(f"{self.section}.{field}", path, get_task, methods, hint)

  def autoencoder(self) -> stages.LoadedRun:
    """The frozen autoencoder run (EMA params if any), checked against this config."""
    if self._autoencoder is None:
      run = self._load("autoencoder_workdir", self.autoencoder_methods)
      ae, m, path = run.config.model, self.config.model, self.stage.autoencoder_workdir
      k = self.num_segments
      if (ae.num_latents * k, ae.d_latent) != (m.num_latents, m.d_latent):
        per = f" ({k} segments of the autoencoder's latents)" if k > 1 else ""
        raise ConfigError(
          f"model.num_latents/d_latent = {m.num_latents}/{m.d_latent}{per} but the autoencoder "
          f"in {path} makes {ae.num_latents} x {ae.d_latent} latents; use the same size for both "
          "stages"
        )
      if ae.max_len < self.config.data.max_len:
        raise ConfigError(
          f"data.max_len={self.config.data.max_len} exceeds the autoencoder's max_len={ae.max_len}"
        )
      self._autoencoder = run
    return self._autoencoder

  def decoder(self) -> stages.LoadedRun:
    """The run whose decoder turns sampled latents into text: the `decoder_workdir` run (a decoder
    tuned on this denoiser's estimates) if set, else the autoencoder run."""
    lc, s = self.stage, self.section
    if not lc.decoder_workdir:
      return self.autoencoder()
    if self._decoder is None:
      run = self._load("decoder_workdir", self.decoder_method)
      ae_field = f"{s}.autoencoder_workdir"
      have = run.config[s].autoencoder_workdir
      mine = lc.autoencoder_workdir
      field_a, field_b = f"{s}.decoder_workdir's {ae_field}", f"this run's {ae_field}"
      stages.check_same_run(field_a, have, field_b, mine, SHARED_AE)
      self._decoder = run
    return self._decoder

  def make_data(self, workdir, *, process_index: int, process_count: int):
    """Sentence batches, or (`cache_latents`) the same sentences' latents encoded once by the
    frozen autoencoder (`lsd.data.latent_cache`), with their tokens for the decoding loss."""
    ae, enc, n = self.autoencoder(), self.context_encoder, self.config.model.num_classes
    data = self.text_data(
      workdir, process_index, process_count, ae.tokenizer, enc.tokenizer if enc else None
    )
    self.tokenizer = data.tokenizer
    if n and data.num_labels == 0:
      raise ConfigError(f"model.num_classes={n} but the sentences have no labels")
    if n and data.num_labels > n:
      raise ConfigError(f"the sentences have {data.num_labels} labels > model.num_classes={n}")
    if not self.stage.cache_latents:
      return self.trainer_data(data, None)
    encode = lambda t, v: tl.encode_tokens(ae.graphdef, ae.params, jnp.asarray(t), jnp.asarray(v))
    return self.trainer_data(data, encode)

  def text_data(self, workdir, process_index, process_count, tokenizer, source_tokenizer):
    """The run's texts, tokenised with the autoencoder's `tokenizer` (and the context encoder's
    `source_tokenizer`): sentence data (`lsd.data.sentences`)."""
    return build_sentence_data(
      self.config.data,
      workdir,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
      tokenizer=tokenizer,
      source_tokenizer=source_tokenizer,
    )

  def trainer_data(self, data, encode):
    """The trainer's data object from `text_data`'s: the texts as they are (encode None), or with
    their latents encoded once by `encode` (tokens, valid -> latents; `cache_latents`), their
    tokens kept for the decoding loss."""
    if encode is None:
      return data
    keep = bool(self.stage.decoding_loss_weight)
    return cached_latent_data(data, encode, keep_tokens=keep, field=f"{self.section}.cache_latents")

  def build_model(self, rngs: nnx.Rngs) -> LatentDenoiser:
    return LatentDenoiser(DenoiserConfig.from_config(self.config.model), rngs=rngs)

  def decoding_loss(self, tokens: jax.Array, valid: jax.Array):
    """The `x0_loss` of `diffusion_training_loss`: weight x the frozen autoencoder's
    teacher-forced cross-entropy of each sentence (each segment) read from the denoiser's x0_hat
    (on the sphere when the AE normalises), over the rows with t <= decoding_loss_t_max. Gradients
    reach the denoiser through x0_hat only. SLD's L_cnv, as a live loss."""
    ae, lc, k = self.autoencoder(), self.stage, self.num_segments
    project = sphere(ae.config.model.normalize_latents) or (lambda x: x)

    def x0_loss(x0_hat, t):
      if k > 1:  # [B, K, T] segments and [B, K * l, d] latents -> one row per segment
        rows = valid & (t <= float(lc.decoding_loss_t_max))[:, None, None]
        b, _, d = x0_hat.shape
        flat = lambda x: x.reshape(-1, x.shape[-1])
        x0_hat, rows, toks = x0_hat.reshape(b * k, -1, d), flat(rows), flat(tokens)
      else:
        rows, toks = valid & (t <= float(lc.decoding_loss_t_max))[:, None], tokens
      ce, m = reconstruction_loss(ae.model(), toks, rows, latents=project(x0_hat))
      return float(lc.decoding_loss_weight) * ce, {"decode_ce": ce, "decode_acc": m["accuracy"]}

    return x0_loss

  def loss(self, model: LatentDenoiser, batch: Batch, key: jax.Array):
    lc, ae, enc = self.stage, self.autoencoder(), self.context_encoder
    k, extra = self.num_segments, {}
    if "latents" in batch:  # cache_latents: encoded once when the data was built
      x0 = jnp.asarray(batch["latents"], jnp.float32)
    elif k > 1:  # each segment encoded on its own, [B * K, l, d] -> [B, K * l, d]
      tokens, valid = batch["tokens"], batch["valid"]
      b, t = tokens.shape[0], tokens.shape[-1]
      z = tl.encode_tokens(ae.graphdef, ae.params, tokens.reshape(-1, t), valid.reshape(-1, t))
      x0 = jax.lax.stop_gradient(z).reshape(b, -1, z.shape[-1])
    else:
      z = tl.encode_tokens(ae.graphdef, ae.params, batch["tokens"], batch["valid"])
      x0 = jax.lax.stop_gradient(z)
    if "segment_valid" in batch:  # each segment's latents count only where it exists
      per = x0.shape[1] // batch["segment_valid"].shape[1]
      extra["latent_valid"] = jnp.repeat(jnp.asarray(batch["segment_valid"], bool), per, axis=1)
    ctx = {}
    if enc is not None:
      valid = batch["source_valid"]
      ctx = dict(context=hidden_states(enc, batch["source_tokens"], valid), context_valid=valid)
    decoding = lc.decoding_loss_weight
    return diffusion_training_loss(
      model,
      x0,
      key,
      labels=batch.get("label") if model.cfg.num_classes else None,
      objective=lc.objective,
      schedule=self.schedule,
      self_condition_prob=lc.self_condition_prob if model.cfg.self_condition else 0.0,
      cond_drop_prob=lc.cond_drop_prob,
      project_self_cond=sphere(ae.config.model.normalize_latents),
      x0_loss=self.decoding_loss(batch["tokens"], batch["valid"]) if decoding else None,
      **ctx,
      **extra,
    )

  def tokens_in(self, batch: Batch) -> int:
    rows = batch["latents"] if "latents" in batch else batch["tokens"]
    return int(rows.shape[0] * self.config.model.num_latents)

  def decode(self, latents: jax.Array) -> list[str]:
    """Latents -> texts with the `decoder()` run and this run's `sample` decoding settings."""
    run, decoding = self.decoder(), tl.DecodeConfig.from_config(self.config.sample)
    return tl.decode_texts(run.tokenizer, run.graphdef, run.params, latents, decoding)

  def sampler(self, model: LatentDenoiser) -> tl.LatentTextSampler:
    """Texts from `model` with this run's `sample` settings, decoded by `decode`: `.latents(key,
    n, labels=...)`, `.samples(key, n, num_classes)`, `.from_sources(key, sources)` (seq2seq)."""
    graphdef, params = nnx.split(model)
    objective, max_source_len = self.stage.objective, self.config.data.max_source_len
    return tl.LatentTextSampler(
      graphdef, params, self.sampling, objective, self.schedule, self.decode,
      self.context_encoder, max_source_len,
    )  # fmt: skip

  def held_out_docs(self, n: int) -> list[dict]:
    """The first n held-out texts {"text", "source"?}, which seq2seq `sample_text` conditions on."""
    return held_out_sentences(self.config.data, n)

  def sample_latents(self, model: LatentDenoiser, key: jax.Array, n: int, **kw) -> jax.Array:
    """Latents [n, l, d] with the run's `sample` settings; kw: guidance_scale, labels, context."""
    return self.sampler(model).latents(key, n, **kw)

  def sample_text(self, model: LatentDenoiser, key: jax.Array, num_samples: int) -> list[dict]:
    """Unconditional samples, class-conditional ones cycling through the classes, or (seq2seq) one
    output for each of the first held-out sources."""
    sampler = self.sampler(model)
    if self.context_encoder is None:
      return sampler.samples(key, num_samples, model.cfg.num_classes)
    docs = self.held_out_docs(num_samples)
    texts = sampler.from_sources(key, [d["source"] for d in docs])
    return [
      {"source": d["source"], "text": t, "reference": d["text"], "nfe": sampler.nfe(True)}
      for d, t in zip(docs, texts, strict=True)
    ]

  def generate(self, model: LatentDenoiser, key: jax.Array, inputs: list[dict], **options):
    """Conditional generation: seq2seq, each input's "source" -> one text (options guidance_scale,
    candidates: MBR among k samples); class-conditional, each input's "label" (absent: the null
    class) -> one text (option guidance_scale); unconditional, one text per input ({}). Options
    None = the run's `config.sample`; records `{**input, "text", "nfe"}`."""
    seq2seq, num_classes = self.context_encoder is not None, model.cfg.num_classes
    fields = ("source",) if seq2seq else ("label",) if num_classes else ()
    inputs = self.generation_inputs(inputs, fields)
    known = ("guidance_scale", "candidates") if seq2seq else ("guidance_scale",)
    unknown = sorted(k for k, v in options.items() if k not in known and v is not None)
    if unknown:
      raise ConfigError(f"generate: options {unknown} are not read by this run; accepted: {known}")
    sampler, w = self.sampler(model), options.get("guidance_scale")
    if seq2seq:
      missing = [i for i, x in enumerate(inputs) if not isinstance(x.get("source"), str)]
      if missing:
        raise ConfigError(f"generate: inputs {missing[:5]} have no 'source' text (seq2seq run)")
      sources = [x["source"] for x in inputs]
      texts = sampler.from_sources(key, sources, w, options.get("candidates"))
      nfe = sampler.nfe(True)
      return [{**x, "text": t, "nfe": nfe} for x, t in zip(inputs, texts, strict=True)]
    labels = None
    if num_classes:
      labels = [x.get("label", num_classes) for x in inputs]
      ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= num_classes
      bad = [v for v in labels if not ok(v)]
      if bad:
        raise ConfigError(
          f"generate: label={bad[0]!r} must be an int in [0, {num_classes}) ({num_classes}: the "
          "null class, as an absent label)"
        )
      labels = jnp.asarray(labels, jnp.int32)
    texts = self.decode(sampler.latents(key, len(inputs), w, labels=labels))
    nfe = sampler.nfe(bool(num_classes))
    return [{**x, "text": t, "nfe": nfe} for x, t in zip(inputs, texts, strict=True)]


class DecoderTuningMixin:
  """Tunes an autoencoder task's reconstruction network and decoder to read a frozen denoiser's
  estimates of a sentence's latents as that sentence (mixed in before the autoencoder task, whose
  model, data and `reconstruction` loss it keeps).

  A decoder trained only on encodings reads the space between them as subword salad, and a
  denoiser's samples land there. Each sentence's latents z0 are noised to t ~ U(0, tune_t_max), the
  frozen denoiser estimates x0_hat from z_t as a sampler would (`noised_estimates`), and the
  decoder learns to reconstruct the sentence from x0_hat; a fraction `tune_clean_prob` of the rows
  keeps the clean z0. Training-only latent noise of max std `tune_latent_noise` (None = the
  autoencoder's) is added to either. Encoder and compressor stay frozen (`train.freeze`), so the
  result is a complete autoencoder run that encodes as the autoencoder run did.

  Stage fields (`stage_config`): autoencoder_workdir, denoiser_workdir, tune_clean_prob,
  tune_t_max, cond_drop_prob, tune_latent_noise.
  """

  FROZEN = ("encoder", "compressor")
  section: ClassVar[str]
  stage_config: ClassVar[type]
  denoiser_stage_config: ClassVar[type]  # the stage dataclass of the denoiser run's section
  autoencoder_method: ClassVar[str]
  denoiser_method: ClassVar[str]

  def __init__(self, config):
    super().__init__(config)
    _ = self.stage  # validated now, before any work
    freeze = tuple(config.train.freeze)
    # A pretrained encoder (encoder != scratch) is frozen outside the train state: no parameters.
    scratch = AutoencoderConfig.from_config(config.model, vocab_size=1).encoder == "scratch"
    missing = [m for m in self.FROZEN if m not in freeze and (scratch or m != "encoder")]
    if missing:
      raise ConfigError(
        f"train.freeze={list(freeze)} must include {missing}: the denoiser was trained on the "
        "stage-1 encodings, so encoder and compressor may not change"
      )
    self._autoencoder = self._denoiser = None

  @property
  def stage(self) -> Any:
    return dataclass_from_config(self.stage_config, self.config[self.section], self.section)

  def autoencoder(self) -> stages.LoadedRun:
    """The autoencoder run this one starts from; its model config must equal `config.model`."""
    if self._autoencoder is None:
      field = f"{self.section}.autoencoder_workdir"
      path = self.stage.autoencoder_workdir
      run = stages.load_stage_run(field, path, get_task, self.autoencoder_method)
      want, have = self.config.model.to_dict(), run.config.model.to_dict()
      stages.check_same_section("model", field, want, have)
      self._autoencoder = run
    return self._autoencoder

  def denoiser(self) -> stages.LoadedRun:
    """The frozen denoiser run (EMA params if any), trained on this autoencoder's latents."""
    if self._denoiser is None:
      lc, s = self.stage, self.section
      field = f"{s}.denoiser_workdir"
      run = stages.load_stage_run(field, lc.denoiser_workdir, get_task, self.denoiser_method)
      if dataclass_from_config(self.denoiser_stage_config, run.config[s]).context_encoder:
        raise ConfigError(
          f"{field}={lc.denoiser_workdir!r} is a seq2seq denoiser; decoder tuning supports "
          "unconditional and class-conditional denoisers"
        )
      ae_field, have = f"{s}.autoencoder_workdir", run.config[s].autoencoder_workdir
      mine = lc.autoencoder_workdir
      stages.check_same_run(f"{field}'s {ae_field}", have, ae_field, mine, SHARED_AE)
      self._denoiser = run
    return self._denoiser

  def data_tokenizer(self):
    """The autoencoder run's tokenizer (loading both frozen runs now, outside any trace)."""
    self.denoiser()
    return self.autoencoder().tokenizer

  def initial_params(self, params):
    """Every weight of the autoencoder run."""
    field, path = f"{self.section}.autoencoder_workdir", self.stage.autoencoder_workdir
    ae, names = self.autoencoder().params, ("autoencoder run", "model")
    return stages.copy_params(params, ae, field=field, path=path, names=names, complete=True)[0]

  def estimates(self, z0: jax.Array, labels: jax.Array | None, key: jax.Array):
    """The frozen denoiser's x0 estimates of latents z0 noised to t ~ U(0, tune_t_max)
    (no gradient): (x0_hat [B, l, d], t [B])."""
    lc, run = self.stage, self.denoiser()
    den = run.model()
    dlc = dataclass_from_config(self.denoiser_stage_config, run.config[self.section])
    if den.cfg.num_classes and labels is None:
      raise ConfigError("the denoiser is class-conditional but the sentences have no labels")
    return noised_estimates(
      den,
      z0,
      key,
      t_max=float(lc.tune_t_max),
      objective=dlc.objective,
      schedule=CosineSchedule(scale=float(dlc.schedule_scale)),
      labels=labels if den.cfg.num_classes else None,
      cond_drop_prob=lc.cond_drop_prob,
      self_condition=den.cfg.self_condition,
      project=sphere(self.config.model.normalize_latents),
    )

  def loss(self, model: LatentAutoencoder, batch: Batch, key: jax.Array, train: bool = True):
    z0 = jax.lax.stop_gradient(tl.encode_latents(model, batch["tokens"], batch["valid"]))
    k_est, k_clean, k_rest = jax.random.split(key, 3)
    x0_hat, _ = self.estimates(z0, batch.get("label"), k_est)
    clean = jax.random.bernoulli(k_clean, self.stage.tune_clean_prob, (z0.shape[0],))
    latents = jnp.where(clean[:, None, None], z0, x0_hat)
    kw = dict(latents=latents, latent_noise=self.stage.tune_latent_noise)
    loss, metrics = self.reconstruction(model, batch, k_rest, train, **kw)
    return loss, dict(metrics, estimate_mse=jnp.mean(jnp.square(x0_hat - z0)))
