"""DGLM's soft-prompt generator and the causal-LM decoder it steers.

  embedding [B, E] (noisy, standardised) --Linear(E -> P W)--> P tokens of W + learned positions
  --> N pre-norm bidirectional blocks, AdaLN-zero on the noise level alpha_bar
  --> norm --> Linear(W -> d_decoder) = P soft-prompt vectors in the decoder's input space

`splice` places the P vectors between a prefix and its continuation in the decoder's input
embeddings ([prefix tokens] [P soft prompts] [continuation tokens]); `SoftPromptDecoder` holds the
generator and a causal `Transformer` (`lsd.nn`) and returns the logits of the spliced sequence.
Shapes: B batch, E embedding width, P prompts, W generator width, T tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.config import ConfigError, check_positive, dataclass_from_config
from lsd.nn import Block, TimestepEmbedding, Transformer, TransformerConfig, dense, make_norm
from lsd.nn.masks import causal_mask


@dataclasses.dataclass(frozen=True)
class SoftPromptConfig:
  d_embedding: int = 384  # the sentence embedding's width (all-MiniLM-L6-v2: 384)
  num_prompts: int = 8  # P soft-prompt vectors
  d_model: int = 384  # W, the generator's width
  n_layers: int = 2
  n_heads: int = 6
  d_ff: int = 0
  mlp: str = "swiglu"
  norm: str = "rms"
  dtype: str = "float32"

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, **overrides) -> SoftPromptConfig:
    return dataclass_from_config(cls, cfg, **overrides)

  def validate(self, prefix: str = "soft_prompt") -> None:
    for name in ("d_embedding", "num_prompts"):
      check_positive(f"{prefix}.{name}", getattr(self, name))
    self.block_config().validate(prefix)

  def block_config(self) -> TransformerConfig:
    return TransformerConfig(
      vocab_size=1,
      d_model=self.d_model,
      n_layers=self.n_layers,
      n_heads=self.n_heads,
      d_ff=self.d_ff,
      mlp=self.mlp,
      norm=self.norm,
      rope_base=0.0,
      cond_dim=self.d_model,
      dtype=self.dtype,
    )


class SoftPromptGenerator(nnx.Module):
  """(embedding [B, E], alpha_bar [B]) -> soft prompts [B, P, d_out] (fp32)."""

  def __init__(self, cfg: SoftPromptConfig, d_out: int, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    bc = cfg.block_config()
    p, w, dt = cfg.num_prompts, cfg.d_model, bc.compute_dtype
    self.proj_in = dense(
      cfg.d_embedding, p * w, ("latent", "mlp"), use_bias=True, dtype=dt, rngs=rngs
    )
    self.pos = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (p, w)), sharding=(None, "embed")
    )
    self.time = TimestepEmbedding(w, freq_dim=w, scale=1000.0, rngs=rngs)
    self.blocks = nnx.List([Block(bc, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = make_norm(cfg.norm, w, rngs=rngs)
    self.proj_out = dense(w, d_out, ("embed", "embed"), use_bias=True, dtype=dt, rngs=rngs)

  def __call__(
    self, embedding: Float[Array, "B E"], alpha_bar: Float[Array, " B"]
  ) -> Float[Array, "B P O"]:
    c = self.cfg
    b = embedding.shape[0]
    if embedding.shape != (b, c.d_embedding):
      raise ValueError(f"embedding has shape {embedding.shape}; expected [B, {c.d_embedding}]")
    h = self.proj_in(jnp.asarray(embedding, jnp.float32)).reshape(b, c.num_prompts, c.d_model)
    h = h + self.pos[...].astype(h.dtype)
    cond = self.time(jnp.asarray(alpha_bar, jnp.float32))
    for block in self.blocks:
      h, _ = block(h, positions=None, mask=None, cond=cond)
    return self.proj_out(self.final_norm(h)).astype(jnp.float32)


def splice(
  token_embeds: Float[Array, "B T D"], prompts: Float[Array, "B P D"], split: Int[Array, " B"]
) -> tuple[Float[Array, "B T+P D"], Bool[Array, "B T+P"], Int[Array, "B T+P"]]:
  """[prefix tokens][prompts][continuation tokens] per row: tokens [0, split) come first, then the
  P prompts, then tokens [split, T). Returns (inputs, is_prompt, token_index) where token_index is
  each position's index into the T tokens (clipped, meaningless where is_prompt)."""
  b, t, _ = token_embeds.shape
  p = prompts.shape[1]
  i = jnp.arange(t + p)[None, :]
  s = jnp.asarray(split, jnp.int32)[:, None]
  is_prompt = (i >= s) & (i < s + p)
  token_index = jnp.clip(jnp.where(i < s, i, i - p), 0, t - 1)
  prompt_index = jnp.clip(i - s, 0, p - 1)
  tok = jnp.take_along_axis(token_embeds, token_index[..., None], axis=1)
  pro = jnp.take_along_axis(prompts.astype(tok.dtype), prompt_index[..., None], axis=1)
  return (
    jnp.where(is_prompt[..., None], pro, tok),
    is_prompt,
    jnp.broadcast_to(token_index, (b, t + p)),
  )


class SoftPromptDecoder(nnx.Module):
  """A causal-LM `Transformer` (`decoder`) read through the soft prompts of a `generator`."""

  def __init__(self, cfg: SoftPromptConfig, decoder_cfg: TransformerConfig, *, rngs: nnx.Rngs):
    if decoder_cfg.cond_dim or decoder_cfg.cross_attention:
      raise ConfigError("the DGLM decoder is a plain causal LM (no cond_dim / cross-attention)")
    self.generator = SoftPromptGenerator(cfg, decoder_cfg.d_model, rngs=rngs)
    self.decoder = Transformer(decoder_cfg, rngs=rngs)

  def __call__(
    self,
    tokens: Int[Array, "B T"],
    split: Int[Array, " B"],
    embedding: Float[Array, "B E"],
    alpha_bar: Float[Array, " B"],
    *,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[Float[Array, "B T+P V"], Bool[Array, "B T+P"], Int[Array, "B T+P"]]:
    """Logits over the spliced sequence (causal), with `splice`'s is_prompt and token_index."""
    prompts = self.generator(embedding, alpha_bar)
    inputs, is_prompt, index = splice(self.decoder.embed_tokens(tokens), prompts, split)
    n = inputs.shape[1]
    logits, _ = self.decoder(inputs_embeds=inputs, mask=causal_mask(n), rngs=rngs)
    return logits, is_prompt, index


def soft_prompt_lm_loss(
  logits: Float[Array, "B N V"],
  is_prompt: Bool[Array, "B N"],
  token_index: Int[Array, "B N"],
  tokens: Int[Array, "B T"],
  valid: Bool[Array, "B T"],
) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """Mean next-token cross-entropy over the spliced sequence: every position whose next position
  holds a valid token (prefix and continuation alike; prompt slots are never targets). Returns
  (loss, the number of targets)."""
  tgt_index = token_index[:, 1:]
  targets = jnp.take_along_axis(tokens, tgt_index, axis=1)
  weights = (~is_prompt[:, 1:]) & jnp.take_along_axis(valid, tgt_index, axis=1)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  count = jnp.sum(w)
  return jnp.sum(nll * w) / jnp.maximum(count, 1.0), count
