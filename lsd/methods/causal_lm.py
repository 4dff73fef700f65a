"""Autoregressive (causal) language model: the baseline for every method and the DGLM decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lsd.config import ConfigError, check_positive, check_range
from lsd.nn import Transformer, TransformerConfig, causal_mask
from lsd.sampling.autoregressive import generate
from lsd.train.task import Batch, Task


def transformer_flops_per_token(cfg: TransformerConfig, seq_len: int, n_params: int) -> float:
  """Training FLOPs per token: 6 * (non-embedding params) + 6 * layers * seq_len * d_attn (the
  attention scores and weighted sum, forward 2x, backward 4x; Kaplan et al. convention)."""
  embed = cfg.vocab_size * cfg.d_model
  d_attn = cfg.n_heads * cfg.dim_per_head
  matmul_params = n_params - embed + (embed if cfg.tie_embeddings else 0)  # the head is a matmul
  return 6.0 * matmul_params + 6.0 * cfg.n_layers * seq_len * d_attn


class CausalLMTask(Task):
  name = "causal_lm"

  def validate(self) -> None:
    # The vocabulary comes from the tokenizer; any size checks the other model fields.
    TransformerConfig.from_config(self.config.model, vocab_size=8)
    # The end-of-training samples: a bad sample field must not surface only after the whole run.
    s = self.config.sample
    check_range("sample.top_p", s.top_p, 0.0, 1.0)  # 0 = greedy
    check_positive("sample.temperature", s.temperature)
    n = s.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ConfigError(f"sample.max_new_tokens={n!r} must be an int >= 1")

  def model_config(self) -> TransformerConfig:
    return TransformerConfig.from_config(self.config.model, vocab_size=self.tokenizer.vocab_size)

  def build_model(self, rngs: nnx.Rngs) -> Transformer:
    return Transformer(self.model_config(), rngs=rngs)

  def loss(self, model: Transformer, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
    tokens, valid = batch["tokens"], batch["valid"]
    rngs = nnx.Rngs(dropout=key) if model.cfg.dropout else None
    logits, _ = model(tokens[:, :-1], mask=causal_mask(tokens.shape[1] - 1), rngs=rngs)
    targets, weights = tokens[:, 1:], (valid[:, 1:] & valid[:, :-1]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    # The mean's weight: train.grad_accum combines microbatches by it (the whole batch's gradient).
    return loss, {"ppl": jnp.exp(loss), "loss_weight": jnp.sum(weights)}

  def likelihood(self, *, num_samples: int = 1, block_size: int | None = None):
    """Exact held-out NLL (`lsd.eval.likelihood.causal_nll_sums`); num_samples is not used (the
    likelihood is exact) and block_size is refused."""
    from lsd.eval.likelihood import causal_nll_sums

    if block_size is not None:
      raise ConfigError(
        f"--block_size {block_size!r} applies to masked / block diffusion (sbd) runs; this "
        "causal_lm run's likelihood is exact: leave --block_size out"
      )
    return causal_nll_sums, {"estimate": "exact nll"}

  def flops_per_token(self) -> float:
    cfg = self.model_config()
    model = nnx.eval_shape(lambda: self.build_model(nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    return transformer_flops_per_token(cfg, self.config.data.seq_len, n)

  def lower_sampler(self, graphdef, params, key, num_samples: int):
    """`generate` (KV-cached decoding of sample.max_new_tokens from <bos>), lowered."""
    scfg = self.config.sample
    prompt = jax.ShapeDtypeStruct((num_samples, 1), jnp.int32)
    kw = dict(max_new_tokens=scfg.max_new_tokens, top_p=scfg.top_p, temperature=scfg.temperature)
    return generate.lower(graphdef, params, key, prompt, **kw)

  def sample_text(self, model: Transformer, key: jax.Array, num_samples: int) -> list[dict]:
    scfg = self.config.sample
    graphdef, params = nnx.split(model)
    prompt = jnp.full((num_samples, 1), self.tokenizer.bos_id, jnp.int32)
    tokens = generate(
      graphdef,
      params,
      key,
      prompt,
      max_new_tokens=scfg.max_new_tokens,
      top_p=scfg.top_p,
      temperature=scfg.temperature,
    )
    out = []
    for row in jax.device_get(tokens).tolist():
      if self.tokenizer.eos_id in row:
        row = row[: row.index(self.tokenizer.eos_id)]
      out.append({"text": self.tokenizer.decode(row), "tokens": row, "nfe": len(row)})
    return out

  def generate(self, model: Transformer, key: jax.Array, inputs: list[dict], **options):
    """Prompt continuation: each input's "prompt" (absent or "": from <bos> alone) after <bos>,
    continued with the run's sample settings (options max_new_tokens, top_p, temperature override
    them); "text" is the continuation, cut at eos. Prompts of one token length share a call."""
    inputs = self.generation_inputs(inputs, ("prompt",))
    known = ("max_new_tokens", "top_p", "temperature")
    unknown = sorted(set(options) - set(known))
    if unknown:
      raise ConfigError(f"generate: options {unknown} are not read by causal_lm; accepted: {known}")
    kw = {k: self.config.sample[k] if options.get(k) is None else options[k] for k in known}
    tok, (graphdef, params) = self.tokenizer, nnx.split(model)
    prompts = [[tok.bos_id, *tok.encode(x.get("prompt", ""))] for x in inputs]
    out = [None] * len(inputs)
    for length in sorted({len(p) for p in prompts}):
      rows = [i for i, p in enumerate(prompts) if len(p) == length]
      batch = jnp.asarray([prompts[i] for i in rows], jnp.int32)
      tokens = generate(graphdef, params, jax.random.fold_in(key, length), batch, **kw)
      for i, row in zip(rows, jax.device_get(tokens).tolist(), strict=True):
        row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
        out[i] = {**inputs[i], "text": tok.decode(row), "tokens": row, "nfe": len(row)}
    return out


def default_sample_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"max_new_tokens": 64, "top_p": 0.95, "temperature": 1.0})
