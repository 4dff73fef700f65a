"""BERT encoder (imported checkpoints, e.g. the MiniLM sentence encoder) and the post-norm block.

BERT (and BART, which reuses `PostNormBlock`) normalise *after* each residual add, unlike the
pre-norm `lsd.nn.Block`, so the block is composed here from the `lsd.nn` primitives.
Shapes: B batch, T tokens, S context tokens, E width. `valid` is a bool [B, T] mask (True = real
token); padded keys are hidden from attention, padded rows hold values nobody should read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.nn.attention import Attention
from lsd.nn.layers import MLP, Embed, LayerNorm, dense
from lsd.nn.transformer import DTYPES

# transformers' `hidden_act` / `activation_function` names -> lsd MLP kinds (and back).
_FROM_HF = {
  "gelu": "gelu",
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "relu": "relu",
  "silu": "silu",
  "swish": "silu",
}
_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def activation_from_hf(name: str, arch: str) -> str:
  """Maps a transformers activation name to an lsd MLP kind; ValueError names what is accepted."""
  if name not in _FROM_HF:
    raise ValueError(
      f"{arch} config: activation {name!r} is not supported; accepted: {list(_FROM_HF)}"
    )
  return _FROM_HF[name]


def activation_to_hf(kind: str) -> str:
  return _TO_HF[kind]


def key_padding_mask(valid: Bool[Array, "B S"] | None) -> Bool[Array, "B 1 1 S"] | None:
  return None if valid is None else valid[:, None, None, :]


class PostNormBlock(nnx.Module):
  """x -> LN(x + SelfAttn(x)) [-> LN(x + CrossAttn(x, context))] -> LN(x + MLP(x)); all biased."""

  def __init__(
    self,
    d_model: int,
    n_heads: int,
    d_ff: int,
    activation: str,
    *,
    eps: float,
    cross_attention: bool = False,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.attn = Attention(d_model, n_heads, use_bias=True, dtype=dtype, rngs=rngs)
    self.attn_norm = LayerNorm(d_model, eps=eps, rngs=rngs)
    if cross_attention:
      self.cross = Attention(d_model, n_heads, use_bias=True, dtype=dtype, rngs=rngs)
      self.cross_norm = LayerNorm(d_model, eps=eps, rngs=rngs)
    else:
      self.cross = self.cross_norm = None
    self.mlp = MLP(d_model, d_ff, activation, use_bias=True, dtype=dtype, rngs=rngs)
    self.mlp_norm = LayerNorm(d_model, eps=eps, rngs=rngs)

  def __call__(
    self,
    x: Float[Array, "B T E"],
    *,
    mask: Bool[Array, "#B #H T T"] | None,
    context: Float[Array, "B S E"] | None = None,
    context_mask: Bool[Array, "#B #H T S"] | None = None,
  ) -> Float[Array, "B T E"]:
    x = self.attn_norm(x + self.attn(x, mask=mask)[0])
    if self.cross is not None:
      x = self.cross_norm(x + self.cross(x, context=context, mask=context_mask)[0])
    return self.mlp_norm(x + self.mlp(x))


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  d_ff: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  activation: str = "gelu"
  norm_eps: float = 1e-12
  pad_id: int = 0
  dtype: str = "float32"  # compute dtype; params stay fp32

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
    """From a transformers `BertConfig` dict (config.json); only absolute positions."""
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"bert config: position_embedding_type={pos!r}; accepted: ['absolute']")
    return cls(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      d_ff=hf["intermediate_size"],
      max_positions=hf["max_position_embeddings"],
      type_vocab_size=hf.get("type_vocab_size", 2),
      activation=activation_from_hf(hf.get("hidden_act", "gelu"), "bert"),
      norm_eps=hf.get("layer_norm_eps", 1e-12),
      pad_id=hf.get("pad_token_id") or 0,
    )

  def to_hf(self) -> dict[str, Any]:
    return {
      "architectures": ["BertModel"],
      "model_type": "bert",
      "vocab_size": self.vocab_size,
      "hidden_size": self.d_model,
      "num_hidden_layers": self.n_layers,
      "num_attention_heads": self.n_heads,
      "intermediate_size": self.d_ff,
      "max_position_embeddings": self.max_positions,
      "type_vocab_size": self.type_vocab_size,
      "hidden_act": activation_to_hf(self.activation),
      "layer_norm_eps": self.norm_eps,
      "pad_token_id": self.pad_id,
      "position_embedding_type": "absolute",
    }


class BertEncoder(nnx.Module):
  """BERT: token (+ segment) ids -> contextual hidden states; the pooler is kept for export."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = DTYPES[cfg.dtype]
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dt, rngs=rngs)
    normal = nnx.initializers.normal(0.02)
    self.pos_embed = nnx.Param(
      normal(rngs.params(), (cfg.max_positions, cfg.d_model)), sharding=(None, "embed")
    )
    self.type_embed = nnx.Param(
      normal(rngs.params(), (cfg.type_vocab_size, cfg.d_model)), sharding=(None, "embed")
    )
    self.embed_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.blocks = nnx.List(
      [
        PostNormBlock(
          cfg.d_model,
          cfg.n_heads,
          cfg.d_ff,
          cfg.activation,
          eps=cfg.norm_eps,
          dtype=dt,
          rngs=rngs,
        )
        for _ in range(cfg.n_layers)
      ]
    )
    # One logical name per dimension, so no mesh axis is used twice.
    self.pooler = dense(cfg.d_model, cfg.d_model, ("embed", None), use_bias=True, rngs=rngs)

  def __call__(
    self,
    tokens: Int[Array, "B T"],
    valid: Bool[Array, "B T"] | None = None,
    token_types: Int[Array, "B T"] | None = None,
  ) -> Float[Array, "B T E"]:
    """Last hidden states (fp32). Positions are 0..T-1; `token_types` defaults to segment 0."""
    t = tokens.shape[1]
    x = self.embed(tokens) + self.pos_embed[:t].astype(self.embed.dtype)
    types = self.type_embed[...]
    types = types[0] if token_types is None else jnp.take(types, token_types, axis=0)
    x = x + types.astype(x.dtype)
    x = self.embed_norm(x)
    mask = key_padding_mask(valid)
    for block in self.blocks:
      x = block(x, mask=mask)
    return x.astype(jnp.float32)

  def pool(self, hidden: Float[Array, "B T E"]) -> Float[Array, "B E"]:
    """BERT's pooler: tanh(dense(hidden state of the first token))."""
    return jnp.tanh(self.pooler(hidden[:, 0]))

  def mean_pooled_embeddings(
    self, tokens: Int[Array, "B T"], valid: Bool[Array, "B T"], normalize: bool = True
  ) -> Float[Array, "B E"]:
    """Sentence embeddings, the sentence-transformers recipe: the mean of the last hidden states
    over valid tokens, then (if `normalize`) L2-normalised; fp32."""
    h = self(tokens, valid)
    w = valid.astype(jnp.float32)[..., None]
    emb = jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9)
    if normalize:
      emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb
