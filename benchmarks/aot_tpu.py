"""Do the TPU-scale configs fit? Ahead-of-time compiles of the train step for TPU slices (no TPU).

    PYTHONPATH=<libtpu dir> python benchmarks/aot_tpu.py [--only sbd] [--topologies v5e-16,v4-32]

Needs libtpu (pip install 'lsd[aot]'); runs on any machine. For every config and slice it compiles
the trainer's step with the trainer's shardings (`lsd.train.aot`, what `lsd compile` runs), first
as configured, then with memory levers in order (model.remat dots_saveable, full, then
train.grad_accum 2, 4, 8, then FSDP) until one fits, and records per-device memory against the HBM,
compiled FLOPs per step and the expected step time at 40 % MFU. Rows: one per config and slice, with
the levers that make it fit; attempts: every compile.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host side; the TPU is only a compile target

from common import write_result

from lsd.config import apply_override, load_config_file
from lsd.methods import abstract, get_task
from lsd.train import aot

CONFIGS = {
  "sbd": "configs/sbd.py:size=base",
  "ld4lg_ae": "configs/ld4lg_yelp.py:stage=ae,size=base",
  "ld4lg_diffusion": "configs/ld4lg_yelp.py:stage=diffusion,size=base",
  "sld_ae": "configs/sld.py:stage=ae,size=base",
  "sld_diffusion": "configs/sld.py:stage=diffusion,size=base",
  "dglm_diffusion": "configs/dglm.py:size=base",
  "dglm_decoder": "configs/dglm.py:size=base,stage=decoder",
}
MEASURED = tuple(CONFIGS)
TOPOLOGIES = ("v5e-16", "v4-32", "v5p-128")
# Tried in order until the step fits; each entry is a list of overrides.
LEVERS = (
  [],
  ["model.remat=dots_saveable"],
  ["model.remat=full"],
  ["model.remat=full", "train.grad_accum=2"],
  ["model.remat=full", "train.grad_accum=4"],
  ["model.remat=full", "train.grad_accum=8"],
  ["model.remat=full", "train.grad_accum=8", "mesh.data=-1", "mesh.fsdp=4"],
)
NOTES = [
  "Memory per device from compiled.memory_analysis(): total = arguments + outputs - aliased "
  "(donated state) + temporaries; out-of-memory compiles report XLA's required bytes.",
  "flops_per_step: compiled cost_analysis() FLOPs per device x devices (the grad_accum scan body "
  "scaled by its trip count); model_flops_per_step: the task's analytic flops_per_token x tokens.",
  "step_time_s_at_40pct_mfu: compiled FLOPs per device / (0.4 x the device's dense bf16 peak).",
  "ld4lg_diffusion compiles with cached latents and a stand-in for its stage-1 run "
  "(lsd.methods.abstract), as training with ld4lg.cache_latents=true runs it.",
]


def compile_one(spec: str, topo: aot.Topology, overrides: list[str]) -> aot.CompileReport:
  config = load_config_file(spec)
  for o in overrides:
    k, v = o.split("=", 1)
    apply_override(config, k, v)
  task = abstract.prepare(get_task(config))
  batch = abstract.batch(task, config.data.batch_size)
  return aot.compile_train_step(config, task, topo, batch)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default=",".join(MEASURED), help="comma-separated keys of CONFIGS")
  p.add_argument("--topologies", default=",".join(TOPOLOGIES))
  p.add_argument("--name", default="aot_tpu", help="results/<name>.json")
  p.add_argument(
    "--levers",
    default=None,
    help="lever sets to try in order instead of LEVERS: ';'-separated, each ','-separated "
    "overrides, e.g. 'model.remat=full,train.grad_accum=32;model.remat=full,train.grad_accum=64'",
  )
  p.add_argument(
    "--combine",
    default=None,
    help="instead of compiling: merge the rows and attempts of results/<part>.json for these "
    "comma-separated parts (runs of config subsets, or earlier merges) into results/<name>.json",
  )
  args = p.parse_args()
  if args.combine:
    return combine(args.name, args.combine.split(","))
  levers = LEVERS
  if args.levers is not None:
    levers = tuple([o for o in group.split(",") if o] for group in args.levers.split(";"))
  args.levers_tried = levers
  rows, attempts = [], []
  for key in args.only.split(","):
    spec = CONFIGS[key]
    for name in args.topologies.split(","):
      topo = aot.describe_topology(name)
      baseline = None
      for overrides in levers:
        t0 = time.perf_counter()
        r = compile_one(spec, topo, overrides)
        seconds = time.perf_counter() - t0
        d = r.to_dict()
        attempts.append({"config": spec, "overrides": overrides, "compile_s": seconds, **d})
        print(f"[{seconds:6.0f}s] {key} {name} {overrides or 'as configured'}: fits={r.fits} "
              f"total={d['total_gb']} GiB of {d['hbm_gb']}", flush=True)  # fmt: skip
        if baseline is None and not overrides:
          baseline = {
            "fits": r.fits,
            "total_gb": d["total_gb"],
            "advice": [lv["override"] for lv in d["levers"]],
          }
        if r.fits:
          rows.append(
            {
              "config": spec,
              "topology": name,
              "libtpu_topology": topo.libtpu_name,
              "device_kind": topo.device_kind,
              "n_devices": r.n_devices,
              "mesh": r.mesh,
              "global_batch": r.global_batch,
              "fits": True,
              "levers": overrides,
              "total_gb": d["total_gb"],
              "hbm_gb": d["hbm_gb"],
              "argument_gb": d["argument_gb"],
              "temp_gb": d["temp_gb"],
              "flops_per_step": d["flops_per_step"],
              "model_flops_per_step": d["model_flops_per_step"],
              "step_time_s_at_40pct_mfu": d["step_time_s_at_40pct_mfu"],
              "as_configured": baseline,
            }
          )
          break
        if r.fits is None:  # a compile error other than memory: stop, and show it
          print(f"  error: {r.error}", file=sys.stderr, flush=True)
          break
      else:
        rows.append(
          {
            "config": spec,
            "topology": name,
            "fits": False,
            "levers": None,
            "as_configured": baseline,
          }
        )
      _write(args, rows, attempts, complete=False)  # progress survives an interrupted run
  _write(args, rows, attempts, complete=True)


def combine(name: str, parts: list[str]) -> None:
  from common import RESULTS_DIR

  rows, attempts, configs, topologies, provenance = [], [], [], [], []
  for part in parts:
    # A row is written once its config and slice are settled, so the rows of a part that was
    # stopped early are final; its attempts are kept for those rows only.
    record = json.loads((RESULTS_DIR / f"{part}.json").read_text())
    done = {(r["config"], r["topology"]) for r in record["metrics"]["rows"]}
    for r in record["metrics"]["rows"]:  # no compile as configured (--levers): no such baseline
      tried = [a["overrides"] for a in record["metrics"]["attempts"]
               if (a["config"], a["topology"]) == (r["config"], r["topology"])]  # fmt: skip
      if [] not in tried:
        r["as_configured"] = None
    rows += record["metrics"]["rows"]
    attempts += [a for a in record["metrics"]["attempts"] if (a["config"], a["topology"]) in done]
    for c, t in sorted(done):
      configs += [] if c in configs else [c]
      topologies += [] if t in topologies else [t]
    if "combined_from" in record["config"]:  # an earlier merge: keep its parts' own provenance
      provenance += record["config"]["combined_from"]
      continue
    provenance.append(
      {k: record[k] for k in ("git_commit", "date")}
      | {"part": part, "complete": record["metrics"]["complete"]}
      | {"levers_tried_in_order": record["config"]["levers_tried_in_order"]}
    )
  args = argparse.Namespace(name=name, only=None, topologies=",".join(topologies))
  args.levers_tried = json.loads((RESULTS_DIR / f"{parts[0]}.json").read_text())["config"][
    "levers_tried_in_order"
  ]
  done = {(r["config"], r["topology"]) for r in rows}
  missing = [[c, t] for c in configs for t in topologies if (c, t) not in done]
  _write(
    args, rows, attempts, complete=not missing, configs=configs, parts=provenance, missing=missing
  )


def _write(args, rows, attempts, complete: bool, configs=None, parts=None, missing=()) -> None:
  from importlib.metadata import version

  metrics = {
    "complete": complete,
    "all_fit": all(r["fits"] for r in rows),
    "rows": rows,
    "attempts": attempts,
    "notes": NOTES,
  }
  if missing:  # --combine: config and slice pairs no part measured
    metrics["not_measured"] = list(missing)
  config = {
    "configs": configs or [CONFIGS[k] for k in args.only.split(",")],
    "topologies": args.topologies.split(","),
    "levers_tried_in_order": args.levers_tried,
    "libtpu_version": version("libtpu"),
  }
  if parts:
    config["combined_from"] = parts  # each part's own commit and date
  with contextlib.redirect_stdout(io.StringIO()):  # the summary line would print every row
    path = write_result(args.name, metrics, config)
  print(f"{args.name}: {len(rows)} rows, all_fit={metrics['all_fit']} -> {path}", flush=True)


if __name__ == "__main__":
  main()
