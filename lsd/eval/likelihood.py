"""Likelihood of held-out text: the masked-diffusion NELBO (an upper bound on -log p) and the causal
LM's exact negative log-likelihood, in nats per token (the BD3-LM / MDLM `ppl_eval`).

Held-out documents are tokenised and wrap-packed exactly as the run's training data
(`lsd.data.eval_canvases`: [bos] doc [eos], cut every data.seq_len tokens, only the tail of the last
canvas is padding). Each method defines the per-canvas sums (`Task.likelihood`); `evaluate` runs
them jitted over all canvases and reports

  nats_per_token = (sum over canvases of the NLL or its bound) / (number of scored tokens),
  ppl = exp(nats_per_token)  (a perplexity bound for diffusion models, exact for the causal LM).

Masked / block diffusion (`nelbo_sums`): the continuous-time MDLM bound with the log-linear
schedule, per block b of size B given the clean blocks < b (BD3-LM; B = L is MDLM):
  -log p(x) <= sum_b E_{t ~ U[t_min, 1]} E_{x_t ~ q_t} [ (1/t) sum_{masked l in b} -log p(x^l | x_t, x_{<b}) ],
  t_min = 1e-3 (the unclipped interval BD3-LM reports likelihood on, whatever the training clip).
Each (canvas, block) gets K = num_samples times t_k = t_min + (t_max - t_min) (u + k) / K,
k = 0..K-1, from one uniform u per (canvas, block): a low-discrepancy (stratified) draw, MDLM's
antithetic sampler applied over the K draws of one block instead of over the batch, so the estimate
is unbiased for every block and does not depend on how canvases are batched. The randomness of
canvas i comes from fold_in(key, i). Scored tokens: every valid canvas token (BD3-LM's denominator;
with sbd.ignore_bos position 0 is never masked, contributes 0 and still counts).

Causal LM (`causal_nll_sums`): -log p(x_l | x_<l) for l = 1..L-1 of each canvas (the first token of a
canvas is given, as in training); scored tokens: valid targets with a valid predecessor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lsd.config import ConfigError
from lsd.diffusion.masked import SCHEDULE, bd3_forward
from lsd.diffusion.schedules import ClippedInterval
from lsd.nn import padding_mask

EVAL_T_MIN, EVAL_T_MAX = 1e-3, 1.0
# fn(model, batch, key) -> (nll [B] fp32, tokens [B] fp32): per-canvas sums; batch has "tokens",
# "valid" and "row" (the canvas index, for per-canvas randomness).
LikelihoodFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array]]


def eval_noise(
  key: jax.Array,
  rows: jax.Array,
  x0: jax.Array,
  noisable: jax.Array,
  block_size: int,
  k: int | jax.Array,
  num_samples: int,
  mask_id: int,
  *,
  t_min: float = EVAL_T_MIN,
  t_max: float = EVAL_T_MAX,
) -> tuple[jax.Array, jax.Array]:
  """(t fp32 [B, L], x_t int32 [B, L]) of draw k of `num_samples` for canvases `rows` [B].

  One uniform u per (canvas, block) from fold_in(key, row); t_k = interval((u + k) / K), so the K
  draws of a block lie in the K strata of [0, 1); position l is masked when a uniform from
  fold_in(mask key, k) falls below t (and l is `noisable`).
  """
  length = x0.shape[1]
  blk = jnp.arange(length, dtype=jnp.int32) // block_size
  interval = ClippedInterval(t_min, t_max)

  def one(row, x0_row, noisable_row):
    t_key, mask_key = jax.random.split(jax.random.fold_in(key, row))
    u = jax.random.uniform(t_key, (length,), jnp.float32)[blk]
    t = interval(jnp.minimum((u + k) / num_samples, 1.0))
    move = jax.random.uniform(jax.random.fold_in(mask_key, k), (length,), jnp.float32) < t
    return t, jnp.where(move & noisable_row, jnp.asarray(mask_id, x0_row.dtype), x0_row)

  return jax.vmap(one)(rows, x0, noisable)


def masked_bound_terms(
  log_probs: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array, mask_id: int, valid: jax.Array
) -> jax.Array:
  """Per-canvas sums [B] of (1/t) * -log p(x0) over masked valid positions (fp32)."""
  masked = (x_t == mask_id) & valid
  nll = -jnp.take_along_axis(log_probs, x0[..., None], axis=-1)[..., 0].astype(jnp.float32)
  weight = SCHEDULE.weight(jnp.where(masked, t, 1.0))
  return jnp.sum(jnp.where(masked, nll * weight, 0.0), axis=1)


def nelbo_sums(
  model,
  batch: dict,
  key: jax.Array,
  *,
  block_size: int,
  num_samples: int,
  ignore_bos: bool = False,
  full_context: bool | None = None,
  t_min: float = EVAL_T_MIN,
  t_max: float = EVAL_T_MAX,
) -> tuple[jax.Array, jax.Array]:
  """The NELBO of each canvas (summed over its tokens, averaged over `num_samples` draws of t and
  the mask) and its number of valid tokens; fp32 [B] each.

  block_size: static, divides L. full_context: run the 2L block-diffusion forward [x_t ; x0]
  (default: when block_size < L); with block_size = L the L-length bidirectional forward (MDLM)
  gives the same values up to fp32 rounding.
  """
  x0, valid, rows = batch["tokens"], batch["valid"], batch["row"]
  length = x0.shape[1]
  if length % block_size:
    raise ConfigError(f"block_size={block_size} must divide the canvas length {length}")
  two_l = block_size < length if full_context is None else full_context
  noisable = valid
  if ignore_bos:
    noisable = valid & (jnp.arange(length) > 0)[None, :]

  def draw(total, k):
    t, x_t = eval_noise(
      key, rows, x0, noisable, block_size, k, num_samples, model.mask_id, t_min=t_min, t_max=t_max
    )
    if two_l:
      log_probs = bd3_forward(model, x_t, x0, valid, block_size)
    else:
      log_probs, _ = model(x_t, mask=padding_mask(valid, valid))
    return total + masked_bound_terms(log_probs, x0, x_t, t, model.mask_id, valid), None

  zero = jnp.zeros(x0.shape[0], jnp.float32)
  total, _ = jax.lax.scan(draw, zero, jnp.arange(num_samples, dtype=jnp.int32))
  return total / num_samples, jnp.sum(valid, axis=1).astype(jnp.float32)


def causal_nll_sums(
  model, batch: dict, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Exact -log p of each canvas's tokens 1..L-1 given their prefix (fp32 [B]) and the number of
  scored tokens (valid targets with a valid predecessor, fp32 [B]). `key` is unused."""
  from lsd.nn import causal_mask

  tokens, valid = batch["tokens"], batch["valid"]
  logits, _ = model(tokens[:, :-1], mask=causal_mask(tokens.shape[1] - 1))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  weights = valid[:, 1:] & valid[:, :-1]
  return jnp.sum(jnp.where(weights, nll, 0.0), axis=1), jnp.sum(weights, axis=1).astype(jnp.float32)


def read_documents(path: str | os.PathLike, data_config, flag: str = "--data") -> list[dict]:
  """Documents of a held-out file, read as the run reads its training files: .txt one document per
  line (paragraph / file per the run's data.text_split when the run reads text), .jsonl the run's
  data.text_field (default "text"). Errors name `flag` and what is accepted."""
  from lsd.data import load_documents
  from lsd.fileio import as_path

  accepted = "a .txt file (one document per line) or a .jsonl file (a 'text' field per line)"
  p = as_path(path)
  if not p.is_file():
    raise ConfigError(f"{flag} {str(path)!r} does not exist or is not a file; accepted: {accepted}")
  cfg = data_config.copy_and_resolve_references()
  suffix = p.suffix.lower()
  if suffix == ".jsonl":
    if cfg.source != "jsonl":
      cfg.text_field = "text"
    cfg.source = "jsonl"
  elif suffix == ".txt":
    if cfg.source != "text":
      cfg.text_split = "line"
    cfg.source = "text"
  else:
    raise ConfigError(f"{flag} {str(path)!r} has suffix {p.suffix!r}; accepted: {accepted}")
  cfg.path, cfg.max_docs, cfg.label_field = str(path), 0, ""
  try:
    return load_documents(cfg)
  except ConfigError as e:
    raise ConfigError(f"{flag} {str(path)!r}: {e}") from e


def held_out_documents(data_config) -> list[dict]:
  """The run's held-out documents: its data source split by data.eval_fraction and split_seed."""
  from lsd.data import load_documents, split_documents

  _, held_out = split_documents(
    load_documents(data_config), data_config.eval_fraction, data_config.split_seed
  )
  if not held_out:
    raise ConfigError(
      "the run holds out no documents (data.eval_fraction=0); pass --data FILE with held-out text"
    )
  return held_out


def held_out_prepared(data_config) -> tuple[np.ndarray, np.ndarray, int]:
  """The held-out canvases of a run trained on a `lsd prepare` directory, read from its records
  (the texts are not there): (tokens, valid, number of held-out documents)."""
  from lsd.data import load_prepared

  data = load_prepared(data_config, None, seed=0)
  if not len(data.eval_ids):
    raise ConfigError(
      "the run holds out no documents (data.eval_fraction=0); pass --data FILE with held-out text"
    )
  tokens, valid = data.held_out_canvases
  return tokens, valid, len(data.eval_ids)


def evaluate(
  fn: LikelihoodFn,
  graphdef: nnx.GraphDef,
  params: nnx.State,
  tokens: np.ndarray,
  valid: np.ndarray,
  key: jax.Array,
  *,
  batch_size: int = 16,
  pad_id: int = 0,
) -> dict[str, float]:
  """Runs `fn` (one jitted program) over canvases `tokens`, `valid` [N, L] in batches of
  `batch_size` (the last padded with invalid rows) and sums in float64 on the host.

  Returns {"nats_per_token", "ppl", "tokens", "canvases", "nll_sum"}.
  """
  n, length = tokens.shape
  if n == 0 or not valid.any():
    raise ConfigError("no held-out tokens to evaluate: the documents are empty")

  @jax.jit
  def step(params, batch, key):
    return fn(nnx.merge(graphdef, params), batch, key)

  pad = -n % batch_size
  tokens = np.concatenate([tokens, np.full((pad, length), pad_id, np.int32)])
  valid = np.concatenate([valid, np.zeros((pad, length), bool)])
  rows = np.arange(n + pad, dtype=np.int32)
  nll_sum, count = 0.0, 0.0
  for s in range(0, n + pad, batch_size):
    batch = {
      "tokens": jnp.asarray(tokens[s : s + batch_size]),
      "valid": jnp.asarray(valid[s : s + batch_size]),
      "row": jnp.asarray(rows[s : s + batch_size]),
    }
    nll, cnt = jax.device_get(step(params, batch, key))
    nll_sum += float(np.sum(np.asarray(nll, np.float64)))
    count += float(np.sum(np.asarray(cnt, np.float64)))
  nats = nll_sum / max(count, 1.0)
  return {
    "nats_per_token": nats,
    "ppl": math.exp(nats) if nats < 700 else math.inf,
    "tokens": int(count),
    "canvases": int(n),
    "nll_sum": nll_sum,
  }


def run_likelihood(
  run,
  documents: Sequence[dict] | None = None,
  *,
  num_samples: int = 8,
  block_size: int | None = None,
  seed: int = 0,
  batch_size: int | None = None,
) -> dict[str, Any]:
  """The likelihood report of a loaded run (`lsd.train.stages.LoadedRun`) on `documents` ({"text"}
  dicts; None = the run's held-out split): the method's settings (`Task.likelihood`) and the
  numbers of `evaluate`."""
  from lsd.data import eval_canvases

  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ConfigError(f"--nelbo_samples {num_samples!r} must be an int >= 1")
  fn, info = run.task.likelihood(num_samples=num_samples, block_size=block_size)
  tok = run.tokenizer
  if documents is None and run.config.data.source == "prepared":
    tokens, valid, n_docs = held_out_prepared(run.config.data)
  else:
    docs = held_out_documents(run.config.data) if documents is None else list(documents)
    if not docs:
      raise ConfigError("no documents to evaluate")
    tokens, valid = eval_canvases(docs, tok, int(run.config.data.seq_len))
    n_docs = len(docs)
  bs = batch_size or int(run.config.data.batch_size)
  out = evaluate(
    fn,
    run.graphdef,
    run.params,
    tokens,
    valid,
    jax.random.key(seed),
    batch_size=bs,
    pad_id=tok.pad_id,
  )
  return {
    "method": run.config.get("method", run.task.name),
    **info,
    **out,
    "documents": n_docs,
    "seq_len": int(run.config.data.seq_len),
    "seed": seed,
    "step": run.step,
  }
