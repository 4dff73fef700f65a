"""DGLM (Diffusion Guided Language Modeling): a recipe over the shared latent stack.

Each sentence is cut at a word boundary into a prefix and a continuation (`split_prefixes`, seeded
per sentence). The latent is the frozen encoder's sentence embedding of the continuation
(mean-pooled, unit norm: `sentence_embeddings`), standardised per dimension with statistics of the
training corpus that the run keeps in `<workdir>/embedding_stats.safetensors`
(`lsd.diffusion.embedding`). `DGLMTask` is what both stages share.

`DGLMDiffusionTask` (`dglm_diffusion`): the shared `LatentDenoiser` on the standardised embedding
split into `model.num_latents` tokens of `model.d_latent`, cross-attending to the frozen encoder's
states of the prefix (dropped for CFG); v-prediction, self-conditioning, DDPM / DDIM from
`lsd.sampling.latent`. Its end-of-run samples are proposals for held-out prefixes, reported by
their cosine similarity to the true continuation's embedding (text needs a decoder stage, the
soft-prompt decoder of `lsd.methods.dglm_decoder`).

Plug-and-play attribute classifiers: logistic classifiers fitted on the frozen encoder's
embeddings of labelled text and saved to files (`save_attribute_classifier`), named in a decoder
run's `dglm.classifiers` (`classifier_specs`) and chosen per call (`parse_attribute`).

Stages exchange embeddings in the encoder's unit-norm space; each standardises with its statistics,
which both stages keep in their workdirs and which must be equal. See docs/dglm.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd.config import ConfigError, check_choice, check_positive, check_range, dataclass_from_config
from lsd.convert.encoder_specs import encoder_spec
from lsd.convert.encoders import frozen_encoder, hidden_states, pool
from lsd.data.arrays import ArrayData, gather_rows
from lsd.data.latent_cache import encode_in_chunks
from lsd.data.sentences import encode_sentences, load_sentences
from lsd.data.sources import split_documents
from lsd.diffusion import embedding as emb
from lsd.diffusion.attribute_guidance import (
  LinearClassifier,
  save_classifier,
)
from lsd.diffusion.gaussian import OBJECTIVES, CosineSchedule
from lsd.diffusion.latent import diffusion_training_loss
from lsd.fileio import as_path, atomic_write
from lsd.models.denoiser import DenoiserConfig, LatentDenoiser
from lsd.sampling import latent as latent_sampling
from lsd.sampling.text_latent import LatentSampleConfig
from lsd.train.task import Batch, Task


def split_prefixes(docs: list[dict], seed: int) -> list[dict]:
  """Sentences -> {"source": prefix, "text": continuation, "label"?}: each sentence of at least two
  words is cut after k ~ U{1, ..., words - 1} words, k drawn from (seed, the sentence's index);
  shorter sentences are dropped."""
  out = []
  for i, d in enumerate(docs):
    words = d["text"].split()
    if len(words) < 2:
      continue
    k = int(np.random.default_rng([seed, i]).integers(1, len(words)))
    out.append({**d, "source": " ".join(words[:k]), "text": " ".join(words[k:])})
  return out


def sentence_embeddings(enc, tokens: jax.Array, valid: jax.Array) -> jax.Array:
  """The frozen encoder's sentence embeddings [B, E] (the sentence-transformers recipe: the mean of
  the last hidden states over valid tokens, then unit L2 norm); fp32, no gradient."""
  e = pool(hidden_states(enc, tokens, valid), valid, "mean")
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class DGLMDiffusionStage:
  """`config.dglm` for the diffusion stage."""

  encoder: str = "minilm"  # the frozen sentence encoder (a `lsd.convert.encoder_specs` name)
  objective: str = "v"
  self_condition_prob: float = 0.5
  cond_drop_prob: float = 0.1  # the prefix is replaced by the null context (CFG)
  schedule_scale: float = 1.0
  stats_sentences: int = 10000  # the first N training continuations give the statistics
  split_seed: int = 0  # the per-sentence prefix / continuation cut
  embedding_cache: str = ""  # a directory keeping the corpus's embeddings (`cached_embeddings`)

  def validate(self) -> None:
    encoder_spec(self.encoder, "dglm.encoder")
    check_cache_dir(self.embedding_cache)
    check_choice("dglm.objective", self.objective, OBJECTIVES)
    check_range("dglm.self_condition_prob", self.self_condition_prob, 0.0, 1.0)
    check_range("dglm.cond_drop_prob", self.cond_drop_prob, 0.0, 1.0)
    check_positive("dglm.schedule_scale", self.schedule_scale)
    check_stats_sentences(self.stats_sentences)


def check_cache_dir(path) -> None:
  if not isinstance(path, str):
    raise ConfigError(f"dglm.embedding_cache={path!r} must be a directory path, or '' for none")


def check_stats_sentences(n) -> None:
  if isinstance(n, bool) or not isinstance(n, int) or n < 2:
    raise ConfigError(f"dglm.stats_sentences={n!r} must be an int >= 2")


class DGLMTask(Task):
  """What both DGLM stages share: the frozen sentence encoder, the prefix / continuation split of
  the sentence data, and the run's embedding statistics (`<workdir>/embedding_stats.safetensors`:
  a resumed or loaded run reloads them)."""

  stage_config: type  # the frozen dataclass of `config.dglm`

  def __init__(self, config):
    super().__init__(config)
    self.stats: emb.EmbeddingStats | None = None  # set by make_data / load_stats

  @property
  def stage(self):
    return dataclass_from_config(self.stage_config, self.config.dglm, "dglm")

  def encoder(self):
    return frozen_encoder(self.stage.encoder, "dglm.encoder")

  def split_docs(self) -> tuple[list[dict], list[dict]]:
    """(training, held-out) sentences cut into {"source": prefix, "text": continuation}."""
    st, cfg = self.stage, self.config.data
    train_docs, eval_docs = split_documents(load_sentences(cfg), cfg.eval_fraction, cfg.split_seed)
    train_docs = split_prefixes(train_docs, st.split_seed)
    if len(train_docs) < 2:
      raise ConfigError(f"data: {len(train_docs)} training sentences of >= 2 words; need more")
    return train_docs, split_prefixes(eval_docs, st.split_seed + 1)

  def embeddings(self, texts: list[str]) -> np.ndarray:
    """Unit embeddings [N, E] of `texts` (tokenised to data.max_len), encoded once (and kept in
    `dglm.embedding_cache` when set)."""
    cache = self.stage.embedding_cache
    return cached_embeddings(self.encoder(), texts, self.config.data.max_len, cache)

  def load_stats(self, workdir: str | Path) -> emb.EmbeddingStats:
    """The run's statistics from `workdir` (a loaded run reloads them itself)."""
    path = as_path(workdir) / emb.STATS_FILE
    if not path.is_file():
      raise ConfigError(f"workdir={str(workdir)!r} holds no {emb.STATS_FILE}: is it a DGLM run?")
    self.stats = emb.load_stats(path, self.encoder().width)
    return self.stats

  def load_run_files(self, workdir: Path) -> None:
    self.load_stats(workdir)

  def prepare_abstract(self) -> None:
    """Without data, the loss standardises with stand-in statistics (mean 0, std 1): only their
    shapes reach a compiled step."""
    super().prepare_abstract()
    if self.stats is None:
      width = encoder_spec(self.stage.encoder, "dglm.encoder").width
      self.stats = emb.EmbeddingStats(np.zeros(width, np.float32), np.ones(width, np.float32))

  def reference_stats(self) -> tuple[str, emb.EmbeddingStats] | None:
    """(field, statistics) of an earlier run this run must share statistics with; None."""
    return None

  def setup_stats(self, workdir, train_docs: list[dict], process_index: int) -> None:
    """The run's statistics: those in the workdir (a resumed run), else those of the earlier run
    of `reference_stats`, else computed on the first `dglm.stats_sentences` training
    continuations (the same on every process); saved in the workdir. With an earlier run, the two
    must match."""
    path, ref = as_path(workdir) / emb.STATS_FILE, self.reference_stats()
    if path.exists():
      self.load_stats(workdir)
    elif ref is not None:
      self.stats = ref[1]
    else:
      head = self.embeddings([d["text"] for d in train_docs[: self.stage.stats_sentences]])
      self.stats = emb.embedding_stats(head)
    if not path.exists() and process_index == 0:
      emb.save_stats(path, self.stats)
    if ref is not None:
      check_same_stats(self.stats, ref[1], str(path), ref[0])


def check_same_stats(a: emb.EmbeddingStats, b: emb.EmbeddingStats, a_name: str, b_name: str):
  """Raises ConfigError unless statistics a and b are equal (to float32 rounding)."""
  close = lambda x, y: x.shape == y.shape and np.allclose(x, y, rtol=1e-5, atol=1e-7)
  if not (close(a.mean, b.mean) and close(a.std, b.std)):
    raise ConfigError(
      f"the embedding statistics of {a_name} and {b_name} differ: both stages must standardise "
      "with one set (train the decoder with the diffusion run's data and dglm.stats_sentences, "
      "or start a fresh decoder run, which copies them)"
    )


class DGLMDiffusionTask(DGLMTask):
  """The prefix-conditioned denoiser over the continuation's standardised sentence embedding."""

  name = "dglm_diffusion"
  stage_config = DGLMDiffusionStage

  @property
  def schedule(self) -> CosineSchedule:
    return CosineSchedule(scale=float(self.stage.schedule_scale))

  def validate(self) -> None:
    self.stage.validate()
    m = DenoiserConfig.from_config(self.config.model)
    m.validate("model")
    width = self.encoder().width
    if m.num_latents * m.d_latent != width:
      raise ConfigError(
        f"model.num_latents x model.d_latent = {m.num_latents} x {m.d_latent} must equal the "
        f"{self.stage.encoder} embedding width {width} (e.g. 8 x {width // 8})"
      )
    if m.d_context != width:
      raise ConfigError(
        f"model.d_context={m.d_context}: the prefix is given as {self.stage.encoder} states of "
        f"width {width}"
      )
    if m.num_classes:
      raise ConfigError(f"model.num_classes={m.num_classes}: DGLM's denoiser is prefix-conditioned")
    s = LatentSampleConfig.from_config(self.config.sample)
    s.validate()

  def _rows(self, docs: list[dict]) -> dict[str, np.ndarray]:
    enc, cfg = self.encoder(), self.config.data
    src, src_valid = encode_sentences(
      [d["source"] for d in docs], enc.tokenizer, cfg.max_source_len
    )
    return {
      "embedding": self.embeddings([d["text"] for d in docs]),
      "source_tokens": src,
      "source_valid": src_valid,
    }

  def make_data(self, workdir, *, process_index: int, process_count: int):
    """ArrayData of the held-in sentences' continuation embeddings (encoded once, each process
    its share, then joined) and prefix tokens; the statistics are `setup_stats`'s."""
    cfg, enc = self.config.data, self.encoder()
    train_docs, eval_docs = self.split_docs()
    self.setup_stats(workdir, train_docs, process_index)
    self.tokenizer = enc.tokenizer
    self.tokenizer.save(as_path(workdir) / "tokenizer.json")
    self.eval_docs = eval_docs
    local = self._rows(train_docs[process_index::process_count])
    return ArrayData(
      tokenizer=enc.tokenizer,
      train=gather_rows(local, process_index, process_count),
      eval=self._rows(eval_docs) if eval_docs else {},
      batch_size=cfg.batch_size,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
    )

  def build_model(self, rngs: nnx.Rngs) -> LatentDenoiser:
    return LatentDenoiser(DenoiserConfig.from_config(self.config.model), rngs=rngs)

  def latents(self, embedding: jax.Array, num_latents: int) -> jax.Array:
    """Unit embeddings [B, E] -> the denoiser's x0 [B, L, E / L] (standardised)."""
    if self.stats is None:
      raise ValueError("dglm: no embedding statistics; build the data or call load_stats(workdir)")
    return emb.to_tokens(emb.standardize(self.stats, embedding), num_latents)

  def loss(self, model: LatentDenoiser, batch: Batch, key: jax.Array):
    st = self.stage
    x0 = self.latents(batch["embedding"], model.cfg.num_latents)
    valid = batch["source_valid"]
    context = hidden_states(self.encoder(), batch["source_tokens"], valid)
    return diffusion_training_loss(
      model,
      x0,
      key,
      context=context,
      context_valid=valid,
      objective=st.objective,
      schedule=self.schedule,
      self_condition_prob=st.self_condition_prob if model.cfg.self_condition else 0.0,
      cond_drop_prob=st.cond_drop_prob,
    )

  def tokens_in(self, batch: Batch) -> int:
    return int(batch["embedding"].shape[0] * self.config.model.num_latents)

  def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """`make_data`'s rows: the continuation's unit embedding and the prefix's encoder tokens."""
    n, width = (
      self.config.data.max_source_len,
      encoder_spec(self.stage.encoder, "dglm.encoder").width,
    )
    return {
      "embedding": jax.ShapeDtypeStruct((batch_size, width), jnp.float32),
      "source_tokens": jax.ShapeDtypeStruct((batch_size, n), jnp.int32),
      "source_valid": jax.ShapeDtypeStruct((batch_size, n), jnp.bool_),
    }

  def propose(
    self, model: LatentDenoiser, key: jax.Array, prefixes: list[str], *, guide=None
  ) -> jax.Array:
    """Semantic proposals: unit-norm continuation embeddings [B, E] for `prefixes` (the encoder's
    space, which stages exchange; each stage standardises with its statistics), sampled with the
    run's `sample` settings (CFG with sample.guidance_scale), optionally with a classifier `guide`
    (`lsd.diffusion.attribute_guidance.attribute_guide`)."""
    s, enc = LatentSampleConfig.from_config(self.config.sample), self.encoder()
    src, valid = encode_sentences(prefixes, enc.tokenizer, self.config.data.max_source_len)
    context = hidden_states(enc, jnp.asarray(src), jnp.asarray(valid))
    graphdef, params = nnx.split(model)
    x0 = latent_sampling.sample(
      graphdef,
      params,
      key,
      len(prefixes),
      steps=s.steps,
      sampler=s.sampler,
      eta=s.eta,
      objective=self.stage.objective,
      schedule=self.schedule,
      guidance_scale=s.guidance_scale,
      guide=guide,
      context=context,
      context_valid=jnp.asarray(valid),
    )
    return emb.unstandardize(self.stats, emb.from_tokens(x0))

  def nfe(self) -> int:
    s = LatentSampleConfig.from_config(self.config.sample)
    return s.steps * (2 if s.guidance_scale != 1.0 else 1)

  def sample_text(self, model: LatentDenoiser, key: jax.Array, num_samples: int) -> list[dict]:
    """Proposals for the first held-out prefixes, each with its cosine similarity to the true
    continuation's embedding (the decoder stage turns proposals into text)."""
    docs = getattr(self, "eval_docs", [])[:num_samples]
    if not docs:
      return []
    props = np.asarray(self.propose(model, key, [d["source"] for d in docs]))
    truth = self.embeddings([d["text"] for d in docs])
    nfe = self.nfe()
    return [
      {
        "source": d["source"],
        "reference": d["text"],
        "text": "",
        "cosine": float(p @ t),
        "nfe": nfe,
      }
      for d, p, t in zip(docs, props, truth, strict=True)
    ]


# ---------------------------------------------------------------------------------------------------
# Plug-and-play attribute classifiers
# ---------------------------------------------------------------------------------------------------
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_ATTRIBUTE = re.compile(r"^([A-Za-z0-9_.-]+)=([^:=]+):([^:=]+)$")


class ClassifierSpec(NamedTuple):
  """One entry of `dglm.classifiers`: a classifier file (`save_classifier`) and the target class
  (a name or index) and scale its guidance has unless an attribute option sets them."""

  name: str
  path: str
  target: str
  scale: float


def classifier_specs(entries) -> dict[str, ClassifierSpec]:
  """`dglm.classifiers` (a list of {"name", "path", "target", "scale"}) checked, by name."""
  keys = list(ClassifierSpec._fields)
  if isinstance(entries, str | dict) or not isinstance(entries, list | tuple):
    raise ConfigError(f"dglm.classifiers={entries!r} must be a list of {{{', '.join(keys)}}}")
  out = {}
  for i, e in enumerate(entries):
    e = e.to_dict() if hasattr(e, "to_dict") else e
    ok = isinstance(e, dict) and sorted(e) == sorted(keys)
    name, path, target, scale = (e.get(k) for k in keys) if ok else (None,) * 4
    ok = ok and isinstance(name, str) and bool(_NAME.match(name)) and name not in out
    ok = ok and isinstance(path, str) and bool(path) and isinstance(target, str | int)
    ok = ok and not isinstance(target, bool) and is_number(scale)
    if not ok:
      raise ConfigError(
        f"dglm.classifiers[{i}]={e!r} must be {{name: a unique word, path: a classifier file, "
        "target: a class name or index, scale: a number}"
      )
    out[name] = ClassifierSpec(name, path, str(target), float(scale))
  return out


def is_number(x) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and bool(np.isfinite(x))


def parse_attribute(text: str, field: str = "--attribute") -> tuple[str, str, float]:
  """`NAME=TARGET:SCALE` (e.g. `sentiment=positive:3.0`) -> (name, target, scale); a ConfigError
  names `field`, the value and the accepted form."""
  m = _ATTRIBUTE.match(text.strip()) if isinstance(text, str) else None
  scale = None
  if m:
    try:
      scale = float(m[3])
    except ValueError:
      scale = None
  if scale is None or not np.isfinite(scale):
    raise ConfigError(
      f"{field} {text!r}: expected NAME=TARGET:SCALE, e.g. sentiment=positive:3.0 (NAME a "
      "classifier of the run's dglm.classifiers, TARGET one of its classes or a class index, SCALE "
      "a finite number)"
    )
  return m[1], m[2].strip(), scale


def embed_texts(enc, texts: list[str], max_len: int = 64, chunk: int = 256) -> np.ndarray:
  """Unit sentence embeddings [N, E] of `texts` by the frozen encoder (fp32 numpy), in chunks of
  similar lengths, each cut to a multiple of 8 tokens (a row's value depends neither on the other
  rows nor on its padding; one compiled program per width)."""
  tokens, valid = encode_sentences(list(texts), enc.tokenizer, max_len)
  return encode_in_chunks(tokens, valid, _embedder(enc.name), chunk=chunk, bucket=8)


def cached_embeddings(
  enc, texts: list[str], max_len: int, cache_dir: str = "", log=None
) -> np.ndarray:
  """`embed_texts`, kept in `cache_dir` ("" = no cache) under a name made of the encoder, max_len
  and a digest of the texts: runs over the same sentences (a probe and its run, both DGLM stages,
  a restart) encode them once. The file is written whole (atomic), so a killed run leaves none."""
  if not cache_dir:
    return embed_texts(enc, texts, max_len)
  digest = hashlib.sha256(json.dumps([enc.name, max_len, list(texts)]).encode()).hexdigest()[:20]
  path = as_path(cache_dir) / f"{enc.name}-{max_len}-{digest}.npy"
  if path.exists():
    with path.open("rb") as f:
      out = np.load(f)
    if out.shape[0] == len(texts):
      return out
  t0 = time.perf_counter()
  out = embed_texts(enc, texts, max_len)

  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:  # a file name would get ".npy" appended
      np.save(f, out, allow_pickle=False)

  atomic_write(path, write)
  if log is not None:
    log(f"embedded {len(texts)} texts in {time.perf_counter() - t0:.0f} s -> {path}")
  return out


@functools.cache
def _embedder(name: str):
  """`sentence_embeddings` of the registry encoder `name`, jitted once per process."""
  enc = frozen_encoder(name)
  return jax.jit(lambda t, v: sentence_embeddings(enc, t, v))


def classifier_from_probe(probe) -> LinearClassifier:
  """A fitted `lsd.eval.metrics.LinearProbe` as a `LinearClassifier` on the raw embedding: its
  standardisation folded into the weights (w / scale, b - mean . w / scale), so the logits are the
  probe's. Class index i is `probe.classes[i]`."""
  if probe.coef is None:
    raise ValueError("the probe is not fitted")
  w = np.asarray(probe.coef, np.float64) / np.asarray(probe.scale, np.float64)
  b = np.asarray(probe.intercept, np.float64) - w @ np.asarray(probe.mean, np.float64)
  return LinearClassifier(w[0], b[0]) if w.shape[0] == 1 else LinearClassifier(w, b)


CONSTANT_STD = 1e-6  # an embedding dimension with a smaller std over the texts carries nothing


def fit_embedding_classifier(
  embeddings: np.ndarray, labels, *, c: float = 1000.0
) -> tuple[LinearClassifier, np.ndarray]:
  """A logistic classifier on embeddings [N, E] (`LinearProbe`, folded by
  `classifier_from_probe`): (classifier, its classes). Dimensions whose std over the rows is below
  CONSTANT_STD are zeroed first, so they get weight 0: all-MiniLM-L6-v2 has dimensions whose
  values differ only by rounding (std ~1e-33), which the probe's standardisation would blow up to
  unit variance and the folded weights to ~1e32, wrecking the classifier (and its gradient) away
  from the training rows."""
  from lsd.eval.metrics import LinearProbe

  x = np.array(embeddings, np.float64)
  constant = x.std(axis=0) < CONSTANT_STD
  x[:, constant] = 0.0  # exactly constant: std 0, so the probe leaves it unscaled, coefficient 0
  probe = LinearProbe(c=c, max_iter=10_000).fit(x, labels)
  return classifier_from_probe(probe), probe.classes


def fit_attribute_classifier(
  enc, texts: list[str], labels, *, c: float = 1000.0, max_len: int = 64
) -> tuple[LinearClassifier, np.ndarray]:
  """A logistic classifier on the frozen encoder's unit embeddings of labelled `texts` (C = 1000,
  the reference's inverse L2 strength; `fit_embedding_classifier`): (classifier, its classes,
  index i = class classes[i])."""
  return fit_embedding_classifier(embed_texts(enc, texts, max_len), labels, c=c)


def save_attribute_classifier(
  path: str | Path, enc, texts: list[str], labels, class_names=None, **kw
) -> tuple[LinearClassifier, list[str]]:
  """`fit_attribute_classifier` on labelled `texts`, saved to `path` (`save_classifier`) with
  `class_names` (class i's name; None = the labels as text), for `dglm.classifiers`."""
  clf, classes = fit_attribute_classifier(enc, texts, labels, **kw)
  names = [str(c) for c in (classes if class_names is None else class_names)]
  save_classifier(path, clf, names)
  return clf, names
