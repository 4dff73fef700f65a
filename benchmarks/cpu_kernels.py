"""What bounds a small train step on a CPU: the same SwiGLU MLP forward and backward, and its three
matmul layouts, in XLA (lsd's `lsd.nn.MLP`) and in torch (MKL), in one process, interleaved.

    python benchmarks/cpu_kernels.py [--threads 2] [--repeats 5] [--iters 30]

Shapes are those of the peer benchmark's block-diffusion train step (`benchmarks/peers.py`: batch 16,
canvas 2 x 128, d_model 128, SwiGLU width 384): x [16, 256, 128]. Per row: the best over `--repeats`
windows of the mean time of `--iters` calls, for each side.
- `mlp_fwd_bwd`: the gradients of sum(MLP(x)^2) with respect to the three weights;
- `dot_nn` x @ W, `dot_nt` h @ W^T, `dot_tn` x^T @ h: the forward matmul and the two backward ones
  (activation gradient, weight gradient), [4096, 128] x [128, 384];
- `xla_mlp_top_ops`: the costliest ops of XLA's compiled MLP gradient, from a `jax.profiler` trace
  (`lsd.train.profile`), with what each computes.

Both sides use `--threads` threads: torch through `set_num_threads`, XLA by pinning the process to
that many CPUs (its pools follow the affinity). Writes benchmarks/results/cpu_kernels.json.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

from common import write_result

BATCH, TOKENS, D_MODEL, D_FF = 16, 256, 128, 384


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
  p.add_argument("--repeats", type=int, default=5, help="timed windows per side (best is kept)")
  p.add_argument("--iters", type=int, default=30, help="calls per window")
  p.add_argument("--name", default="cpu_kernels", help="writes benchmarks/results/<name>.json")
  a = p.parse_args(argv)
  for field in ("threads", "repeats", "iters"):
    if getattr(a, field) < 1:
      p.error(f"--{field}={getattr(a, field)} must be >= 1")
  return a


def best_mean(fn, sync, repeats: int, iters: int) -> float:
  sync(fn())  # warm-up (and compile)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      out = fn()
    sync(out)
    best = min(best, (time.perf_counter() - t) / iters)
  return best


def main(argv=None):
  args = parse_args(argv)
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx

  from lsd.nn import MLP
  from lsd.train import profile

  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, TOKENS, D_MODEL)).astype(np.float32)
  h = rng.normal(size=(BATCH * TOKENS, D_FF)).astype(np.float32)
  w = rng.normal(size=(D_MODEL, D_FF)).astype(np.float32)

  mlp = MLP(D_MODEL, D_FF, "swiglu", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mlp)
  xj = jnp.asarray(x)

  @jax.jit
  def jax_grad(params, x):
    return jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)

  # lsd's weights ({'gate': [E, F], 'up': [E, F], 'down': [F, E]} kernels) on the torch side.
  def flat(state):
    return {path[0]: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}

  tw = {k: torch.tensor(v, requires_grad=True) for k, v in flat(params).items()}
  gate, up, down = tw["gate"], tw["up"], tw["down"]
  tx = torch.tensor(x)

  def torch_grad():
    for p in tw.values():
      p.grad = None
    y = (torch.nn.functional.silu(tx @ gate) * (tx @ up)) @ down
    (y**2).sum().backward()
    return down.grad

  # The two sides compute the same gradients (a check that they time the same thing).
  ref = flat(jax_grad(params, xj))
  torch_grad()
  diff = max(
    float(np.max(np.abs(ref[k] - tw[k].grad.numpy())) / np.max(np.abs(ref[k]))) for k in ref
  )

  xj2, hj, wj = jnp.asarray(x.reshape(-1, D_MODEL)), jnp.asarray(h), jnp.asarray(w)
  xt2, ht, wt = torch.tensor(x.reshape(-1, D_MODEL)), torch.tensor(h), torch.tensor(w)
  dots = {
    "dot_nn": (jax.jit(lambda a, b: a @ b), (xj2, wj), lambda: xt2 @ wt),
    "dot_nt": (jax.jit(lambda a, b: a @ b.T), (hj, wj), lambda: ht @ wt.T),
    "dot_tn": (jax.jit(lambda a, b: a.T @ b), (xj2, hj), lambda: xt2.T @ ht),
  }
  flops = {"mlp_fwd_bwd": 9 * 2 * BATCH * TOKENS * D_MODEL * D_FF}
  flops.update(dict.fromkeys(dots, 2 * BATCH * TOKENS * D_MODEL * D_FF))

  calls = {"mlp_fwd_bwd": (lambda: jax_grad(params, xj), torch_grad)}
  calls.update({k: ((lambda f=f, a=a: f(*a)), t) for k, (f, a, t) in dots.items()})
  rows = {}
  for name, (jax_fn, torch_fn) in calls.items():
    xla_s = best_mean(jax_fn, jax.block_until_ready, args.repeats, args.iters)
    torch_s = best_mean(torch_fn, lambda _: None, args.repeats, args.iters)
    rows[name] = {
      "xla_ms": xla_s * 1e3,
      "torch_ms": torch_s * 1e3,
      "xla_over_torch": xla_s / torch_s,
      "xla_gflop_s": flops[name] / xla_s / 1e9,
      "torch_gflop_s": flops[name] / torch_s / 1e9,
    }
    print(f"{name}: xla {xla_s * 1e3:.2f} ms, torch {torch_s * 1e3:.2f} ms", flush=True)

  # Where XLA's MLP gradient spends its time, op by op.
  hlo = jax_grad.lower(params, xj).compile().as_text()
  steps = 5
  with tempfile.TemporaryDirectory() as trace:
    with jax.profiler.trace(trace, create_perfetto_trace=True):
      for _ in range(steps):
        out = jax_grad(params, xj)
      jax.block_until_ready(out)
    ops = profile.op_times(profile.trace_events(trace), profile.module_name(hlo))
  total = sum(ops.values())
  top = []
  for op, us in sorted(ops.items(), key=lambda kv: -kv[1])[:6]:
    line = next((ln for ln in hlo.splitlines() if re.search(rf"%{re.escape(op)} = ", ln)), "")
    shape = re.search(r"= (\S+)", line)
    kind = re.search(r'op_name="[^"]*/([^"/]+)"', line)
    top.append(
      {
        "op": op,
        "ms": us / steps / 1e3,
        "share": us / total,
        "shape": shape.group(1) if shape else "?",
        "jax_op": kind.group(1) if kind else "?",
      }
    )
  metrics = {
    **rows,
    "max_rel_grad_diff": diff,
    "xla_mlp_top_ops": top,
    "xla_mlp_op_ms": total / steps / 1e3,
  }
  config = {
    "shape_x": [BATCH, TOKENS, D_MODEL],
    "d_ff": D_FF,
    "threads": args.threads,
    "repeats": args.repeats,
    "iters": args.iters,
    "torch": torch.__version__,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  write_result(args.name, metrics, config)


if __name__ == "__main__":
  main()
