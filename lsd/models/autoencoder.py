"""LD4LG's text autoencoder: text -> l x d latents on the sqrt(d) sphere -> text.

  tokens [B, T] --encoder--> hidden [B, T, H] --Perceiver compressor--> latents [B, l, d]
  latents --reconstruction network--> memory [B, l, E] --causal decoder (cross-attends)--> logits

The encoder is either a small bidirectional `Transformer` trained with the rest (`encoder="scratch"`)
or a frozen encoder whose hidden states the caller computes and passes to `encode_hidden`: a named
pretrained one (`encoder=<name>` of the registry `lsd.convert.encoder_specs`, e.g. "minilm": the
method runs it) or any other (`encoder="external"`), so this module never depends on where those
states come from.

Shapes: B batch, T tokens, H encoder width, l latents, d latent width, E decoder width, V vocab.
`valid` is bool [B, T] (True = real token). Latents are fp32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.config import ConfigError, check_choice, check_positive, dataclass_from_config
from lsd.nn import (
  DTYPES,
  MLP,
  Block,
  LayerNorm,
  RMSNorm,
  Transformer,
  TransformerConfig,
  causal_mask,
  dense,
  dot_product_attention,
  make_norm,
)
from lsd.nn.layers import normalize_to_sphere

# Encoders that are not a named frozen pretrained one; any other `encoder` value is a registry name
# (checked by the method, which loads it: this module does not import the registry).
OWN_ENCODERS = ("scratch", "external")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  vocab_size: int
  max_len: int = 64  # longest token sequence the encoder / compressor sees
  encoder: str = "scratch"  # "scratch", "external" or a frozen pretrained encoder's name
  d_encoder: int = 256  # scratch encoder width, or the external encoder's hidden width
  encoder_layers: int = 2  # scratch only
  encoder_heads: int = 4  # scratch only
  num_latents: int = 32  # l
  d_latent: int = 64  # d
  compressor_layers: int = 3
  compressor_head_dim: int = 64  # heads = max(d_encoder, d_latent) // compressor_head_dim
  normalize_latents: bool = True  # each latent vector L2-normalised and scaled to sqrt(d)
  d_model: int = 256  # reconstruction network and decoder width E
  reconstruct_layers: int = 3
  decoder_layers: int = 3
  n_heads: int = 4  # reconstruction network and decoder
  mlp: str = "gelu"
  norm: str = "layer"
  dropout: float = 0.0
  # Training only: each teacher-forced decoder input token (not the leading bos) is replaced by
  # the tokenizer's mask token with this probability, so the decoder must read the latents for
  # what it cannot see (word dropout, Bowman et al. 2016); 0 = plain teacher forcing.
  word_dropout: float = 0.0
  # Training only: Gaussian noise of std sigma ~ U(0, latent_noise), drawn per example, is added to
  # the latents before reconstruction (then re-projected onto the sphere when normalize_latents),
  # so the decoder reads a neighbourhood of each sentence's latents as that sentence and the
  # denoiser's small errors at sampling time decode to fluent text; 0 = clean latents.
  latent_noise: float = 0.0
  dtype: str = "float32"  # compute dtype; params and latents stay fp32

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, **overrides) -> AutoencoderConfig:
    return dataclass_from_config(cls, cfg, **overrides)

  def validate(self, prefix: str = "model") -> None:
    if not isinstance(self.encoder, str) or not self.encoder:
      raise ConfigError(
        f"{prefix}.encoder={self.encoder!r} must be 'scratch', 'external' or the name of a frozen "
        "pretrained encoder (lsd.convert.encoder_specs)"
      )
    check_choice(f"{prefix}.dtype", self.dtype, list(DTYPES))
    if not 0.0 <= self.word_dropout < 1.0:
      raise ConfigError(f"{prefix}.word_dropout={self.word_dropout} must be in [0, 1)")
    if not self.latent_noise >= 0.0:
      raise ConfigError(f"{prefix}.latent_noise={self.latent_noise} must be >= 0")
    for name in (
      "vocab_size",
      "max_len",
      "d_encoder",
      "num_latents",
      "d_latent",
      "compressor_layers",
      "compressor_head_dim",
      "d_model",
      "decoder_layers",
      "n_heads",
    ):
      check_positive(f"{prefix}.{name}", getattr(self, name))
    inner = max(self.d_encoder, self.d_latent)
    if inner % self.compressor_head_dim:
      raise ConfigError(
        f"max({prefix}.d_encoder, {prefix}.d_latent)={inner} must be divisible by "
        f"{prefix}.compressor_head_dim={self.compressor_head_dim}"
      )
    self.decoder_config().validate(prefix)
    if self.encoder == "scratch":
      self.encoder_config().validate(prefix + ".encoder")

  @property
  def pretrained_encoder(self) -> str:
    """The frozen pretrained encoder's registry name; "" for a scratch or external encoder."""
    return "" if self.encoder in OWN_ENCODERS else self.encoder

  def encoder_config(self) -> TransformerConfig:
    return TransformerConfig(
      vocab_size=self.vocab_size,
      d_model=self.d_encoder,
      n_layers=self.encoder_layers,
      n_heads=self.encoder_heads,
      mlp=self.mlp,
      norm=self.norm,
      dropout=self.dropout,
      dtype=self.dtype,
    )

  def decoder_config(self) -> TransformerConfig:
    return TransformerConfig(
      vocab_size=self.vocab_size,
      d_model=self.d_model,
      n_layers=self.decoder_layers,
      n_heads=self.n_heads,
      mlp=self.mlp,
      norm=self.norm,
      dropout=self.dropout,
      cross_attention=True,
      d_context=self.d_model,
      dtype=self.dtype,
    )

  def reconstruct_config(self) -> TransformerConfig:
    # Positions are learned (added once at the input), so no RoPE; QK-norm as in the reference.
    return TransformerConfig(
      vocab_size=1,
      d_model=self.d_model,
      n_layers=self.reconstruct_layers,
      n_heads=self.n_heads,
      mlp=self.mlp,
      norm=self.norm,
      rope_base=0.0,
      qk_norm=True,
      dropout=self.dropout,
      dtype=self.dtype,
    )


class PerceiverLayer(nnx.Module):
  """Latents attend to concat(inputs, latents) (Flamingo's resampler), QK-RMSNorm, then an MLP.

  Inputs and latents have different widths, so each gets its own key/value projection into the
  shared inner width max(d_in, d_latent).
  """

  def __init__(self, d_in: int, d_latent: int, head_dim: int, mlp: str, *, dtype, rngs: nnx.Rngs):
    inner = max(d_in, d_latent)
    self.n_heads, self.head_dim = inner // head_dim, head_dim
    self.norm_in = LayerNorm(d_in, rngs=rngs)
    self.norm_latents = LayerNorm(d_latent, rngs=rngs)
    self.q = dense(d_latent, inner, ("latent", "heads"), dtype=dtype, rngs=rngs)
    self.kv_in = dense(d_in, 2 * inner, ("embed", "kv"), dtype=dtype, rngs=rngs)
    self.kv_latents = dense(d_latent, 2 * inner, ("latent", "kv"), dtype=dtype, rngs=rngs)
    self.q_norm = RMSNorm(head_dim, axis_name="head_dim", rngs=rngs)
    self.k_norm = RMSNorm(head_dim, axis_name="head_dim", rngs=rngs)
    self.o = dense(inner, d_latent, ("heads", "latent"), dtype=dtype, rngs=rngs)
    self.mlp_norm = LayerNorm(d_latent, rngs=rngs)
    self.mlp = MLP(d_latent, 4 * d_latent, mlp, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(
    self, x: Float[Array, "B T H"], latents: Float[Array, "B l d"], valid: Bool[Array, "B T"]
  ) -> Float[Array, "B l d"]:
    b, n_latents, _ = latents.shape
    h = self.norm_latents(latents)
    kv = jnp.concatenate([self.kv_in(self.norm_in(x)), self.kv_latents(h)], axis=1)
    k, v = jnp.split(kv.reshape(b, -1, 2 * self.n_heads, self.head_dim), 2, axis=2)
    q = self.q(h).reshape(b, n_latents, self.n_heads, self.head_dim)
    mask = jnp.concatenate([valid, jnp.ones((b, n_latents), bool)], axis=1)[:, None, None, :]
    out = dot_product_attention(self.q_norm(q), self.k_norm(k), v, mask=mask)
    latents = latents + self.o(out.reshape(b, n_latents, -1))
    return latents + self.mlp(self.mlp_norm(latents))


class PerceiverCompressor(nnx.Module):
  """Hidden states [B, T, H] + valid -> l latents [B, l, d] (final LayerNorm, optional sphere)."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    dt = DTYPES[cfg.dtype]
    normal = nnx.initializers.normal(0.02)
    self.normalize = cfg.normalize_latents
    self.pos = nnx.Param(
      normal(rngs.params(), (cfg.max_len, cfg.d_encoder)), sharding=(None, "embed")
    )
    self.latents = nnx.Param(
      normal(rngs.params(), (cfg.num_latents, cfg.d_latent)), sharding=(None, "latent")
    )
    self.layers = nnx.List(
      [
        PerceiverLayer(
          cfg.d_encoder, cfg.d_latent, cfg.compressor_head_dim, cfg.mlp, dtype=dt, rngs=rngs
        )
        for _ in range(cfg.compressor_layers)
      ]
    )
    self.final_norm = LayerNorm(cfg.d_latent, rngs=rngs)

  def __call__(self, hidden: Float[Array, "B T H"], valid: Bool[Array, "B T"]) -> Array:
    b, t, _ = hidden.shape
    x = hidden + self.pos[:t].astype(hidden.dtype)
    latents = jnp.broadcast_to(self.latents[...], (b,) + self.latents.shape).astype(hidden.dtype)
    for layer in self.layers:
      latents = layer(x, latents, valid)
    latents = self.final_norm(latents).astype(jnp.float32)
    return normalize_to_sphere(latents) if self.normalize else latents


class Reconstructor(nnx.Module):
  """Latents [B, l, d] -> decoder memory [B, l, E]: Linear, learned positions, pre-LN blocks."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    rc = cfg.reconstruct_config()
    self.proj = dense(
      cfg.d_latent,
      cfg.d_model,
      ("latent", "embed"),
      use_bias=True,
      dtype=rc.compute_dtype,
      rngs=rngs,
    )
    self.pos = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_latents, cfg.d_model)),
      sharding=(None, "embed"),
    )
    self.blocks = nnx.List([Block(rc, rngs=rngs) for _ in range(rc.n_layers)])
    self.final_norm = make_norm(rc.norm, rc.d_model, eps=rc.norm_eps, rngs=rngs)

  def __call__(self, latents: Float[Array, "B l d"], rngs: nnx.Rngs | None = None) -> Array:
    x = self.proj(latents)
    x = x + self.pos[...].astype(x.dtype)
    for block in self.blocks:
      x, _ = block(x, positions=None, mask=None, rngs=rngs)
    return self.final_norm(x)


class LatentAutoencoder(nnx.Module):
  """Encoder (scratch or external) + Perceiver compressor + reconstruction net + causal decoder."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.encoder = (
      Transformer(cfg.encoder_config(), rngs=rngs) if cfg.encoder == "scratch" else None
    )
    self.compressor = PerceiverCompressor(cfg, rngs=rngs)
    self.reconstructor = Reconstructor(cfg, rngs=rngs)
    self.decoder = Transformer(cfg.decoder_config(), rngs=rngs)

  def encode(
    self, tokens: Int[Array, "B T"], valid: Bool[Array, "B T"], rngs: nnx.Rngs | None = None
  ) -> Float[Array, "B l d"]:
    """Token ids -> latents with the scratch encoder (bidirectional, padding keys hidden)."""
    if self.encoder is None:
      raise ValueError(
        f"model.encoder={self.cfg.encoder!r}: pass the encoder's hidden states to encode_hidden"
      )
    if tokens.shape[1] > self.cfg.max_len:
      raise ValueError(f"{tokens.shape[1]} tokens exceed model.max_len={self.cfg.max_len}")
    hidden, _ = self.encoder(tokens, mask=valid[:, None, None, :], rngs=rngs, return_hidden=True)
    return self.compressor(hidden, valid)

  def encode_hidden(
    self, hidden: Float[Array, "B T H"], valid: Bool[Array, "B T"]
  ) -> Float[Array, "B l d"]:
    """Precomputed encoder hidden states (H = model.d_encoder) -> latents."""
    if hidden.shape[-1] != self.cfg.d_encoder or hidden.shape[1] > self.cfg.max_len:
      raise ValueError(
        f"hidden states {hidden.shape} need width model.d_encoder={self.cfg.d_encoder} and at "
        f"most model.max_len={self.cfg.max_len} positions"
      )
    return self.compressor(hidden, valid)

  def reconstruct(self, latents: Float[Array, "B l d"], rngs: nnx.Rngs | None = None) -> Array:
    """Latents -> cross-attention memory [B, l, E] of the decoder."""
    return self.reconstructor(latents, rngs=rngs)

  def decode_logits(
    self,
    latents: Float[Array, "B l d"],
    tokens_in: Int[Array, "B T"],
    rngs: nnx.Rngs | None = None,
  ) -> Float[Array, "B T V"]:
    """Teacher-forced next-token logits (fp32) for decoder inputs `tokens_in` (starting with bos)."""
    memory = self.reconstruct(latents, rngs=rngs)
    logits, _ = self.decoder(
      tokens_in, mask=causal_mask(tokens_in.shape[1]), context=memory, rngs=rngs
    )
    return logits


def noise_latents(
  latents: Float[Array, "B l d"], key: Array, max_std: float, *, fixed: bool = False
) -> Array:
  """latents + sigma * N(0, I) with sigma ~ U(0, max_std) drawn per example (`fixed`: sigma =
  max_std for every example); fp32."""
  k_std, k_eps = jax.random.split(key)
  if fixed:
    std = jnp.float32(max_std)
  else:
    std = jax.random.uniform(k_std, (latents.shape[0], 1, 1), jnp.float32, 0.0, max_std)
  return latents + std * jax.random.normal(k_eps, latents.shape, jnp.float32)


def reconstruction_loss(
  model: LatentAutoencoder,
  tokens: Int[Array, "B T"],
  valid: Bool[Array, "B T"],
  *,
  hidden: Float[Array, "B S H"] | None = None,
  hidden_valid: Bool[Array, "B S"] | None = None,
  rngs: nnx.Rngs | None = None,
  word_dropout_key: Array | None = None,
  mask_id: int | None = None,
  latent_noise_key: Array | None = None,
  latents: Float[Array, "B L D"] | None = None,
  latent_noise: float | None = None,
) -> tuple[Float[Array, ""], dict]:
  """Teacher-forced cross-entropy of reconstructing `tokens` ([bos] ids [eos] pad...) from their
  latents, averaged over valid target tokens; returns (loss, {"accuracy"}), fp32.

  With an external encoder pass its states `hidden` and their `hidden_valid` (its own tokenisation
  of the same texts); `tokens` / `valid` are then only the decoder's targets. With
  `word_dropout_key` (training) and `model.cfg.word_dropout` > 0, decoder inputs after the first
  are replaced by `mask_id` with that probability; the encoder always sees the clean tokens. With
  `latent_noise_key` (training) and `model.cfg.latent_noise` > 0, the decoder reads noised latents
  (see AutoencoderConfig.latent_noise; `latent_noise` given overrides that maximum std, e.g. for
  stage 3's own setting). Given `latents`, the decoder reads those instead of the
  encoding of `tokens` (which are then only its targets), e.g. a denoiser's estimates of them.
  """
  tokens_in = tokens[:, :-1]
  p = model.cfg.word_dropout
  if p and word_dropout_key is not None:
    if mask_id is None:
      raise ValueError("word dropout needs the tokenizer's mask_id")
    drop = jax.random.bernoulli(word_dropout_key, p, tokens_in.shape)
    drop = drop.at[:, 0].set(False)
    tokens_in = jnp.where(drop, mask_id, tokens_in)
  if latents is not None:
    latents = jnp.asarray(latents, jnp.float32)
  elif hidden is None:
    latents = model.encode(tokens, valid, rngs=rngs)
  else:
    latents = model.encode_hidden(hidden, hidden_valid)
  max_std = model.cfg.latent_noise if latent_noise is None else latent_noise
  if max_std and latent_noise_key is not None:
    latents = noise_latents(latents, latent_noise_key, max_std)
    if model.cfg.normalize_latents:
      latents = normalize_to_sphere(latents)
  logits = model.decode_logits(latents, tokens_in, rngs=rngs)
  targets = tokens[:, 1:]
  w = (valid[:, 1:] & valid[:, :-1]).astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  denom = jnp.maximum(jnp.sum(w), 1.0)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * w) / denom
  return jnp.sum(nll * w) / denom, {"accuracy": accuracy}
