"""Training throughput of the default causal-LM config on this machine, and its model FLOP utilisation.

    python benchmarks/train_throughput.py [--config configs/causal_lm.py:size=tiny] [--steps 30]

MFU here is achieved model FLOP/s (analytic FLOPs per token x tokens/s) over the measured matmul peak of
the same device (a jitted fp32 matmul timed in the same run), not over a datasheet number.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import write_result
from flax import nnx

from lsd.config import load_config_file
from lsd.methods import get_task
from lsd.parallel import batch_sharding, make_mesh, rules_from_config, sharded_init
from lsd.train.state import init_state, make_optimizer, make_train_step


class _Vocab:
  """Stands in for the corpus tokenizer: throughput depends only on the vocabulary size."""

  def __init__(self, size):
    self.vocab_size = size + 4
    self.pad_id, self.bos_id, self.eos_id, self.mask_id = size, size + 1, size + 2, size + 3


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    out = f(a, b)
  out.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/causal_lm.py:size=tiny")
  p.add_argument("--steps", type=int, default=30)
  args = p.parse_args()
  config = load_config_file(args.config)
  task = get_task(config)
  task.tokenizer = _Vocab(config.data.tokenizer.vocab_size)
  mesh = make_mesh(config.mesh)
  rules = rules_from_config(config.mesh)
  graphdef, params, _ = sharded_init(lambda: task.build_model(nnx.Rngs(0)), mesh, rules)
  tx = make_optimizer(config.train)
  state = jax.jit(lambda p: init_state(p, tx, ema=config.train.ema_decay > 0))(params)
  step = jax.jit(make_train_step(graphdef, task.loss, tx, config.train, 0), donate_argnums=0)
  bsz, seq = config.data.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  batches = [
    {
      "tokens": jax.device_put(
        # Data ids only: the specials (and the [MASK] id of a masked-diffusion config) sit at
        # config.data.tokenizer.vocab_size and above, and drawing them as data blows up the loss.
        rng.integers(0, config.data.tokenizer.vocab_size, (bsz, seq)).astype(np.int32),
        batch_sharding(mesh, rules, 2),
      ),
      "valid": jax.device_put(np.ones((bsz, seq), bool), batch_sharding(mesh, rules, 2)),
    }
    for _ in range(4)
  ]
  for i in range(3):  # compile + warm up
    state, m = step(state, batches[i % 4])
  jax.block_until_ready(m)
  t = time.perf_counter()
  for i in range(args.steps):
    state, m = step(state, batches[i % 4])
  jax.block_until_ready(m)
  dt = time.perf_counter() - t
  tokens_per_s = bsz * seq * args.steps / dt
  flops_tok = task.flops_per_token()
  achieved = tokens_per_s * flops_tok
  peak = matmul_peak()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  write_result(
    "train_throughput",
    {
      "tokens_per_s": tokens_per_s,
      "step_time_s": dt / args.steps,
      "flops_per_token": flops_tok,
      "achieved_flops_per_s": achieved,
      "matmul_peak_flops_per_s": peak,
      "mfu": achieved / peak,
      "n_params": int(n_params),
    },
    {
      "config": args.config,
      "batch_size": bsz,
      "seq_len": seq,
      "steps_timed": args.steps,
      "dtype": config.model.dtype,
      "devices": len(jax.devices()),
    },
  )


if __name__ == "__main__":
  main()
