"""Stage-1 draft sampling speed with and without the KV cache, for growing canvases.

    python benchmarks/sbd_sampling.py [--lengths 128,256,512,1024] [--batch 4]

Same model (the tiny SBD size, random weights: speed does not depend on training), B = 4, a fixed
number of steps per block. `cache_exact` checks that both paths give identical tokens for the same key.
Times exclude compilation (each sampler is compiled ahead of time, then timed over `--repeats` runs).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from common import write_result
from flax import nnx

from lsd.models.masked_lm import MaskedLM
from lsd.nn import TransformerConfig
from lsd.sampling.block import DraftConfig, segment_ends
from lsd.sampling.revise import SBDSamplerConfig, draft_then_revise

BLOCK = 4  # draft block size B


def time_draft(graphdef, state, batch, length, cfg, repeats):
  key = jax.random.key(0)
  # Compile ahead of time so the timed calls exclude compilation without a warm-up run.
  compiled = draft_then_revise.lower(graphdef, state, key, batch, length, cfg).compile()
  run = lambda: compiled(state, key)
  t = time.perf_counter()
  for _ in range(repeats):
    out = run()
  jax.block_until_ready(out)
  return out, (time.perf_counter() - t) / repeats


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--lengths", default="128,256,512,1024")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps_per_block", type=int, default=4)
  p.add_argument("--repeats", type=int, default=1, help="timed runs of the uncached sampler")
  p.add_argument("--cached_repeats", type=int, default=5, help="timed runs of the cached one")
  p.add_argument("--cache_segments", type=int, default=DraftConfig.cache_segments)
  args = p.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  cfg = TransformerConfig(vocab_size=4100, d_model=128, n_layers=4, n_heads=4)
  model = MaskedLM(cfg, mask_id=4099, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  results = {}
  for length in lengths:
    row = {}
    tokens = {}
    for use_cache in (True, False):
      draft = DraftConfig(
        block_size=BLOCK,
        steps_per_block=args.steps_per_block,
        use_cache=use_cache,
        cache_segments=args.cache_segments,
      )
      repeats = args.cached_repeats if use_cache else args.repeats
      out, seconds = time_draft(
        graphdef, state, args.batch, length, SBDSamplerConfig(draft=draft), repeats
      )
      name = "cached" if use_cache else "uncached"
      row[f"{name}_seconds"] = seconds
      row[f"{name}_tokens_per_s"] = args.batch * length / seconds
      tokens[name] = np.asarray(out.tokens)
    row["speedup"] = row["uncached_seconds"] / row["cached_seconds"]
    row["cache_exact"] = bool((tokens["cached"] == tokens["uncached"]).all())
    ends = segment_ends(0, length // BLOCK, BLOCK, args.cache_segments)
    row["cache_sizes"] = [e * BLOCK for e in ends]
    results[str(length)] = row
    print(length, row, flush=True)
  first, last = str(lengths[0]), str(lengths[-1])
  write_result(
    "sbd_sampling",
    {
      "per_length": results,
      "speedup_at_max_len": results[last]["speedup"],
      "cached_time_ratio_max_over_min": results[last]["cached_seconds"]
      / results[first]["cached_seconds"],
      "length_ratio_max_over_min": lengths[-1] / lengths[0],
      "cache_exact": all(r["cache_exact"] for r in results.values()),
    },
    {
      "model": "MaskedLM d=128, 4 layers, 4 heads, vocab 4100 (random weights)",
      "block_size": BLOCK,
      "steps_per_block": args.steps_per_block,
      "batch": args.batch,
      "lengths": lengths,
      "repeats": {"uncached": args.repeats, "cached": args.cached_repeats},
      "cache_segments": args.cache_segments,
    },
  )


if __name__ == "__main__":
  main()
