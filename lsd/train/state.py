"""Train state, optimiser (AdamW, warmup + cosine, clipping), EMA and the pure train step."""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lsd.config import ConfigError, check_choice, check_positive, check_range


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of completed optimiser steps
  params: nnx.State
  opt_state: optax.OptState
  ema: nnx.State | None
  nonfinite: jax.Array  # int32 scalar: steps skipped because loss or gradients were NaN/Inf


def default_train_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "steps": 1000,
      "lr": 3e-4,
      "warmup_steps": 100,
      "min_lr_ratio": 0.1,
      # After the linear warmup: "cosine" decays to lr * min_lr_ratio at train.steps; "constant"
      # holds lr, so the schedule does not depend on train.steps (a run can be extended).
      "lr_decay": "cosine",
      "weight_decay": 0.01,
      "b1": 0.9,
      "b2": 0.98,
      "grad_clip": 1.0,
      "ema_decay": 0.0,  # 0 disables EMA
      # > 0: EMA decay warms up as min(ema_decay, 1 - (1 + n)^-power) at update n (ema_pytorch's
      # schedule; the LD4LG / DGLM reference code uses power 3/4), so a short run's EMA is not
      # dominated by its initial weights. 0: the constant ema_decay from the first update.
      "ema_warmup_power": 0.0,
      # Parameter paths (dotted prefixes of the model's attribute paths, e.g. "encoder" or
      # "decoder.blocks.0") that get no update at all: neither gradient steps nor weight decay.
      "freeze": (),
      # Microbatches per step (a lax.scan): the same update from 1/grad_accum of the activation
      # memory. Losses that are weighted means report their weight as metrics["loss_weight"].
      "grad_accum": 1,
      "log_every": 10,
      # [start, stop]: a jax.profiler trace of steps start..stop-1 (0-based) into workdir/profile/
      # (TensorBoard profile plugin, Perfetto); [] = none.
      "profile_steps": (),
      # Peak FLOP/s of one device for the logged `mfu`; 0 = the known peak of the device kind
      # (lsd.train.aot.DEVICE_SPECS: TPUs, common GPUs). No known peak (CPU): no mfu logged.
      "peak_flops": 0.0,
      "eval_every": 0,  # 0: only at the end
      "eval_batches": 4,
      "ckpt_every": 200,
      "keep_checkpoints": 3,
      "num_samples": 4,  # printed at the end of training
      "judge_samples": False,  # score those samples with the judge LM (downloads it once)
      "progress": True,
    }
  )


def _check_int(field: str, value, lo: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < lo:
    raise ConfigError(f"{field}={value!r} must be an int >= {lo}")


def validate_train_config(cfg: ml_collections.ConfigDict) -> None:
  _check_int("train.steps", cfg.steps, 1)
  check_positive("train.lr", cfg.lr)
  _check_int("train.warmup_steps", cfg.warmup_steps, 0)
  check_range("train.min_lr_ratio", cfg.min_lr_ratio, 0.0, 1.0)
  check_choice("train.lr_decay", cfg.get("lr_decay", "cosine"), LR_DECAYS)
  check_positive("train.weight_decay", cfg.weight_decay, allow_zero=True)
  check_range("train.b1", cfg.b1, 0.0, 1.0)
  check_range("train.b2", cfg.b2, 0.0, 1.0)
  check_positive("train.grad_clip", cfg.grad_clip, allow_zero=True)
  check_range("train.ema_decay", cfg.ema_decay, 0.0, 1.0)
  check_positive("train.ema_warmup_power", cfg.get("ema_warmup_power", 0.0), allow_zero=True)
  freeze = cfg.get("freeze", ())
  if not isinstance(freeze, list | tuple) or not all(isinstance(f, str) and f for f in freeze):
    raise ConfigError(
      f"train.freeze={freeze!r} must be a list of parameter path prefixes such as "
      "['encoder', 'compressor'] (empty = train everything)"
    )
  accum = cfg.get("grad_accum", 1)
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise ConfigError(f"train.grad_accum={accum!r} must be an int >= 1 (microbatches per step)")
  window = cfg.get("profile_steps", ())
  ints = isinstance(window, list | tuple) and all(
    isinstance(x, int) and not isinstance(x, bool) for x in window
  )
  if not ints or len(window) not in (0, 2) or (window and not 0 <= window[0] < window[1]):
    raise ConfigError(
      f"train.profile_steps={window!r} must be [] or [start, stop] with 0 <= start < stop "
      "(steps traced into workdir/profile/)"
    )
  check_positive("train.peak_flops", cfg.get("peak_flops", 0.0), allow_zero=True)
  for name in ("log_every", "ckpt_every", "keep_checkpoints"):
    _check_int(f"train.{name}", cfg[name], 1)
  for name in ("eval_every", "eval_batches", "num_samples"):  # eval_every 0: only at the end
    _check_int(f"train.{name}", cfg.get(name, 0), 0)


LR_DECAYS = ("cosine", "constant")


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  if cfg.get("lr_decay", "cosine") == "constant":
    warmup = int(cfg.warmup_steps)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)],
      [warmup],
    )
  warmup = min(int(cfg.warmup_steps), int(cfg.steps) - 1)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=max(warmup, 0),
    decay_steps=int(cfg.steps),
    end_value=cfg.lr * cfg.min_lr_ratio,
  )


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  # Decay only matrices: norms, biases and scalar gains keep their scale.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
  parts.append(
    optax.adamw(
      lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
    )
  )
  tx = optax.chain(*parts)
  freeze = tuple(cfg.get("freeze", ()))
  if not freeze:
    return tx
  return optax.multi_transform(
    {"train": tx, "frozen": optax.set_to_zero()},
    lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if is_frozen(param_path(path), freeze) else "train", params
    ),
  )


def param_path(path: tuple) -> str:
  """A pytree key path of an nnx.State leaf -> "decoder.blocks.0.attn.qkv.kernel.value"."""
  return jax.tree_util.keystr(path, simple=True, separator=".")


def is_frozen(path: str, freeze: tuple[str, ...]) -> bool:
  return any(path == f or path.startswith(f + ".") for f in freeze)


def ema_decay_at(cfg: ml_collections.ConfigDict, n: jax.Array) -> jax.Array:
  """The EMA decay of update n = 1, 2, ... (`train.ema_decay`, warmed up by `ema_warmup_power`)."""
  d = jnp.float32(cfg.ema_decay)
  power = float(cfg.get("ema_warmup_power", 0.0))
  if power <= 0:
    return d
  warm = 1.0 - jnp.power(1.0 + jnp.asarray(n, jnp.float32), -power)
  return jnp.minimum(d, jnp.maximum(warm, 0.0))


def init_state(params: nnx.State, tx: optax.GradientTransformation, ema: bool) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema=jax.tree.map(jnp.copy, params) if ema else None,
    nonfinite=jnp.zeros((), jnp.int32),
  )


def train_state_shardings(params: nnx.State, tx: optax.GradientTransformation, ema: bool, mesh):
  """Shardings of the TrainState of `params` (placed arrays): the optimiser's per-parameter leaves
  (Adam moments) and the EMA are sharded exactly like their parameters, so FSDP shards the whole
  state, not only the weights; counters and other non-parameter leaves are replicated."""
  from jax.sharding import NamedSharding, PartitionSpec

  rep = NamedSharding(mesh, PartitionSpec())
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen parameters' empty optimiser slots
  opt_sh = optax.tree_map_params(
    tx,
    lambda leaf, sharding: leaf if masked(leaf) else sharding,
    jax.eval_shape(tx.init, params),
    param_sh,
    transform_non_params=lambda _: rep,
    is_leaf=masked,
  )
  return TrainState(
    step=rep, params=param_sh, opt_state=opt_sh, ema=param_sh if ema else None, nonfinite=rep
  )


def abstract_train_state(
  params: nnx.State, tx: optax.GradientTransformation, ema: bool, mesh
) -> TrainState:
  """The TrainState of `params` (arrays, or ShapeDtypeStructs with shardings) as
  ShapeDtypeStructs in `train_state_shardings`: nothing allocated or compiled (`jax.eval_shape`).
  The target a checkpoint is restored into, or an ahead-of-time compile's input."""
  shardings = train_state_shardings(params, tx, ema, mesh)
  shapes = jax.eval_shape(lambda p: init_state(p, tx, ema=ema), params)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )


def init_sharded_state(
  params: nnx.State, tx: optax.GradientTransformation, ema: bool, mesh
) -> TrainState:
  """`init_state` jitted into `train_state_shardings`: every leaf is created in its shards."""
  shardings = train_state_shardings(params, tx, ema, mesh)
  return jax.jit(lambda p: init_state(p, tx, ema=ema), out_shardings=shardings)(params)


LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(
  graphdef: nnx.GraphDef,
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  cfg: ml_collections.ConfigDict,
  seed: int,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Pure (state, batch) -> (state, metrics). The step key is fold_in(key(seed), step), so a resumed
  run replays exactly the randomness of an uninterrupted one. A step whose loss or gradient norm is
  not finite leaves the state unchanged (and is counted), so a bad batch can never corrupt params."""
  base_key = jax.random.key(seed)
  schedule = lr_schedule(cfg)

  accum = int(cfg.get("grad_accum", 1))

  def loss_and_grads(params, batch, key):
    def objective(params):
      loss, metrics = loss_fn(nnx.merge(graphdef, params), batch, key)
      metrics = dict(metrics)
      weight = jnp.asarray(metrics.pop("loss_weight", 1.0), jnp.float32)
      return loss, (metrics, weight)

    (loss, (metrics, weight)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, metrics, weight, grads

  def accumulated(params, batch, key):
    """`accum` microbatches as a lax.scan, combined with the tasks' loss weights: for a loss that
    is a weighted mean (e.g. over valid tokens) this is the gradient of the whole batch's loss.
    Microbatch i holds rows i, i + accum, ... so each stays spread over the batch shards."""
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % accum:
      raise ConfigError(f"train.grad_accum={accum} must divide the global batch of {rows} rows")
    micro = jax.tree.map(
      lambda x: x.reshape(rows // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
    )

    def body(carry, inputs):
      i, mb = inputs
      loss, metrics, weight, grads = loss_and_grads(params, mb, jax.random.fold_in(key, i))
      acc = jax.tree.map(
        lambda a, x: a + weight * jnp.asarray(x, jnp.float32), carry, (loss, metrics, grads)
      )
      return acc, weight

    zeros = jax.tree.map(
      lambda x: jnp.zeros(x.shape, jnp.float32),
      jax.eval_shape(lambda: loss_and_grads(params, jax.tree.map(lambda x: x[0], micro), key)),
    )
    init = (zeros[0], zeros[1], zeros[3])
    (loss, metrics, grads), weights = jax.lax.scan(body, init, (jnp.arange(accum), micro))
    total = jnp.maximum(jnp.sum(weights), 1e-12)
    loss, metrics = loss / total, jax.tree.map(lambda m: m / total, metrics)
    grads = jax.tree.map(lambda g, p: (g / total).astype(p.dtype), grads, params)
    return loss, metrics, grads

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(base_key, state.step)
    if accum == 1:
      loss, metrics, _, grads = loss_and_grads(state.params, batch, key)
    else:
      loss, metrics, grads = accumulated(state.params, batch, key)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    ema = state.ema
    if ema is not None:
      d = ema_decay_at(cfg, state.step + 1)
      ema = keep(jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params), ema)
    new_state = TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      ema=ema,
      nonfinite=state.nonfinite + (~ok).astype(jnp.int32),
    )
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state.step))
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

  return step_fn
