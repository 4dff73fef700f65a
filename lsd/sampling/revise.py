"""Draft-then-revise (Structural Block Diffusion): remask the least trusted tokens, denoise again.

After the stage-1 draft (`lsd.sampling.block`), each stage k
1. scores every generated token ("snapshot": the confidence frozen when it was unmasked;
   "posthoc": p(token) under one bidirectional forward of the finished canvas; "posthoc_heldout":
   p(token) with the token itself hidden, see below; "random": uniform),
2. remasks the round(gamma_k * n) lowest-scored tokens of each sequence (one `lax.top_k`),
3. denoises the masks with block size B_k (block-causal over the canvas; B_k = L is one global
   bidirectional block), S_k ancestral steps per block, recording fresh snapshot confidences.
Baselines are settings of the same code: no revision (`stages=()`), random or post-hoc
remasking, and MDLM (`mdlm_sample`: an all-mask canvas, i.e. gamma = 1, revised by one block of L).

With a draft window W (`DraftConfig.window`, generation past the trained context) every stage keeps
it: a query in stage block b sees its block and the W tokens before it (`block_causal_mask(L, B_k,
W)`), a post-hoc score (either kind) is read under that same mask, and B_k must be at most W + B (the draft's
block size), so no stage attends over more than the draft does.

"posthoc" reads the model's output at visible positions, which the MDLM loss never trains (it
scores masked positions only, and with "subs" a visible token copies through). "posthoc_heldout" is
a held-out estimate in the style of ReMDM's confidence: the generated (non-fixed) positions of each
row are dealt at random into k = `StageConfig.heldout_splits` disjoint subsets of near-equal size
(`heldout_split`), and for each subset one forward of the canvas with that subset replaced by
[MASK] gives log p(token) at the masked positions. Every generated position is scored exactly once,
by k forwards (a `lax.scan`), all counted in the stage's NFE; k = n (one position per forward) is
masking each position alone. Fixed positions are not scored (+inf) and are never remasked.

Keys: the draft uses fold_in(key, 0); stage k uses fold_in(key, k + 1), split by fold_in into
0 (scores: the random order, or the held-out split) and 1 (denoising), so `mdlm_sample` and a gamma = 1, B = L stage draw the same noise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.models.masked_lm import MaskedLM
from lsd.nn import block_causal_mask
from lsd.sampling.block import BlockState, DraftConfig, denoise_block, draft_blocks
from lsd.sampling.categorical import Confidence

Score = Literal["snapshot", "posthoc", "posthoc_heldout", "random"]
SCORES: tuple[str, ...] = ("snapshot", "posthoc", "posthoc_heldout", "random")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One revision stage: block size B_k (divides L), remask fraction gamma in [0, 1], ancestral
  steps per block, and the score that ranks tokens for remasking. heldout_splits: k, the number of
  disjoint subsets (one masked forward each) of the "posthoc_heldout" score; unused otherwise."""

  block_size: int
  gamma: float
  steps: int
  score: Score = "snapshot"
  heldout_splits: int = 4

  def validate(self, length: int, name: str = "stage") -> None:
    if self.block_size < 1 or length % self.block_size:
      raise ValueError(f"{name}.block_size={self.block_size} must be >= 1 and divide L={length}")
    if not 0.0 <= self.gamma <= 1.0:
      raise ValueError(f"{name}.gamma={self.gamma} must be in [0, 1]")
    if self.steps < 1:
      raise ValueError(f"{name}.steps={self.steps} must be >= 1")
    if self.score not in SCORES:
      raise ValueError(f"{name}.score={self.score!r} is not supported; accepted: {list(SCORES)}")
    if isinstance(self.heldout_splits, bool) or not (
      isinstance(self.heldout_splits, int) and self.heldout_splits >= 1
    ):
      raise ValueError(f"{name}.heldout_splits={self.heldout_splits!r} must be an int >= 1")


@dataclasses.dataclass(frozen=True)
class SBDSamplerConfig:
  """The whole sampler (static). Stages share the draft's top_p / temperature / confidence."""

  draft: DraftConfig = DraftConfig()
  stages: tuple[StageConfig, ...] = ()

  def validate(self, length: int, prefix_len: int = 0) -> None:
    self.draft.validate(length, prefix_len)
    span = self.draft.window + self.draft.block_size
    for k, stage in enumerate(self.stages):
      stage.validate(length, f"stages[{k}]")
      if self.draft.window and stage.block_size > span:
        raise ValueError(
          f"stages[{k}].block_size={stage.block_size} must be <= draft.window + "
          f"draft.block_size={span} with a draft window (a longer block attends past the window)"
        )


@flax.struct.dataclass
class SampleOutput:
  """draft_tokens, tokens: int32 [N, L] before / after revision (prefix included); conf: fp32 [N, L]
  snapshot confidence of each final token (+inf for the prefix); nfe_per_stage: int32 [N, 1 + K]
  (column 0 the draft, then one per stage; a post-hoc stage counts its scoring forward, a held-out
  one its heldout_splits forwards);
  commit_forwards: int32 scalar (draft KV-cache appends); stage_tokens: int32 [K, N, L] the canvas
  after each stage; remasked: bool [K, N, L] the positions each stage remasked; fixed: bool
  [N, L] the positions no stage may change (prompt, infill text, EOS and the padding after it)."""

  draft_tokens: Int[Array, "N L"]
  tokens: Int[Array, "N L"]
  conf: Float[Array, "N L"]
  nfe_per_stage: Int[Array, "N S"]
  commit_forwards: Int[Array, ""]
  stage_tokens: Int[Array, "K N L"]
  remasked: Bool[Array, "K N L"]
  fixed: Bool[Array, "N L"]


def remask(
  tokens: Int[Array, "N L"],
  scores: Float[Array, "N L"],
  gamma: float,
  mask_id: int,
  valid: Bool[Array, "#N L"] | None = None,
) -> tuple[Int[Array, "N L"], Bool[Array, "N L"]]:
  """Sets the k = round(gamma * n_valid) lowest-scored valid positions of each row to `mask_id`.

  One `lax.top_k` of -scores with the static bound round(gamma * L); each row keeps its first k.
  Ties are broken by position (lower index remasked first: `lax.top_k` returns the lower index
  first among equal values; -0.0 and +0.0 are made equal so signed zeros tie too), so the result
  is deterministic. Scores of +inf (never drafted) rank after every finite score, invalid positions
  after all valid ones. `round` is half-to-even, like Python's. Scores must not be NaN.

  Args:
    gamma: static Python float in [0, 1].
    valid: optional bool [N, L] or [L]; False positions (a prompt, padding) are never remasked.
  Returns:
    (tokens with the chosen positions masked, bool [N, L] chosen positions).
  """
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"gamma={gamma} must be in [0, 1]")
  n, length = tokens.shape
  k_max = round(gamma * length)
  if k_max == 0:
    return tokens, jnp.zeros((n, length), bool)
  s = jnp.minimum(scores.astype(jnp.float32), jnp.finfo(jnp.float32).max)
  if valid is None:
    k = jnp.full((n,), k_max, jnp.int32)
  else:
    valid = jnp.broadcast_to(valid, (n, length))
    s = jnp.where(valid, s, jnp.inf)
    n_valid = jnp.sum(valid, axis=-1)
    # The fp32 product can round across .5 differently from Python's; k_max bounds it either way.
    k = jnp.minimum(jnp.round(gamma * n_valid).astype(jnp.int32), k_max)
  # top_k orders -0.0 below +0.0; map both to +0.0 (XLA folds away a `+ 0.0`, so use where).
  _, idx = jax.lax.top_k(jnp.where(s == 0.0, 0.0, -s), k_max)
  chosen = jnp.arange(k_max)[None, :] < k[:, None]
  remasked = jnp.zeros((n, length), bool).at[jnp.arange(n)[:, None], idx].set(chosen)
  return jnp.where(remasked, jnp.asarray(mask_id, tokens.dtype), tokens), remasked


def posthoc_scores(
  model: MaskedLM, tokens: Int[Array, "N L"], mask: Bool[Array, "L L"] | None = None
) -> Float[Array, "N L"]:
  """p(token_i | whole canvas) from one bidirectional forward with every token visible (subs off,
  so the model's own belief is scored rather than the copy-through); `mask` restricts what each
  token sees (a windowed stage's mask)."""
  logp, _ = model(tokens, mask=mask, subs=False)
  return jnp.exp(jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0])


def heldout_split(key: Array, valid: Bool[Array, "#N L"], splits: int) -> Int[Array, "N L"]:
  """Deals each row's valid positions at random into `splits` (static) disjoint subsets.

  A row's valid positions are ranked by one uniform draw each (fixed positions rank last), and the
  position of rank r goes to subset r mod `splits`: subset sizes differ by at most one, and a row
  with fewer valid positions than `splits` leaves some subsets empty. Returns int32 [N, L]: the
  subset index, -1 at invalid positions. `valid` must be [N, L] (a broadcast row gives every row
  the same split)."""
  n, length = valid.shape
  u = jnp.where(valid, jax.random.uniform(key, (n, length)), 2.0)
  rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
  return jnp.where(valid, rank % splits, -1).astype(jnp.int32)


def heldout_scores(
  model: MaskedLM,
  tokens: Int[Array, "N L"],
  split: Int[Array, "N L"],
  splits: int,
  mask: Bool[Array, "L L"] | None = None,
) -> Float[Array, "N L"]:
  """p(token_i | canvas with subset j masked) for each position i of subset j = split[i] >= 0,
  +inf where split is -1 (not scored). One forward per subset (a `lax.scan` over the static
  `splits`); `mask` as in `posthoc_scores` (a windowed stage's mask)."""

  def one(scores, j):
    held = split == j
    logp, _ = model(jnp.where(held, model.mask_id, tokens), mask=mask, subs=False)
    lp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.where(held, jnp.exp(lp), scores), None

  init = jnp.full(tokens.shape, jnp.inf, jnp.float32)
  scores, _ = jax.lax.scan(one, init, jnp.arange(splits, dtype=jnp.int32))
  return scores


def revise_stage(
  model: MaskedLM,
  key: Array,
  tokens: Int[Array, "N L"],
  block_size: int,
  steps: int,
  *,
  conf: Float[Array, "N L"] | None = None,
  top_p: float = 1.0,
  temperature: float = 1.0,
  confidence: Confidence = "filtered",
  window: int = 0,
) -> tuple[Int[Array, "N L"], Float[Array, "N L"], Int[Array, " N"]]:
  """Denoises every masked position of `tokens`, blocks of `block_size` left to right (traceable).

  Each step is one full-canvas forward under the block-causal mask (block b sees blocks <= b;
  block_size == L is a plain bidirectional forward); `steps` ancestral steps per block as in the
  draft. Newly unmasked tokens get fresh snapshot confidences in `conf` (+inf default), so stages
  chain. `window` (static): W > 0 also hides keys more than W tokens before a query's block
  (`block_causal_mask(L, block_size, W)`). Returns (tokens, conf, nfe [N]: forwards made while the
  current block had masks).
  """
  n, length = tokens.shape
  conf = jnp.full((n, length), jnp.inf, jnp.float32) if conf is None else conf
  attn_mask = None
  if block_size != length or window:
    attn_mask = block_causal_mask(length, block_size, window)

  def one_block(carry, b):
    canvas, conf, nfe = carry
    start = b * block_size

    def logp_fn(blk):
      logp, _ = model(jax.lax.dynamic_update_slice(canvas, blk, (0, start)), mask=attn_mask)
      return jax.lax.dynamic_slice_in_dim(logp, start, block_size, axis=1)

    state = denoise_block(
      logp_fn,
      jax.random.fold_in(key, b),
      BlockState(
        tokens=jax.lax.dynamic_slice_in_dim(canvas, start, block_size, axis=1),
        conf=jax.lax.dynamic_slice_in_dim(conf, start, block_size, axis=1),
        unmask_step=jnp.zeros((n, block_size), jnp.int32),
        nfe=nfe,
      ),
      steps=steps,
      step_offset=0,
      mask_id=model.mask_id,
      top_p=top_p,
      temperature=temperature,
      confidence=confidence,
    )
    canvas = jax.lax.dynamic_update_slice(canvas, state.tokens, (0, start))
    conf = jax.lax.dynamic_update_slice(conf, state.conf, (0, start))
    return (canvas, conf, state.nfe), None

  init = (tokens, conf, jnp.zeros((n,), jnp.int32))
  blocks = jnp.arange(length // block_size, dtype=jnp.int32)
  (tokens, conf, nfe), _ = jax.lax.scan(one_block, init, blocks)
  return tokens, conf, nfe


def _run_stages(
  model: MaskedLM,
  key: Array,
  tokens: Int[Array, "N L"],
  conf: Float[Array, "N L"],
  stages: tuple[StageConfig, ...],
  valid: Bool[Array, "#N L"],
  sampling: dict,
  window: int = 0,
) -> tuple[Array, list[Array], list[Array], list[Array]]:
  """Stage k: score -> remask -> revise_stage. A Python loop over the (static, few) stages only.

  Returns (final conf, then per stage: tokens after it, NFE [N], remasked [N, L])."""
  outs, nfes, remasks = [], [], []
  for k, stage in enumerate(stages):
    stage_key = jax.random.fold_in(key, k + 1)
    score_key, denoise_key = (jax.random.fold_in(stage_key, i) for i in (0, 1))
    extra = 0
    if stage.score == "snapshot":
      scores = conf
    elif stage.score in ("posthoc", "posthoc_heldout"):
      mask = block_causal_mask(tokens.shape[1], stage.block_size, window) if window else None
      if stage.score == "posthoc":
        scores, extra = posthoc_scores(model, tokens, mask), 1
      else:
        k_split = stage.heldout_splits
        split = heldout_split(score_key, jnp.broadcast_to(valid, tokens.shape), k_split)
        scores, extra = heldout_scores(model, tokens, split, k_split, mask), k_split
    else:
      scores = jax.random.uniform(score_key, tokens.shape)
    tokens, remasked = remask(tokens, scores, stage.gamma, model.mask_id, valid)
    tokens, conf, nfe = revise_stage(
      model,
      denoise_key,
      tokens,
      stage.block_size,
      stage.steps,
      conf=conf,
      window=window,
      **sampling,
    )
    outs.append(tokens)
    nfes.append(nfe + extra)
    remasks.append(remasked)
  return conf, outs, nfes, remasks


def _output(draft_tokens, draft_nfe, commits, fixed, conf, outs, nfes, remasks) -> SampleOutput:
  def stack(xs, dtype):
    return jnp.stack(xs) if xs else jnp.zeros((0, *draft_tokens.shape), dtype)

  return SampleOutput(
    draft_tokens=draft_tokens,
    tokens=outs[-1] if outs else draft_tokens,
    conf=conf,
    nfe_per_stage=jnp.stack([draft_nfe, *nfes], axis=1),
    commit_forwards=commits,
    stage_tokens=stack(outs, jnp.int32),
    remasked=stack(remasks, bool),
    fixed=jnp.broadcast_to(fixed, draft_tokens.shape),
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length", "cfg"))
def draft_then_revise(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  key: Array,
  batch: int,
  length: int,
  cfg: SBDSamplerConfig,
  prefix: Int[Array, "N P"] | None = None,
  canvas: Int[Array, "N L"] | None = None,
) -> SampleOutput:
  """Stage-1 draft then `cfg.stages` revisions, one jitted call.

  Args:
    graphdef, state: `nnx.split(masked_lm)`; graphdef static.
    key: PRNG key. batch, length (L, prefix included), cfg: static.
    prefix: optional int [N, P] prompt at positions [0, P) (P a multiple of the draft block size);
      it conditions every stage and is never remasked.
    canvas: optional int [N, L] starting sequence instead of a prefix: [MASK] positions are
      generated, every other position is fixed (prompts of any length, infill templates).
  Every stage remasks only positions the draft generated and did not freeze (`SampleOutput.fixed`:
  the prefix or canvas text, and with `cfg.draft.eos_id` each row's EOS and its padding).
  """
  p = 0 if prefix is None else prefix.shape[1]
  cfg.validate(length, p)
  model = nnx.merge(graphdef, state)
  d = draft_blocks(model, jax.random.fold_in(key, 0), batch, length, cfg.draft, prefix, canvas)
  sampling = dict(
    top_p=cfg.draft.top_p, temperature=cfg.draft.temperature, confidence=cfg.draft.confidence
  )
  stages = _run_stages(
    model, key, d.tokens, d.conf, cfg.stages, ~d.fixed, sampling, cfg.draft.window
  )
  return _output(d.tokens, d.nfe, d.commit_forwards, d.fixed, *stages)


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "batch", "length", "steps", "top_p", "temperature", "confidence"),
)
def mdlm_sample(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  key: Array,
  batch: int,
  length: int,
  steps: int,
  *,
  top_p: float = 1.0,
  temperature: float = 1.0,
  confidence: Confidence = "filtered",
  prefix: Int[Array, "N P"] | None = None,
) -> SampleOutput:
  """MDLM baseline: an all-mask canvas (remask with gamma = 1) revised by one block of size L with
  `steps` ancestral steps. Same key use as stage 0 of `draft_then_revise`, so a single stage
  StageConfig(L, 1.0, steps) there gives identical tokens. nfe_per_stage column 0 (draft) is 0."""
  model = nnx.merge(graphdef, state)
  tokens = jnp.full((batch, length), model.mask_id, jnp.int32)
  p = 0
  if prefix is not None:
    p = prefix.shape[1]
    tokens = tokens.at[:, :p].set(prefix.astype(jnp.int32))
  stage = StageConfig(block_size=length, gamma=1.0, steps=steps)
  stage.validate(length)
  sampling = dict(top_p=top_p, temperature=temperature, confidence=confidence)
  conf = jnp.full((batch, length), jnp.inf, jnp.float32)
  valid = jnp.arange(length) >= p
  stages = _run_stages(model, key, tokens, conf, (stage,), valid, sampling)
  no_draft = jnp.zeros((batch,), jnp.int32)
  return _output(tokens, no_draft, jnp.zeros((), jnp.int32), ~valid, *stages)
