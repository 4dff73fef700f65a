"""Train-step speed of the causal LM, SBD and LD4LG configs on this machine: tokens/s, model FLOP
utilisation, compile time, and (with --profile) the five source lines that cost the most per step.

    python benchmarks/train_throughput.py [--config CONFIG ...] [--steps 30] [--profile]

One row per config (default: `CONFIGS`), from random weights and random valid batches of the
config's shapes (`lsd.methods.abstract`: no corpus, no earlier-stage run). Per row:
- `tokens_per_s`, `step_time_s`: median of `--repeats` timed windows of `--steps` steps each;
- `compile_s`: lowering + compiling the step, `first_step_s`: compile + the first run (what a
  quickstart waits for before its first step);
- `mfu`: model FLOP/s over the measured matmul peak of this machine (a jitted fp32 matmul of
  2048^2, timed in the same run; not a datasheet number). Model FLOPs are the task's analytic
  `flops_per_token` (`flops_source: analytic`); tasks without one use the FLOPs XLA counts in the
  compiled step (`flops_source: compiled`);
- `loss_first`, `loss_last`, `diverged`: random tokens at the config's learning rate may diverge,
  which leaves the step's cost unchanged;
- with --profile, from a `jax.profiler` trace of 3 steps: `top_costs` (`lsd.train.profile.top_costs`,
  the five costliest source lines), `ms_per_step_by_kind` (op time per JAX operation), `dot_share`
  (the matmuls' share of op time) and `mfu_if_only_dots` (model FLOPs over the matmuls' time alone,
  over the peak: the MFU if nothing but the matmuls cost time, an upper bound for these shapes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import log, write_result
from flax import nnx

from lsd.config import load_config_file
from lsd.methods import abstract, get_task
from lsd.parallel import batch_sharding, make_mesh, rules_from_config, sharded_init
from lsd.train.aot import compiled_flops as xla_flops
from lsd.train.profile import time_by_kind, top_costs
from lsd.train.state import init_state, make_optimizer, make_train_step

CONFIGS = (
  "configs/causal_lm.py:size=tiny",
  "configs/causal_lm.py:size=small",
  "configs/sbd.py:size=tiny",
  "configs/sbd.py:size=small",
  "configs/ld4lg_yelp.py:stage=ae,size=tiny",
  "configs/ld4lg_yelp.py:stage=diffusion,size=tiny",
)


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of a jitted fp32 n x n matmul: the best of 3 timed windows."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(repeats):
      out = f(a, b)
    out.block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 * repeats / best


def random_batch(task, shapes: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Valid random data of the batch's shapes: token ids below the specials (the [MASK] id drawn
  as data blows up a masked-diffusion loss), every position valid, labels below num_classes."""
  vocab = int(task.config.data.tokenizer.vocab_size)
  classes = max(1, int(task.config.model.get("num_classes", 0) or 1))
  out = {}
  for k, s in shapes.items():
    if s.dtype == jnp.bool_:
      out[k] = np.ones(s.shape, bool)
    elif k == "label":
      out[k] = rng.integers(0, classes, s.shape).astype(np.int32)
    elif jnp.issubdtype(s.dtype, jnp.integer):
      out[k] = rng.integers(0, vocab, s.shape).astype(np.int32)
    else:
      out[k] = rng.normal(size=s.shape).astype(np.float32)
  return out


def measure(spec: str, steps: int, repeats: int, peak: float, profile: bool) -> dict:
  config = load_config_file(spec)
  task = abstract.prepare(get_task(config))
  mesh, rules = make_mesh(config.mesh), rules_from_config(config.mesh)
  graphdef, params, _ = sharded_init(lambda: task.build_model(nnx.Rngs(0)), mesh, rules)
  tx = make_optimizer(config.train)
  state = jax.jit(lambda p: init_state(p, tx, ema=config.train.ema_decay > 0))(params)
  step = jax.jit(make_train_step(graphdef, task.loss, tx, config.train, 0), donate_argnums=0)
  shapes = abstract.batch(task, int(config.data.batch_size))
  rng = np.random.default_rng(0)
  batches = [
    {
      k: jax.device_put(v, batch_sharding(mesh, rules, v.ndim))
      for k, v in random_batch(task, shapes, rng).items()
    }
    for _ in range(4)
  ]
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batches[0])
  jax.block_until_ready(m)
  first_step_s = time.perf_counter() - t0
  loss0 = float(m["loss"])
  for i in range(2):  # warm up
    state, m = compiled(state, batches[(i + 1) % 4])
  jax.block_until_ready(m)
  windows = []
  for _ in range(repeats):
    t = time.perf_counter()
    for i in range(steps):
      state, m = compiled(state, batches[i % 4])
    jax.block_until_ready(m)
    windows.append((time.perf_counter() - t) / steps)
  loss = float(m["loss"])
  # Random tokens at the config's learning rate can diverge (SBD small does): the speed of the
  # step is the same, but the row says so.
  diverged = not np.isfinite(loss) or loss > 10 * max(loss0, 1.0)
  if diverged:
    log(f"{spec}: the loss went from {loss0:.4g} to {loss:.4g} on random tokens")
  step_s = statistics.median(windows)
  tokens = int(task.tokens_in(batches[0]))
  fpt = float(task.flops_per_token() or 0.0)
  compiled_flops = xla_flops(compiled)
  flops_step = fpt * tokens if fpt else (compiled_flops or 0.0)
  row = {
    "tokens_per_step": tokens,
    "tokens_per_s": tokens / step_s,
    "step_time_s": step_s,
    "step_time_s_windows": windows,
    "compile_s": compile_s,
    "first_step_s": first_step_s,
    "model_flops_per_step": flops_step,
    "compiled_flops_per_step": compiled_flops,
    "flops_source": "analytic" if fpt else "compiled",
    "mfu": flops_step / step_s / peak,
    "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
    "batch": {k: list(v.shape) for k, v in shapes.items()},
    "dtype": config.model.get("dtype", "float32"),
    "loss_first": loss0,
    "loss_last": loss,
    "diverged": diverged,
  }
  if profile:
    n = 3
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for i in range(n):
          state, m = compiled(state, batches[i % 4])
        jax.block_until_ready(m)
      text = compiled.as_text()
      row["top_costs"] = [c.as_dict() for c in top_costs(d, text, n, k=5)]
      kinds = time_by_kind(d, text, n)
    ops_ms, dot_ms = sum(kinds.values()), kinds.get("dot_general", 0.0)
    row["ms_per_step_by_kind"] = dict(list(kinds.items())[:10])
    row["op_ms_per_step"] = ops_ms
    row["dot_share"] = dot_ms / ops_ms
    # What MFU would be if every op but the matmuls took no time: above the target, the rest of
    # the step is what to cut; below it, the matmuls themselves (their shapes) bound the target.
    row["mfu_if_only_dots"] = flops_step / (dot_ms / 1e3) / peak if dot_ms else None
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", action="append", help="a config spec (repeatable); default: CONFIGS")
  p.add_argument("--steps", type=int, default=20, help="steps per timed window")
  p.add_argument("--repeats", type=int, default=3, help="timed windows per config (median)")
  p.add_argument("--profile", action="store_true", help="add each config's top five costs")
  p.add_argument("--name", default="train_throughput", help="results/<name>.json")
  args = p.parse_args()
  if args.steps < 1 or args.repeats < 1:
    p.error(f"--steps={args.steps} and --repeats={args.repeats} must be >= 1")
  peak = matmul_peak()
  log(f"matmul peak {peak / 1e9:.1f} GFLOP/s")
  rows = {}
  for spec in args.config or CONFIGS:
    rows[spec] = r = measure(spec, args.steps, args.repeats, peak, args.profile)
    log(
      f"{spec}: {r['tokens_per_s']:.0f} tok/s, {r['step_time_s'] * 1e3:.1f} ms/step, "
      f"MFU {r['mfu']:.3f} ({r['flops_source']}), compile {r['compile_s']:.1f} s"
    )
    if "dot_share" in r:
      ceiling = r["mfu_if_only_dots"]
      log(f"    matmuls {r['dot_share']:.0%} of op time; MFU if only they cost: "
          f"{ceiling:.3f}" if ceiling else "    no matmul ops in the trace")  # fmt: skip
    for c in r.get("top_costs", []):
      log(f"    {c['ms_per_step']:7.2f} ms {c['share']:6.1%}  {c['source']}  {c['kinds'][:3]}")
  write_result(
    args.name,
    {"matmul_peak_flops_per_s": peak, "rows": rows},
    {
      "configs": list(rows),
      "steps_per_window": args.steps,
      "repeats": args.repeats,
      "devices": len(jax.devices()),
      "profile": args.profile,
    },
  )


if __name__ == "__main__":
  main()
