"""GPT-2 causal LM (imported checkpoints) on the shared pre-norm `Transformer`.

GPT-2 is our decoder stack with LayerNorm (with bias), biased projections, a tanh-approximated GELU
MLP, learned absolute positions and no RoPE, so `GPT2Config.transformer_config()` is the whole
architecture. Shapes: B batch, T tokens, E width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.models.bert import activation_from_hf, activation_to_hf
from lsd.nn.masks import causal_mask
from lsd.nn.transformer import Transformer, TransformerConfig


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  d_ff: int = 0  # 0 = 4 * d_model
  activation: str = "gelu_tanh"
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  bos_id: int | None = None
  eos_id: int | None = None
  dtype: str = "float32"  # compute dtype; params stay fp32

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
    """From a transformers `GPT2Config` dict (config.json); refuses variants we do not implement."""
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
      raise ValueError(
        "gpt2 config: only scale_attn_weights=true and scale_attn_by_inverse_layer_idx=false are "
        f"supported, got {hf.get('scale_attn_weights')} and "
        f"{hf.get('scale_attn_by_inverse_layer_idx')}"
      )
    return cls(
      vocab_size=hf["vocab_size"],
      n_positions=hf["n_positions"],
      d_model=hf["n_embd"],
      n_layers=hf["n_layer"],
      n_heads=hf["n_head"],
      d_ff=hf.get("n_inner") or 0,
      activation=activation_from_hf(hf.get("activation_function", "gelu_new"), "gpt2"),
      norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      tie_embeddings=hf.get("tie_word_embeddings", True),
      bos_id=hf.get("bos_token_id"),
      eos_id=hf.get("eos_token_id"),
    )

  def to_hf(self) -> dict[str, Any]:
    """The transformers `GPT2Config` dict that `from_hf` maps back to this config."""
    return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "vocab_size": self.vocab_size,
      "n_positions": self.n_positions,
      "n_embd": self.d_model,
      "n_layer": self.n_layers,
      "n_head": self.n_heads,
      "n_inner": self.d_ff or None,
      "activation_function": activation_to_hf(self.activation),
      "layer_norm_epsilon": self.norm_eps,
      "tie_word_embeddings": self.tie_embeddings,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "bos_token_id": self.bos_id,
      "eos_token_id": self.eos_id,
    }

  def transformer_config(self) -> TransformerConfig:
    cfg = TransformerConfig(
      vocab_size=self.vocab_size,
      d_model=self.d_model,
      n_layers=self.n_layers,
      n_heads=self.n_heads,
      d_ff=self.d_ff or 4 * self.d_model,
      mlp=self.activation,
      norm="layer",
      norm_eps=self.norm_eps,
      rope_base=0.0,
      learned_pos=self.n_positions,
      use_bias=True,
      tie_embeddings=self.tie_embeddings,
      dtype=self.dtype,
    )
    cfg.validate("gpt2")
    return cfg


class GPT2LM(nnx.Module):
  """GPT-2 language model: token ids -> next-token logits."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.transformer = Transformer(cfg.transformer_config(), rngs=rngs)

  def __call__(
    self, tokens: Int[Array, "B T"], valid: Bool[Array, "B T"] | None = None
  ) -> Float[Array, "B T V"]:
    """Logits (fp32) at every position. Padding must sit on the right (positions are 0..T-1);
    `valid` hides padded keys so real tokens never depend on what fills the padding."""
    mask = causal_mask(tokens.shape[1])[None, None]
    if valid is not None:
      mask = mask & valid[:, None, None, :]
    return self.transformer(tokens, mask=mask)[0].astype(jnp.float32)
