"""Stage-1 draft of masked block diffusion: blocks left to right, a KV cache over finished blocks.

Canvas of length L, block size B (B | L). Block b is denoised given the clean blocks < b with
`steps_per_block` = S ancestral steps of the linear schedule: at step i each still-masked position
of the block is unmasked with probability 1 / (S - i) (MDLM's ancestral rule for t = (S-i)/S ->
s = (S-i-1)/S; the last step unmasks everything left). Tokens are drawn by `sample_categorical`
from the model's p(x0 | noisy block, clean prefix), and each token's probability at the step it is
unmasked is frozen as its *snapshot confidence* (`conf`, +inf where nothing was drafted).

Two exact implementations of the same distribution (tests check identical tokens per key):
- cached: per step one "peek" forward of the B block tokens against the KV cache of the clean prefix
  (the returned cache is dropped); per block one "commit" forward of the finished block that appends
  its keys/values to the cache. The block scan is split into a few scans whose cache sizes double
  (`DraftConfig.cache_segments`), so attention cost follows the prefix length, not L.
- uncached: per step one forward of the whole canvas under the block-causal mask (later blocks are
  hidden, earlier blocks see only themselves and their past, exactly what the cache holds).
Randomness is `fold_in(fold_in(key, block), step)`, so both paths consume identical noise.

Unmasking order (`DraftConfig.order`; the draft only, revision stages keep the random order):
- "random" (default): the ancestral coin flips above.
- "confidence" / "margin" / "entropy": step i of S unmasks k = ceil(m / (S - i)) of the m
  still-masked positions of each row (the expected count of the random rule made deterministic, as
  in LLaDA: B = 4, S = 3 gives 2, 1, 1; the last step unmasks the rest), the k with the highest
  score: the largest probability, the top-1 minus top-2 probability, or the lowest entropy of the
  distribution the token is drawn from (after temperature and top-p). Ties go to the lower position.
- "threshold": every masked position whose largest probability exceeds `threshold` (strictly),
  and at least the single most confident one, so a block may finish in fewer than S steps; the last
  step unmasks the rest.
Tokens are sampled as in the random order (not argmax), with the same key per step; only which
positions are unmasked differs. Ordered steps run only while some row of the batch still has masks
(a `lax.cond` skips the forward once none has).

Fixed positions (prompts, infilling, stopping): the draft only ever writes positions that hold the
[MASK] token. A `canvas` [N, L] given to the draft is the starting sequence: its [MASK] positions are
generated, every other position is fixed (a prompt of any length per row, left-aligned; an infill
template's text on both sides of its spans) and conditions the model through the cache like any
finished token. A block with no [MASK] in any row is skipped (a `lax.cond`; its commit forward still
runs). With `DraftConfig.eos_id` set, a row whose drafted block contains EOS is finished: the
positions it generated after its first EOS become `pad_id`, and every later [MASK] of the row is
filled with `pad_id` before its block is drafted (fixed text of an infill template stays). The
row's EOS and padding are frozen (`DraftOutput.fixed`), so revision leaves them alone. Rows finish
independently.

Generating past the trained context (`DraftConfig.window` = W > 0, a multiple of B): block b
attends to its own block and the last W tokens before it (blocks max(0, b - W/B) .. b-1), never
to older ones, so the canvas may be any length. Cached: one scan over a fixed cache of W + B
slots; a block is committed against the W tokens its peeks saw, then a cache holding more than W
tokens drops its oldest block ("commit and shift", `KVCache.drop_oldest`), so the keys of every
block are those the windowed full-canvas forward computes; a prefix goes through the scan block
by block. Uncached: the
full-canvas forward under `block_causal_mask(L, B, W)`. Keys are stored post-RoPE and positions
stay absolute, so attention scores depend on relative distances < W + B only: with W + B at most
the trained length every distance was seen in training. A model with learned absolute positions
(`model.learned_pos`) cannot go past its table (`check_positions` raises). W >= L - B never drops
a block and gives the unwindowed draft.

NFE counts, per sequence, the forwards made while the block still had masked positions (BD3-LM
counts forwards that can change the sequence); commit forwards are reported separately.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.models.masked_lm import MaskedLM
from lsd.nn import KVCache, block_causal_mask
from lsd.sampling.categorical import Confidence, nucleus_log_probs, sample_categorical

Order = Literal["random", "confidence", "margin", "entropy", "threshold"]
ORDERS: tuple[str, ...] = ("random", "confidence", "margin", "entropy", "threshold")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
  """Static settings of the draft; hashable, so it is a static argument of the jitted samplers.

  block_size: B, divides L (and the prompt length). steps_per_block: S ancestral steps per block.
  top_p, temperature, confidence: as in `sample_categorical` (also used by every revision stage of
  `draft_then_revise`). use_cache: KV-cached peek/commit forwards, or full-canvas forwards.
  cache_segments: with the cache, the block scan runs as up to this many consecutive scans whose
  caches grow geometrically (ending at L/2^(k-1), ..., L/2, L slots; segments under `MIN_SEGMENT`
  slots are merged into the next), so a block attends over at most about twice its prefix instead
  of the whole L-slot cache. 1 = one scan over a fixed L-slot cache. Same tokens either way.
  order: which masked positions a step unmasks (see the module docstring; "random" is the
  ancestral rule). threshold: the probability a position's top token must exceed for
  order="threshold" to commit it, in (0, 1]; ignored by the other orders.
  eos_id, pad_id: EOS-aware stopping (see the module docstring); eos_id = -1 (default) drafts
  every block whatever it holds.
  window: W, 0 (default) = block b attends to every block before it; W > 0 (a multiple of
  block_size) = only to the last W tokens before it, for canvases longer than the trained context
  (see the module docstring; cache_segments is then not used).
  """

  block_size: int = 4
  steps_per_block: int = 4
  top_p: float = 1.0
  temperature: float = 1.0
  use_cache: bool = True
  confidence: Confidence = "filtered"
  cache_segments: int = 4
  order: Order = "random"
  threshold: float = 0.9
  eos_id: int = -1
  pad_id: int = -1
  window: int = 0

  def validate(self, length: int, prefix_len: int = 0) -> None:
    if self.block_size < 1 or length % self.block_size:
      raise ValueError(f"draft.block_size={self.block_size} must be >= 1 and divide L={length}")
    if self.steps_per_block < 1:
      raise ValueError(f"draft.steps_per_block={self.steps_per_block} must be >= 1")
    if prefix_len % self.block_size or not 0 <= prefix_len < length:
      raise ValueError(
        f"prefix length {prefix_len} must be a multiple of draft.block_size={self.block_size} "
        f"and < L={length}"
      )
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"draft.top_p={self.top_p} must be in (0, 1]")
    if not self.temperature > 0.0:
      raise ValueError(f"draft.temperature={self.temperature} must be > 0")
    if self.cache_segments < 1:
      raise ValueError(f"draft.cache_segments={self.cache_segments} must be >= 1")
    if self.confidence not in ("filtered", "raw"):
      raise ValueError(f"draft.confidence={self.confidence!r} must be 'filtered' or 'raw'")
    if self.order not in ORDERS:
      raise ValueError(f"draft.order={self.order!r} is not supported; accepted: {list(ORDERS)}")
    if not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"draft.threshold={self.threshold} must be a probability in (0, 1]")
    if self.window < 0 or self.window % self.block_size:
      raise ValueError(
        f"draft.window={self.window} must be 0 (no window) or a positive multiple of "
        f"draft.block_size={self.block_size}"
      )
    if self.eos_id >= 0 and (self.pad_id < 0 or self.pad_id == self.eos_id):
      raise ValueError(
        f"draft.pad_id={self.pad_id} must be a token id >= 0 other than draft.eos_id={self.eos_id}"
      )


@flax.struct.dataclass
class DraftOutput:
  """tokens: int32 [N, L] (prefix included); conf: fp32 [N, L] snapshot confidence, +inf where not
  drafted (the prefix); unmask_step: int32 [N, L] global step block * S + i at which the token was
  unmasked, -1 if not drafted; nfe: int32 [N]; commit_forwards: int32 scalar (prefix + blocks);
  fixed: bool [N, L] positions later stages must not change (the prefix or the canvas's non-[MASK]
  positions, and with EOS stopping each finished row's first EOS and the padding after it)."""

  tokens: Int[Array, "N L"]
  conf: Float[Array, "N L"]
  unmask_step: Int[Array, "N L"]
  nfe: Int[Array, " N"]
  commit_forwards: Int[Array, ""]
  fixed: Bool[Array, "N L"]


@flax.struct.dataclass
class BlockState:
  """Loop carry of the denoising steps inside one block (all [N, B] except nfe [N])."""

  tokens: Int[Array, "N B"]
  conf: Float[Array, "N B"]
  unmask_step: Int[Array, "N B"]
  nfe: Int[Array, " N"]


def _unmask_cap(block: int, steps: int) -> int:
  """Static slot count for the positions one step unmasks per row: twice the average rate
  (block / steps; a fully masked block loses block / steps positions per step on average) plus 8.
  Steps that exceed it (late steps of a schedule unmask everything left) take the all-positions
  branch of `_sample_unmasking`, so the cap changes speed, never the result's distribution."""
  return min(block, 2 * -(-block // steps) + 8)


def _sample_unmasking(
  key: Array,
  log_probs: Float[Array, "N B V"],
  unmask: Array,
  cap: int,
  **sampling,
) -> tuple[Int[Array, "N B"], Float[Array, "N B"]]:
  """`sample_categorical` where only the rows with `unmask` matter (the rest are discarded).

  When every row unmasks at most `cap` (static) positions, the log-probs of those positions are
  gathered to [N, cap, V] and only they are sampled (with MDLM's B = L = steps that is ~10 of 128
  positions: the vocabulary-wide noise and nucleus dominate a CPU step otherwise); else (a `cond`,
  e.g. the last step that unmasks everything left) all B positions are sampled. The same
  distribution either way; which branch ran changes the noise, not its law.
  """
  n, b, _ = log_probs.shape
  if cap >= b:
    return sample_categorical(key, log_probs, **sampling)

  def sparse(_):
    _, idx = jax.lax.top_k(unmask.astype(jnp.int32), cap)  # unmasking positions first
    rows = jnp.take_along_axis(log_probs, idx[..., None], axis=1)
    tok, prob = sample_categorical(key, rows, **sampling)
    at = (jnp.arange(n)[:, None], idx)
    return (
      jnp.zeros((n, b), jnp.int32).at[at].set(tok),
      jnp.zeros((n, b), jnp.float32).at[at].set(prob),
    )

  def dense(_):
    return sample_categorical(key, log_probs, **sampling)

  fits = jnp.max(jnp.sum(unmask, axis=-1)) <= cap
  return jax.lax.cond(fits, sparse, dense, None)


def sampling_log_probs(
  log_probs: Float[Array, "... V"], top_p: float, temperature: float
) -> Float[Array, "... V"]:
  """The log-probs `sample_categorical` draws from: temperature, then the nucleus (same ops, so a
  draw from these with top_p = temperature = 1 is the draw `sample_categorical` makes)."""
  logp = log_probs.astype(jnp.float32)
  if temperature != 1.0:
    logp = jax.nn.log_softmax(logp / temperature, axis=-1)
  if top_p < 1.0:
    logp = nucleus_log_probs(logp, top_p)
  return logp


def order_scores(logp: Float[Array, "N B V"], order: str) -> Float[Array, "N B"]:
  """Unmasking priority of each position (higher first) from normalised log-probs: the largest
  probability ("confidence", "threshold"), top-1 minus top-2 probability ("margin"), or minus the
  entropy in nats ("entropy")."""
  if order in ("confidence", "threshold"):
    return jnp.exp(jnp.max(logp, axis=-1))
  p = jnp.exp(logp)
  if order == "margin":
    top2, _ = jax.lax.top_k(p, 2)
    return top2[..., 0] - top2[..., 1]
  if order == "entropy":
    return jnp.sum(jnp.where(p > 0.0, p * logp, 0.0), axis=-1)
  raise ValueError(
    f"order={order!r} has no score; accepted: {[o for o in ORDERS if o != 'random']}"
  )


def ordered_unmask(
  scores: Float[Array, "N B"],
  masked: Array,
  i: Array | int,
  steps: int,
  order: str,
  threshold: float,
) -> Array:
  """Positions step i of `steps` unmasks under an ordered rule (bool [N, B], a subset of `masked`).

  Masked positions are ranked by descending score with one `lax.top_k` over the block (ties: the
  lower position first). Ranked orders take the first k = ceil(m / (steps - i)) of the m masked
  positions of each row; "threshold" takes every masked position with score > threshold plus the
  first-ranked one; at the last step (i = steps - 1) both take every masked position.
  """
  n, b = masked.shape
  s = jnp.where(masked, scores.astype(jnp.float32), -jnp.inf)
  s = jnp.where(s == 0.0, 0.0, s)  # top_k orders -0.0 below +0.0; make signed zeros tie
  _, idx = jax.lax.top_k(s, b)
  rank = jnp.zeros((n, b), jnp.int32).at[jnp.arange(n)[:, None], idx].set(jnp.arange(b))
  if order == "threshold":
    pick = (scores > threshold) | (rank == 0) | (i == steps - 1)
  else:
    m = jnp.sum(masked, axis=-1, keepdims=True, dtype=jnp.int32)
    pick = rank < -(-m // (steps - i))  # ceil(m / (steps - i)); steps - i = 1 at the last step
  return masked & pick


def denoise_block(
  logp_fn: Callable[[Int[Array, "N B"]], Float[Array, "N B V"]],
  key: Array,
  state: BlockState,
  *,
  steps: int,
  step_offset: Array | int,
  mask_id: int,
  top_p: float,
  temperature: float,
  confidence: Confidence,
  order: Order = "random",
  threshold: float = 0.9,
) -> BlockState:
  """`steps` denoising steps over the masked positions of one block (a `lax.scan`).

  `logp_fn(block_tokens [N, B]) -> log-probs [N, B, V]` is the model's view of the block (cached
  peek, or the block's rows of a full-canvas forward). Step i uses `fold_in(key, i)`, split into
  the unmask coin flips and the token draws. `unmask_step` records `step_offset + i`. Shared by
  the draft and every revision stage, so all of them follow one rule. `order` / `threshold`: see
  the module docstring; any order but "random" scores positions with `order_scores` under the
  sampling distribution and picks them with `ordered_unmask` (the coin key is then unused), and
  its step is skipped by a `lax.cond` once no row has masks (NFE is unchanged by the skip: it
  counts, per row, steps where the row still had masks).
  """
  cap = _unmask_cap(state.tokens.shape[-1], steps)
  sampling = dict(top_p=top_p, temperature=temperature, confidence=confidence)

  def step(s: BlockState, i: Array) -> tuple[BlockState, None]:
    coin_key, token_key = jax.random.split(jax.random.fold_in(key, i))
    masked = s.tokens == mask_id
    # Drawn flat for compile time (see `exponential_log_noise`); u * (S - i) < 1 is u < 1 / (S - i).
    coins = jax.random.uniform(coin_key, (masked.size,)).reshape(masked.shape)
    unmask = masked & (coins * (steps - i) < 1.0)
    tok, prob = _sample_unmasking(token_key, logp_fn(s.tokens), unmask, cap, **sampling)
    return BlockState(
      tokens=jnp.where(unmask, tok, s.tokens),
      conf=jnp.where(unmask, prob, s.conf),
      unmask_step=jnp.where(unmask, step_offset + i, s.unmask_step),
      nfe=s.nfe + jnp.any(masked, axis=-1).astype(jnp.int32),
    ), None

  def ordered_step(s: BlockState, i: Array) -> tuple[BlockState, None]:
    masked = s.tokens == mask_id

    def run(_) -> BlockState:
      _, token_key = jax.random.split(jax.random.fold_in(key, i))
      raw = logp_fn(s.tokens).astype(jnp.float32)
      logp = sampling_log_probs(raw, top_p, temperature)
      unmask = ordered_unmask(order_scores(logp, order), masked, i, steps, order, threshold)
      # Drawn from `logp` itself, so the draw is the one `sample_categorical` makes from `raw`.
      tok, prob = _sample_unmasking(token_key, logp, unmask, cap, top_p=1.0, temperature=1.0)
      if confidence == "raw":
        prob = jnp.exp(jnp.take_along_axis(raw, tok[..., None], axis=-1)[..., 0])
      return BlockState(
        tokens=jnp.where(unmask, tok, s.tokens),
        conf=jnp.where(unmask, prob, s.conf),
        unmask_step=jnp.where(unmask, step_offset + i, s.unmask_step),
        nfe=s.nfe + jnp.any(masked, axis=-1).astype(jnp.int32),
      )

    return jax.lax.cond(jnp.any(masked), run, lambda _: s, None), None

  body = step if order == "random" else ordered_step
  state, _ = jax.lax.scan(body, state, jnp.arange(steps, dtype=jnp.int32))
  return state


MIN_SEGMENT = 128  # cache slots: below this a separate scan costs more than the attention it saves


def segment_ends(first: int, n_blocks: int, block_size: int, segments: int) -> list[int]:
  """Block indices (exclusive) where the cache-growing segments of a draft over blocks
  [first, n_blocks) end: n_blocks / 2^j for j = segments - 1 ... 0, keeping only ends past `first`
  whose cache (end * block_size slots) has at least MIN_SEGMENT slots. The last is n_blocks."""
  ends = {n_blocks // 2**j for j in range(segments)}
  ends = {e for e in ends if e > first and e * block_size >= MIN_SEGMENT} | {n_blocks}
  return sorted(ends)


def check_positions(model: MaskedLM, length: int) -> None:
  """Refuses a canvas longer than a learned absolute position table (`model.learned_pos`): past it
  there are no position embeddings to look up. RoPE (or no positions) has no such limit."""
  table = model.cfg.learned_pos
  if table and length > table:
    raise ValueError(
      f"a canvas of {length} positions needs learned positions past the model's table "
      f"(model.learned_pos={table}): a model with learned absolute positions cannot generate past "
      f"{table} tokens, with or without draft.window; use a RoPE model (model.rope_base > 0)"
    )


@flax.struct.dataclass
class _DraftCarry:
  tokens: Int[Array, "N L"]
  conf: Float[Array, "N L"]
  unmask_step: Int[Array, "N L"]
  nfe: Int[Array, " N"]
  cache: KVCache | None
  fixed: Bool[Array, "N L"]
  done: Bool[Array, " N"]


def stop_at_eos(
  tokens: Int[Array, "N B"], generated: Bool[Array, "N B"], eos_id: int, pad_id: int
) -> tuple[Int[Array, "N B"], Bool[Array, "N B"], Bool[Array, "N B"], Bool[Array, " N"]]:
  """A drafted block with EOS stopping: the generated positions after each row's first generated
  EOS become `pad_id`. Returns (tokens, frozen: the first EOS and the generated positions after
  it, padded: the generated positions after it, ended: whether the row generated an EOS here)."""
  is_eos = generated & (tokens == eos_id)
  count = jnp.cumsum(is_eos, axis=-1)
  seen = count > 0  # at or after the first EOS
  padded = seen & ~(is_eos & (count == 1)) & generated
  tokens = jnp.where(padded, pad_id, tokens)
  return tokens, seen & generated, padded, jnp.any(is_eos, axis=-1)


def draft_blocks(
  model: MaskedLM,
  key: Array,
  batch: int,
  length: int,
  cfg: DraftConfig,
  prefix: Int[Array, "N P"] | None = None,
  canvas: Int[Array, "N L"] | None = None,
) -> DraftOutput:
  """The draft as a traceable function of a merged model (call under jit; see `draft`)."""
  p = 0 if prefix is None else prefix.shape[1]
  cfg.validate(length, p)
  check_positions(model, length)
  bs, mask_id, window = cfg.block_size, model.mask_id, cfg.window
  if canvas is not None:
    if prefix is not None:
      raise ValueError("draft: give a prefix or a canvas, not both")
    if canvas.shape != (batch, length):
      raise ValueError(f"draft: canvas shape {canvas.shape} must be (batch, L) = {(batch, length)}")
    tokens = canvas.astype(jnp.int32)
  else:
    tokens = jnp.full((batch, length), mask_id, jnp.int32)
  conf = jnp.full((batch, length), jnp.inf, jnp.float32)
  cache, commits = None, 0
  if prefix is not None:
    tokens = tokens.at[:, :p].set(prefix.astype(jnp.int32))
  fixed = tokens != mask_id
  stopping = cfg.eos_id >= 0
  # With a window the prefix goes through the block scan like any fixed block (skipped, then
  # committed), so its keys are computed through the window as well.
  first, n_blocks = (0 if window else p // bs), length // bs
  ends = [n_blocks]
  if cfg.use_cache and not window:
    ends = segment_ends(first, n_blocks, bs, cfg.cache_segments)
  if cfg.use_cache:
    cache = model.init_cache(batch, min(window + bs, length) if window else ends[0] * bs)
    if p and not window:
      _, cache = model(tokens[:, :p], mask=block_causal_mask(p, bs), cache=cache)
      commits = 1
  canvas_mask = block_causal_mask(length, bs, window)

  def one_block(c: _DraftCarry, b: Array) -> tuple[_DraftCarry, None]:
    start = b * bs
    positions = jnp.broadcast_to(start + jnp.arange(bs), (batch, bs))

    def peek(blk: Array) -> Array:
      if cfg.use_cache:
        logp, _ = model(blk, positions=positions, cache=c.cache)
        return logp
      canvas = jax.lax.dynamic_update_slice(c.tokens, blk, (0, start))
      logp, _ = model(canvas, mask=canvas_mask)
      return jax.lax.dynamic_slice_in_dim(logp, start, bs, axis=1)

    blk = jax.lax.dynamic_slice_in_dim(c.tokens, start, bs, axis=1)
    blk_fixed = jax.lax.dynamic_slice_in_dim(c.fixed, start, bs, axis=1)
    if stopping:  # a finished row's [MASK]s are padding, never drafted
      pad = c.done[:, None] & (blk == mask_id)
      blk, blk_fixed = jnp.where(pad, cfg.pad_id, blk), blk_fixed | pad
    generated = blk == mask_id
    block = BlockState(
      tokens=blk,
      conf=jax.lax.dynamic_slice_in_dim(c.conf, start, bs, axis=1),
      unmask_step=jnp.full((batch, bs), -1, jnp.int32),
      nfe=c.nfe,
    )
    denoise = functools.partial(
      denoise_block,
      peek,
      jax.random.fold_in(key, b),
      steps=cfg.steps_per_block,
      step_offset=b * cfg.steps_per_block,
      mask_id=mask_id,
      top_p=cfg.top_p,
      temperature=cfg.temperature,
      confidence=cfg.confidence,
      order=cfg.order,
      threshold=cfg.threshold,
    )
    # A block that is fixed in every row (a prompt's) needs no denoising steps.
    block = jax.lax.cond(jnp.any(generated), denoise, lambda s: s, block)
    done = c.done
    if stopping:
      tokens, frozen, padded, ended = stop_at_eos(block.tokens, generated, cfg.eos_id, cfg.pad_id)
      block = block.replace(
        tokens=tokens,
        conf=jnp.where(padded, jnp.inf, block.conf),
        unmask_step=jnp.where(padded, -1, block.unmask_step),
      )
      blk_fixed, done = blk_fixed | frozen, done | ended
    cache = c.cache
    if cfg.use_cache:
      _, cache = model(block.tokens, positions=positions, cache=cache)
      if window:  # commit and shift: past W tokens the cache drops its oldest block
        over = cache.length > window
        cache = jax.lax.cond(over, lambda k: k.drop_oldest(bs), lambda k: k, cache)
    return _DraftCarry(
      tokens=jax.lax.dynamic_update_slice(c.tokens, block.tokens, (0, start)),
      conf=jax.lax.dynamic_update_slice(c.conf, block.conf, (0, start)),
      unmask_step=jax.lax.dynamic_update_slice(c.unmask_step, block.unmask_step, (0, start)),
      nfe=block.nfe,
      cache=cache,
      fixed=jax.lax.dynamic_update_slice(c.fixed, blk_fixed, (0, start)),
      done=done,
    ), None

  carry = _DraftCarry(
    tokens=tokens,
    conf=conf,
    unmask_step=jnp.full((batch, length), -1, jnp.int32),
    nfe=jnp.zeros((batch,), jnp.int32),
    cache=cache,
    fixed=fixed,
    done=jnp.zeros((batch,), bool),
  )
  start = first
  for end in ends:  # static: one scan per cache size
    if cfg.use_cache and not window:
      carry = carry.replace(cache=carry.cache.resize(end * bs))
    carry, _ = jax.lax.scan(one_block, carry, jnp.arange(start, end, dtype=jnp.int32))
    start = end
  if cfg.use_cache:
    commits += n_blocks - first
  return DraftOutput(
    tokens=carry.tokens,
    conf=carry.conf,
    unmask_step=carry.unmask_step,
    nfe=carry.nfe,
    commit_forwards=jnp.asarray(commits, jnp.int32),
    fixed=carry.fixed,
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length", "cfg"))
def draft(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  key: Array,
  batch: int,
  length: int,
  cfg: DraftConfig,
  prefix: Int[Array, "N P"] | None = None,
  canvas: Int[Array, "N L"] | None = None,
) -> DraftOutput:
  """Stage-1 draft of `batch` canvases of `length` tokens, one jitted call.

  Args:
    graphdef, state: `nnx.split(masked_lm)`; graphdef static, state traced.
    key: PRNG key.
    batch, length, cfg: static. L = `length` counts the prefix.
    prefix: optional int [N, P] tokens fixed at positions [0, P) (P a multiple of the block size),
      committed to the cache in one forward before drafting (not counted in NFE).
    canvas: optional int [N, L] starting sequence instead of a prefix: its [MASK] positions are
      drafted, the others are fixed (prompts of any length per row, infill templates).
  """
  return draft_blocks(nnx.merge(graphdef, state), key, batch, length, cfg, prefix, canvas)
