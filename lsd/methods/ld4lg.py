"""LD4LG (Latent Diffusion for Language Generation, arXiv 2212.09462) as two trainer tasks.

Stage 1, `LD4LGAutoencoderTask` ("ld4lg_ae"): sentences -> `LatentAutoencoder`, trained on
teacher-forced reconstruction. Its encoder is trained from scratch (`model.encoder="scratch"`) or is
the frozen pretrained all-MiniLM-L6-v2 (`"minilm"`, with `data.tokenizer.kind="minilm"`): the
paper's frozen-encoder setting, where only compressor, reconstruction net and decoder learn.
Stage 2, `LD4LGDiffusionTask` ("ld4lg_diffusion"): the stage-1 run (`ld4lg.autoencoder_workdir`) is
loaded frozen and encodes each batch on the fly, or (`ld4lg.cache_latents`) encodes every training
sentence once when the data is built, so a step costs only the denoiser; a `LatentDenoiser` learns
the v-prediction (cosine schedule, unweighted L2) with self-conditioning (a no-gradient first pass
on half of the batches) and, when class-conditional, label dropout for classifier-free guidance. Seq2seq (`ld4lg.context_encoder`
= "minilm", `data.source_field` set): each sentence's source text goes through the frozen MiniLM and
its hidden states are the denoiser's cross-attention context (dropped to a null context for CFG).

The pure functions at the bottom work on runs loaded with `lsd.api.load`:
    ae, diff = lsd.api.load("runs/ae"), lsd.api.load("runs/diff")
    z = encode_texts(ae, ["the food was great ."])
    decode_latents(ae, z); interpolate_texts(ae, a, b, 5); edit_text(diff, ae, key, texts, 0.5)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from lsd.config import ConfigError, check_choice, check_range
from lsd.data.arrays import ArrayData
from lsd.data.sentences import build_sentence_data, encode_sentences, load_sentences
from lsd.diffusion.gaussian import COSINE, OBJECTIVES, CosineSchedule, predict_x0_eps, q_sample
from lsd.diffusion.gaussian import diffusion_loss as gaussian_loss
from lsd.eval.metrics import MBR_METRICS, mbr_select
from lsd.models.autoencoder import (
  AutoencoderConfig,
  LatentAutoencoder,
  normalize_to_sphere,
  reconstruction_loss,
)
from lsd.models.denoiser import DenoiserConfig, LatentDenoiser
from lsd.models.encoders import FROZEN_ENCODERS, frozen_encoder, hidden_states
from lsd.sampling import latent as latent_sampling
from lsd.train.task import Batch, Task


def _dropout_rngs(dropout: float, key: jax.Array) -> nnx.Rngs | None:
  return nnx.Rngs(dropout=key) if dropout else None


# ---------------------------------------------------------------------------------------------------
# Stage 1: autoencoder
# ---------------------------------------------------------------------------------------------------
class LD4LGAutoencoderTask(Task):
  name = "ld4lg_ae"

  def make_data(self, workdir, *, process_index: int, process_count: int):
    kind = self.config.data.tokenizer.kind
    if self.config.model.encoder == "minilm" and kind != "minilm":
      raise ConfigError(
        f"data.tokenizer.kind={kind!r}: model.encoder='minilm' reads the ids of its own "
        "WordPiece; set --config.data.tokenizer.kind=minilm"
      )
    if self.config.model.encoder in FROZEN_ENCODERS:
      frozen_encoder(self.config.model.encoder, "model.encoder")  # load now, outside any trace
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
    """The tokenizer of the sentence data: the `ld4lg.decoder_init` LM's when set (the decoder
    starts from its weights, so the ids must mean the same); None = train one on the training split."""
    run = self.decoder_init_run()
    return None if run is None else run.tokenizer

  def decoder_init_run(self):
    """The causal-LM run named by `ld4lg.decoder_init` (None when unset), loaded once.

    Its weights initialise the AE decoder (`initial_params`): every self-attention, MLP, norm and
    embedding weight, leaving only the cross-attention to the latents fresh, so a decoder that
    already models the language learns to read the latents (the paper fine-tunes BART's pretrained
    decoder the same way). The LM's model must be the decoder's without cross-attention."""
    path = (self.config.get("ld4lg") or {}).get("decoder_init", "")
    if not path:
      return None
    if getattr(self, "_decoder_init", None) is None:
      run = _load_run("ld4lg.decoder_init", path, "causal_lm", "(configs/causal_lm.py)")
      kind, lm_kind = self.config.data.tokenizer.kind, run.config.data.tokenizer.kind
      if kind != lm_kind:
        raise ConfigError(
          f"ld4lg.decoder_init={path!r} was trained with data.tokenizer.kind={lm_kind!r}, this run "
          f"has data.tokenizer.kind={kind!r}: the decoder and the LM must share one tokenizer"
        )
      self._decoder_init = run
    return self._decoder_init

  def initial_params(self, params):
    """The random init, with the AE decoder's weights from the `ld4lg.decoder_init` LM if set."""
    run = self.decoder_init_run()
    if run is None:
      return params
    path = self.config.ld4lg.decoder_init
    want = dataclasses.replace(
      self.model_config().decoder_config(), cross_attention=False, d_context=0
    )
    have = run.task.model_config()
    diff = [
      f"{f.name}: LM {getattr(have, f.name)!r}, AE decoder {getattr(want, f.name)!r}"
      for f in dataclasses.fields(want)
      if f.name not in ("dropout", "dtype") and getattr(have, f.name) != getattr(want, f.name)
    ]
    if diff:
      raise ConfigError(
        f"ld4lg.decoder_init={path!r}: its model is not the AE decoder without cross-attention "
        f"({'; '.join(diff)}); train the LM with the decoder's sizes (model.d_model, "
        "model.decoder_layers, model.n_heads, model.mlp, model.norm)"
      )
    flat = traverse_util.flatten_dict(params.to_pure_dict())
    lm = traverse_util.flatten_dict(run.params.to_pure_dict())
    for key, value in lm.items():
      target = ("decoder", *key)
      if target not in flat or tuple(flat[target].shape) != tuple(value.shape):
        raise ConfigError(
          f"ld4lg.decoder_init={path!r}: LM parameter {'.'.join(map(str, key))} "
          f"{tuple(value.shape)} has no counterpart of that shape in the AE decoder"
        )
      flat[target] = jnp.asarray(value, flat[target].dtype)
    fresh = [k for k in flat if k[0] == "decoder" and k[1:] not in lm]
    if jax.process_index() == 0:
      print(
        f"lsd: AE decoder initialised from {path} (step {run.step}): {len(lm)} tensors copied, "
        f"{len(fresh)} cross-attention tensors fresh",
        flush=True,
      )
    out = jax.tree.map(lambda x: x, params)
    out.replace_by_pure_dict(traverse_util.unflatten_dict(flat))
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

  def loss(self, model: LatentAutoencoder, batch: Batch, key: jax.Array, train: bool = True):
    hidden = _frozen_hidden(model, batch["tokens"], batch["valid"])
    loss, metrics = reconstruction_loss(
      model,
      batch["tokens"],
      batch["valid"],
      hidden=hidden,
      hidden_valid=None if hidden is None else batch["valid"],
      rngs=_dropout_rngs(model.cfg.dropout, key) if train else None,
      word_dropout_key=jax.random.fold_in(key, 1) if train else None,
      mask_id=self.tokenizer.mask_id,
      latent_noise_key=jax.random.fold_in(key, 2) if train else None,
    )
    return loss, dict(metrics, ppl=jnp.exp(loss))

  def eval_loss(self, model: LatentAutoencoder, batch: Batch, key: jax.Array):
    """Reconstruction loss without dropout or word dropout."""
    return self.loss(model, batch, key, train=False)[0]

  def sample_text(self, model: LatentAutoencoder, key: jax.Array, num_samples: int) -> list[dict]:
    """Greedy reconstructions of the first held-out sentences (the eval split of `config.data`)."""
    del key
    from lsd.data import split_documents

    cfg = self.config.data
    _, eval_docs = split_documents(load_sentences(cfg), cfg.eval_fraction, cfg.split_seed)
    sources = [d["text"] for d in eval_docs[:num_samples]]
    graphdef, params = nnx.split(model)
    latents = _encode_texts(self.tokenizer, graphdef, params, sources, cfg.max_len)
    outs = _decode_texts(self.tokenizer, graphdef, params, latents, self.config.sample)
    recon = [self.tokenizer.decode(self.tokenizer.encode(s)) for s in sources]
    return [
      {"text": o, "source": s, "exact": o == r}
      for o, s, r in zip(outs, sources, recon, strict=True)
    ]


# ---------------------------------------------------------------------------------------------------
# Stage 2: latent diffusion
# ---------------------------------------------------------------------------------------------------
class LD4LGDiffusionTask(Task):
  name = "ld4lg_diffusion"

  def __init__(self, config):
    super().__init__(config)
    lc = config.ld4lg
    check_choice("ld4lg.objective", lc.objective, OBJECTIVES)
    check_range("ld4lg.self_condition_prob", lc.self_condition_prob, 0.0, 1.0)
    check_range("ld4lg.cond_drop_prob", lc.cond_drop_prob, 0.0, 1.0)
    if not isinstance(lc.get("cache_latents", False), bool):
      raise ConfigError(f"ld4lg.cache_latents={lc.cache_latents!r} must be true or false")
    w = lc.get("decoding_loss_weight", 0.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
      raise ConfigError(f"ld4lg.decoding_loss_weight={w!r} must be a number >= 0 (0 = off)")
    t_max = lc.get("decoding_loss_t_max", 1.0)
    if isinstance(t_max, bool) or not isinstance(t_max, (int, float)) or not 0 < t_max <= 1:
      raise ConfigError(f"ld4lg.decoding_loss_t_max={t_max!r} must be in (0, 1]")
    check_choice("sample.sampler", config.sample.sampler, latent_sampling.SAMPLERS)
    check_choice("sample.mbr_metric", config.sample.get("mbr_metric", "rouge2"), MBR_METRICS)
    k = config.sample.get("candidates", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ConfigError(
        f"sample.candidates={k!r} must be an integer >= 1 (1 = one sample per source, no MBR)"
      )
    ctx = lc.get("context_encoder", "")
    check_choice("ld4lg.context_encoder", ctx, ("", *FROZEN_ENCODERS))
    if ctx and config.model.d_context != frozen_encoder(ctx).width:
      raise ConfigError(
        f"model.d_context={config.model.d_context}: ld4lg.context_encoder={ctx!r} gives "
        f"{frozen_encoder(ctx).width}-wide states"
      )
    if not ctx and config.model.d_context:
      raise ConfigError(
        f"model.d_context={config.model.d_context} needs a context: set ld4lg.context_encoder "
        f"(one of {list(FROZEN_ENCODERS)}) and data.source_field"
      )
    self.context_encoder = frozen_encoder(ctx) if ctx else None
    self.schedule = CosineSchedule(scale=float(lc.schedule_scale))
    self._autoencoder = None  # the frozen stage-1 run, loaded on first use
    self._decoder = None  # the stage-3 run of ld4lg.decoder_workdir, if any

  def autoencoder(self):
    """The stage-1 run (`lsd.api.LoadedRun`, EMA params if any), checked against this config."""
    if self._autoencoder is None:
      from lsd.api import load

      path = self.config.ld4lg.autoencoder_workdir
      if not path:
        raise ConfigError(
          "ld4lg.autoencoder_workdir is empty; train stage 1 (stage=ae) and pass its workdir "
          "with --config.ld4lg.autoencoder_workdir=<dir>"
        )
      run = load(path)
      ae, m = run.config.model, self.config.model
      if (ae.num_latents, ae.d_latent) != (m.num_latents, m.d_latent):
        raise ConfigError(
          f"model.num_latents/d_latent = {m.num_latents}/{m.d_latent} but the autoencoder in "
          f"{path} makes {ae.num_latents} x {ae.d_latent} latents; use the same size for both stages"
        )
      if ae.max_len < self.config.data.max_len:
        raise ConfigError(
          f"data.max_len={self.config.data.max_len} exceeds the autoencoder's max_len={ae.max_len}"
        )
      self._autoencoder = run
    return self._autoencoder

  def decoder(self):
    """The run whose decoder turns sampled latents into text: `ld4lg.decoder_workdir` (a stage-3
    `ld4lg_decoder` run tuned on this denoiser's estimates) if set, else the stage-1 run."""
    path = self.config.ld4lg.get("decoder_workdir", "")
    if not path:
      return self.autoencoder()
    if self._decoder is None:
      run = _load_run(
        "ld4lg.decoder_workdir", path, "ld4lg_decoder", "(configs/ld4lg_yelp.py:stage=decoder)"
      )
      _check_same_run(
        "ld4lg.decoder_workdir's ld4lg.autoencoder_workdir",
        run.config.ld4lg.autoencoder_workdir,
        "this run's ld4lg.autoencoder_workdir",
        self.config.ld4lg.autoencoder_workdir,
      )
      self._decoder = run
    return self._decoder

  def make_data(self, workdir, *, process_index: int, process_count: int):
    """Sentence batches, or (`ld4lg.cache_latents`) the same sentences' latents encoded once by
    the frozen autoencoder (`ArrayData` rows {"latents", "label"?, "source_tokens"?, ...})."""
    ae = self.autoencoder()
    data = build_sentence_data(
      self.config.data,
      workdir,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
      tokenizer=ae.tokenizer,
      source_tokenizer=self.context_encoder.tokenizer if self.context_encoder else None,
    )
    self.tokenizer = data.tokenizer
    n = self.config.model.num_classes
    if n and data.num_labels == 0:
      raise ConfigError(f"model.num_classes={n} but the sentences have no labels")
    if n and data.num_labels > n:
      raise ConfigError(f"the sentences have {data.num_labels} labels > model.num_classes={n}")
    if not self.config.ld4lg.get("cache_latents", False):
      return data
    t0 = time.perf_counter()
    train_rows = self.latent_rows(data.train_docs[process_index::process_count])
    eval_rows = self.latent_rows(data.eval_docs) if data.eval_docs else {}
    if process_index == 0:
      print(
        f"ld4lg: encoded {len(train_rows['latents'])} training + {len(data.eval_docs)} eval "
        f"sentences to latents in {time.perf_counter() - t0:.1f} s (ld4lg.cache_latents)",
        flush=True,
      )
    return ArrayData(
      tokenizer=data.tokenizer,
      train=train_rows,
      eval=eval_rows,
      batch_size=self.config.data.batch_size,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
      num_labels=data.num_labels,
    )

  def latent_rows(self, docs: list[dict], chunk: int = 512) -> dict[str, np.ndarray]:
    """Sentences -> {"latents": fp32[N, l, d] (the frozen AE's clean encoding), "label"?: int32[N],
    "source_tokens"? / "source_valid"? (seq2seq)}. Encodes in fixed-size chunks (one compile)."""
    ae, cfg = self.autoencoder(), self.config.data
    tokens, valid = encode_sentences([d["text"] for d in docs], ae.tokenizer, cfg.max_len)
    latents = []
    for i in range(0, len(docs), chunk):
      t, v = tokens[i : i + chunk], valid[i : i + chunk]
      pad = chunk - len(t)
      if pad:  # pad the last chunk to the compiled shape; padding rows are dropped below
        t = np.concatenate([t, np.repeat(t[-1:], pad, 0)])
        v = np.concatenate([v, np.repeat(v[-1:], pad, 0)])
      z = _encode(ae.graphdef, ae.params, jnp.asarray(t), jnp.asarray(v))
      latents.append(np.asarray(jax.device_get(z))[: chunk - pad])
    rows = {"latents": np.concatenate(latents).astype(np.float32)}
    if self.decoding_loss_weight:  # the decoding loss reads each sentence's tokens as targets
      rows["tokens"], rows["valid"] = tokens, valid
    if docs and "label" in docs[0]:
      rows["label"] = np.array([d["label"] for d in docs], np.int32)
    if self.context_encoder is not None:
      rows["source_tokens"], rows["source_valid"] = encode_sentences(
        [d["source"] for d in docs], self.context_encoder.tokenizer, cfg.max_source_len
      )
    return rows

  def build_model(self, rngs: nnx.Rngs) -> LatentDenoiser:
    return LatentDenoiser(DenoiserConfig.from_config(self.config.model), rngs=rngs)

  @property
  def decoding_loss_weight(self) -> float:
    return float(self.config.ld4lg.get("decoding_loss_weight", 0.0))

  def decoding_loss(self, tokens: jax.Array, valid: jax.Array):
    """The auxiliary loss on the denoiser's estimates (`diffusion_training_loss`'s `x0_loss`):
    weight x the frozen stage-1 decoder's teacher-forced cross-entropy of each sentence read from
    its x0_hat (projected onto the sphere when the AE normalises its latents), over the rows with
    t <= ld4lg.decoding_loss_t_max. Gradients reach the denoiser through x0_hat only; the AE's
    weights are constants. SLD's L_cnv, here as a live loss (the reference's carries no gradient).
    """
    ae = self.autoencoder()
    weight = self.decoding_loss_weight
    t_max = float(self.config.ld4lg.get("decoding_loss_t_max", 1.0))
    project = bool(ae.config.model.normalize_latents)

    def x0_loss(x0_hat, t):
      model = nnx.merge(ae.graphdef, ae.params)
      z = normalize_to_sphere(x0_hat) if project else x0_hat
      rows = valid & (t <= t_max)[:, None]
      ce, m = reconstruction_loss(model, tokens, rows, latents=z)
      return weight * ce, {"decode_ce": ce, "decode_acc": m["accuracy"]}

    return x0_loss

  def loss(self, model: LatentDenoiser, batch: Batch, key: jax.Array):
    lc, mc = self.config.ld4lg, model.cfg
    ae = self.autoencoder()
    if "latents" in batch:  # ld4lg.cache_latents: encoded once when the data was built
      x0 = jnp.asarray(batch["latents"], jnp.float32)
    else:
      x0 = jax.lax.stop_gradient(_encode(ae.graphdef, ae.params, batch["tokens"], batch["valid"]))
    context = context_valid = None
    if self.context_encoder is not None:
      context_valid = batch["source_valid"]
      context = hidden_states(self.context_encoder, batch["source_tokens"], context_valid)
    return diffusion_training_loss(
      model,
      x0,
      key,
      labels=batch.get("label") if mc.num_classes else None,
      context=context,
      context_valid=context_valid,
      objective=lc.objective,
      schedule=self.schedule,
      self_condition_prob=lc.self_condition_prob if mc.self_condition else 0.0,
      cond_drop_prob=lc.cond_drop_prob,
      project_self_cond=ae.config.model.normalize_latents,
      x0_loss=self.decoding_loss(batch["tokens"], batch["valid"])
      if self.decoding_loss_weight
      else None,
    )

  def tokens_in(self, batch: Batch) -> int:
    rows = batch["latents"] if "latents" in batch else batch["tokens"]
    return int(rows.shape[0] * self.config.model.num_latents)

  def sample_text(self, model: LatentDenoiser, key: jax.Array, num_samples: int) -> list[dict]:
    """Unconditional samples, class-conditional ones cycling through the classes, or (seq2seq) one
    output for each of the first held-out sources."""
    if self.context_encoder is not None:
      from lsd.data import split_documents

      cfg = self.config.data
      _, eval_docs = split_documents(load_sentences(cfg), cfg.eval_fraction, cfg.split_seed)
      docs = eval_docs[:num_samples]
      texts = self.generate_from_sources(model, key, [d["source"] for d in docs])
      return [
        {"source": d["source"], "text": t, "reference": d["text"], "nfe": self._nfe(True)}
        for d, t in zip(docs, texts, strict=True)
      ]
    n_cls = model.cfg.num_classes
    labels = jnp.arange(num_samples, dtype=jnp.int32) % n_cls if n_cls else None
    latents = self.sample_latents(model, key, num_samples, labels=labels)
    texts = decode_latents(self.decoder(), latents, sample=self.config.sample)
    nfe = self._nfe(bool(n_cls))
    out = []
    for i, text in enumerate(texts):
      row = {"text": text, "nfe": nfe}
      if n_cls:
        row["label"] = i % n_cls
      out.append(row)
    return out

  def _nfe(self, conditional: bool) -> int:
    guided = conditional and self.config.sample.guidance_scale != 1
    return self.config.sample.steps * (2 if guided else 1)

  def encode_sources(self, sources: list[str]) -> tuple[jax.Array, jax.Array]:
    """Source texts -> (context [N, S, H], context_valid [N, S]) with the frozen context encoder."""
    if self.context_encoder is None:
      raise ConfigError("this run has no ld4lg.context_encoder; it is not a seq2seq model")
    enc = self.context_encoder
    tokens, valid = encode_sentences(sources, enc.tokenizer, self.config.data.max_source_len)
    return _context(enc.graphdef, enc.params, jnp.asarray(tokens), jnp.asarray(valid)), valid

  def generate_from_sources(
    self,
    model: LatentDenoiser,
    key: jax.Array,
    sources: list[str],
    guidance_scale=None,
    candidates: int | None = None,
  ) -> list[str]:
    """Seq2seq: one output text per source (the run's sample settings; `guidance_scale` overrides
    sample.guidance_scale, CFG against the null context). With `candidates` k > 1 (default
    sample.candidates, else 1) each source gets k samples in one batch and the output is their
    minimum-Bayes-risk choice under sample.mbr_metric (default ROUGE-2), as in the reference."""
    s = self.config.sample
    k = int(s.get("candidates", 1) if candidates is None else candidates)
    if k < 1:
      raise ConfigError(f"candidates={k} must be >= 1 (1 = one sample per source, no MBR)")
    context, valid = self.encode_sources(sources)
    valid = jnp.asarray(valid)
    if k > 1:  # rows [i * k, (i + 1) * k) are source i's candidates
      context, valid = jnp.repeat(context, k, axis=0), jnp.repeat(valid, k, axis=0)
    latents = self.sample_latents(
      model,
      key,
      len(sources) * k,
      context=context,
      context_valid=valid,
      guidance_scale=guidance_scale,
    )
    texts = decode_latents(self.decoder(), latents, sample=s)
    if k == 1:
      return texts
    groups = [texts[i * k : (i + 1) * k] for i in range(len(sources))]
    picks = mbr_select(groups, metric=str(s.get("mbr_metric", "rouge2")))
    return [g[j] for g, j in zip(groups, picks, strict=True)]

  def sample_latents(
    self, model: LatentDenoiser, key: jax.Array, num_samples: int, guidance_scale=None, **cond
  ):
    """Latents [num_samples, l, d] from the run's `sample` settings; cond: labels / context."""
    s = self.config.sample
    graphdef, params = nnx.split(model)
    return latent_sampling.sample(
      graphdef,
      params,
      key,
      num_samples,
      steps=s.steps,
      sampler=s.sampler,
      eta=float(s.eta),
      objective=self.config.ld4lg.objective,
      schedule=self.schedule,
      guidance_scale=float(s.guidance_scale if guidance_scale is None else guidance_scale),
      project=bool(s.project),
      **cond,
    )


def diffusion_training_loss(
  model: LatentDenoiser,
  x0: jax.Array,
  key: jax.Array,
  *,
  labels: jax.Array | None = None,
  context: jax.Array | None = None,
  context_valid: jax.Array | None = None,
  objective: str = "v",
  schedule: CosineSchedule = COSINE,
  self_condition_prob: float = 0.5,
  cond_drop_prob: float = 0.1,
  project_self_cond: bool = True,
  x0_loss: Callable[[jax.Array, jax.Array], tuple[jax.Array, dict]] | None = None,
) -> tuple[jax.Array, dict]:
  """The LD4LG denoiser loss on clean latents x0 [B, l, d] (fp32 scalar, metrics).

  t ~ U(0, 1) per example; with probability `self_condition_prob` (one coin per batch, as in the
  reference) a first, gradient-free pass supplies x0_hat (projected onto the sqrt(d) sphere when
  the latents live there) to the second; each example's class / context is dropped with
  `cond_drop_prob`. Statics: objective, schedule, the probabilities, project_self_cond.
  `x0_loss(x0_hat, t) -> (loss, metrics)`, if given, is added to the L2 loss with gradient through
  the (second pass's) estimate x0_hat [B, l, d], e.g. `LD4LGDiffusionTask.decoding_loss`.
  """
  b = x0.shape[0]
  k_t, k_noise, k_coin, k_drop, k_first, k_second = jax.random.split(key, 6)
  t = jax.random.uniform(k_t, (b,))
  z_t, eps = q_sample(k_noise, x0, t, schedule)
  ab = schedule.alpha_bar(t)
  cond = {"labels": labels, "context": context, "context_valid": context_valid}
  cond = {k: v for k, v in cond.items() if v is not None}
  if cond and cond_drop_prob > 0:
    cond["drop_cond"] = jax.random.bernoulli(k_drop, cond_drop_prob, (b,))
  dropout = model.cfg.dropout

  x0_sc, sc_valid = None, None
  if self_condition_prob > 0:
    use = jax.random.bernoulli(k_coin, self_condition_prob)

    def first_pass():
      pred = model(z_t, ab, **cond, rngs=_dropout_rngs(dropout, k_first))
      x0_hat, _ = predict_x0_eps(pred, z_t, ab, objective)
      return normalize_to_sphere(x0_hat) if project_self_cond else x0_hat

    x0_sc = jax.lax.stop_gradient(jax.lax.cond(use, first_pass, lambda: jnp.zeros_like(z_t)))
    sc_valid = jnp.broadcast_to(use, (b,))
  pred = model(
    z_t, ab, x0_sc=x0_sc, sc_valid=sc_valid, **cond, rngs=_dropout_rngs(dropout, k_second)
  )
  loss = gaussian_loss(pred, x0, eps, t, objective, schedule=schedule)
  x0_hat, _ = predict_x0_eps(pred, z_t, ab, objective)
  metrics = {"x0_mse": jnp.mean(jnp.square(x0_hat - x0))}
  if x0_loss is not None:
    extra, extra_metrics = x0_loss(x0_hat, t)
    metrics.update(extra_metrics, l2_loss=loss)
    loss = loss + extra
  return loss, metrics


# ---------------------------------------------------------------------------------------------------
# Stage 3 (optional): the decoder tuned on the denoiser's estimates
# ---------------------------------------------------------------------------------------------------
class LD4LGDecoderTask(LD4LGAutoencoderTask):
  """Fine-tunes the stage-1 reconstruction network and decoder to read the stage-2 denoiser's
  estimates of a sentence's latents as that sentence.

  A decoder trained only on encodings (plus small Gaussian noise) reads the neighbourhoods of
  actual encodings as sentences and the space between them as subword salad, and a denoiser's
  samples land between them. Here each training sentence's latents z0 are noised to a level
  t ~ U(0, ld4lg.tune_t_max), the frozen denoiser estimates x0_hat from z_t (a first pass, then a
  self-conditioned second one, as the sampler does), and the decoder learns to reconstruct the
  sentence from x0_hat; a fraction `ld4lg.tune_clean_prob` of the rows keeps the clean z0 so that
  reconstruction of real encodings is trained too. Training-only latent noise (std ~ U(0, s)) is
  added to either, with s = `ld4lg.tune_latent_noise` (stage 1's `model.latent_noise` by
  default; model fields must equal stage 1's, so this is the stage's own knob). Encoder and
  compressor stay frozen (`train.freeze`), so the run encodes exactly as the stage-1 run did and its latents stay those the
  denoiser was trained on. The result is a complete autoencoder run: `encode_texts` /
  `decode_latents` take it like a stage-1 run, and a diffusion run decodes with it when given
  `ld4lg.decoder_workdir`.
  """

  name = "ld4lg_decoder"
  FROZEN = ("encoder", "compressor")

  def __init__(self, config):
    super().__init__(config)
    lc = config.ld4lg
    check_range("ld4lg.tune_clean_prob", lc.tune_clean_prob, 0.0, 1.0)
    noise = lc.get("tune_latent_noise", None)
    if noise is not None and not float(noise) >= 0.0:
      raise ConfigError(f"ld4lg.tune_latent_noise={noise!r} must be >= 0 (0 = clean latents)")
    if not 0.0 < float(lc.tune_t_max) <= 1.0:
      raise ConfigError(f"ld4lg.tune_t_max={lc.tune_t_max!r} must be in (0, 1]")
    check_range("ld4lg.cond_drop_prob", lc.cond_drop_prob, 0.0, 1.0)
    freeze = tuple(config.train.get("freeze", ()))
    # A pretrained encoder (encoder != scratch) is frozen outside the train state: no parameters.
    scratch = config.model.get("encoder", "scratch") == "scratch"
    missing = [m for m in self.FROZEN if m not in freeze and (scratch or m != "encoder")]
    if missing:
      raise ConfigError(
        f"train.freeze={list(freeze)} must include {missing}: the denoiser was trained on the "
        "stage-1 encodings, so encoder and compressor may not change"
      )
    for field in ("autoencoder_workdir", "denoiser_workdir"):
      if not lc.get(field, ""):
        raise ConfigError(
          f"ld4lg.{field} is empty; stage 3 tunes the decoder of a trained stage-1 run on the "
          "estimates of a trained stage-2 run: pass --config.ld4lg.autoencoder_workdir=<stage-1 "
          "dir> --config.ld4lg.denoiser_workdir=<stage-2 dir>"
        )
    self._autoencoder = self._denoiser = None

  def autoencoder(self):
    """The stage-1 run this one starts from; its model config must equal `config.model`."""
    if self._autoencoder is None:
      run = _load_run(
        "ld4lg.autoencoder_workdir", self.config.ld4lg.autoencoder_workdir, "ld4lg_ae"
      )
      stored, wanted = run.config.model.to_dict(), self.config.model.to_dict()
      diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
      if diff:
        raise ConfigError(
          "model fields differ from the stage-1 run in ld4lg.autoencoder_workdir: "
          + "; ".join(f"model.{k}={wanted.get(k)!r} vs {stored.get(k)!r}" for k in diff)
        )
      self._autoencoder = run
    return self._autoencoder

  def denoiser(self):
    """The frozen stage-2 run (EMA params if any), trained on this autoencoder's latents."""
    if self._denoiser is None:
      path = self.config.ld4lg.denoiser_workdir
      run = _load_run("ld4lg.denoiser_workdir", path, "ld4lg_diffusion")
      if run.config.ld4lg.get("context_encoder", ""):
        raise ConfigError(
          f"ld4lg.denoiser_workdir={path!r} is a seq2seq denoiser; stage 3 supports "
          "unconditional and class-conditional denoisers"
        )
      _check_same_run(
        "ld4lg.denoiser_workdir's ld4lg.autoencoder_workdir",
        run.config.ld4lg.autoencoder_workdir,
        "ld4lg.autoencoder_workdir",
        self.config.ld4lg.autoencoder_workdir,
      )
      self._denoiser = run
    return self._denoiser

  def data_tokenizer(self):
    """Stage 1's tokenizer (loading both frozen runs now, outside any trace)."""
    self.denoiser()
    return self.autoencoder().tokenizer

  def initial_params(self, params):
    loaded = self.autoencoder().params
    if jax.tree.structure(loaded) != jax.tree.structure(params):
      raise ConfigError(
        f"the stage-1 run in {self.config.ld4lg.autoencoder_workdir} has another parameter tree"
      )
    return loaded

  def estimates(self, z0: jax.Array, labels: jax.Array | None, key: jax.Array):
    """The frozen denoiser's x0 estimates of latents z0 noised to t ~ U(0, tune_t_max)
    (no gradient): (x0_hat [B, l, d], t [B])."""
    lc, d = self.config.ld4lg, self.denoiser()
    dc = d.config
    den = nnx.merge(d.graphdef, d.params)
    schedule = CosineSchedule(scale=float(dc.ld4lg.schedule_scale))
    b = z0.shape[0]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (b,)) * float(lc.tune_t_max)
    z_t, _ = q_sample(k_noise, z0, t, schedule)
    ab = schedule.alpha_bar(t)
    cond = {}
    if dc.model.num_classes:
      if labels is None:
        raise ConfigError("the denoiser is class-conditional but the sentences have no labels")
      cond["labels"] = labels
      if lc.cond_drop_prob > 0:  # the null class too: the sampler's CFG evaluates both
        cond["drop_cond"] = jax.random.bernoulli(k_drop, lc.cond_drop_prob, (b,))
    project = self.config.model.normalize_latents

    def x0_of(pred):
      x0_hat, _ = predict_x0_eps(pred, z_t, ab, dc.ld4lg.objective)
      return normalize_to_sphere(x0_hat) if project else x0_hat

    x0_hat = x0_of(den(z_t, ab, **cond))
    if dc.model.self_condition:
      sc_valid = jnp.ones((b,), bool)
      x0_hat = x0_of(den(z_t, ab, x0_sc=x0_hat, sc_valid=sc_valid, **cond))
    return jax.lax.stop_gradient(x0_hat), t

  def loss(self, model: LatentAutoencoder, batch: Batch, key: jax.Array, train: bool = True):
    tokens, valid = batch["tokens"], batch["valid"]
    z0 = jax.lax.stop_gradient(_encode_model(model, tokens, valid))
    k_est, k_clean, k_rest = jax.random.split(key, 3)
    x0_hat, _ = self.estimates(z0, batch.get("label"), k_est)
    clean = jax.random.bernoulli(k_clean, self.config.ld4lg.tune_clean_prob, (z0.shape[0],))
    latents = jnp.where(clean[:, None, None], z0, x0_hat)
    loss, metrics = reconstruction_loss(
      model,
      tokens,
      valid,
      latents=latents,
      rngs=_dropout_rngs(model.cfg.dropout, k_rest) if train else None,
      word_dropout_key=jax.random.fold_in(k_rest, 1) if train else None,
      mask_id=self.tokenizer.mask_id,
      latent_noise_key=jax.random.fold_in(k_rest, 2) if train else None,
      latent_noise=self.config.ld4lg.get("tune_latent_noise", None),
    )
    return loss, dict(metrics, ppl=jnp.exp(loss), estimate_mse=jnp.mean(jnp.square(x0_hat - z0)))

  def eval_loss(self, model: LatentAutoencoder, batch: Batch, key: jax.Array):
    """The tuning loss (denoiser estimates included) without dropout or latent noise."""
    return self.loss(model, batch, key, train=False)[0]


def _load_run(field: str, path: str, method: str, hint: str = ""):
  """`lsd.api.load(path)` for config field `field`, which must name a `method` run."""
  from lsd.api import load

  run = load(path)
  if run.config.method != method:
    raise ConfigError(
      f"{field}={path!r} is a {run.config.method!r} run; it must be a {method} run {hint}".rstrip()
    )
  return run


def _check_same_run(name_a: str, a: str, name_b: str, b: str) -> None:
  if Path(a).resolve() != Path(b).resolve():
    raise ConfigError(
      f"{name_a}={a!r} and {name_b}={b!r} differ: the runs must share one stage-1 autoencoder"
    )


# ---------------------------------------------------------------------------------------------------
# Pure functions of loaded runs
# ---------------------------------------------------------------------------------------------------
def _frozen_hidden(model: LatentAutoencoder, tokens, valid):
  """The frozen pretrained encoder's states for an autoencoder with one (else None)."""
  if model.cfg.encoder in FROZEN_ENCODERS:
    return hidden_states(frozen_encoder(model.cfg.encoder, "model.encoder"), tokens, valid)
  return None


def _encode_model(model: LatentAutoencoder, tokens, valid):
  """Sentences -> latents through the model's own encoder or its frozen pretrained one."""
  hidden = _frozen_hidden(model, tokens, valid)
  return model.encode(tokens, valid) if hidden is None else model.encode_hidden(hidden, valid)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, params, tokens, valid):
  return _encode_model(nnx.merge(graphdef, params), tokens, valid)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _context(graphdef, params, tokens, valid):
  return jax.lax.stop_gradient(nnx.merge(graphdef, params)(tokens, valid))


def _encode_texts(tokenizer, graphdef, params, texts, max_len) -> jax.Array:
  tokens, valid = encode_sentences(texts, tokenizer, max_len)
  return _encode(graphdef, params, jnp.asarray(tokens), jnp.asarray(valid))


def _decode_texts(tokenizer, graphdef, params, latents, sample, key=None) -> list[str]:
  key = jax.random.key(0) if key is None else key
  beams = int(sample.get("num_beams", 1))
  if beams < 1:
    raise ConfigError(f"sample.num_beams={beams} must be >= 1 (1 = greedy / top-p decoding)")
  if beams > 1:
    tokens = latent_sampling.beam_decode(
      graphdef,
      params,
      latents,
      bos_id=tokenizer.bos_id,
      eos_id=tokenizer.eos_id,
      max_new_tokens=int(sample.max_new_tokens),
      num_beams=beams,
      length_penalty=float(sample.get("length_penalty", 1.0)),
      repetition_penalty=float(sample.get("repetition_penalty", 1.0)),
      no_repeat_ngram=int(sample.get("no_repeat_ngram", 0)),
      min_new_tokens=int(sample.get("min_new_tokens", 0)),
    )
  else:
    tokens = latent_sampling.decode(
      graphdef,
      params,
      key,
      latents,
      bos_id=tokenizer.bos_id,
      max_new_tokens=int(sample.max_new_tokens),
      top_p=float(sample.top_p),
      temperature=float(sample.temperature),
    )
  out = []
  for row in np.asarray(jax.device_get(tokens)).tolist():
    if tokenizer.eos_id in row:
      row = row[: row.index(tokenizer.eos_id)]
    out.append(tokenizer.decode(row))
  return out


def encode_texts(ae_run, texts: list[str]) -> jax.Array:
  """Texts -> latents [N, l, d] (fp32) with a loaded stage-1 run; texts longer than the run's
  data.max_len are truncated."""
  return _encode_texts(
    ae_run.tokenizer, ae_run.graphdef, ae_run.params, list(texts), ae_run.config.data.max_len
  )


def decode_latents(
  ae_run, latents: jax.Array, *, key: jax.Array | None = None, sample=None
) -> list[str]:
  """Latents [N, l, d] -> texts with the stage-1 decoder; `sample` (max_new_tokens, top_p,
  temperature) defaults to the AE run's `config.sample` (greedy when top_p = 0)."""
  sample = ae_run.config.sample if sample is None else sample
  return _decode_texts(ae_run.tokenizer, ae_run.graphdef, ae_run.params, latents, sample, key)


def interpolate_texts(ae_run, text_a: str, text_b: str, n: int = 5) -> list[str]:
  """n texts decoded along the slerp between the latents of text_a and text_b (ends included)."""
  z = encode_texts(ae_run, [text_a, text_b])
  return decode_latents(ae_run, latent_sampling.interpolate(z[0], z[1], n))


def generate_from_sources(
  diffusion_run,
  key: jax.Array,
  sources: list[str],
  *,
  guidance_scale: float | None = None,
  candidates: int | None = None,
) -> list[str]:
  """Seq2seq with a loaded diffusion run that has a context encoder: one output text per source
  (guidance_scale defaults to the run's sample.guidance_scale, 1 = no guidance; candidates to its
  sample.candidates, 1 = no MBR: k > 1 samples k outputs per source and keeps the MBR choice)."""
  return diffusion_run.task.generate_from_sources(
    diffusion_run.model(), key, list(sources), guidance_scale=guidance_scale, candidates=candidates
  )


def edit_text(
  diffusion_run,
  ae_run,
  key: jax.Array,
  texts: list[str],
  t_edit: float,
  *,
  labels: list[int] | None = None,
  guidance_scale: float | None = None,
  steps: int | None = None,
) -> list[str]:
  """Encodes texts, noises their latents to t_edit in (0, 1], denoises them and decodes the result.

  With a class-conditional denoiser, `labels` (one per text) is the target class of the edit; None
  denoises unconditionally (the null class). `steps` defaults to the run's sample.steps scaled by
  t_edit; the other sampler settings come from the diffusion run's `config.sample`.
  """
  s = diffusion_run.config.sample
  z0 = encode_texts(ae_run, texts)
  model_cfg = diffusion_run.config.model
  cond = {}
  if model_cfg.num_classes:
    if labels is None:
      cond["labels"] = jnp.full((len(texts),), model_cfg.num_classes, jnp.int32)
    else:
      cond["labels"] = jnp.asarray(labels, jnp.int32)
  z = latent_sampling.edit(
    diffusion_run.graphdef,
    diffusion_run.params,
    key,
    z0,
    t_edit,
    steps=int(steps or max(1, round(s.steps * t_edit))),
    sampler=s.sampler,
    eta=float(s.eta),
    objective=diffusion_run.config.ld4lg.objective,
    schedule=CosineSchedule(scale=float(diffusion_run.config.ld4lg.schedule_scale)),
    guidance_scale=float(s.guidance_scale if guidance_scale is None else guidance_scale),
    project=bool(s.project),
    **cond,
  )
  return decode_latents(ae_run, z)
