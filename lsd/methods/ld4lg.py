"""LD4LG (Latent Diffusion for Language Generation, arXiv 2212.09462) as three trainer tasks.

Stage 1, "ld4lg_ae" (`LD4LGAutoencoderTask`): a `LatentAutoencoder` trained on teacher-forced
reconstruction; its encoder is trained from scratch or is the frozen MiniLM (`model.encoder`), its
decoder optionally starts from a causal-LM run (`ld4lg.decoder_init`).
Stage 2, "ld4lg_diffusion": a `LatentDenoiser` learns the v-prediction (cosine schedule, unweighted
L2) with self-conditioning and condition dropout for CFG on the latents of the frozen stage-1 run
(encoded once, `ld4lg.cache_latents`), optionally plus a decoding loss; seq2seq: the frozen
MiniLM's states of each source are the denoiser's context
(`lsd.methods.latent.LatentDiffusionTask`).
Stage 3 (optional), "ld4lg_decoder": the stage-1 decoder tuned to read the stage-2 denoiser's
estimates (`lsd.methods.latent.DecoderTuningMixin`); diffusion runs decode with it when
`ld4lg.decoder_workdir` names it.

The recipe only: the stages, the math, the stage runs, the latent cache and text <-> latents are
shared (`lsd.methods.latent`, `lsd.diffusion.latent`, `lsd.train.stages`, `lsd.data.latent_cache`,
`lsd.sampling.text_latent`; `lsd.api.encode_texts`, `decode_latents`, `interpolate_texts`,
`edit_text` and `generate_from_sources` for loaded runs). Each stage's `config.ld4lg` section is
read into its dataclass at every use, so edits to a loaded run's config take effect.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lsd.config import ConfigError, check_choice, check_positive, check_range, dataclass_from_config
from lsd.data.sentences import build_sentence_data
from lsd.diffusion.gaussian import OBJECTIVES
from lsd.methods import get_task
from lsd.methods.latent import DecoderTuningMixin, LatentDiffusionTask, held_out_sentences
from lsd.models.autoencoder import AutoencoderConfig, LatentAutoencoder, reconstruction_loss
from lsd.models.encoders import FROZEN_ENCODERS, frozen_encoder
from lsd.sampling import text_latent as tl
from lsd.train import stages
from lsd.train.task import Batch, Task


@dataclasses.dataclass(frozen=True)
class AutoencoderStage:
  """`config.ld4lg` of stage 1 (absent from runs that predate it)."""

  decoder_init: str = ""  # a causal-LM run whose weights start the decoder; "" = random init

  def validate(self) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class DiffusionStage:
  """`config.ld4lg` of stage 2 (the fields of `LatentDiffusionTask`); the defaults are for runs
  that predate a field, configs/ld4lg_yelp.py sets them all."""

  autoencoder_workdir: str
  objective: str
  self_condition_prob: float
  cond_drop_prob: float
  schedule_scale: float
  context_encoder: str = ""  # seq2seq: the frozen encoder of the sources (data.source_field)
  cache_latents: bool = False
  decoder_workdir: str = ""  # a stage-3 run to decode with; "" = the stage-1 run
  decoding_loss_weight: float = 0.0
  decoding_loss_t_max: float = 1.0

  def validate(self) -> None:
    check_choice("ld4lg.objective", self.objective, OBJECTIVES)
    check_choice("ld4lg.context_encoder", self.context_encoder, ("", *FROZEN_ENCODERS))
    for name in ("self_condition_prob", "cond_drop_prob"):
      check_range(f"ld4lg.{name}", getattr(self, name), 0.0, 1.0)
    check_positive("ld4lg.schedule_scale", self.schedule_scale)
    check_positive("ld4lg.decoding_loss_weight", self.decoding_loss_weight, allow_zero=True)
    if not isinstance(self.cache_latents, bool):
      raise ConfigError(f"ld4lg.cache_latents={self.cache_latents!r} must be true or false")
    t_max = self.decoding_loss_t_max
    if isinstance(t_max, bool) or not isinstance(t_max, int | float) or not 0 < t_max <= 1:
      raise ConfigError(f"ld4lg.decoding_loss_t_max={t_max!r} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class DecoderStage:
  """`config.ld4lg` of stage 3 (the fields of `DecoderTuningMixin`)."""

  autoencoder_workdir: str
  denoiser_workdir: str
  tune_clean_prob: float
  tune_t_max: float
  cond_drop_prob: float
  tune_latent_noise: float | None = None  # None = model.latent_noise

  def validate(self) -> None:
    for name in ("tune_clean_prob", "cond_drop_prob"):
      check_range(f"ld4lg.{name}", getattr(self, name), 0.0, 1.0)
    noise = self.tune_latent_noise
    if noise is not None and not float(noise) >= 0.0:
      raise ConfigError(f"ld4lg.tune_latent_noise={noise!r} must be >= 0 (0 = clean latents)")
    if not 0.0 < float(self.tune_t_max) <= 1.0:
      raise ConfigError(f"ld4lg.tune_t_max={self.tune_t_max!r} must be in (0, 1]")
    for field in ("autoencoder_workdir", "denoiser_workdir"):
      if not getattr(self, field):
        raise ConfigError(
          f"ld4lg.{field} is empty; stage 3 tunes the decoder of a trained stage-1 run on the "
          "estimates of a trained stage-2 run: pass --config.ld4lg.autoencoder_workdir=<stage-1 "
          "dir> --config.ld4lg.denoiser_workdir=<stage-2 dir>"
        )


class LD4LGAutoencoderTask(Task):
  """Stage 1: the autoencoder, trained on teacher-forced reconstruction (word dropout and latent
  noise in training); its samples are greedy reconstructions of held-out sentences."""

  name = "ld4lg_ae"

  @property
  def stage(self) -> AutoencoderStage:
    return dataclass_from_config(AutoencoderStage, self.config.get("ld4lg") or {})

  def make_data(self, workdir, *, process_index: int, process_count: int):
    encoder, kind = self.config.model.encoder, self.config.data.tokenizer.kind
    if encoder == "minilm" and kind != "minilm":
      raise ConfigError(
        f"data.tokenizer.kind={kind!r}: model.encoder='minilm' reads the ids of its own "
        "WordPiece; set --config.data.tokenizer.kind=minilm"
      )
    if encoder in FROZEN_ENCODERS:
      frozen_encoder(encoder, "model.encoder")  # load now, outside any trace
    data = build_sentence_data(
      self.config.data,
      workdir,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
      tokenizer=self.data_tokenizer(),
    )
    self.tokenizer = data.tokenizer
    return data

  def data_tokenizer(self):
    """The `ld4lg.decoder_init` LM's tokenizer (the decoder starts from its weights, so the ids
    must mean the same); None = train one on the training split."""
    run = self.decoder_init_run()
    return None if run is None else run.tokenizer

  def decoder_init_run(self):
    """The causal-LM run named by `ld4lg.decoder_init` (None when unset), loaded once."""
    path = self.stage.decoder_init
    if path and getattr(self, "_decoder_init", None) is None:
      hint = "(configs/causal_lm.py)"
      run = stages.load_stage_run("ld4lg.decoder_init", path, get_task, "causal_lm", hint)
      kind, lm_kind = self.config.data.tokenizer.kind, run.config.data.tokenizer.kind
      if kind != lm_kind:
        raise ConfigError(
          f"ld4lg.decoder_init={path!r} was trained with data.tokenizer.kind={lm_kind!r}, this run "
          f"has data.tokenizer.kind={kind!r}: the decoder and the LM must share one tokenizer"
        )
      self._decoder_init = run
    return self._decoder_init if path else None

  def initial_params(self, params):
    """The random init, with every decoder weight but the cross-attention to the latents from the
    `ld4lg.decoder_init` LM if set (as the paper fine-tunes BART's decoder)."""
    run, path = self.decoder_init_run(), self.stage.decoder_init
    if run is None:
      return params
    kw = dict(field="ld4lg.decoder_init", path=path, names=("LM", "AE decoder"))
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
        "model.encoder='external': ld4lg_ae trains with 'scratch' or the frozen 'minilm'; any "
        "other encoder's hidden states go through LatentAutoencoder.encode_hidden / "
        "reconstruction_loss(hidden=...)"
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

  def sample_text(self, model: LatentAutoencoder, key: jax.Array, num_samples: int) -> list[dict]:
    """Reconstructions of the first held-out sentences."""
    tok = self.tokenizer
    sources = [d["text"] for d in held_out_sentences(self.config.data, num_samples)]
    graphdef, params = nnx.split(model)
    latents = tl.encode_texts(tok, graphdef, params, sources, self.config.data.max_len)
    decoding = tl.DecodeConfig.from_config(self.config.sample)
    outs = tl.decode_texts(tok, graphdef, params, latents, decoding)
    recon = [tok.decode(tok.encode(s)) for s in sources]
    return [
      {"text": o, "source": s, "exact": o == r}
      for o, s, r in zip(outs, sources, recon, strict=True)
    ]


class LD4LGDiffusionTask(LatentDiffusionTask):
  """Stage 2: the denoiser on the frozen stage-1 (or stage-3) run's latents."""

  name = "ld4lg_diffusion"
  section, stage_config = "ld4lg", DiffusionStage
  autoencoder_methods, decoder_method = ("ld4lg_ae", "ld4lg_decoder"), "ld4lg_decoder"
  hints = {
    "autoencoder_workdir": "(configs/ld4lg_yelp.py:stage=ae)",
    "decoder_workdir": "(configs/ld4lg_yelp.py:stage=decoder)",
  }


class LD4LGDecoderTask(DecoderTuningMixin, LD4LGAutoencoderTask):
  """Stage 3: the stage-1 run's decoder tuned on the stage-2 denoiser's estimates, encoder and
  compressor frozen; a complete autoencoder run that `ld4lg.decoder_workdir` can name."""

  name = "ld4lg_decoder"
  section, stage_config, denoiser_stage_config = "ld4lg", DecoderStage, DiffusionStage
  autoencoder_method, denoiser_method = "ld4lg_ae", "ld4lg_diffusion"
