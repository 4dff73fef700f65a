"""NNX building blocks with logical axis names; no method-specific logic lives here."""

from lsd.nn.attention import (
  Attention,
  KVCache,
  LayerCache,
  apply_rope,
  block_diffusion_attention,
  dot_product_attention,
)
from lsd.nn.layers import (
  MLP,
  AdaLN,
  Embed,
  LayerNorm,
  RMSNorm,
  TimestepEmbedding,
  dense,
  make_norm,
  modulate,
  sinusoidal_embedding,
)
from lsd.nn.masks import (
  BlockDiffusionMask,
  bd3_training_mask,
  bidirectional_mask,
  block_causal_mask,
  causal_mask,
  padding_mask,
  segment_mask,
)
from lsd.nn.transformer import DTYPES, Block, Transformer, TransformerConfig

__all__ = [
  "DTYPES",
  "MLP",
  "AdaLN",
  "Attention",
  "Block",
  "BlockDiffusionMask",
  "Embed",
  "KVCache",
  "LayerCache",
  "LayerNorm",
  "RMSNorm",
  "TimestepEmbedding",
  "Transformer",
  "TransformerConfig",
  "apply_rope",
  "bd3_training_mask",
  "bidirectional_mask",
  "block_diffusion_attention",
  "block_causal_mask",
  "causal_mask",
  "dense",
  "dot_product_attention",
  "make_norm",
  "modulate",
  "padding_mask",
  "segment_mask",
  "sinusoidal_embedding",
]
