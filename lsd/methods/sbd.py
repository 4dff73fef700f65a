"""Structural Block Diffusion (SBD): a masked block-diffusion LM trained with mix-scale block sizes.

Config fields read here:
  model.*            `TransformerConfig` fields; vocab_size and the [MASK] id come from the tokenizer.
  data.seq_len       the canvas length L.
  sbd.block_small    B_small (default 4); must divide L.
  sbd.block_large    B_large, 0 = L (the global, MDLM-like block); must divide L.
  sbd.mix_lambda     probability of drawing B_large at a step, in [0, 1] (paper: 0.1).
  sbd.t_min, t_max   clipped time interval (default [1e-3, 1]).
  sbd.antithetic     stratified block times (BD3-LM).
  sbd.ignore_bos     position 0 is never masked.
The math lives in `lsd.diffusion.masked`; sampling (draft then revise) in `lsd.sampling.revise`.
Conditional generation (`generate`): inputs {"prompt": text} continue a text, {"infill": "a [MASK:3]
b"} fill the marked spans; both keep their given tokens fixed through draft and revision.
Length: sample.max_new_tokens (0 = fill the training canvas of data.seq_len) may exceed
data.seq_len; a canvas longer than data.seq_len is drafted and revised through a sliding window of
sample.window tokens (0 = auto: data.seq_len - draft.block_size), see `lsd.sampling.block`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lsd.config import ConfigError, check_divides, check_range
from lsd.diffusion.masked import NoiseSpec, mdlm_loss, mix_scale_loss
from lsd.methods.causal_lm import transformer_flops_per_token
from lsd.models.masked_lm import MaskedLM
from lsd.nn import TransformerConfig
from lsd.sampling.block import DraftConfig
from lsd.sampling.revise import SampleOutput, SBDSamplerConfig, StageConfig, draft_then_revise
from lsd.train.task import Batch, Task


def default_sbd_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "block_small": 4,
      "block_large": 0,
      "mix_lambda": 0.1,
      "t_min": 1e-3,
      "t_max": 1.0,
      "antithetic": True,
      "ignore_bos": False,
    }
  )


def _check_block(field: str, value: Any, seq_len: int, *, allow_zero: bool) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
    accepted = "an int >= 0 (0 = data.seq_len)" if allow_zero else "an int >= 1"
    raise ConfigError(f"{field}={value!r} must be {accepted} dividing data.seq_len={seq_len}")
  if value:
    check_divides("data.seq_len", seq_len, field, value)


def sbd_block_sizes(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Validated (B_small, B_large) with B_large = 0 resolved to L; raises ConfigError naming the field."""
  seq_len = config.data.seq_len
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise ConfigError(f"data.seq_len={seq_len!r} must be an int >= 1")
  _check_block("sbd.block_small", config.sbd.block_small, seq_len, allow_zero=False)
  _check_block("sbd.block_large", config.sbd.block_large, seq_len, allow_zero=True)
  return config.sbd.block_small, config.sbd.block_large or seq_len


def sbd_noise(config: ml_collections.ConfigDict) -> NoiseSpec:
  s = config.sbd
  check_range("sbd.t_min", s.t_min, 0.0, 1.0)
  check_range("sbd.t_max", s.t_max, 0.0, 1.0)
  if s.t_min > s.t_max:
    raise ConfigError(f"sbd.t_min={s.t_min} must be <= sbd.t_max={s.t_max}")
  return NoiseSpec(
    antithetic=bool(s.antithetic),
    t_min=float(s.t_min),
    t_max=float(s.t_max),
    ignore_bos=bool(s.ignore_bos),
  )


def sbd_model_from_config(
  cfg: ml_collections.ConfigDict, vocab_size: int, mask_id: int, *, rngs: nnx.Rngs | None = None
) -> MaskedLM:
  """The SBD `MaskedLM` from a run config's `model` section (fresh weights from `rngs`, default seed 0)."""
  model_cfg = TransformerConfig.from_config(cfg.model, vocab_size=vocab_size)
  return MaskedLM(model_cfg, mask_id, rngs=nnx.Rngs(0) if rngs is None else rngs)


class SBDTask(Task):
  """Training side of SBD: mix-scale block-diffusion NELBO on packed canvases of length L."""

  name = "sbd"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    # Validate at construction so a bad launch command fails before data or model are built.
    self.block_small, self.block_large = sbd_block_sizes(config)
    check_range("sbd.mix_lambda", config.sbd.mix_lambda, 0.0, 1.0)
    self.mix_lambda = float(config.sbd.mix_lambda)
    self.noise = sbd_noise(config)
    # Every step draws the global block (MDLM): trained with an L-length forward (see `loss`).
    self.global_only = self.block_large == config.data.seq_len and (
      self.block_small == self.block_large or self.mix_lambda == 1.0
    )

  def validate(self) -> None:
    # The vocabulary comes from the tokenizer; any size checks the other model fields.
    TransformerConfig.from_config(self.config.model, vocab_size=8)
    self.sampler_config()
    stop = self.config.sample.get("stop_at_eos", False)
    if not isinstance(stop, bool):
      raise ConfigError(f"sample.stop_at_eos={stop!r} must be true or false")
    n = self.max_new_tokens()
    if n:
      self.sampler_config(round_up(n, self.sampler_config().draft.block_size))

  def max_new_tokens(self, value: Any = None, field: str = "sample.max_new_tokens") -> int:
    """sample.max_new_tokens (or `value`), validated: 0 = fill the training canvas (data.seq_len);
    n > 0 = n generated tokens, past data.seq_len through the window if need be."""
    n = self.config.sample.get("max_new_tokens", 0) if value is None else value
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      raise ConfigError(
        f"{field}={n!r} must be an int >= 0 (0 = fill data.seq_len={self.config.data.seq_len})"
      )
    return n

  def check_length(self, model: MaskedLM, length: int) -> None:
    """A canvas past a learned position table is refused, naming the length fields."""
    table = model.cfg.learned_pos
    if table and length > table:
      raise ConfigError(
        f"a canvas of {length} tokens (sample.max_new_tokens and the prompt) is longer than the "
        f"model's learned positions (model.learned_pos={table}); accepted: at most {table} "
        "tokens (a model with learned absolute positions cannot generate past its table)"
      )

  def _require_tokenizer(self):
    if self.tokenizer is None:
      raise RuntimeError("SBDTask needs .tokenizer (set by make_data) before the model is built")
    return self.tokenizer

  def build_model(self, rngs: nnx.Rngs) -> MaskedLM:
    tok = self._require_tokenizer()
    return sbd_model_from_config(self.config, tok.vocab_size, tok.mask_id, rngs=rngs)

  def loss(self, model: MaskedLM, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
    if self.global_only:
      # Every step is global (MDLM): the x0 half of the 2L input would never be attended to, so the
      # L-length forward gives the same loss (within fp32 rounding) at half the cost. The key is
      # split as in `mix_scale_loss`, so the noise is the one that function would draw.
      _, noise_key = jax.random.split(key)
      loss, metrics = mdlm_loss(model, batch["tokens"], batch["valid"], noise_key, noise=self.noise)
      return loss, {**metrics, "block_size": jnp.float32(self.block_large)}
    return mix_scale_loss(
      model,
      batch["tokens"],
      batch["valid"],
      key,
      lam=self.mix_lambda,
      small=self.block_small,
      large=self.block_large,
      noise=self.noise,
    )

  def likelihood(self, *, num_samples: int = 1, block_size: int | None = None):
    """The NELBO of held-out canvases (`lsd.eval.likelihood.nelbo_sums`) at `block_size` (default
    sbd.block_small; 0 or data.seq_len = one global block, MDLM): each block given the clean blocks
    before it, num_samples low-discrepancy draws of t per block on [1e-3, 1]."""
    import functools

    from lsd.eval.likelihood import EVAL_T_MAX, EVAL_T_MIN, nelbo_sums

    length = self.config.data.seq_len
    size = self.block_small if block_size is None else block_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or (size and length % size):
      raise ConfigError(
        f"--block_size {size!r} is not usable; accepted: an int >= 1 dividing data.seq_len="
        f"{length} (0 = {length}, one global block)"
      )
    size = size or length
    fn = functools.partial(
      nelbo_sums, block_size=size, num_samples=num_samples, ignore_bos=self.noise.ignore_bos
    )
    info = {
      "estimate": "nelbo (upper bound on -log p)",
      "block_size": size,
      "nelbo_samples": num_samples,
      "t_interval": [EVAL_T_MIN, EVAL_T_MAX],
    }
    return fn, info

  def flops_per_token(self) -> float:
    """Training FLOPs per canvas token (the unit of `tokens_in`), expected over the mix-scale draw.

    A step of block size B < L processes the canvas as a 2L sequence [x_t ; x0] whose attention
    scores only what the mask shows (`BlockDiffusionMask`): L + B / 2 keys per query on average, so
    per canvas token 2 * (6 * N + 6 * n_layers * (L + B / 2) * d_attn). A step of B = L is the
    L-length forward, 6 * N + 6 * n_layers * L * d_attn. N = non-embedding matmul parameters (the
    tied output head counts), d_attn = n_heads * head_dim.
    """
    tok = self._require_tokenizer()
    model = nnx.eval_shape(lambda: self.build_model(nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    cfg = TransformerConfig.from_config(self.config.model, vocab_size=tok.vocab_size)
    seq_len = self.config.data.seq_len

    def at(block: int) -> float:
      if block == seq_len:
        return transformer_flops_per_token(cfg, seq_len, n_params)
      return 2.0 * transformer_flops_per_token(cfg, seq_len + block / 2, n_params)

    if self.global_only:  # L-length forward, see `loss`
      return at(seq_len)
    if self.block_small == self.block_large:
      return at(self.block_small)
    lam = self.mix_lambda
    return (1.0 - lam) * at(self.block_small) + lam * at(self.block_large)

  def sampler_config(self, length: int | None = None) -> SBDSamplerConfig:
    seq_len = self.config.data.seq_len
    return sampler_config(self.config.sample, length or seq_len, seq_len)

  def lower_sampler(self, graphdef, params, key, num_samples: int):
    """`draft_then_revise` (the whole draft-then-revise sampler, one jitted call), lowered."""
    length = self.config.data.seq_len
    cfg = self.sampler_config(length)
    return draft_then_revise.lower(graphdef, params, key, batch=num_samples, length=length, cfg=cfg)

  def sample_text(self, model: MaskedLM, key: jax.Array, num_samples: int) -> list[dict]:
    """Draft-then-revise samples: revised text and tokens plus the draft, snapshot confidences and
    NFE per stage (column 0 = draft)."""
    tok = self._require_tokenizer()
    graphdef, state = nnx.split(model)
    n = self.max_new_tokens()
    length = round_up(n, self.sampler_config().draft.block_size) if n else self.config.data.seq_len
    self.check_length(model, length)
    out = draft_then_revise(graphdef, state, key, num_samples, length, self.stop_config(length))
    rows = decode_output(out, tok)
    return [cut_row(r, n, tok) for r in rows] if n and n < length else rows

  def stop_config(self, length: int, stop: bool | None = None) -> SBDSamplerConfig:
    """The sampler config with EOS stopping set from `sample.stop_at_eos` (or `stop`)."""
    cfg = self.sampler_config(length)
    stop = self.config.sample.get("stop_at_eos", False) if stop is None else stop
    if not isinstance(stop, bool):
      raise ConfigError(f"sample.stop_at_eos={stop!r} must be true or false")
    if not stop:
      return cfg
    tok = self._require_tokenizer()
    draft = dataclasses.replace(cfg.draft, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return dataclasses.replace(cfg, draft=draft)

  def generate(self, model: MaskedLM, key: jax.Array, inputs: list[dict], **options) -> list[dict]:
    """Prompt continuation and infilling, all inputs in one batched call.

    An input is {"prompt": text} (the canvas starts <bos> prompt, the rest is generated) or
    {"infill": template} (<bos> template <eos>, then padding; each [MASK:n] of the template is n
    generated tokens, see `parse_infill`). Rows are left-aligned: each row's given tokens are fixed
    positions of its own canvas, so prompts of different lengths share one call. The fixed tokens
    are never drafted or remasked. Option stop_at_eos (default `sample.stop_at_eos`): a row whose
    drafted block holds EOS ends there (padding after it, left alone by revision). Option
    max_new_tokens (default `sample.max_new_tokens`; 0 = the canvas is data.seq_len): each prompt
    gets that many generated positions, the canvas being the longest row rounded up to the draft
    block size, past data.seq_len through the draft window if need be. "text" is the prompt and
    its continuation up to the first generated EOS, or the filled template; "tokens" the canvas
    (cut at that EOS for prompts). A call with an infill input does not stop at EOS (an EOS
    drafted in a span would otherwise pad the spans after it).
    """
    inputs = self.generation_inputs(inputs, ("prompt", "infill"))
    unknown = sorted(set(options) - {"stop_at_eos", "max_new_tokens"})
    if unknown:
      raise ConfigError(
        f"generate: options {unknown} are not read by sbd; accepted: max_new_tokens, stop_at_eos"
      )
    tok = self._require_tokenizer()
    length = self.config.data.seq_len
    n = self.max_new_tokens(options.get("max_new_tokens"), "generate: max_new_tokens")
    if n:
      # A prompt gets n positions; a template its own length and the closing <eos>.
      longest = max(
        len(self.given_ids(x, i)) + (n if "prompt" in x else 1) for i, x in enumerate(inputs)
      )
      length = round_up(longest, self.sampler_config().draft.block_size)
    self.check_length(model, length)
    stop = options.get("stop_at_eos")
    if any("infill" in x for x in inputs):  # an EOS inside a span would pad the spans after it
      stop = False
    cfg = self.stop_config(length, stop)
    canvas = np.stack([self.canvas_row(x, i, length) for i, x in enumerate(inputs)])
    graphdef, state = nnx.split(model)
    out = draft_then_revise(
      graphdef, state, key, len(inputs), length, cfg, canvas=jnp.asarray(canvas, jnp.int32)
    )
    rows = decode_output(out, tok)
    for k, (x, row, start) in enumerate(zip(inputs, rows, canvas, strict=True)):
      given = int(np.sum(start != tok.mask_id)) if "prompt" in x else 0
      if "prompt" in x and n and given + n < length:  # this row's max_new_tokens positions
        rows[k] = row = cut_row(row, given + n, tok)
      if "prompt" in x:  # cut at the first EOS the sampler generated
        gen = [j for j, t in enumerate(row["tokens"]) if j >= given and t == tok.eos_id]
        if gen:
          row["tokens"] = row["tokens"][: gen[0]]
          row["text"] = tok.decode(row["tokens"])
      else:  # the template: up to its closing <eos>
        end = int(np.flatnonzero(start == tok.eos_id)[-1]) if tok.eos_id in start else length
        row["tokens"] = row["tokens"][:end]
        row["text"] = tok.decode(row["tokens"])
    return [{**x, **row} for x, row in zip(inputs, rows, strict=True)]

  def given_ids(self, x: dict, i: int) -> list[int]:
    """One `generate` input's tokens: <bos> and the prompt, or <bos> and the infill template with
    [MASK] for each span position."""
    tok = self._require_tokenizer()
    if ("prompt" in x) == ("infill" in x):
      raise ConfigError(
        f"generate: input {i} {x!r} needs exactly one of 'prompt' (--prompt) or 'infill' (--infill)"
      )
    if "prompt" in x:
      text = x["prompt"]
      if not isinstance(text, str):
        raise ConfigError(f"generate: input {i} prompt={text!r} must be a string (--prompt)")
      return [tok.bos_id, *tok.encode(text)]
    ids = [tok.bos_id]
    for piece in parse_infill(x["infill"], "--infill"):
      ids += [tok.mask_id] * piece if isinstance(piece, int) else tok.encode(piece)
    return ids

  def canvas_row(self, x: dict, i: int, length: int) -> np.ndarray:
    """The starting canvas of one `generate` input: fixed tokens, [MASK] where to generate."""
    tok = self._require_tokenizer()
    ids = self.given_ids(x, i)
    if "prompt" in x:
      text = x["prompt"]
      if len(ids) >= length:
        raise ConfigError(
          f"--prompt {text!r} (input {i}) is {len(ids)} tokens with <bos>; accepted: at most "
          f"{length - 1} (data.seq_len={length} leaves at least one position to generate)"
        )
      ids += [tok.mask_id] * (length - len(ids))
    else:
      if len(ids) > length:
        raise ConfigError(
          f"--infill {x['infill']!r} (input {i}) is {len(ids)} tokens with <bos> and its spans; "
          f"accepted: at most data.seq_len={length}"
        )
      if len(ids) < length:
        ids += [tok.eos_id] + [tok.pad_id] * (length - len(ids) - 1)
    return np.asarray(ids, np.int32)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def cut_row(row: dict, n: int, tokenizer) -> dict:
  """A `decode_output` row cut to its first `n` positions (texts decoded again)."""
  row = {**row, **{k: row[k][:n] for k in ("tokens", "draft_tokens", "conf")}}
  row["text"] = tokenizer.decode(row["tokens"])
  row["draft_text"] = tokenizer.decode(row["draft_tokens"])
  return row


_SPAN = re.compile(r"\[MASK(?::([^\]]*))?\]")


def parse_infill(template: Any, flag: str = "infill") -> list[str | int]:
  """An infill template -> its pieces: fixed text (str) and span lengths (int >= 1), in order.

  "The [MASK:3] sat on the [MASK:2]." -> ["The ", 3, " sat on the ", 2, "."]. Raises a one-line
  ConfigError naming `flag` and the template for a bad span ([MASK], [MASK:0], [MASK:x]), an
  unclosed "[MASK", or a template without spans.
  """
  accepted = "text with spans [MASK:n], n an int >= 1, e.g. 'The [MASK:3] sat on the mat.'"
  if not isinstance(template, str):
    raise ConfigError(f"{flag} {template!r} must be a string; accepted: {accepted}")
  pieces: list[str | int] = []
  pos = 0
  for m in _SPAN.finditer(template):
    n = m.group(1)
    if n is None or not n.strip().isdigit() or int(n) < 1:
      raise ConfigError(
        f"{flag} {template!r}: span {m.group(0)!r} is not valid; accepted: {accepted}"
      )
    if m.start() > pos:
      pieces.append(template[pos : m.start()])
    pieces.append(int(n))
    pos = m.end()
  rest = template[pos:]
  if "[MASK" in rest:
    raise ConfigError(f"{flag} {template!r}: unclosed '[MASK'; accepted: {accepted}")
  if rest:
    pieces.append(rest)
  if not any(isinstance(p, int) for p in pieces):
    raise ConfigError(f"{flag} {template!r} has no span to fill; accepted: {accepted}")
  return pieces


def default_sample_config() -> ml_collections.ConfigDict:
  """Sampler settings. stages: [block_size (0 = L, global), gamma, steps, score(, heldout_splits)]
  per revision stage; score in {snapshot, posthoc, posthoc_heldout, random}; heldout_splits (default
  4) the masked forwards of posthoc_heldout; [] = draft only (BD3-LM). draft.order: which masked
  positions a draft step unmasks, in {random, confidence, margin, entropy, threshold};
  draft.threshold: the probability above which order=threshold commits a position, in (0, 1].
  stop_at_eos: a row whose drafted block holds EOS ends there; the rest of its canvas is padding
  that revision leaves alone. max_new_tokens: generated tokens per sample / prompt, 0 = fill
  data.seq_len; may exceed data.seq_len. window: the draft and revision attend to the last `window`
  tokens before a block (a multiple of draft.block_size, at most data.seq_len - draft.block_size);
  0 = auto: no window while the canvas fits data.seq_len, data.seq_len - draft.block_size past it.
  Past data.seq_len a stage block of 0 is the longest block that fits window + draft.block_size."""
  return ml_collections.ConfigDict(
    {
      "draft": {
        "block_size": 4,
        "steps_per_block": 4,
        "top_p": 0.9,
        "temperature": 1.0,
        "use_cache": True,
        "confidence": "filtered",
        "order": "random",
        "threshold": 0.9,
      },
      "stages": [[0, 0.25, 32, "snapshot"]],
      "stop_at_eos": False,
      "max_new_tokens": 0,
      "window": 0,
    }
  )


def sampler_config(
  cfg: ml_collections.ConfigDict, length: int, seq_len: int | None = None
) -> SBDSamplerConfig:
  """`config.sample` -> the static sampler config of a canvas of `length`; raises ConfigError naming
  the bad field. seq_len: the trained length (data.seq_len, default `length`); a longer canvas gets
  the draft window `sample.window` (0 = seq_len - draft.block_size)."""
  d = cfg.draft
  seq_len = seq_len or length

  def num(kind, field, value):  # a ValueError naming the field for a value of the wrong type
    try:
      if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError
      return kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
      msg = f"{field}={value!r} must be {'an int' if kind is int else 'a number'}"
      raise ValueError(msg) from None

  try:
    block = num(int, "draft.block_size", d.block_size or min(length, seq_len))
    window = _window(cfg.get("window", 0), block, length, seq_len)
    draft = DraftConfig(
      block_size=block,
      steps_per_block=num(int, "draft.steps_per_block", d.steps_per_block),
      top_p=num(float, "draft.top_p", d.top_p),
      temperature=num(float, "draft.temperature", d.temperature),
      use_cache=bool(d.use_cache),
      confidence=str(d.confidence),
      # Configs saved before these fields existed sample with the random order.
      order=d.get("order", "random"),
      threshold=num(float, "draft.threshold", d.get("threshold", 0.9)),
      window=window,
    )
    stages = []
    if not isinstance(cfg.stages, list | tuple):
      raise ValueError(
        f"stages={cfg.stages!r} must be a list of [block_size, gamma, steps(, score(, splits))]"
      )
    for k, st in enumerate(cfg.stages):
      if not isinstance(st, list | tuple) or len(st) not in (3, 4, 5):
        raise ValueError(
          f"stages[{k}]={st!r} must be [block_size, gamma, steps(, score(, heldout_splits))]"
        )
      block, gamma, steps = (
        num(int, f"stages[{k}][0]", st[0]),
        num(float, f"stages[{k}][1]", st[1]),
        num(int, f"stages[{k}][2]", st[2]),
      )
      if not block:  # global: the canvas, or with a window the longest block that fits it
        block = length if not window else _longest_block(length, window + draft.block_size)
      stages.append(StageConfig(block, gamma, steps, *st[3:]))
    out = SBDSamplerConfig(draft=draft, stages=tuple(stages))
    out.validate(length)
  except ValueError as e:
    raise ConfigError(f"sample.{e}") from e
  return out


def _window(w: Any, block: int, length: int, seq_len: int) -> int:
  """sample.window resolved for a canvas of `length` (ValueError without the "sample." prefix)."""
  most = seq_len - block
  if isinstance(w, bool) or not isinstance(w, int) or w < 0 or (w and (w % block or w > most)):
    raise ValueError(
      f"window={w!r} must be 0 (auto) or a positive multiple of draft.block_size={block} at most "
      f"data.seq_len - draft.block_size={most}"
    )
  if w or length <= seq_len:
    return w
  if most < 1:
    raise ValueError(
      f"draft.block_size={block} leaves no window in data.seq_len={seq_len}: a canvas of {length} "
      f"tokens (past data.seq_len) needs draft.block_size < data.seq_len"
    )
  return most


def _longest_block(length: int, span: int) -> int:
  """The largest divisor of `length` that is at most `span`."""
  return max(b for b in range(1, min(span, length) + 1) if length % b == 0)


def decode_output(out: SampleOutput, tokenizer) -> list[dict]:
  host = jax.device_get(out)
  rows = []
  for i in range(host.tokens.shape[0]):
    rows.append(
      {
        "text": tokenizer.decode(host.tokens[i].tolist()),
        "draft_text": tokenizer.decode(host.draft_tokens[i].tolist()),
        "tokens": host.tokens[i].tolist(),
        "draft_tokens": host.draft_tokens[i].tolist(),
        # None where nothing was generated (prompt, infill text, padding): JSON has no infinity.
        "conf": [float(c) if np.isfinite(c) else None for c in host.conf[i]],
        "nfe_per_stage": host.nfe_per_stage[i].tolist(),
        "nfe": int(host.nfe_per_stage[i].sum()),
      }
    )
  return rows
