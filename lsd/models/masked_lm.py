"""Masked (block) diffusion LM: a bidirectional `Transformer` over canvases with a [MASK] token.

The attention pattern is chosen by the caller (bidirectional for MDLM, block-causal for drafting, the
2L pattern for block-diffusion training), so one set of weights serves every stage of SBD.

"subs" parameterisation (MDLM): the model never predicts [MASK] (its logit is -inf), and positions
whose input token is not [MASK] carry their input through unchanged (log-prob 0 on the input token).

Training needs only -log p(x0) at masked positions: `target_nll` gives it from the logits (a
logsumexp and a one-hot pick) without writing the normalised [B, T, V] log-probabilities, the
subs copy or their backward passes (docs/performance.md, "Results").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.nn import KVCache, Transformer, TransformerConfig

NEG_INF = -1e9


class MaskedLM(nnx.Module):
  def __init__(self, cfg: TransformerConfig, mask_id: int, *, rngs: nnx.Rngs):
    if not 0 <= mask_id < cfg.vocab_size:
      raise ValueError(f"mask_id={mask_id} must be a token id in [0, {cfg.vocab_size})")
    self.mask_id = mask_id
    self.backbone = Transformer(cfg, rngs=rngs)

  @property
  def cfg(self) -> TransformerConfig:
    return self.backbone.cfg

  def init_cache(self, batch: int, size: int) -> KVCache:
    return self.backbone.init_cache(batch, size)

  def __call__(
    self,
    tokens: Int[Array, "B T"],
    *,
    positions: Int[Array, "B T"] | None = None,
    mask: Bool[Array, "#B #H T S"] | None = None,
    cache: KVCache | None = None,
    rngs: nnx.Rngs | None = None,
    subs: bool = True,
    num_outputs: int | None = None,
  ) -> tuple[Float[Array, "B T V"], KVCache | None]:
    """Log-probabilities over the vocabulary (fp32). With `subs`, unmasked inputs copy through.
    With `num_outputs`, only the first `num_outputs` positions get log-probabilities."""
    logits, cache = self._logits(tokens, positions, mask, cache, rngs, num_outputs)
    tokens = tokens[:, : logits.shape[1]]
    vocab = logits.shape[-1]
    logp = logits - jnp.max(logits, axis=-1, keepdims=True)
    logp = logp - jnp.log(jnp.sum(jnp.exp(logp), axis=-1, keepdims=True))
    if subs:
      is_masked = (tokens == self.mask_id)[..., None]
      copy = jnp.where(jnp.arange(vocab) == tokens[..., None], 0.0, NEG_INF)
      logp = jnp.where(is_masked, logp, copy)
    return logp, cache

  def _logits(self, tokens, positions, mask, cache, rngs, num_outputs):
    """fp32 logits with NEG_INF added to the [MASK] logit: an added constant vector, which fuses
    into the consumers and whose backward is the identity (a select over [B, T, V] would be
    written twice more). Its probability is exactly 0 in fp32 either way."""
    logits, cache = self.backbone(
      tokens, positions=positions, mask=mask, cache=cache, rngs=rngs, num_outputs=num_outputs
    )
    never = jnp.where(jnp.arange(logits.shape[-1]) == self.mask_id, NEG_INF, 0.0)
    return logits + never, cache

  def target_nll(
    self,
    tokens: Int[Array, "B T"],
    targets: Int[Array, "B N"],
    *,
    positions: Int[Array, "B T"] | None = None,
    mask: Bool[Array, "#B #H T S"] | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> Float[Array, "B N"]:
    """-log p(targets) (fp32) at the first N = targets.shape[1] positions, without subs: equal to
    -take_along_axis(self(tokens, subs=False)[0], targets) where the input is [MASK], which is the
    only place a masked-diffusion loss reads it."""
    logits, _ = self._logits(tokens, positions, mask, None, rngs, targets.shape[1])
    pick = jnp.arange(logits.shape[-1]) == targets[..., None]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(pick, logits, 0.0), axis=-1)
