"""lsd against the bd3lms reference implementation on this machine: sampling and training speed at
equal model sizes, both sides timed interleaved in one run.

    python benchmarks/peers.py --bd3lms PATH [--lengths 128,256,512,1024] [--repeats 3] [--threads 2]

PATH is a checkout of https://github.com/kuleshov-group/bd3lms (fetching it is the user's step:
`git clone https://github.com/kuleshov-group/bd3lms`; docs/performance.md). The reference runs in
its own virtual environment (`--venv`, created on first use with torch==2.13.0 and its minimal
requirements) inside one long-lived worker process (benchmarks/peers_ref_worker.py, which also
holds the CPU patches the reference needs; its files are never edited). lsd runs in this process.

Both models: d=128, 4 layers, 4 heads, vocabulary 4100 ([MASK] = 4099), random weights, fp32,
dropout 0, no EMA. Sampling: batch 2, block 4, 4 denoising steps per block, KV cache on, at each
length L; training: one step (loss, backward, clip 1.0, AdamW lr 3e-4) on batch 16 x 128, ids
below 4096. Each timed call goes to one side at a time and the side that goes first alternates;
warm-up calls and lsd's compilation are not timed. Writes benchmarks/results/<--result>.json.

With --ld4lg PATH (a checkout of https://github.com/justinlovelace/latent-diffusion-for-language)
the result also gets `ld4lg_sampling`: LD4LG's latent sampler against lsd's at the denoiser size of
configs/ld4lg_yelp.py size=tiny (d=128, 4 layers, 4 heads, 8 latents x 32, 2 long skips, random
weights): DDPM over 250 uniform steps with self-conditioning, v-prediction, cosine schedule, no
CFG, at each batch of --ld4lg_batches, timed the same way in a second worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "peers_ref_worker.py"
FETCH = "git clone https://github.com/kuleshov-group/bd3lms"
# The reference's minimal requirements for a CPU forward and backward (its requirements.txt pins
# a CUDA build of an older torch, flash-attn-era packages and the data stack, none needed here).
REF_PACKAGES = [
  "torch==2.13.0",
  "lightning",
  "hydra-core",
  "omegaconf",
  "einops",
  "torchmetrics",
  "transformers",
  "numpy",
  "fsspec",
  "huggingface_hub",
]
CHECKOUT_FILES = ("diffusion.py", "models/dit.py", "configs/config.yaml")
LD4LG_FETCH = "git clone https://github.com/justinlovelace/latent-diffusion-for-language"
LD4LG_FILES = ("diffusion/text_denoising_diffusion.py", "model/diffusion_transformer.py")
# The denoiser of configs/ld4lg_yelp.py size=tiny; skips: U-ViT long skips (lsd: n_layers // 2,
# the reference's num_dense_connections set equal).
LD4LG_MODEL = dict(d_model=128, n_layers=4, n_heads=4, num_latents=8, d_latent=32, skips=2)
LD4LG_STEPS = 250
VOCAB, MASK_ID, DATA_IDS = 4100, 4099, 4096
BLOCK, STEPS, SAMPLE_BATCH = 4, 4, 2
TRAIN_BATCH, TRAIN_LEN = 16, 128


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--bd3lms", help=f"path to a checkout of the reference ({FETCH})")
  p.add_argument("--venv", default=str(ROOT / "runs" / "peers_venv"), help="reference venv")
  p.add_argument("--python", default="python3.11", help="interpreter that creates --venv")
  p.add_argument("--lengths", default="128,256,512,1024")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per side and length")
  p.add_argument("--train_steps", type=int, default=5, help="training steps per timed call")
  p.add_argument(
    "--threads",
    type=int,
    default=min(2, os.cpu_count() or 1),
    help="torch threads; both processes are also pinned to this many CPUs, which sizes XLA's pool",
  )
  p.add_argument("--result", default="peers", help="writes benchmarks/results/<result>.json")
  p.add_argument("--ld4lg", help=f"also time LD4LG's latent sampler: a checkout ({LD4LG_FETCH})")
  p.add_argument("--ld4lg_batches", default="1,16,128", help="batches of the LD4LG comparison")
  args = p.parse_args(argv)
  if not args.bd3lms:
    p.exit(
      2,
      f"peers.py: --bd3lms PATH is required: a checkout of the reference. Get it with\n"
      f"  {FETCH}\nthen run: python benchmarks/peers.py --bd3lms bd3lms\n",
    )
  missing = [f for f in CHECKOUT_FILES if not (Path(args.bd3lms) / f).is_file()]
  if missing:
    p.exit(
      2,
      f"peers.py: --bd3lms {args.bd3lms} is not a bd3lms checkout (no {', '.join(missing)}). "
      f"Get one with\n  {FETCH}\n",
    )
  if args.ld4lg:
    missing = [f for f in LD4LG_FILES if not (Path(args.ld4lg) / f).is_file()]
    if missing:
      p.exit(
        2,
        f"peers.py: --ld4lg {args.ld4lg} is not a latent-diffusion-for-language checkout (no "
        f"{', '.join(missing)}). Get one with\n  {LD4LG_FETCH}\n",
      )
  if args.repeats < 1 or args.threads < 1:
    p.error("--repeats and --threads must be at least 1")
  return args


def ensure_venv(venv: Path, python: str) -> Path:
  """The reference venv's interpreter, creating the venv first when it is missing."""
  exe = venv / "bin" / "python"
  if exe.exists():
    print(f"reference venv: {venv}", flush=True)
    return exe
  interp = shutil.which(python) or sys.executable
  print(f"creating the reference venv {venv} with {interp}", flush=True)
  subprocess.run([interp, "-m", "venv", str(venv)], check=True)
  print(f"installing into it: {' '.join(REF_PACKAGES)}", flush=True)
  subprocess.run([str(exe), "-m", "pip", "install", "-q", *REF_PACKAGES], check=True)
  return exe


class RefWorker:
  """The reference's worker process: one JSON request per line, one answer per line."""

  def __init__(self, exe: Path, path: str, threads: int, kind: str = "bd3lms"):
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    self.proc = subprocess.Popen(
      [str(exe), str(WORKER), f"--{kind}", path, "--threads", str(threads)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
    )
    self.hello = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the reference worker exited (code {self.proc.wait()}); see its stderr")
    out = json.loads(line)
    if not out.pop("ok"):
      raise RuntimeError(f"reference worker: {out['error']}")
    return out

  def __call__(self, cmd: str, **kw) -> dict:
    self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write('{"cmd": "quit"}\n')
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


class _LsdSide:
  """What both lsd sides share: a sampler compiled ahead of time as fn(state, key), then called
  with a fresh key per call and timed to completion."""

  def compile_sampler(self, lower, *args, **kwargs) -> float:
    """Compiles `lower(*args, **kwargs)` as the sampler; returns the compile seconds."""
    t = time.perf_counter()
    self.sampler = lower(*args, **kwargs).compile()
    self.calls = 0
    return time.perf_counter() - t

  def call_sampler(self):
    """(output, seconds) of one sampler call with key `calls` (then incremented)."""
    key = self.jax.random.key(self.calls)
    self.calls += 1
    t = time.perf_counter()
    out = self.jax.block_until_ready(self.sampler(self.state, key))
    return out, time.perf_counter() - t


class Lsd(_LsdSide):
  """lsd's side: the SBD masked LM at the same size, its KV-cached draft and its train step."""

  def __init__(self):
    import jax
    from flax import nnx

    from lsd.models.masked_lm import MaskedLM
    from lsd.nn import TransformerConfig

    self.jax = jax
    cfg = TransformerConfig(vocab_size=VOCAB, d_model=128, n_layers=4, n_heads=4)
    model = MaskedLM(cfg, mask_id=MASK_ID, rngs=nnx.Rngs(0))
    self.graphdef, self.state = nnx.split(model)
    self.n_params = int(sum(x.size for x in jax.tree.leaves(self.state)))

  def build_sampler(self, length: int):
    from lsd.sampling.block import DraftConfig
    from lsd.sampling.revise import SBDSamplerConfig, draft_then_revise

    draft = DraftConfig(block_size=BLOCK, steps_per_block=STEPS, use_cache=True)
    cfg = SBDSamplerConfig(draft=draft)
    key = self.jax.random.key(0)
    return self.compile_sampler(
      draft_then_revise.lower, self.graphdef, self.state, key, SAMPLE_BATCH, length, cfg
    )

  def sample(self) -> dict:
    import numpy as np

    out, seconds = self.call_sampler()
    tokens = np.asarray(out.tokens)
    draft_nfe = np.asarray(out.nfe_per_stage)[:, 0]
    return {
      "seconds": seconds,
      # The sampler's own counters: peek forwards while a row's block still had masks (max over
      # the batch) plus the KV-cache commit forwards.
      "nfe": int(draft_nfe.max()) + int(out.commit_forwards),
      "masked_left": int((tokens == MASK_ID).sum()),
      "distinct_tokens": int(np.unique(tokens).size),
    }

  def build_train(self):
    import jax
    import numpy as np

    from configs.sbd import get_config
    from lsd.methods import get_task
    from lsd.train.state import init_state, make_optimizer, make_train_step

    c = get_config("size=tiny,variant=bd3")  # block 4 throughout, as bd3lms's block_size=4
    c.data.batch_size, c.data.seq_len = TRAIN_BATCH, TRAIN_LEN
    c.train.update(lr=3e-4, weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=1.0, ema_decay=0.0)
    c.train.warmup_steps = 0
    task = get_task(c)
    task.tokenizer = _Vocab(DATA_IDS)
    from flax import nnx

    graphdef, params = nnx.split(task.build_model(nnx.Rngs(0)))
    tx = make_optimizer(c.train)
    self.train_state = jax.jit(lambda p: init_state(p, tx, ema=False))(params)
    self.step = jax.jit(make_train_step(graphdef, task.loss, tx, c.train, 0), donate_argnums=0)
    rng = np.random.default_rng(0)
    self.batches = [
      {
        "tokens": rng.integers(0, DATA_IDS, (TRAIN_BATCH, TRAIN_LEN)).astype(np.int32),
        "valid": np.ones((TRAIN_BATCH, TRAIN_LEN), bool),
      }
      for _ in range(4)
    ]
    self.step_i = 0

  def train(self, steps: int) -> dict:
    t = time.perf_counter()
    for _ in range(steps):
      self.train_state, m = self.step(self.train_state, self.batches[self.step_i % 4])
      self.step_i += 1
    self.jax.block_until_ready(m)
    return {"seconds": time.perf_counter() - t, "loss": float(m["loss"])}


class LsdLatent(_LsdSide):
  """lsd's side of the LD4LG comparison: the latent denoiser and `lsd.sampling.latent.sample`."""

  def __init__(self):
    import jax
    from flax import nnx

    from lsd.models.denoiser import DenoiserConfig, LatentDenoiser

    self.jax = jax
    m = LD4LG_MODEL
    cfg = DenoiserConfig(
      **{k: m[k] for k in ("num_latents", "d_latent", "d_model", "n_layers", "n_heads")},
      self_condition=True,
    )
    if cfg.n_layers // 2 != m["skips"]:
      raise ValueError(f"lsd's denoiser has {cfg.n_layers // 2} long skips, not {m['skips']}")
    self.graphdef, self.state = nnx.split(LatentDenoiser(cfg, rngs=nnx.Rngs(0)))
    self.n_params = int(sum(x.size for x in jax.tree.leaves(self.state)))

  def build_sampler(self, batch: int, steps: int) -> float:
    from lsd.sampling import latent

    self.steps = steps
    return self.compile_sampler(
      latent.sample.lower, self.graphdef, self.state, self.jax.random.key(0), batch, steps=steps,
      sampler="ddpm", objective="v",
    )  # fmt: skip

  def sample(self) -> dict:
    import numpy as np

    z, seconds = self.call_sampler()
    # NFE: one denoiser pass per step (self-conditioning feeds the last estimate back; no CFG)
    return {"seconds": seconds, "nfe": self.steps, "finite": bool(np.isfinite(z).all())}


def run_ld4lg(args, exe: Path, turn: list[int]) -> tuple[dict, dict]:
  """The LD4LG latent-sampler comparison: (metrics, config) of `ld4lg_sampling`."""
  commit = subprocess.run(
    ["git", "-C", args.ld4lg, "rev-parse", "HEAD"], capture_output=True, text=True
  ).stdout.strip()
  ref = RefWorker(exe, args.ld4lg, args.threads, kind="ld4lg")
  lsd = LsdLatent()
  rows = {}
  try:
    for batch in [int(x) for x in args.ld4lg_batches.split(",")]:
      info = ref("build_sampler", batch=batch, steps=LD4LG_STEPS, model=LD4LG_MODEL)
      compile_s = lsd.build_sampler(batch, LD4LG_STEPS)
      warm = {"lsd": lsd.sample(), "ref": ref("sample")}  # untimed
      runs = interleaved({"lsd": lsd.sample, "ref": lambda: ref("sample")}, args.repeats, turn)
      lsd_s = [r["seconds"] for r in runs["lsd"]]
      ref_s = [r["seconds"] for r in runs["ref"]]
      rows[str(batch)] = row = {
        **compare("s", lsd_s, ref_s, lower_is_better=True),
        "lsd_nfe": runs["lsd"][-1]["nfe"],
        "ref_nfe": runs["ref"][-1]["nfe"],
        "lsd_seconds_all": lsd_s,
        "ref_seconds_all": ref_s,
        "lsd_compile_s": compile_s,
        "finite": all(r["finite"] for side in runs.values() for r in side),
        "warmup_s": {"lsd": warm["lsd"]["seconds"], "ref": warm["ref"]["seconds"]},
        "ref_params": info["n_params"],
      }
      print(
        f"LD4LG batch {batch}: lsd {row['lsd_s']:.3f} s, reference {row['ref_s']:.3f} s "
        f"(NFE {row['lsd_nfe']} / {row['ref_nfe']}), reference / lsd {row['ratio']:.2f}x",
        flush=True,
      )
  finally:
    ref.close()
  config = {
    "model": LD4LG_MODEL,
    "steps": LD4LG_STEPS,
    "lsd": "lsd.sampling.latent.sample: ddpm, v-prediction, self-conditioning, cosine schedule, "
    "one lax.scan",
    "ref": "GaussianDiffusion(DiffusionTransformer(scale_shift, self_condition, "
    "num_dense_connections=skips), pred_v, cosine, ddpm).sample: a Python loop of 250 steps",
    "lsd_params": lsd.n_params,
    "ld4lg_commit": commit or "unknown",
  }
  return rows, config


class _Vocab:
  """The tokenizer fields lsd's task reads: `size` data ids, then pad, bos, eos and [MASK]."""

  def __init__(self, size):
    self.vocab_size = size + 4
    self.pad_id, self.bos_id, self.eos_id, self.mask_id = size, size + 1, size + 2, size + 3


def interleaved(calls: dict, repeats: int, turn: list[int]) -> dict:
  """Runs each side's call `repeats` times, one call at a time, alternating which side goes first
  (`turn` carries the alternation across lengths); returns {side: [answers]}."""
  out = {side: [] for side in calls}
  sides = list(calls)
  for _ in range(repeats):
    order = sides if turn[0] % 2 == 0 else sides[::-1]
    turn[0] += 1
    for side in order:
      out[side].append(calls[side]())
  return out


def compare(unit: str, lsd: list[float], ref: list[float], *, lower_is_better: bool) -> dict:
  """lsd_<unit> / ref_<unit>: the best of each side's repetitions (min of seconds, max of
  throughput), their medians, and `ratio` / `ratio_median`: how many times faster lsd is."""
  best = min if lower_is_better else max
  faster = (lambda a, b: b / a) if lower_is_better else (lambda a, b: a / b)
  out = {}
  for suffix, pick in (("", best), ("_median", statistics.median)):
    a, b = pick(lsd), pick(ref)
    out.update({f"lsd_{unit}{suffix}": a, f"ref_{unit}{suffix}": b, f"ratio{suffix}": faster(a, b)})
  return out


def main(argv=None):
  args = parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  cpus = sorted(os.sched_getaffinity(0))[: args.threads]
  os.sched_setaffinity(0, cpus)  # before jax starts: XLA sizes its thread pool from the affinity
  commit = subprocess.run(
    ["git", "-C", args.bd3lms, "rev-parse", "HEAD"], capture_output=True, text=True
  ).stdout.strip()
  exe = ensure_venv(Path(args.venv), args.python)
  ref = RefWorker(exe, args.bd3lms, args.threads)  # inherits the affinity
  print(f"reference worker: torch {ref.hello['torch']}, {ref.hello['threads']} threads", flush=True)
  sys.path.insert(0, str(ROOT))  # configs/
  import jax
  from common import write_result

  lsd = Lsd()
  turn = [0]
  sampling = {}
  try:
    for length in lengths:
      ref_info = ref("build_sampler", length=length, batch=SAMPLE_BATCH, steps=STEPS)
      compile_s = lsd.build_sampler(length)
      warm = {"lsd": lsd.sample(), "ref": ref("sample")}  # untimed
      runs = interleaved({"lsd": lsd.sample, "ref": lambda: ref("sample")}, args.repeats, turn)
      lsd_s = [r["seconds"] for r in runs["lsd"]]
      ref_s = [r["seconds"] for r in runs["ref"]]
      row = {
        **compare("s", lsd_s, ref_s, lower_is_better=True),
        "lsd_nfe": statistics.median(r["nfe"] for r in runs["lsd"]),
        "ref_nfe": statistics.median(r["nfe"] for r in runs["ref"]),
        "lsd_seconds_all": lsd_s,
        "ref_seconds_all": ref_s,
        "lsd_compile_s": compile_s,
        "lsd_masked_left": max(r["masked_left"] for r in runs["lsd"]),
        "ref_masked_left": max(r.get("masked_left", -1) for r in runs["ref"]),
        "ref_stopped_early": any(r.get("stopped_early", False) for r in runs["ref"]),
        "lsd_distinct_tokens": runs["lsd"][-1]["distinct_tokens"],
        "ref_distinct_tokens": runs["ref"][-1].get("distinct_tokens", 0),
        "warmup_s": {"lsd": warm["lsd"]["seconds"], "ref": warm["ref"]["seconds"]},
      }
      sampling[str(length)] = row
      print(
        f"L={length}: lsd {row['lsd_s']:.3f} s (median {row['lsd_s_median']:.3f}, NFE "
        f"{row['lsd_nfe']}), bd3lms {row['ref_s']:.3f} s (median {row['ref_s_median']:.3f}, NFE "
        f"{row['ref_nfe']}), bd3lms / lsd {row['ratio']:.2f}x",
        flush=True,
      )
    ref_train = ref("build_train", batch=TRAIN_BATCH, length=TRAIN_LEN)
    lsd.build_train()
    steps = args.train_steps
    lsd.train(3)  # compile + warm up
    ref("train", steps=1)
    runs = interleaved(
      {"lsd": lambda: lsd.train(steps), "ref": lambda: ref("train", steps=steps)},
      args.repeats,
      turn,
    )
  finally:
    ref.close()
  tokens = TRAIN_BATCH * TRAIN_LEN * steps
  lsd_tok = [tokens / r["seconds"] for r in runs["lsd"]]
  ref_tok = [tokens / r["seconds"] for r in runs["ref"]]
  training = {
    **compare("tok_s", lsd_tok, ref_tok, lower_is_better=False),
    "lsd_loss_last": runs["lsd"][-1]["loss"],
    "ref_loss_last": runs["ref"][-1]["loss"],
  }
  print(
    f"training {TRAIN_BATCH}x{TRAIN_LEN}: lsd {training['lsd_tok_s']:.0f} tok/s, bd3lms "
    f"{training['ref_tok_s']:.0f} tok/s, lsd / bd3lms {training['ratio']:.2f}x",
    flush=True,
  )
  metrics, extra = {"sampling": sampling, "training": training}, {}
  if args.ld4lg:
    metrics["ld4lg_sampling"], extra["ld4lg_sampling"] = run_ld4lg(args, exe, turn)
  write_result(
    args.result,
    metrics,
    {
      **extra,
      "what": "sampling: ratio = bd3lms s / lsd s (min over repeats; *_median from medians); "
      "training: ratio = lsd tok/s / bd3lms tok/s (max over repeats)",
      "model": "d=128, 4 layers, 4 heads, vocab 4100 ([MASK] 4099), random weights, fp32, dropout 0",
      "lsd_params": lsd.n_params,
      "ref_params": ref_info["n_params"],
      "ref_train_params": ref_train["n_params"],
      "sampling": {
        "batch": SAMPLE_BATCH,
        "block_size": BLOCK,
        "steps_per_block": STEPS,
        "lengths": lengths,
        "lsd": "draft_then_revise, KV cache, no revision stages; NFE = its own counter "
        "(peek forwards, max over the batch) + commit forwards",
        "ref": "_semi_ar_sampler(B, T=4, L/4, L), kv_cache, first_hitting=false, nucleus_p=1; "
        "NFE = backbone forward calls (peeks + cache stores)",
      },
      "training": {
        "batch": TRAIN_BATCH,
        "seq_len": TRAIN_LEN,
        "steps_per_call": steps,
        "lsd": "configs/sbd.py variant=bd3 train step, AdamW 3e-4 (wd 0), clip 1.0",
        "ref": "_loss + backward + clip 1.0 + AdamW 3e-4 (its optim config), no Trainer",
      },
      "repeats": args.repeats,
      "order": "one call at a time, the side going first alternates",
      "threads": {
        "requested": args.threads,
        "cpus_pinned": cpus,
        "torch_num_threads": ref.hello["threads"],
        "torch_version": ref.hello["torch"],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_pool": "XLA's default, sized by the CPU affinity above",
        "jax_devices": len(jax.devices()),
      },
      "bd3lms_commit": commit or "unknown",
    },
  )


if __name__ == "__main__":
  main()
