"""Representation losses on a `LatentAutoencoder`'s latents (SLD, arXiv 2412.11333): they shape the
latent space so that a denoiser's imperfect estimates still decode to the text they are near.

  - Gaussian latent noise: the decoder reconstructs from latents + N(0, std^2) (a fixed std, paper
    0.05), re-projected onto the sphere when the latents live there.
  - Adversarial latent noise (Miyato et al.): each segment's latents are moved by epsilon (paper
    0.05) along the normalised gradient of this step's reconstruction loss with respect to them,
    computed in the same step; the decoder learns to reconstruct from the moved latents. On the
    sphere the gradient is taken in its tangent plane (the component a re-projection keeps).
  - SimCSE contrastive loss (paper weight 0.2, temperature 0.05): each segment's latents,
    mean-pooled over the l latents, are pulled towards those of the same segment encoded again
    under a different dropout and encoder word-dropout mask (its positive) and pushed from the
    other segments of the batch (its negatives), by cosine similarity / temperature.

`representation_loss` adds the weighted terms to the teacher-forced reconstruction loss of
`lsd.models.autoencoder.reconstruction_loss`; each term is off at weight (or std) 0. The encoder is
a function passed in, so a frozen pretrained encoder's states can feed the compressor. Shapes: N
segments, T tokens, l latents, d latent width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.config import ConfigError
from lsd.models.autoencoder import LatentAutoencoder, noise_latents, reconstruction_loss
from lsd.nn.layers import normalize_to_sphere

# (tokens [N, T], valid [N, T], dropout rngs or None) -> latents [N, l, d]
Encode = Callable[[Array, Array, nnx.Rngs | None], Array]


@dataclasses.dataclass(frozen=True)
class RepresentationLosses:
  """The weights and settings of the three losses (0 weight / std = that loss off)."""

  latent_noise_std: float  # Gaussian latent noise on the decoder's input
  adversarial_weight: float
  adversarial_epsilon: float  # L2 norm of each segment's adversarial move
  contrastive_weight: float
  contrastive_temperature: float
  contrastive_word_dropout: float  # encoder inputs masked in the positive view

  def validate(self, prefix: str = "losses") -> None:
    for name in ("latent_noise_std", "adversarial_weight", "adversarial_epsilon"):
      value = getattr(self, name)
      if not value >= 0:
        raise ConfigError(f"{prefix}.{name}={value!r} must be >= 0 (0 = off)")
    if not self.contrastive_weight >= 0:
      raise ConfigError(f"{prefix}.contrastive_weight={self.contrastive_weight!r} must be >= 0")
    if not self.contrastive_temperature > 0:
      raise ConfigError(
        f"{prefix}.contrastive_temperature={self.contrastive_temperature!r} must be > 0"
      )
    if not 0 <= self.contrastive_word_dropout < 1:
      raise ConfigError(
        f"{prefix}.contrastive_word_dropout={self.contrastive_word_dropout!r} must be in [0, 1)"
      )


def gaussian_latents(z: Float[Array, "N l d"], key: Array, std: float, project: bool) -> Array:
  """z + std * N(0, I) (one fixed std for every segment), re-projected onto the sphere."""
  out = noise_latents(z, key, std, fixed=True)
  return normalize_to_sphere(out) if project else out


def adversarial_direction(
  loss_fn: Callable[[Array], Array], z: Float[Array, "N l d"], project: bool
) -> Float[Array, "N l d"]:
  """The unit direction (L2 norm 1 over each segment's l x d latents) of steepest ascent of
  `loss_fn` at z, without gradient: on the sphere (project) the gradient's tangential part."""
  z = jax.lax.stop_gradient(z)
  g = jax.grad(loss_fn)(z)
  if project:  # remove each latent vector's radial component
    u = normalize_to_sphere(z) / jnp.sqrt(z.shape[-1])
    g = g - jnp.sum(g * u, -1, keepdims=True) * u
  norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=(1, 2), keepdims=True))
  return jax.lax.stop_gradient(g / jnp.maximum(norm, 1e-12))


def moved_latents(z: Array, direction: Array, epsilon: float, project: bool) -> Array:
  """z + epsilon * direction, re-projected onto the sphere (project); gradient flows to z."""
  out = z + epsilon * direction
  return normalize_to_sphere(out) if project else out


def simcse_loss(
  anchors: Float[Array, "N l d"],
  positives: Float[Array, "N l d"],
  row_valid: Bool[Array, " N"],
  temperature: float,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """SimCSE's InfoNCE on mean-pooled latents: logits[i, j] = cos(mean anchors_i, mean positives_j)
  / temperature over the valid rows j; the loss is the mean over valid rows i of
  -log softmax(logits[i])[i]. Returns (loss, accuracy of picking the own positive), fp32."""
  a = jnp.mean(jnp.asarray(anchors, jnp.float32), axis=1)
  p = jnp.mean(jnp.asarray(positives, jnp.float32), axis=1)
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
  logits = (a @ p.T) / temperature
  logits = jnp.where(row_valid[None, :], logits, -1e9)
  own = jnp.arange(a.shape[0])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), own[:, None], -1)[:, 0]
  w = row_valid.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(w), 1.0)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == own) * w) / denom
  return jnp.sum(nll * w) / denom, accuracy


def mask_encoder_inputs(
  tokens: Int[Array, "N T"], valid: Bool[Array, "N T"], key: Array, p: float, mask_id: int
) -> Int[Array, "N T"]:
  """Each valid token between the leading bos and the final eos replaced by `mask_id` with
  probability p (encoder word dropout)."""
  t = tokens.shape[1]
  after = jnp.concatenate([valid[:, 1:], jnp.zeros_like(valid[:, :1])], axis=1)
  inner = valid & after & (jnp.arange(t) > 0)[None, :]
  drop = inner & jax.random.bernoulli(key, p, tokens.shape)
  return jnp.where(drop, mask_id, tokens)


def representation_loss(
  model: LatentAutoencoder,
  tokens: Int[Array, "N T"],
  valid: Bool[Array, "N T"],
  key: Array,
  losses: RepresentationLosses,
  *,
  encode: Encode,
  mask_id: int,
  train: bool = True,
) -> tuple[Float[Array, ""], dict]:
  """The reconstruction loss of segments `tokens` ([bos] ids [eos] pad...; rows without a valid
  token are padding and count nowhere) plus, in training, the representation losses:

    recon(gaussian(z)) + adversarial_weight * recon(z + epsilon * adv) + contrastive_weight *
    simcse(z, z')

  where z = encode(tokens) (training dropout), recon is the teacher-forced cross-entropy with the
  model's training dropout and decoder word dropout (the same masks in every term), and z' the
  positive view. Without `train`: the plain reconstruction loss. Metrics: recon, accuracy and each
  active term."""
  k_enc, k_pos, k_pos_words, k_dec, k_words, k_noise = jax.random.split(key, 6)
  drop = bool(model.cfg.dropout) and train
  rngs = lambda k: nnx.Rngs(dropout=k) if drop else None
  project = model.cfg.normalize_latents
  z = encode(tokens, valid, rngs(k_enc))

  def recon(latents, model=model):
    return reconstruction_loss(
      model,
      tokens,
      valid,
      latents=latents,
      rngs=rngs(k_dec),
      word_dropout_key=k_words if train else None,
      mask_id=mask_id,
    )

  noisy = z
  if train and losses.latent_noise_std:
    noisy = gaussian_latents(z, k_noise, losses.latent_noise_std, project)
  loss, m = recon(noisy)
  metrics = {"recon": loss, "accuracy": m["accuracy"]}
  if train and losses.adversarial_weight:
    # The direction is found with the weights held fixed (it trains nothing), as in the reference.
    graphdef, state = nnx.split(model)
    fixed = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    direction = adversarial_direction(lambda x: recon(x, fixed)[0], z, project)
    adv, _ = recon(moved_latents(z, direction, losses.adversarial_epsilon, project))
    loss = loss + losses.adversarial_weight * adv
    metrics["adversarial"] = adv
  if train and losses.contrastive_weight:
    words = mask_encoder_inputs(
      tokens, valid, k_pos_words, losses.contrastive_word_dropout, mask_id
    )
    positives = encode(words, valid, rngs(k_pos))
    cst, acc = simcse_loss(z, positives, valid.any(-1), losses.contrastive_temperature)
    loss = loss + losses.contrastive_weight * cst
    metrics.update(contrastive=cst, contrastive_acc=acc)
  return loss, metrics
