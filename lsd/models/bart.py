"""BART encoder-decoder (imported checkpoints): post-norm blocks, learned positions, tied LM head.

Both stacks embed with the shared token table (times sqrt(E) if `scale_embedding`), add learned
positions stored with BART's offset of 2 (row p + 2 holds position p), and normalise the sum; the
decoder adds cross-attention to the encoder output; logits = hidden @ shared^T + final_logits_bias.
Shapes: B batch, S source tokens, T target tokens, E width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.models.bert import PostNormBlock, activation_from_hf, activation_to_hf, key_padding_mask
from lsd.nn.layers import Embed, LayerNorm
from lsd.nn.masks import causal_mask
from lsd.nn.transformer import DTYPES

POS_OFFSET = 2  # BART's learned position tables have two extra leading rows


@dataclasses.dataclass(frozen=True)
class BartConfig:
  vocab_size: int = 50265
  d_model: int = 768
  encoder_layers: int = 6
  decoder_layers: int = 6
  encoder_heads: int = 12
  decoder_heads: int = 12
  encoder_ff: int = 3072
  decoder_ff: int = 3072
  max_positions: int = 1024
  activation: str = "gelu"
  scale_embedding: bool = False
  norm_eps: float = 1e-5
  pad_id: int = 1
  bos_id: int = 0
  eos_id: int = 2
  decoder_start_id: int = 2
  dtype: str = "float32"  # compute dtype; params stay fp32

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> BartConfig:
    """From a transformers `BartConfig` dict (config.json); mBART-style variants are refused."""
    if hf.get("model_type", "bart") != "bart":
      raise ValueError(f"bart config: model_type={hf.get('model_type')!r}; accepted: ['bart']")
    return cls(
      vocab_size=hf["vocab_size"],
      d_model=hf["d_model"],
      encoder_layers=hf["encoder_layers"],
      decoder_layers=hf["decoder_layers"],
      encoder_heads=hf["encoder_attention_heads"],
      decoder_heads=hf["decoder_attention_heads"],
      encoder_ff=hf["encoder_ffn_dim"],
      decoder_ff=hf["decoder_ffn_dim"],
      max_positions=hf["max_position_embeddings"],
      activation=activation_from_hf(hf.get("activation_function", "gelu"), "bart"),
      scale_embedding=hf.get("scale_embedding", False),
      pad_id=hf.get("pad_token_id", 1),
      bos_id=hf.get("bos_token_id", 0),
      eos_id=hf.get("eos_token_id", 2),
      decoder_start_id=hf.get("decoder_start_token_id", 2),
    )

  def to_hf(self) -> dict[str, Any]:
    return {
      "architectures": ["BartForConditionalGeneration"],
      "model_type": "bart",
      "vocab_size": self.vocab_size,
      "d_model": self.d_model,
      "encoder_layers": self.encoder_layers,
      "decoder_layers": self.decoder_layers,
      "encoder_attention_heads": self.encoder_heads,
      "decoder_attention_heads": self.decoder_heads,
      "encoder_ffn_dim": self.encoder_ff,
      "decoder_ffn_dim": self.decoder_ff,
      "max_position_embeddings": self.max_positions,
      "activation_function": activation_to_hf(self.activation),
      "scale_embedding": self.scale_embedding,
      "pad_token_id": self.pad_id,
      "bos_token_id": self.bos_id,
      "eos_token_id": self.eos_id,
      "decoder_start_token_id": self.decoder_start_id,
      "tie_word_embeddings": True,
      "is_encoder_decoder": True,
    }


class _Stack(nnx.Module):
  """One side of BART: learned positions, embedding LayerNorm, post-norm blocks."""

  def __init__(
    self, cfg: BartConfig, n_layers: int, n_heads: int, d_ff: int, *, cross: bool, rngs: nnx.Rngs
  ):
    self.pos_embed = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (cfg.max_positions + POS_OFFSET, cfg.d_model)),
      sharding=(None, "embed"),
    )
    self.embed_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.blocks = nnx.List(
      [
        PostNormBlock(
          cfg.d_model,
          n_heads,
          d_ff,
          cfg.activation,
          eps=cfg.norm_eps,
          cross_attention=cross,
          dtype=DTYPES[cfg.dtype],
          rngs=rngs,
        )
        for _ in range(n_layers)
      ]
    )

  def __call__(self, x: Float[Array, "B T E"], *, mask, context=None, context_mask=None) -> Array:
    t = x.shape[1]
    x = self.embed_norm(x + self.pos_embed[POS_OFFSET : POS_OFFSET + t].astype(x.dtype))
    for block in self.blocks:
      x = block(x, mask=mask, context=context, context_mask=context_mask)
    return x


class Bart(nnx.Module):
  """BART for conditional generation: source ids + target ids -> target next-token logits."""

  def __init__(self, cfg: BartConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
    self.shared = Embed(cfg.vocab_size, cfg.d_model, dtype=DTYPES[cfg.dtype], rngs=rngs)
    self.encoder = _Stack(
      cfg, cfg.encoder_layers, cfg.encoder_heads, cfg.encoder_ff, cross=False, rngs=rngs
    )
    self.decoder = _Stack(
      cfg, cfg.decoder_layers, cfg.decoder_heads, cfg.decoder_ff, cross=True, rngs=rngs
    )
    self.final_logits_bias = nnx.Param(
      jnp.zeros((cfg.vocab_size,), jnp.float32), sharding=("vocab",)
    )

  def encode(
    self, tokens: Int[Array, "B S"], valid: Bool[Array, "B S"] | None = None
  ) -> Float[Array, "B S E"]:
    """Encoder hidden states (compute dtype); padded keys are hidden by `valid`."""
    x = self.shared(tokens) * self.embed_scale
    return self.encoder(x, mask=key_padding_mask(valid))

  def decode(
    self,
    tokens: Int[Array, "B T"],
    encoded: Float[Array, "B S E"],
    encoded_valid: Bool[Array, "B S"] | None = None,
    valid: Bool[Array, "B T"] | None = None,
  ) -> Float[Array, "B T V"]:
    """Causal decoder over target ids (right padding), cross-attending to `encoded`; fp32 logits."""
    mask = causal_mask(tokens.shape[1])[None, None]
    if valid is not None:
      mask = mask & key_padding_mask(valid)
    x = self.shared(tokens) * self.embed_scale
    x = self.decoder(x, mask=mask, context=encoded, context_mask=key_padding_mask(encoded_valid))
    logits = self.shared.attend(x).astype(jnp.float32)
    return logits + self.final_logits_bias[...]

  def __call__(
    self,
    tokens: Int[Array, "B S"],
    decoder_tokens: Int[Array, "B T"],
    valid: Bool[Array, "B S"] | None = None,
    decoder_valid: Bool[Array, "B T"] | None = None,
  ) -> Float[Array, "B T V"]:
    return self.decode(decoder_tokens, self.encode(tokens, valid), valid, decoder_valid)
