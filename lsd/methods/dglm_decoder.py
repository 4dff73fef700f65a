"""DGLM's decoder stage (`dglm_decoder`): the soft-prompt decoder steered by the diffusion stage.

`DGLMDecoderTask` trains `lsd.models.soft_prompt.SoftPromptDecoder` on
[<bos> prefix][soft prompts of the noised, standardised continuation embedding][continuation], with
the diffusion run's statistics (`DGLMTask`, `lsd.methods.dglm`). Its `generate` turns prompts into
continuations: proposals from the diffusion run (`dglm.diffusion_workdir`), optionally guided by
saved attribute classifiers (`dglm.classifiers`, `lsd sample --attribute NAME=TARGET:SCALE`),
decoded after the prefix. See docs/dglm.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd.config import ConfigError, check_positive, check_range, dataclass_from_config
from lsd.convert import causal_decoder
from lsd.convert.encoder_specs import encoder_spec
from lsd.data.arrays import ArrayData, gather_rows
from lsd.data.tokenizer import TOKENIZER_FILE, Tokenizer, build_tokenizer
from lsd.diffusion import embedding as emb
from lsd.diffusion.attribute_guidance import attribute_guide, load_classifier
from lsd.diffusion.gaussian import COSINE, q_sample
from lsd.fileio import as_path
from lsd.methods import get_task
from lsd.methods.dglm import (
  DGLMTask,
  check_cache_dir,
  check_same_stats,
  check_stats_sentences,
  classifier_specs,
  is_number,
  parse_attribute,
)
from lsd.models.soft_prompt import SoftPromptConfig, SoftPromptDecoder, soft_prompt_lm_loss
from lsd.nn import TransformerConfig
from lsd.sampling.soft_prompt import continue_from_proposal
from lsd.train import stages
from lsd.train.task import Batch


@dataclasses.dataclass(frozen=True)
class DGLMDecoderStage:
  """`config.dglm` for the decoder stage."""

  encoder: str = "minilm"  # the frozen sentence encoder (the diffusion run's)
  stats_sentences: int = 10000  # as the diffusion stage, when no diffusion run gives statistics
  split_seed: int = 0  # the per-sentence prefix / continuation cut
  embedding_cache: str = ""  # a directory keeping the corpus's embeddings (as the diffusion stage)
  diffusion_workdir: str = ""  # the dglm_diffusion run: its statistics, and proposals at sampling
  decoder_init: str = ""  # a causal_lm run whose weights start the decoder; "" = random init
  # an imported causal LM as the decoder, with its tokenizer (lsd.convert.causal_decoder): a local
  # Hugging Face GPT-2 directory (safetensors), a llama GGUF file (*.gguf) or "smollm2"
  decoder_checkpoint: str = ""
  freeze_decoder: bool = False  # only the soft-prompt generator trains ("decoder" in train.freeze)
  classifiers: Any = ()  # [{name, path, target, scale}]: attribute guidance of the proposals

  def validate(self) -> None:
    encoder_spec(self.encoder, "dglm.encoder")
    check_cache_dir(self.embedding_cache)
    check_stats_sentences(self.stats_sentences)
    if self.decoder_init and self.decoder_checkpoint:
      raise ConfigError(
        f"dglm.decoder_init={self.decoder_init!r} and dglm.decoder_checkpoint="
        f"{self.decoder_checkpoint!r}: the decoder starts from one of them; set the other to ''"
      )
    path = self.decoder_checkpoint
    if path and causal_decoder.checkpoint_kind(path) is None:
      raise ConfigError(
        f"dglm.decoder_checkpoint={path!r} is not a directory, an existing .gguf file or "
        f"{causal_decoder.SMOLLM2!r}; accepted: {causal_decoder.ACCEPTED}"
      )
    if self.freeze_decoder and not (self.decoder_init or self.decoder_checkpoint):
      raise ConfigError(
        "dglm.freeze_decoder=True needs dglm.decoder_init (a causal_lm run) or "
        "dglm.decoder_checkpoint (a GPT-2 or GGUF checkpoint): a frozen random decoder would never "
        "learn to read the prompts' context"
      )
    classifier_specs(self.classifiers)


@dataclasses.dataclass(frozen=True)
class DecoderSampleConfig:
  """`config.sample` of the decoder stage (the proposals use the diffusion run's settings)."""

  max_new_tokens: int = 32
  top_p: float = 0.9  # 0 = greedy
  temperature: float = 1.0
  renoise_alpha_bar: float = 0.95  # the proposal is re-noised to this level (1 = not at all)

  def validate(self) -> None:
    n = self.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ConfigError(f"sample.max_new_tokens={n!r} must be an int >= 1")
    check_range("sample.top_p", self.top_p, 0.0, 1.0)
    check_positive("sample.temperature", self.temperature)
    a = self.renoise_alpha_bar
    if not is_number(a) or not 0 < a <= 1:
      raise ConfigError(f"sample.renoise_alpha_bar={a!r} must be in (0, 1] (1 = no re-noising)")


class DGLMDecoderTask(DGLMTask):
  """The soft-prompt decoder (`lsd.models.soft_prompt.SoftPromptDecoder`): a causal LM that
  reads [<bos> prefix][P soft prompts][continuation <eos>], the prompts generated from the
  continuation's standardised embedding noised to t ~ U(0, 1) on the cosine schedule (alpha_bar(t)
  given to the generator); the loss is `soft_prompt_lm_loss` over prefix and continuation.

  The decoder starts from random weights, from the causal_lm run `dglm.decoder_init` (whose
  tokenizer it then uses) or is an imported causal LM, `dglm.decoder_checkpoint` — a GPT-2
  safetensors directory, a llama GGUF file or `smollm2` — (its architecture, weights and tokenizer
  through `lsd.convert.causal_decoder`; `model` gives only dtype, remat and dropout);
  `dglm.freeze_decoder` puts "decoder" into `train.freeze`, so only the generator trains. The
  statistics are those of the diffusion run `dglm.diffusion_workdir` when
  set (checked equal to the workdir's on resume), else computed as the diffusion stage does.
  Sampling: `generate` continues prompts from the diffusion run's proposals, optionally guided by
  the classifiers of `dglm.classifiers` (`attribute_terms`).
  """

  name = "dglm_decoder"
  stage_config = DGLMDecoderStage

  def __init__(self, config):
    super().__init__(config)
    freeze = config.train.get("freeze", ())
    if self.stage.freeze_decoder and "decoder" not in freeze:
      config.train.freeze = type(freeze)([*freeze, "decoder"])
    self._runs, self._classifiers = {}, {}

  @property
  def sampling(self) -> DecoderSampleConfig:
    return dataclass_from_config(DecoderSampleConfig, self.config.sample, "sample")

  def prompt_config(self) -> SoftPromptConfig:
    width = encoder_spec(self.stage.encoder, "dglm.encoder").width
    return SoftPromptConfig.from_config(self.config.soft_prompt, d_embedding=width)

  def model_config(self) -> TransformerConfig:
    if not self.stage.decoder_checkpoint:
      return TransformerConfig.from_config(self.config.model, vocab_size=self.tokenizer.vocab_size)
    run = TransformerConfig.from_config(self.config.model, vocab_size=8)
    cfg = causal_decoder.decoder_config(self.stage.decoder_checkpoint, self.tokenizer)
    return dataclasses.replace(cfg, dtype=run.dtype, remat=run.remat, dropout=run.dropout)

  def validate(self) -> None:
    _ = self.stage, self.sampling, self.prompt_config()
    TransformerConfig.from_config(self.config.model, vocab_size=8)  # the vocabulary comes later
    path = self.stage.decoder_checkpoint
    if path:
      try:
        n = causal_decoder.max_positions(path)
      except (OSError, ValueError) as e:
        raise ConfigError(f"dglm.decoder_checkpoint={path!r}: {e}") from e
      rows = self.config.data.max_len + self.prompt_config().num_prompts
      if n is not None and rows > n:
        raise ConfigError(
          f"data.max_len + soft_prompt.num_prompts = {rows}: dglm.decoder_checkpoint={path!r} "
          f"has {n} positions; accepted: at most {n}"
        )

  def build_model(self, rngs: nnx.Rngs) -> SoftPromptDecoder:
    return SoftPromptDecoder(self.prompt_config(), self.model_config(), rngs=rngs)

  def _run(self, field: str, method: str, hint: str) -> stages.LoadedRun:
    if field not in self._runs:
      path = getattr(self.stage, field)
      self._runs[field] = stages.load_stage_run(f"dglm.{field}", path, get_task, method, hint)
    return self._runs[field]

  def diffusion_run(self) -> stages.LoadedRun:
    """The dglm_diffusion run of `dglm.diffusion_workdir` (EMA params), loaded once."""
    run = self._run("diffusion_workdir", "dglm_diffusion", "(configs/dglm.py)")
    if run.task.stage.encoder != self.stage.encoder:
      raise ConfigError(
        f"dglm.diffusion_workdir={self.stage.diffusion_workdir!r} embeds with "
        f"{run.task.stage.encoder!r}, this run with dglm.encoder={self.stage.encoder!r}"
      )
    return run

  def decoder_init_run(self) -> stages.LoadedRun:
    return self._run("decoder_init", "causal_lm", "(configs/causal_lm.py)")

  def reference_stats(self):
    path = self.stage.diffusion_workdir
    return (f"dglm.diffusion_workdir={path!r}", self.diffusion_run().task.stats) if path else None

  def decoder_tokenizer(self, workdir, train_docs: list[dict]):
    """The tokenizer the decoder's weights read: the `dglm.decoder_init` LM's, or
    `dglm.decoder_checkpoint`'s (`checkpoint_tokenizer`), else the one `data.tokenizer`
    describes, built on the training sentences; kept in the workdir."""
    if self.stage.decoder_init:
      tok = self.decoder_init_run().tokenizer
    elif self.stage.decoder_checkpoint:
      tok = self.checkpoint_tokenizer()
    else:
      texts = [f"{d['source']} {d['text']}" for d in train_docs]
      return build_tokenizer(self.config.data.tokenizer, texts, save_dir=workdir)
    tok.save(as_path(workdir) / TOKENIZER_FILE)
    return tok

  def checkpoint_tokenizer(self):
    """`dglm.decoder_checkpoint`'s BPE with lsd's specials
    (`lsd.convert.causal_decoder.checkpoint_tokenizer`), checked to fit the checkpoint's rows."""
    path = self.stage.decoder_checkpoint
    try:
      tok = causal_decoder.checkpoint_tokenizer(path)
      causal_decoder.decoder_config(path, tok)
    except (OSError, ValueError) as e:
      raise ConfigError(f"dglm.decoder_checkpoint={path!r}: {e}") from e
    return tok

  def prepare_abstract(self) -> None:
    """The tokenizer the decoder's weights read (`decoder_tokenizer` without data: the causal_lm
    run's file, the checkpoint's, else `data.tokenizer`'s) and stand-in statistics."""
    if self.tokenizer is None and self.stage.decoder_init:
      self.tokenizer = Tokenizer.load(as_path(self.stage.decoder_init) / TOKENIZER_FILE)
    elif self.tokenizer is None and self.stage.decoder_checkpoint:
      self.tokenizer = self.checkpoint_tokenizer()
    super().prepare_abstract()

  def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """`_rows` for `batch_size` rows: tokens, valid [B, data.max_len], split [B], embedding [B, E]."""
    n, width = self.config.data.max_len, encoder_spec(self.stage.encoder, "dglm.encoder").width
    s = lambda *shape, dtype: jax.ShapeDtypeStruct((batch_size, *shape), dtype)
    return {
      "tokens": s(n, dtype=jnp.int32),
      "valid": s(n, dtype=jnp.bool_),
      "split": s(dtype=jnp.int32),
      "embedding": s(width, dtype=jnp.float32),
    }

  def _rows(self, docs: list[dict]) -> dict[str, np.ndarray]:
    """Decoder rows [<bos> prefix continuation <eos>] padded to data.max_len ("tokens", "valid";
    a long continuation is cut, the prefix keeps at most max_len - 3 ids), "split" (the index of
    the first continuation token) and the continuation's unit "embedding"."""
    tok, n = self.tokenizer, self.config.data.max_len
    tokens = np.full((len(docs), n), tok.pad_id, np.int32)
    lengths, split = np.zeros(len(docs), np.int32), np.zeros(len(docs), np.int32)
    for i, d in enumerate(docs):
      p = tok.encode(d["source"])[: n - 3]
      row = [tok.bos_id, *p, *tok.encode(d["text"])[: n - 2 - len(p)], tok.eos_id]
      tokens[i, : len(row)], lengths[i], split[i] = row, len(row), 1 + len(p)
    return {
      "tokens": tokens,
      "valid": np.arange(n)[None, :] < lengths[:, None],
      "split": split,
      "embedding": self.embeddings([d["text"] for d in docs]),
    }

  def make_data(self, workdir, *, process_index: int, process_count: int):
    """ArrayData of decoder rows with the continuation embeddings (encoded once)."""
    cfg = self.config.data
    train_docs, eval_docs = self.split_docs()
    self.tokenizer = self.decoder_tokenizer(workdir, train_docs)
    self.setup_stats(workdir, train_docs, process_index)
    self.eval_docs = eval_docs
    local = train_docs[process_index::process_count]  # encoded here, then joined
    return ArrayData(
      tokenizer=self.tokenizer,
      train=gather_rows(self._rows(local), process_index, process_count),
      eval=self._rows(eval_docs) if eval_docs else {},
      batch_size=cfg.batch_size,
      seed=self.config.seed,
      process_index=process_index,
      process_count=process_count,
    )

  def initial_params(self, params):
    """The random init, with every decoder weight from the `dglm.decoder_init` LM or the
    `dglm.decoder_checkpoint` checkpoint if set."""
    path = self.stage.decoder_init
    if self.stage.decoder_checkpoint:
      return self._checkpoint_params(params)
    if not path:
      return params
    run = self.decoder_init_run()
    kw = dict(field="dglm.decoder_init", path=path, names=("LM", "DGLM decoder"))
    stages.check_fields_match(
      source=run.task.model_config(),
      target=self.model_config(),
      what="its model is not the decoder's",
      hint="train the LM with this run's model fields",
      ignore=("dropout", "dtype", "remat"),
      **kw,
    )
    out, _ = stages.copy_params(params, run.params, into=("decoder",), complete=True, **kw)
    if jax.process_index() == 0:
      print(f"lsd: DGLM decoder initialised from {path} (step {run.step})", flush=True)
    return out

  def _checkpoint_params(self, params):
    path = self.stage.decoder_checkpoint
    try:
      lm = causal_decoder.import_decoder(path, self.tokenizer)
    except (OSError, ValueError) as e:
      raise ConfigError(f"dglm.decoder_checkpoint={path!r}: {e}") from e
    kw = dict(field="dglm.decoder_checkpoint", path=path, names=("checkpoint", "DGLM decoder"))
    out, _ = stages.copy_params(
      params, nnx.state(lm, nnx.Param), into=("decoder",), complete=True, **kw
    )
    if jax.process_index() == 0:
      print(f"lsd: DGLM decoder imported from {path}", flush=True)
    return out

  def loss(self, model: SoftPromptDecoder, batch: Batch, key: jax.Array):
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    z0 = emb.standardize(self.stats, batch["embedding"])
    t = jax.random.uniform(k_t, (z0.shape[0],))
    z, _ = q_sample(k_noise, z0, t, COSINE)
    rngs = nnx.Rngs(dropout=k_drop) if model.decoder.cfg.dropout else None
    logits, is_prompt, index = model(
      batch["tokens"], batch["split"], z, COSINE.alpha_bar(t), rngs=rngs
    )
    loss, count = soft_prompt_lm_loss(logits, is_prompt, index, batch["tokens"], batch["valid"])
    return loss, {"ppl": jnp.exp(loss), "loss_weight": count}

  def classifier(self, path: str):
    """(LinearClassifier, class names) of a classifier file, loaded once."""
    if path not in self._classifiers:
      if not as_path(path).is_file():
        raise ConfigError(f"dglm.classifiers: {path!r} is not a file (save one: save_classifier)")
      self._classifiers[path] = load_classifier(path)
    return self._classifiers[path]

  def attribute_terms(self, attributes=None) -> list[tuple]:
    """Guidance terms [(log p(target | embedding), scale)]: one per `attributes` entry
    ("NAME=TARGET:SCALE" or (name, target, scale)), NAME a classifier of `dglm.classifiers`; None
    = every configured classifier with its own target and scale. Scale 0 drops a term."""
    specs = classifier_specs(self.stage.classifiers)
    if attributes is None:
      chosen = [(c.name, c.target, c.scale) for c in specs.values()]
    else:
      chosen = [parse_attribute(a, "attribute") if isinstance(a, str) else a for a in attributes]
    terms = []
    for name, target, scale in chosen:
      if name not in specs:
        raise ConfigError(
          f"attribute {name!r}: dglm.classifiers has no classifier of that name; accepted: "
          f"{sorted(specs)}"
        )
      clf, classes = self.classifier(specs[name].path)
      t = str(target)
      index = classes.index(t) if t in classes else int(t) if t.isdigit() else -1
      if not 0 <= index < len(classes):
        raise ConfigError(
          f"attribute {name}={target!r}: accepted targets are {classes} or an index in "
          f"[0, {len(classes)})"
        )
      if scale:
        terms.append((clf.log_prob(index), float(scale)))
    return terms

  def propose(self, key: jax.Array, prefixes: list[str], attributes=None) -> jax.Array:
    """Unit-norm proposals [N, E] for `prefixes` from the diffusion run, guided by
    `attribute_terms(attributes)` when there are any."""
    run = self.diffusion_run()
    path = f"dglm.diffusion_workdir={self.stage.diffusion_workdir!r}"
    check_same_stats(self.stats, run.task.stats, "this decoder run", path)
    terms = self.attribute_terms(attributes)
    guide = attribute_guide(run.task.stats, terms) if terms else None
    return run.task.propose(run.model(), key, prefixes, guide=guide)

  def continue_texts(
    self, model, key: jax.Array, prefixes: list[str], proposals, **options
  ) -> list[dict]:
    """Continuations of `prefixes` under unit-norm `proposals` [N, E]: each is standardised with
    the run's statistics, re-noised to sample.renoise_alpha_bar with a draw of its own and read by
    the generator; the decoder continues [<bos> prefix][soft prompts]
    (`lsd.sampling.soft_prompt.continue_from_proposal`). Prefixes are batched by token length
    (one decoding call per length, no padding); row i's re-noising draw is `fold_in(key, i)`'s,
    so it does not depend on the other prefixes (nucleus draws are per length batch). Options
    max_new_tokens, top_p, temperature (None = `config.sample`). Records {"text", "tokens",
    "nfe"}, cut at eos."""
    s, tok = self.sampling, self.tokenizer
    kw = {k: getattr(s, k) if options.get(k) is None else options[k] for k in _DECODING}
    z = emb.standardize(self.stats, proposals)
    k_noise, k_dec = jax.random.split(key)
    draw = lambda i: jax.random.normal(jax.random.fold_in(k_noise, i), z.shape[1:])
    eps = jax.vmap(draw)(jnp.arange(z.shape[0]))
    rows = [[tok.bos_id, *tok.encode(p)] for p in prefixes]
    limit, extra = model.decoder.cfg.learned_pos, model.generator.cfg.num_prompts
    extra += kw["max_new_tokens"]
    longest = max(map(len, rows), default=0)
    if limit and longest + extra > limit:
      raise ConfigError(
        f"a prompt of {longest} tokens (with <bos>), the soft prompts and max_new_tokens="
        f"{kw['max_new_tokens']} need {longest + extra} positions; the decoder has {limit}"
      )
    graphdef, params = nnx.split(model)
    out = [None] * len(rows)
    for length in sorted({len(r) for r in rows}):
      idx = [i for i, r in enumerate(rows) if len(r) == length]
      tokens = continue_from_proposal(
        graphdef,
        params,
        jax.random.fold_in(k_dec, length),
        jnp.asarray([rows[i] for i in idx], jnp.int32),
        z[jnp.asarray(idx)],
        eps=eps[jnp.asarray(idx)],
        alpha_bar=float(s.renoise_alpha_bar),
        **kw,
      )
      for i, row in zip(idx, jax.device_get(tokens).tolist(), strict=True):
        row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
        out[i] = {"text": tok.decode(row), "tokens": row, "nfe": len(row)}
    return out

  def generate(self, model, key: jax.Array, inputs: list[dict], **options) -> list[dict]:
    """Each input's "prompt" (a prefix; absent = "") -> "text", its continuation: the diffusion
    run proposes an embedding for every prefix in one sampler call (guided by `attribute_terms`
    of the `attributes` option, None = dglm.classifiers as configured), then `continue_texts`.
    Options attributes, max_new_tokens, top_p, temperature; "nfe" counts denoiser passes and
    decoding steps."""
    inputs = self.generation_inputs(inputs, ("prompt",))
    known = ("attributes", *_DECODING)
    unknown = sorted(k for k, v in options.items() if k not in known and v is not None)
    if unknown:
      raise ConfigError(
        f"generate: options {unknown} are not read by dglm_decoder; accepted: {known}"
      )
    prefixes = [x.get("prompt", "") for x in inputs]
    if not all(isinstance(p, str) for p in prefixes):
      raise ConfigError("generate: every 'prompt' must be a text")
    k_prop, k_dec = jax.random.split(key)
    proposals = self.propose(k_prop, prefixes, options.get("attributes"))
    outs = self.continue_texts(model, k_dec, prefixes, proposals, **options)
    nfe = self.diffusion_run().task.nfe()
    return [{**x, **o, "nfe": o["nfe"] + nfe} for x, o in zip(inputs, outs, strict=True)]

  def sample_text(self, model, key: jax.Array, num_samples: int) -> list[dict]:
    """Continuations of the first held-out prefixes, from the diffusion run's proposals when
    `dglm.diffusion_workdir` is set, else from the true continuation's embedding (how well the
    decoder reads one); "proposal" says which."""
    docs = getattr(self, "eval_docs", None)
    docs = (self.split_docs()[1] if docs is None else docs)[:num_samples]
    if not docs:
      return []
    prefixes, (k_prop, k_dec) = [d["source"] for d in docs], jax.random.split(key)
    if self.stage.diffusion_workdir:
      proposals, kind = self.propose(k_prop, prefixes), "diffusion"
    else:
      proposals, kind = self.embeddings([d["text"] for d in docs]), "reference"
    outs = self.continue_texts(model, k_dec, prefixes, proposals)
    return [
      {"prompt": d["source"], "reference": d["text"], "proposal": kind, **o}
      for d, o in zip(docs, outs, strict=True)
    ]


_DECODING = ("max_new_tokens", "top_p", "temperature")
