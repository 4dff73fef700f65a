"""Transformer stacks shared by every model: pre-norm blocks with optional cross-attention and AdaLN.

`Transformer` is the token-in / logits-out backbone (causal LM, masked diffusion LM, judge LM); the
attention pattern is the caller's `mask`, so the same weights serve causal, bidirectional, block-causal
and the 2L block-diffusion pattern. It also takes input embeddings in place of token ids
(`inputs_embeds`, e.g. soft prompts spliced between `embed_tokens` rows). `Block` is reused by latent
denoisers and encoders.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.config import ConfigError, check_choice, check_positive, dataclass_from_config
from lsd.nn.attention import Attention, KVCache, LayerCache
from lsd.nn.layers import LINEAR_NAME, MLP, AdaLN, Embed, dense, make_norm, modulate

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Which activations of a block the backward pass keeps (the rest it recomputes): "none" keeps all;
# "full" keeps only the block's inputs; "dots_saveable" keeps the matmul outputs that have no batch
# dimension in their contraction (the projections), recomputing attention scores and elementwise ops.
# The projections go through `lsd.nn.layers.linear`, whose custom VJP hides its dot from the dots
# policy, so they are kept by their checkpoint name.
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(LINEAR_NAME),
  ),
}


BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over (lsd.parallel's "batch" rule)


def constrain_batch(x: Array) -> Array:
  """Pins activations [B, ...] to the batch split over the ambient mesh's (data, fsdp) axes, every
  other dimension replicated. Under FSDP this keeps GSPMD from laying activations out like the
  weights (more temporaries, many collectives). A no-op without an ambient mesh (`jax.set_mesh`,
  entered by the trainer when `mesh.constrain_activations` is on) or when it lacks those axes."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names) if not mesh.empty else ()
  if not axes:
    return x
  spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


def _block_forward(block, x, positions, mask, cond, context, context_mask, rngs):
  return block(
    x,
    positions=positions,
    mask=mask,
    cond=cond,
    context=context,
    context_mask=context_mask,
    cache=None,
    rngs=rngs,
  )


_REMAT_FORWARD = {
  name: nnx.remat(_block_forward, policy=policy)
  for name, policy in REMAT_POLICIES.items()
  if policy is not None
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 0  # 0 = n_heads (plain multi-head attention)
  head_dim: int = 0  # 0 = d_model // n_heads
  d_ff: int = 0  # 0 = 4 * d_model (8/3 * d_model for gated MLPs, rounded to 64)
  mlp: str = "swiglu"
  norm: str = "rms"
  norm_eps: float = 1e-6
  rope_base: float = 10_000.0  # 0 = no RoPE
  learned_pos: int = 0  # > 0: learned absolute positions up to this length
  qk_norm: bool = False
  use_bias: bool = False
  tie_embeddings: bool = True
  dropout: float = 0.0
  cond_dim: int = 0  # > 0: AdaLN-zero conditioning on a [B, cond_dim] vector
  cross_attention: bool = False
  d_context: int = 0  # width of the cross-attention context (0 = d_model)
  dtype: str = "float32"  # compute dtype; params stay fp32
  remat: str = "none"  # one of REMAT_POLICIES: recompute block activations in the backward pass
  # Self/cross-attention kernel (jax.nn.dot_product_attention): "xla" on any backend, "cudnn" for
  # the fused kernel on NVIDIA GPUs (bf16/fp16 compute). The KV-cached sampling path is XLA.
  attention: str = "xla"
  # The embedding and output layers hold vocab_size rounded up to a multiple of this (128 on TPU:
  # lane-aligned matmuls); the extra rows are never looked up and their logits are dropped.
  vocab_multiple: int = 1

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, **overrides) -> TransformerConfig:
    return dataclass_from_config(cls, cfg, **overrides)

  def validate(self, prefix: str = "model") -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "vocab_multiple"):
      check_positive(f"{prefix}.{name}", getattr(self, name))
    # 0 = derived from the other fields (or off); a negative size reached the layer shapes.
    for name in ("n_kv_heads", "head_dim", "d_ff", "learned_pos", "cond_dim", "d_context"):
      check_positive(f"{prefix}.{name}", getattr(self, name), allow_zero=True)
    check_choice(f"{prefix}.mlp", self.mlp, ["swiglu", "geglu", "gelu", "gelu_tanh", "relu"])
    check_choice(f"{prefix}.norm", self.norm, ["rms", "layer"])
    check_choice(f"{prefix}.dtype", self.dtype, list(DTYPES))
    check_choice(f"{prefix}.remat", self.remat, list(REMAT_POLICIES))
    check_choice(f"{prefix}.attention", self.attention, ["xla", "cudnn"])
    if not self.head_dim and self.d_model % self.n_heads:
      raise ConfigError(
        f"{prefix}.d_model={self.d_model} must be divisible by {prefix}.n_heads={self.n_heads}"
      )
    if self.n_kv_heads and self.n_heads % self.n_kv_heads:
      raise ConfigError(
        f"{prefix}.n_heads={self.n_heads} must be a multiple of "
        f"{prefix}.n_kv_heads={self.n_kv_heads}"
      )
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"{prefix}.dropout={self.dropout} must be in [0, 1)")

  @property
  def padded_vocab(self) -> int:
    """The rows of the embedding and output layers: vocab_size rounded up to vocab_multiple."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def ff_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.mlp in ("swiglu", "geglu"):
      return 64 * -(-(8 * self.d_model // 3) // 64)
    return 4 * self.d_model

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]


class Block(nnx.Module):
  """Pre-norm block: self-attention, optional cross-attention, MLP; AdaLN-zero if cond_dim > 0."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    dt = cfg.compute_dtype
    self.cfg = cfg
    self.attn_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.attn = Attention(
      cfg.d_model,
      cfg.n_heads,
      cfg.kv_heads,
      cfg.dim_per_head,
      rope_base=cfg.rope_base,
      qk_norm=cfg.qk_norm,
      use_bias=cfg.use_bias,
      implementation=cfg.attention,
      dtype=dt,
      rngs=rngs,
    )
    if cfg.cross_attention:
      self.cross_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
      self.cross = Attention(
        cfg.d_model,
        cfg.n_heads,
        cfg.kv_heads,
        cfg.dim_per_head,
        qk_norm=cfg.qk_norm,
        use_bias=cfg.use_bias,
        d_context=cfg.d_context or cfg.d_model,
        implementation=cfg.attention,
        dtype=dt,
        rngs=rngs,
      )
    else:
      self.cross_norm = self.cross = None
    self.mlp_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.mlp = MLP(cfg.d_model, cfg.ff_dim, cfg.mlp, use_bias=cfg.use_bias, dtype=dt, rngs=rngs)
    self.ada = AdaLN(cfg.cond_dim, cfg.d_model, 6, rngs=rngs) if cfg.cond_dim else None
    self.dropout = nnx.Dropout(cfg.dropout) if cfg.dropout else None

  def _drop(self, x: Array, rngs: nnx.Rngs | None) -> Array:
    if self.dropout is None or rngs is None:
      return x
    return self.dropout(x, rngs=rngs)

  def __call__(
    self,
    x: Float[Array, "B T E"],
    *,
    positions: Int[Array, "B T"] | None,
    mask: Bool[Array, "#B #H T S"] | None,
    cond: Float[Array, "B C"] | None = None,
    context: Float[Array, "B S C"] | None = None,
    context_mask: Bool[Array, "#B #H T S"] | None = None,
    cache: LayerCache | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> tuple[Array, tuple[Array, Array] | None]:
    if self.ada is not None:
      sh1, sc1, g1, sh2, sc2, g2 = self.ada(cond)
    h = self.attn_norm(x)
    if self.ada is not None:
      h = modulate(h, sh1, sc1)
    h, cache = self.attn(h, positions=positions, mask=mask, cache=cache)
    x = x + self._drop(h * (1 + g1) if self.ada is not None else h, rngs)
    if self.cross is not None:
      h, _ = self.cross(self.cross_norm(x), context=context, mask=context_mask)
      x = x + self._drop(h, rngs)
    h = self.mlp_norm(x)
    if self.ada is not None:
      h = modulate(h, sh2, sc2)
    h = self.mlp(h)
    x = x + self._drop(h * (1 + g2) if self.ada is not None else h, rngs)
    return x, cache


class Transformer(nnx.Module):
  """Token ids (or input embeddings) -> logits over the vocabulary (or final hidden states with
  `return_hidden`)."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.embed = Embed(cfg.padded_vocab, cfg.d_model, dtype=cfg.compute_dtype, rngs=rngs)
    self.pos_embed = (
      nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.learned_pos, cfg.d_model)),
        sharding=(None, "embed"),
      )
      if cfg.learned_pos
      else None
    )
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.final_ada = AdaLN(cfg.cond_dim, cfg.d_model, 2, rngs=rngs) if cfg.cond_dim else None
    self.head = (
      None
      if cfg.tie_embeddings
      else dense(
        cfg.d_model, cfg.padded_vocab, ("embed", "vocab"), dtype=cfg.compute_dtype, rngs=rngs
      )
    )

  def init_cache(self, batch: int, size: int, dtype=jnp.float32) -> KVCache:
    c = self.cfg
    return KVCache.zeros(c.n_layers, batch, size, c.kv_heads, c.dim_per_head, dtype)

  def embed_tokens(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T E"]:
    """The input embeddings of token ids in the compute dtype: what `__call__(tokens)` feeds its
    first block (before learned positions), so `__call__(inputs_embeds=embed_tokens(tokens))` is
    the same computation. Callers splice other vectors (soft prompts) between such rows."""
    return self.embed(tokens)

  def __call__(
    self,
    tokens: Int[Array, "B T"] | None = None,
    *,
    inputs_embeds: Float[Array, "B T E"] | None = None,
    positions: Int[Array, "B T"] | None = None,
    mask: Bool[Array, "#B #H T S"] | None = None,
    cond: Float[Array, "B C"] | None = None,
    context: Float[Array, "B S C"] | None = None,
    context_mask: Bool[Array, "#B #H T S"] | None = None,
    cache: KVCache | None = None,
    rngs: nnx.Rngs | None = None,
    return_hidden: bool = False,
    num_outputs: int | None = None,
  ) -> tuple[Float[Array, "B T V"], KVCache | None]:
    """Exactly one of `tokens` and `inputs_embeds` is given. `inputs_embeds` [B, T, d_model] takes
    the place of the token embeddings (cast to the compute dtype; learned positions, if any, are
    added to it as to token embeddings), so it may hold `embed_tokens` rows and other vectors, e.g.
    a soft prompt between a prefix and its continuation.

    With `cache`, `positions` must be the absolute positions of the inputs (default: the cache's
    length onwards); the returned cache holds their keys/values and its length is advanced by T
    (callers that only peek discard it). A cache filled from embeddings is continued with tokens
    (or more embeddings) like any other.

    num_outputs: a static count; logits (or hidden states) are returned for the first `num_outputs`
    positions only, so the output head is not run where the caller would discard it (the x0 half of
    the 2L block-diffusion input)."""
    if (tokens is None) == (inputs_embeds is None):
      raise ValueError(
        "Transformer: pass exactly one of tokens [B, T] and inputs_embeds [B, T, E] "
        f"(got {'both' if tokens is not None else 'neither'})"
      )
    if inputs_embeds is None:
      x = self.embed(tokens)
    else:
      if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.cfg.d_model:
        raise ValueError(
          f"inputs_embeds has shape {inputs_embeds.shape}; expected [B, T, {self.cfg.d_model}] "
          "(d_model)"
        )
      x = inputs_embeds.astype(self.cfg.compute_dtype)
    b, t = x.shape[:2]
    if positions is None:
      offset = 0 if cache is None else cache.length
      positions = jnp.broadcast_to(jnp.arange(t) + offset, (b, t))
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
    new_layers = []
    remat = _REMAT_FORWARD.get(self.cfg.remat) if cache is None else None  # training passes only
    x = constrain_batch(x)
    for i, block in enumerate(self.blocks):
      if remat is not None:
        x, _ = remat(block, x, positions, mask, cond, context, context_mask, rngs)
        x = constrain_batch(x)
        continue
      x, new_kv = block(
        x,
        positions=positions,
        mask=mask,
        cond=cond,
        context=context,
        context_mask=context_mask,
        cache=None if cache is None else cache.layer(i),
        rngs=rngs,
      )
      x = constrain_batch(x)
      new_layers.append(new_kv)
    x = self.final_norm(x)
    if self.final_ada is not None:
      shift, scale = self.final_ada(cond)
      x = modulate(x, shift, scale)
    new_cache = None if cache is None else cache.append(new_layers)
    if num_outputs is not None:
      if not 0 < num_outputs <= t:
        raise ValueError(f"num_outputs={num_outputs} must be in [1, {t}] (the input length)")
      x = x[:, :num_outputs]
    if return_hidden:
      return x, new_cache
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    if self.cfg.padded_vocab != self.cfg.vocab_size:
      logits = logits[..., : self.cfg.vocab_size]  # the padding rows are no tokens
    return logits.astype(jnp.float32), new_cache
