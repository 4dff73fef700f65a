"""How LD4LG's Yelp sample quality scales with the denoiser's training compute and width, the
autoencoder held fixed.

    python benchmarks/ld4lg_scaling.py [--bench_workdir runs/bench/ld4lg] \
        [--workdir runs/bench/ld4lg_scaling] [--variants a,b]

Reuses the autoencoder that `benchmarks/ld4lg.py` trained in `--bench_workdir` (and its denoiser,
as the 1x point) and trains class-conditional denoisers of configs/ld4lg_yelp.py (size tiny) with
other step counts or widths in `--workdir/<variant>`. Each is scored like
`benchmarks/ld4lg_ablation.py` on the validation slice (512 samples of p(x) at w = 1, DDPM 100
steps, x0_hat projected onto the sphere, greedy decoding; MAUVE on judge features against held-out
rows [1512, 2024)), so the 1x point is the `greedy_s100` row of `benchmarks/ld4lg_decode.py`.
Step counts are multiples of the benchmark's own denoiser run; a wider model gets the steps that
fit the same minutes (an 80-step probe, as in the benchmark). Also reported: the training loss
(mean of the last 10 logged values, the v-objective at t ~ U(0, 1)), the eval loss, the
training seconds, and MAUVE over `--seeds` sampling seeds (labels and noise; mean and std), since
one 512-sample MAUVE moves by a few hundredths between seeds. The question: is the MAUVE gap to the AR baseline a matter of denoiser compute
that more steps or width close at a measurable rate? Writes benchmarks/results/ld4lg_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
from common import git_commit, train_seconds, write_result
from ld4lg import load_trained, log, steps_for_minutes
from ld4lg_ablation import ValidationScorer, train_or_reuse, variant_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsd import api  # noqa: E402

# name -> ("steps", multiple of the benchmark denoiser's steps) or ("minutes", that run's minutes
# multiple, for a model whose step cost differs), and config overrides of the tiny denoiser.
VARIANTS = {
  "d128_x1/3": (("steps", 1 / 3), {}),
  "d128_x1": (("steps", 1.0), {}),  # the benchmark's own run, not retrained
  "d128_x2": (("steps", 2.0), {}),
  "d256_x1": (("minutes", 1.0), {"model.d_model": 256}),
}


def run_log(run: Path) -> dict:
  recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  train_losses = [r["loss"] for r in recs if r.get("split") == "train"]
  evals = [r["loss"] for r in recs if r.get("split") == "eval"]
  return {
    "train_loss_last10": float(np.mean(train_losses[-10:])),
    "eval_loss": evals[-1] if evals else None,
    "train_seconds": train_seconds(run),
  }


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--bench_workdir", default="runs/bench/ld4lg")
  p.add_argument("--workdir", default="runs/bench/ld4lg_scaling")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--diff_minutes", type=float, default=15.0, help="the benchmark run's budget")
  p.add_argument("--seeds", type=int, default=3, help="sampling seeds 1..N scored per variant")
  args = p.parse_args()
  names = [v for v in args.variants.split(",") if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    sys.exit(f"--variants: unknown {unknown}; accepted: {list(VARIANTS)}")
  bench = Path(args.bench_workdir)
  ae, _ = load_trained(bench, "--bench_workdir")
  base_cfg = json.loads((bench / "yelp_diff" / "config.json").read_text())
  base_steps, data_path = base_cfg["train"]["steps"], base_cfg["data"]["path"]
  ae_dir, workdir = bench / "yelp_ae", Path(args.workdir)
  out_file = Path(__file__).parent / "results" / "ld4lg_scaling.json"
  results = json.loads(out_file.read_text())["metrics"] if out_file.exists() else {}

  scorer = ValidationScorer(ae.config, bench.parent / "judge_features")
  for name in names:
    (unit, mult), over = VARIANTS[name]
    if unit == "steps" and mult == 1.0 and not over:
      run = bench / "yelp_diff"
      steps = base_steps
    else:
      run = workdir / name.replace("/", "_")
      if unit == "steps":
        steps = round(base_steps * mult)
      else:
        probe_cfg = variant_config("diffusion", over, 80, data_path, ae_dir)
        steps = steps_for_minutes(probe_cfg, workdir / f"probe_{name}", args.diff_minutes * mult)
      cfg = variant_config("diffusion", over, steps, data_path, ae_dir)
      cfg.train.log_every, cfg.train.ckpt_every = 100, 500  # as the benchmark's own run
      train_or_reuse(cfg, run)
    diff = api.load(run)
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(diff.params)))
    results[name] = {
      "overrides": over,
      "budget": {unit: mult},
      "steps": steps,
      "n_params": n_params,
      **run_log(run),
      **scorer.samples(ae, diff, seed=1),
      "git_commit": git_commit(),
    }
    # MAUVE of 512 samples varies with the sampling seed: more seeds give its spread.
    extra = [scorer.samples(ae, diff, seed=s)["mauve"] for s in range(2, args.seeds + 1)]
    if extra:
      per_seed = [results[name]["mauve"], *extra]
      results[name]["mauve_per_seed"] = per_seed
      results[name]["mauve_mean"] = float(np.mean(per_seed))
      results[name]["mauve_std"] = float(np.std(per_seed, ddof=1))
    log(f"{name}: " + json.dumps({k: v for k, v in results[name].items() if k != "examples"}))
    write_result(
      "ld4lg_scaling",
      results,
      {
        "protocol": "benchmarks/ld4lg_scaling.py docstring",
        "autoencoder": f"{ae_dir.name} of benchmarks/ld4lg.py (8 x 32 latents, fixed)",
        "base_steps": base_steps,
        "base_minutes": args.diff_minutes,
        "samples": 512,
        "mauve_refs": "permuted held-out Yelp rows [1512, 2024) (validation)",
        "sampling": "DDPM, 100 steps, sphere projection, w = 1, labels from the class prior",
        "decoding": "greedy",
      },
    )


if __name__ == "__main__":
  main()
