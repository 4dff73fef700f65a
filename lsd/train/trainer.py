"""The training loop, in the order it runs: setup -> input -> mesh -> model -> state -> checkpoint ->
step -> loop -> end (final checkpoint, loss curve, samples).

Any task (`lsd.train.task.Task`) trains through this one loop. The same code runs on one CPU, on 8
simulated CPU devices, on a GPU and on a TPU pod slice (one process per host).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from lsd.config import ConfigError, to_json
from lsd.fileio import as_path, atomic_write_text, is_remote, one_line
from lsd.parallel import batch_sharding, make_mesh, replicated, rules_from_config, sharded_init
from lsd.train.checkpoint import Checkpointer
from lsd.train.logging import (
  MetricWriter,
  ProfileWindow,
  Progress,
  mfu,
  peak_flops_total,
  plot_loss_curve,
)
from lsd.train.state import (
  TrainState,
  init_sharded_state,
  is_frozen,
  make_optimizer,
  make_train_step,
  param_path,
  validate_train_config,
)
from lsd.train.task import Task
from lsd.train.workdir import StopSignals, WorkdirLock


class TrainingDiverged(RuntimeError):
  """Loss or gradients became NaN/Inf; the last good checkpoint is kept."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions); earlier checkpoints are intact."""


@dataclasses.dataclass
class TrainResult:
  workdir: epath.Path
  final_step: int
  losses: dict[int, float]  # step -> train loss, for every step that was executed in this call
  eval_loss: float | None
  samples: list
  stopped_by: str | None = None  # "SIGTERM" / "SIGINT" / "preemption": saved and stopped early


def to_global(batch: dict, mesh, rules) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes; the global batch is
  the processes' rows stacked (a mesh whose batch axes do not span every process is refused)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    shape = (v.shape[0] * jax.process_count(), *v.shape[1:])
    try:
      out[k] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, rules, v.ndim), v, global_shape=shape
      )
    except ValueError as e:
      raise ConfigError(
        f"the mesh {dict(mesh.shape)} cannot hold a global batch of {shape[0]} rows from "
        f"{jax.process_count()} processes: the batch axes (mesh.data x mesh.fsdp) must span every "
        f"process, so put mesh.tensor within a host ({str(e).splitlines()[0]})"
      ) from e
  return out


def train(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  *,
  task: Task,
  stop_after: int | None = None,
  record_every_step: bool = False,
) -> TrainResult:
  """Trains `task` (built from `config`, e.g. by `lsd.methods.get_task`; `lsd.api.train` does both)
  in `workdir`, resuming from its latest checkpoint if there is one.

  `stop_after` ends the call after that many completed steps (a simulated interruption: the final
  checkpoint is written as on a normal exit). `record_every_step` fetches every step's loss (tests).
  """
  # ---------------------------------------------------------------- setup
  workdir = as_path(workdir)  # a local directory or a remote URL (gs://, s3://, ...)
  validate_train_config(config.train)
  task.validate()  # everything checkable before data loading: model, sampler, eval settings
  tcfg = config.train
  is_main = jax.process_index() == 0
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except Exception as e:  # OSError; on a remote store also a missing client or no credentials
    why = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
    raise ConfigError(f"--workdir {str(workdir)!r} cannot be created: {why}") from e
  if not is_remote(workdir) and not os.access(workdir, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {str(workdir)!r} is not writable by this user")
  # One writer per workdir (process 0 of a multi-host run stands for all of them).
  lock = WorkdirLock(workdir) if is_main else None
  if lock is not None:
    lock.acquire()
  try:
    return _train(config, workdir, task, tcfg, is_main, lock, stop_after, record_every_step)
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir, task, tcfg, is_main, lock, stop_after, record_every_step):
  say = print if is_main else (lambda *a, **k: None)
  if lock is not None and lock.stale:
    say(
      f"lsd: took over the workdir lock left by a process that is gone ({lock.stale})", flush=True
    )

  # ---------------------------------------------------------------- input
  data = task.make_data(
    workdir, process_index=jax.process_index(), process_count=jax.process_count()
  )
  data_iter = data.train_iter()

  # ---------------------------------------------------------------- mesh + model
  mesh = make_mesh(config.mesh)
  rules = rules_from_config(config.mesh)
  graphdef, params, _ = sharded_init(lambda: task.build_model(nnx.Rngs(config.seed)), mesh, rules)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  check_freeze(tcfg.get("freeze", ()), params)
  tx = make_optimizer(tcfg)
  ckpt = Checkpointer(workdir / "checkpoints", keep=tcfg.keep_checkpoints)
  resuming = ckpt.latest_step() is not None
  if not resuming:  # a fresh run may start from another run's weights (e.g. a fine-tuning stage)
    initial = task.initial_params(params)
    if initial is not params:
      params = jax.device_put(initial, jax.tree.map(lambda x: x.sharding, params))
  state = init_sharded_state(params, tx, tcfg.ema_decay > 0, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)

  # ---------------------------------------------------------------- checkpoint / resume
  start = 0
  if resuming:
    # The newest checkpoint that reads; a config that does not fit is a CheckpointMismatch.
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", RuntimeWarning)
      state = ckpt.restore(state, data_iter)
    for w in caught:
      say(f"lsd: warning: {w.message}", flush=True)
    start = int(state.step)
  # The launch is now fully validated (task, data, model, and a checkpoint that fits it): only now
  # does the workdir's config.json change, atomically.
  if is_main:
    atomic_write_text(workdir / "config.json", to_json(config))
  writer = MetricWriter(workdir, enabled=is_main)
  # The steps after the restored one are logged again below; a run that starts over (killed before
  # its first checkpoint) drops every row of the attempt that left no checkpoint.
  writer.truncate_after(start)
  say(
    f"lsd: {task.name} | {n_params / 1e6:.2f}M params | mesh {dict(mesh.shape)} | "
    f"{'resuming at step ' + str(start) if start else 'fresh run'} | workdir {workdir}",
    flush=True,
  )

  # ---------------------------------------------------------------- step
  step_fn = make_train_step(graphdef, task.loss, tx, tcfg, config.seed)
  train_step = jax.jit(
    step_fn,
    in_shardings=(state_shardings, None),
    out_shardings=(state_shardings, replicated(mesh)),
    donate_argnums=0,
  )
  eval_fn = jax.jit(
    lambda params, batch, key: task.eval_loss(nnx.merge(graphdef, params), batch, key)
  )

  def evaluate(params) -> float | None:
    batches = data.eval_batches(tcfg.eval_batches)
    if not batches:
      return None
    key = jax.random.key(config.seed + 1)
    losses = [
      float(eval_fn(params, to_global(b, mesh, rules), jax.random.fold_in(key, i)))
      for i, b in enumerate(batches)
    ]
    return float(np.mean(losses))

  # ---------------------------------------------------------------- loop
  progress = Progress(tcfg.steps, start, enabled=is_main and tcfg.progress)
  end = tcfg.steps if stop_after is None else min(tcfg.steps, stop_after)
  losses: dict[int, float] = {}
  last_log, t_log, tokens_since = start, time.perf_counter(), 0
  metrics = None
  eval_loss = None
  stopped_by = None
  multi = jax.process_count() > 1
  # MFU: the task's analytic FLOPs per token over the devices' peak (logged when both are known).
  flops_per_token = float(task.flops_per_token() or 0.0)
  peak = peak_flops_total(tcfg.get("peak_flops", 0.0), jax.devices())
  last_batch = {}  # the traced step's batch, for the HLO text of the program the profile ran

  def traced_program() -> str:
    return train_step.lower(state, last_batch["batch"]).compile().as_text()

  profile = ProfileWindow(
    workdir / "profile",
    tcfg.get("profile_steps", ()),
    program=traced_program,
    log=print if is_main else (lambda _: None),
  )
  # An ambient mesh lets the model pin activations to the batch split (mesh.constrain_activations).
  ambient = jax.set_mesh(mesh) if config.mesh.get("constrain_activations") else nullcontext()
  try:
    with StopSignals() as stop, ambient:
      for step in range(start, end):
        batch = to_global(next(data_iter), mesh, rules)
        tokens_since += task.tokens_in(batch)
        profile.before(step)
        if profile.active:
          last_batch["batch"] = batch
        state, metrics = train_step(state, batch)
        done = step + 1
        profile.after(done, state)
        if record_every_step:
          losses[done] = float(metrics["loss"])
        if done % tcfg.log_every == 0 or done == end:
          host = jax.device_get(metrics)
          losses[done] = float(host["loss"])
          dt = time.perf_counter() - t_log
          host["tokens_per_s"] = tokens_since / max(dt, 1e-9)
          host["steps_per_s"] = (done - last_log) / max(dt, 1e-9)
          if flops_per_token and peak:
            host["mfu"] = mfu(flops_per_token, host["tokens_per_s"], peak)
          writer.write(done, host)  # before the guard: the diverging window is logged too
          _check_finite(state, ckpt)
          progress.update(
            done - last_log, loss=f"{host['loss']:.3f}", tok_s=f"{host['tokens_per_s']:.0f}"
          )
          last_log, t_log, tokens_since = done, time.perf_counter(), 0
        if tcfg.eval_every and done % tcfg.eval_every == 0:
          eval_loss = evaluate(state.params)
          if eval_loss is not None:
            writer.write(done, {"loss": eval_loss}, prefix="eval")
        stopped_by = stop.received or (
          "preemption" if multi and ckpt.manager.reached_preemption(done) else None
        )
        if done % tcfg.ckpt_every == 0 or stopped_by:
          _check_finite(state, ckpt)
          _save(ckpt, done, state, data_iter, force=bool(stopped_by))
        if stopped_by:
          break
      # ---------------------------------------------------------- end
      final = int(state.step)
      if ckpt.latest_step() != final:
        _check_finite(state, ckpt)
        _save(ckpt, final, state, data_iter, force=True)
      _save(ckpt, final, None, None, force=False)  # waits for pending asynchronous writes
  finally:
    profile.close()
    progress.close()
    writer.close()
    try:
      ckpt.close()
    except Exception:
      if sys.exc_info()[0] is None:  # no other error in flight: this one is the news
        raise
  if stopped_by:
    say(
      f"lsd: {stopped_by} received: stopped at step {final} with a checkpoint in "
      f"{ckpt.directory}; rerun the same command to resume",
      flush=True,
    )
    return TrainResult(workdir, final, losses, eval_loss, [], stopped_by=stopped_by)

  samples = []
  if final >= tcfg.steps:
    # Every process takes part in the jitted eval and sampler (their arrays span all processes);
    # only process 0 writes. (Running them on process 0 alone hung multi-process runs here.)
    eval_loss = evaluate(state.params)
    if eval_loss is not None and is_main:
      MetricWriter(workdir).write(final, {"loss": eval_loss}, prefix="eval")
      say(f"eval loss at step {final}: {eval_loss:.4f}")
    png = plot_loss_curve(workdir) if is_main else None
    if png:
      say(f"loss curve: {png}")
    if tcfg.num_samples:
      params = state.ema if state.ema is not None else state.params
      if jax.process_count() > 1:  # samplers fetch their outputs: make them addressable here
        params = jax.jit(lambda p: p, out_shardings=replicated(mesh))(params)
      samples = task.sample_text(
        nnx.merge(graphdef, params), jax.random.key(config.seed + 2), tcfg.num_samples
      )
      if is_main:
        if tcfg.get("judge_samples"):
          _judge(samples)
        lines = "".join(
          json.dumps(s if isinstance(s, dict) else {"text": s}) + "\n" for s in samples
        )
        atomic_write_text(workdir / "samples.jsonl", lines)
  return TrainResult(workdir, final, losses, eval_loss, samples)


def _save(ckpt: Checkpointer, step: int, state, data_iter, *, force: bool) -> None:
  """Saves, turning a write failure (disk full, permissions) into one message that names the
  directory and the last checkpoint that is intact."""
  try:
    if state is not None:
      ckpt.save(step, state, data_iter, force=force)
    if force or state is None:
      ckpt.wait()
  except Exception as e:  # orbax wraps OSErrors in several exception types
    cause = _root_cause(e)
    try:
      intact = ckpt.all_steps()
    except Exception:
      intact = []
    raise CheckpointWriteError(
      f"writing a checkpoint (step <= {step}) in {ckpt.directory} failed: {cause}. The checkpoints "
      f"already written are intact (steps {intact}); free space or fix permissions, then rerun the "
      "same command to resume"
    ) from e


def _root_cause(e: BaseException) -> str:
  seen = e
  while seen.__cause__ is not None or seen.__context__ is not None:
    seen = seen.__cause__ or seen.__context__
  text = str(seen).strip().splitlines()
  for err in (seen, e):
    if isinstance(err, OSError) and err.strerror:
      return f"{err.strerror} ({type(err).__name__})"
  return f"{type(seen).__name__}: {text[0] if text else ''}"[:300]


def check_freeze(freeze, params) -> None:
  """Every train.freeze prefix must name at least one parameter (a typo would train everything)."""
  paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for f in freeze:
    if not any(is_frozen(p, (f,)) for p in paths):
      tops = sorted({p.split(".")[0] for p in paths})
      raise ConfigError(f"train.freeze entry {f!r} names no parameter; top-level modules: {tops}")


def _judge(samples: list) -> None:
  """Adds the judge's per-sample perplexity (`gen_ppl`, and `draft_gen_ppl` for drafts) in place."""
  from lsd.eval.genppl import GenPPL

  if not samples or not isinstance(samples[0], dict):
    return
  judge = GenPPL()
  for field, out in (("text", "gen_ppl"), ("draft_text", "draft_gen_ppl")):
    if field in samples[0]:
      for s, ppl in zip(samples, judge.per_sample([s[field] for s in samples]), strict=True):
        s[out] = ppl


def _check_finite(state: TrainState, ckpt: Checkpointer) -> None:
  bad = int(jax.device_get(state.nonfinite))
  if bad:
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f"the last good checkpoint (step {last}) is kept" if last else "no checkpoint was saved"
    raise TrainingDiverged(
      f"loss or gradient norm became NaN/Inf at {bad} step(s) up to step {int(state.step)}; "
      f"those updates were skipped and training stopped; {kept} in {ckpt.directory}. "
      "Lower train.lr, raise train.warmup_steps or check the data."
    )
