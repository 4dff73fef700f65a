"""SLD at CPU scale: ROCStories first sentence -> the next four, against LD4LG (one latent for the
whole continuation) and an autoregressive baseline; latent robustness; DialogSum.

    python benchmarks/sld.py [--data_dir ../shared/data] [--workdir runs/bench/sld]
    python benchmarks/sld.py --steps 20 --test_prompts 16 --result sld_smoke   # a smoke run

Protocol (issue "SLD", item 5):
- ROCStories (5,000 stories), split 95/5 by a seeded permutation (seed 0): 4,750 training and 250
  test stories. The prompt is the story's first sentence, the target the rest (four sentences),
  as `lsd.data.segments` cuts them. The split files are written to the workdir.
- SLD (configs/sld.py, tiny): K = 4 segments of 8 x 32 latents; stage 1 the autoencoder with the
  representation losses, stage 2 the segment denoiser with MiniLM states of the prompt as context.
  LD4LG (configs/ld4lg_e2e.py, tiny): one autoencoder of the whole target (up to 96 tokens) to
  32 x 32 latents (the same total latent size), and its seq2seq denoiser on the same context. Both
  sample 100 DDPM steps with CFG w = 2 and decode with 4 beams. AR: a causal LM with about SLD's
  total parameter count (autoencoder + denoiser), trained on the whole stories and continuing the
  prompt (nucleus p = 0.9).
- Budgets: each method's training fits at most 60 minutes of this machine (--sld_ae_minutes +
  --sld_diff_minutes, --ld4lg_ae_minutes + --ld4lg_diff_minutes, --ar_minutes), converted to steps
  by an 80-step probe of each config (lsd.train.sweep.steps_for_minutes), so other load changes
  wall time only.
  --steps N trains every run for N steps instead (smoke runs).
- Metrics on the test prompts (>= 250): ROUGE-1/2/L F1 against the reference continuation, the
  judge's (SmolLM2-135M) perplexity of each continuation given its prompt (per-sample mean),
  MAUVE against the reference continuations on judge features, dist-2, NFE (denoiser evaluations
  per sample; for AR the decoding steps) and sampling seconds.
- Robustness: BLEU of 500 held-out segments reconstructed from latents with Gaussian noise of std
  sigma added (then re-projected onto the sphere), for the SLD autoencoder and one trained the
  same minutes without the contrastive and adversarial losses (Gaussian latent noise kept).
- Latents: PCA of the mean-pooled latents of the test stories' five sentences, coloured by the
  sentence's position (results/<result>_latents.png).
- DialogSum: trained on the 500 dev dialogues (summaries cut into sentences, MiniLM states of the
  dialogue as context), evaluated on the 500 test dialogues against their three references (best
  ROUGE per reference); the AR baseline reads "dialogue \\n Summary:" and continues.

- Comparisons: a paired bootstrap over the test items (2,000 resamples) of SLD minus LD4LG and
  SLD minus AR, for ROUGE-L and log perplexity; a claim holds when the 95 % interval excludes 0
  in its direction.

Every stage is resumable: trainings resume from their checkpoints, sample files are reused. With
the default budgets (20 minutes per method on ROCStories, 12 for the ablation, 4 per method on
DialogSum) the run takes about 110 minutes of a 2-core CPU, probes, sampling and scoring included.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import (
  RESULTS_DIR,
  cached,
  cached_features,
  check_stopped,
  log,
  quiet,
  train_seconds,
  write_result,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flax import nnx  # noqa: E402

from lsd import api  # noqa: E402
from lsd.config import load_config_file  # noqa: E402
from lsd.data.segments import split_segments  # noqa: E402
from lsd.eval.genppl import GenPPL  # noqa: E402
from lsd.eval.metrics import bleu, dist_n, mauve, paired_bootstrap, rouge_per_sample  # noqa: E402
from lsd.fileio import atomic_write_text  # noqa: E402
from lsd.methods import get_task  # noqa: E402
from lsd.nn.layers import normalize_to_sphere  # noqa: E402
from lsd.sampling.autoregressive import generate  # noqa: E402
from lsd.train import sweep  # noqa: E402

SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.3)
LD4LG_MAX_LEN = 96  # tokens of a whole ROCStories continuation (bos and eos included)


def n_params(run_dir: Path) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(api.load(run_dir).params)))


# ------------------------------------------------------------------------------------------ data
def write_rocstories(data_dir: Path, out: Path, test_size: int) -> tuple[Path, list[dict]]:
  """train.jsonl ({"source", "text", "story"}) and the test stories, split 95/5 (seed 0)."""
  lines = (data_dir / "rocstories" / "roc_stories_5k.json").read_text().splitlines()
  stories = [json.loads(x)[0] for x in lines if x.strip()]
  rows = []
  for story in stories:
    sentences = split_segments(story, "sentences")
    if len(sentences) >= 2:
      rows.append({"source": sentences[0], "text": " ".join(sentences[1:]), "story": story})
  perm = np.random.default_rng(0).permutation(len(rows))
  n_test = round(0.05 * len(rows))
  test = [rows[i] for i in sorted(perm[:n_test])][:test_size]
  train = [rows[i] for i in sorted(perm[n_test:])]
  out.mkdir(parents=True, exist_ok=True)
  path = out / "roc_train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in train))
  return path, test


def write_dialogsum(data_dir: Path, out: Path, test_size: int) -> tuple[Path, list[dict]]:
  """The dev dialogues as training rows ({"dialogue", "summary", "story"}: the AR text) and the
  test dialogues with their three references."""
  read = lambda name: [
    json.loads(x) for x in (data_dir / "dialogsum" / name).read_text().splitlines() if x.strip()
  ]
  train = [
    {**r, "story": f"{r['dialogue']}\nSummary: {r['summary']}"} for r in read("dialogsum.dev.jsonl")
  ]
  test = [
    {"source": r["dialogue"], "refs": [r[f"summary{i}"] for i in (1, 2, 3)]}
    for r in read("dialogsum.test.jsonl")
  ][:test_size]
  path = out / "dialogsum_train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in train))
  return path, test


# --------------------------------------------------------------------------------------- configs
def sld_configs(path: Path, workdir: Path, prefix: str, data: str) -> dict:
  ae = load_config_file(f"configs/sld.py:stage=ae,size=tiny,data={data}")
  diff = load_config_file(f"configs/sld.py:stage=diffusion,size=tiny,data={data}")
  for c in (ae, diff):
    c.data.path = str(path)
    c.data.eval_fraction = 0.02
    if data == "rocstories":  # the split file holds the prompt as its own field
      c.data.update(text_field="text", source_field="source", prompt_segments=0)
    else:  # summary sentences are longer than story sentences: T = 48 (32 cuts 8 % of them)
      c.data.max_len = c.data.seq_len = 48
      c.sample.max_new_tokens = 47
  ae.model.max_len = ae.data.max_len
  diff.sld.autoencoder_workdir = str(workdir / f"{prefix}_ae")
  plain = copy.deepcopy(ae)  # the robustness ablation: no contrastive or adversarial loss
  plain.sld.update(contrastive_weight=0.0, adversarial_weight=0.0)
  return {f"{prefix}_ae": ae, f"{prefix}_diff": diff, f"{prefix}_ae_plain": plain}


def ld4lg_configs(path: Path, workdir: Path, prefix: str, sld: dict, data: str) -> dict:
  """LD4LG seq2seq with one l' = K * l latent set for the whole target (SLD's total size)."""
  ae = load_config_file("configs/ld4lg_e2e.py:stage=ae,size=tiny")
  diff = load_config_file("configs/ld4lg_e2e.py:stage=diffusion,size=tiny")
  sld_diff = sld[f"{prefix.replace('ld4lg', 'sld')}_diff"]
  for c in (ae, diff):
    c.data.update(source="jsonl", path=str(path), eval_fraction=0.02)
    c.data.update(text_field="text" if data == "rocstories" else "summary")
    c.data.max_len = c.data.seq_len = LD4LG_MAX_LEN
    c.sample.max_new_tokens = LD4LG_MAX_LEN - 1
  ae.data.source_field = ""
  ae.data.length_buckets = (48, 64, 80)
  ae.model.update(max_len=LD4LG_MAX_LEN, num_latents=sld_diff.model.num_latents)
  diff.model.num_latents = sld_diff.model.num_latents
  diff.data.source_field = "source" if data == "rocstories" else "dialogue"
  diff.data.max_source_len = sld_diff.data.max_source_len
  # The same denoiser training and sampler settings as SLD's.
  diff.data.batch_size = sld_diff.data.batch_size
  for k in ("lr", "warmup_steps", "ema_decay"):
    diff.train[k] = sld_diff.train[k]
  for k in ("steps", "guidance_scale", "candidates"):
    diff.sample[k] = sld_diff.sample[k]
  diff.ld4lg.autoencoder_workdir = str(workdir / f"{prefix}_ae")
  return {f"{prefix}_ae": ae, f"{prefix}_diff": diff}


def ar_config(path: Path, seq_len: int, target_params: int, vocab: int):
  """A causal LM on the "story" field (prompt + continuation), its width and depth chosen from a
  small grid to come closest to `target_params`."""
  base = load_config_file("configs/causal_lm.py:size=tiny,data=text")
  base.data.update(source="jsonl", path=str(path), text_field="story", eval_fraction=0.02)
  base.data.seq_len = seq_len
  base.data.batch_size = 32
  base.data.tokenizer.vocab_size = vocab
  best = None
  for d_model in (128, 192, 256, 320):
    for n_layers in range(2, 9):
      c = copy.deepcopy(base)
      c.model.update(d_model=d_model, n_layers=n_layers, n_heads=max(2, d_model // 64))
      task = get_task(c)
      task.tokenizer = types.SimpleNamespace(vocab_size=vocab + 4)
      shapes = nnx.state(nnx.eval_shape(lambda task=task: task.build_model(nnx.Rngs(0))))
      n = sum(x.size for x in jax.tree.leaves(shapes))
      if best is None or abs(n - target_params) < abs(best[0] - target_params):
        best = (n, c)
  return best[1]


def train_run(cfg, workdir: Path, name: str, minutes: float, args) -> int:
  """Trains `name` for --steps or the steps that fit `minutes`; returns the steps."""
  steps = args.steps or sweep.steps_for_minutes(api.train, cfg, workdir, name, minutes, log=log)
  log(f"training {name} ({steps} steps)")
  result = api.train(quiet(cfg, steps, log_every=max(1, min(100, steps // 4))), workdir / name)
  check_stopped(result, workdir / name, steps)  # a SIGTERM'd run must not be sampled
  return steps


# -------------------------------------------------------------------------------------- sampling
def chunked(fn, items: list, size: int) -> list:
  """fn(i, chunk) over `items` in chunks of `size`, the last padded with its last item (one
  compiled shape); i numbers the chunks."""
  out = []
  for i, start in enumerate(range(0, len(items), size)):
    chunk = items[start : start + size]
    out += fn(i, chunk + [chunk[-1]] * (size - len(chunk)))[: len(chunk)]
  return out


def sample_latent(run_dir: Path, sources: list[str], args) -> dict:
  """One output per source from a seq2seq latent diffusion run (SLD or LD4LG)."""
  run = api.load(run_dir)
  if args.sample_steps:
    run.config.sample.steps = args.sample_steps
  t0 = time.perf_counter()
  key = jax.random.key(args.seed)
  texts = chunked(
    lambda i, c: api.generate_from_sources(run, jax.random.fold_in(key, i), c),
    sources,
    args.chunk,
  )
  sampler = run.task.sampler(run.model())
  return {"texts": texts, "seconds": time.perf_counter() - t0, "nfe": sampler.nfe(True)}


def sample_ar(run_dir: Path, prompts: list[str], max_new: int, args, bucket: int = 0) -> dict:
  """Continuations of [bos] prompt by the causal LM (nucleus p = 0.9), batched by prompt length.
  A prompt keeps its last tokens, so that prompt and continuation fit the LM's training length;
  with `bucket` > 0 down to a multiple of `bucket` (long dialogues: a few compiled lengths
  instead of one per prompt)."""
  run = api.load(run_dir)
  tok = run.tokenizer
  room = run.config.data.seq_len - max_new - 1
  ids = [tok.encode(p)[-room:] for p in prompts]
  if bucket:
    ids = [x[-max(bucket, len(x) // bucket * bucket) + 1 :] for x in ids]
  ids = [[tok.bos_id, *x] for x in ids]
  out: list[str | None] = [None] * len(ids)
  t0 = time.perf_counter()
  for length in sorted({len(x) for x in ids}):
    rows = [i for i, x in enumerate(ids) if len(x) == length]
    for start in range(0, len(rows), args.chunk):
      part = rows[start : start + args.chunk]
      prompt = jnp.asarray([ids[i] for i in part], jnp.int32)
      key = jax.random.fold_in(jax.random.key(args.seed), length * 1000 + start)
      toks = generate(
        run.graphdef, run.params, key, prompt, max_new_tokens=max_new, top_p=0.9, temperature=1.0
      )
      for i, row in zip(part, np.asarray(jax.device_get(toks)).tolist(), strict=True):
        out[i] = tok.decode(row[: row.index(tok.eos_id)] if tok.eos_id in row else row)
  return {"texts": out, "seconds": time.perf_counter() - t0, "nfe": max_new}


# ------------------------------------------------------------------------------------- scoring
def score(rec: dict, prompts: list[str], refs: list, judge, features) -> tuple[dict, dict]:
  """The method's metrics, and its per-sample ROUGE-L and perplexity (for paired comparisons)."""
  texts = rec["texts"]
  r = rouge_per_sample(texts, refs)
  ppl = np.array(judge.conditional_per_sample(prompts, texts))
  flat_refs = [x if isinstance(x, str) else x[0] for x in refs]
  metrics = {
    "rouge_1": float(r["rouge1"].mean()),
    "rouge_2": float(r["rouge2"].mean()),
    "rouge_l": float(r["rougeL"].mean()),
    "gen_ppl": float(np.nanmean(ppl)),
    "gen_ppl_median": float(np.nanmedian(ppl)),
    "mauve": mauve(features(flat_refs), features(texts)),
    "dist_2": dist_n(texts, 2),
    "nfe": rec["nfe"],
    "seconds": rec["seconds"],
    "n": len(texts),
    "empty": sum(not t.strip() for t in texts),
  }
  return metrics, {"rouge_l": r["rougeL"], "log_ppl": np.log(ppl)}


def cached_score(path: Path, rec: dict, prompts, refs, judge, features) -> tuple[dict, dict]:
  """`score`, kept in `path` under a digest of the texts, prompts and references: judging one
  method's DialogSum outputs takes most of an hour on 2 cores, and a stopped run must not redo it."""
  key = hashlib.sha256(json.dumps([rec["texts"], list(prompts), refs]).encode()).hexdigest()
  if path.exists():
    saved = json.loads(path.read_text())
    if saved["digest"] == key:
      return saved["metrics"], {k: np.asarray(v) for k, v in saved["per_sample"].items()}
  metrics, per_sample = score(rec, prompts, refs, judge, features)
  out = {
    "digest": key,
    "metrics": metrics,
    "per_sample": {k: v.tolist() for k, v in per_sample.items()},
  }
  atomic_write_text(path, json.dumps(out))
  log(f"{path.stem}: scored")
  return metrics, per_sample


def compare(per: dict, a: str, b: str) -> dict:
  """Paired bootstrap of method a minus method b over the test items: ROUGE-L (mean) and log
  perplexity (mean; < 0 = a lower), each with a 95 % interval and whether it excludes 0."""
  out = {}
  for key in ("rouge_l", "log_ppl"):
    d = paired_bootstrap(per[a][key], per[b][key])
    out[key] = {**d, "exceeds_spread": bool(d["low"] > 0 or d["high"] < 0)}
  return out


def robustness(ae_dir: Path, segments: list[str], seed: int) -> dict:
  """BLEU of `segments` decoded from their latents + N(0, sigma^2), re-projected onto the sphere."""
  ae = api.load(ae_dir)
  z = jnp.concatenate(
    [api.encode_texts(ae, segments[i : i + 250]) for i in range(0, len(segments), 250)]
  )
  out = {}
  for sigma in SIGMAS:
    noise = jax.random.normal(jax.random.key(seed), z.shape)
    zs = normalize_to_sphere(z + sigma * noise) if sigma else z
    texts = []
    for i in range(0, len(segments), 250):
      texts += api.decode_latents(ae, zs[i : i + 250])
    out[str(sigma)] = bleu(texts, segments)
  log(f"robustness {ae_dir.name}: {out}")
  return out


def latent_pca(ae_dir: Path, stories: list[str], png: Path) -> dict:
  """PCA of the mean-pooled latents of each story's five sentences, coloured by position."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ae = api.load(ae_dir)
  five = [s for s in (split_segments(t, "sentences") for t in stories) if len(s) == 5]
  flat = [x for s in five for x in s]
  z = np.concatenate(
    [np.asarray(api.encode_texts(ae, flat[i : i + 250])) for i in range(0, len(flat), 250)]
  ).mean(1)
  positions = np.tile(np.arange(1, 6), len(five))
  centred = z - z.mean(0)
  _, sv, vt = np.linalg.svd(centred, full_matrices=False)
  xy = centred @ vt[:2].T
  fig, ax = plt.subplots(figsize=(6, 5))
  for p in range(1, 6):
    m = positions == p
    ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, label=f"sentence {p}")
  ax.set(title="SLD segment latents (mean over l), PCA", xlabel="PC 1", ylabel="PC 2")
  ax.legend(markerscale=3)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)
  var = sv**2 / np.sum(sv**2)
  # How far apart the positions sit: the distance of each position's centroid from the overall one
  # in the PCA plane, relative to the spread of the points.
  cent = np.array([xy[positions == p].mean(0) for p in range(1, 6)])
  return {
    "stories": len(five),
    "explained_variance_2": float(var[:2].sum()),
    "position_centroid_spread": float(np.linalg.norm(cent, axis=1).mean() / xy.std()),
  }


# ------------------------------------------------------------------------------------------ main
def run_task(name: str, path: Path, test: list[dict], workdir: Path, args, minutes: dict) -> dict:
  """Trains the three methods on one corpus and scores them: (metrics per method, paired
  comparisons, configs, run info)."""
  data = "rocstories" if name == "roc" else "dialogsum"
  sld = sld_configs(path, workdir, f"{name}_sld", data)
  cfgs = {**sld, **ld4lg_configs(path, workdir, f"{name}_ld4lg", sld, data)}
  steps = {}
  for run in (f"{name}_sld_ae", f"{name}_sld_diff", f"{name}_ld4lg_ae", f"{name}_ld4lg_diff"):
    steps[run] = train_run(cfgs[run], workdir, run, minutes[run], args)
  sld_params = n_params(workdir / f"{name}_sld_ae") + n_params(workdir / f"{name}_sld_diff")
  ar_len = 128 if name == "roc" else 384
  ar = ar_config(path, ar_len, sld_params, cfgs[f"{name}_sld_ae"].data.tokenizer.vocab_size)
  steps[f"{name}_ar"] = train_run(ar, workdir, f"{name}_ar", minutes[f"{name}_ar"], args)
  sources = [d["source"] for d in test]
  cache = workdir / "cache"
  prompts = sources if name == "roc" else [f"{s}\nSummary:" for s in sources]
  makers = {
    "sld": lambda: sample_latent(workdir / f"{name}_sld_diff", sources, args),
    "ld4lg": lambda: sample_latent(workdir / f"{name}_ld4lg_diff", sources, args),
    "ar": lambda: sample_ar(
      workdir / f"{name}_ar", prompts, LD4LG_MAX_LEN, args, bucket=0 if name == "roc" else 32
    ),
  }
  recs = {m: cached(cache / f"{name}_{m}.json", make) for m, make in makers.items()}
  judge = GenPPL(max_len=768 if name == "ds" else 160, batch_size=16)
  features = lambda texts: cached_features(judge, workdir / "judge_features", texts)
  refs = [d["text"] for d in test] if name == "roc" else [d["refs"] for d in test]
  scored = {
    m: cached_score(cache / f"{name}_{m}_scores.json", r, sources, refs, judge, features)
    for m, r in recs.items()
  }
  metrics = {m: v[0] for m, v in scored.items()}
  per_sample = {m: v[1] for m, v in scored.items()}
  for m, v in metrics.items():
    log(f"{name} {m}: ROUGE-L {v['rouge_l']:.2f} PPL {v['gen_ppl']:.1f} MAUVE {v['mauve']:.3f}")
  runs = [*steps]
  paired = {
    "sld_minus_ld4lg": compare(per_sample, "sld", "ld4lg"),
    "sld_minus_ar": compare(per_sample, "sld", "ar"),
  }
  info = {
    "steps": steps,
    "train_seconds": {r: train_seconds(workdir / r) for r in runs},
    "n_params": {r: n_params(workdir / r) for r in runs},
    "examples": {
      m: [{"prompt": s, "text": t} for s, t in zip(sources[:3], r["texts"][:3], strict=True)]
      for m, r in recs.items()
    },
  }
  return metrics, paired, cfgs, info


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
  p.add_argument("--workdir", default="runs/bench/sld")
  # Minutes of training per run on this machine (an 80-step probe converts them to steps): 20 per
  # method on ROCStories (the protocol's cap is 60; a 2-core session affords a third), the
  # robustness ablation the SLD autoencoder's, 4 per method on DialogSum.
  p.add_argument("--sld_ae_minutes", type=float, default=12.0)
  p.add_argument("--sld_diff_minutes", type=float, default=8.0)
  p.add_argument("--ld4lg_ae_minutes", type=float, default=12.0)
  p.add_argument("--ld4lg_diff_minutes", type=float, default=8.0)
  p.add_argument("--ar_minutes", type=float, default=20.0)
  p.add_argument("--dialogsum_minutes", type=float, default=4.0, help="per method, split 1:1")
  p.add_argument("--steps", type=int, default=0, help="every run this many steps (smoke runs)")
  p.add_argument("--test_prompts", type=int, default=250)
  p.add_argument("--dialogsum_test", type=int, default=500)
  p.add_argument("--robust_segments", type=int, default=500)
  p.add_argument("--sample_steps", type=int, default=0, help="DDPM steps (0: the configs')")
  p.add_argument("--chunk", type=int, default=64, help="sources per sampler call")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--skip_dialogsum", action="store_true")
  p.add_argument("--result", default="sld", help="benchmarks/results/<result>.json")
  args = p.parse_args()
  if not args.result.replace("_", "").isalnum():
    p.error(f"--result={args.result!r}: letters, digits and _ only (a file name)")
  data_dir = Path(args.data_dir)
  for folder in ("rocstories", "dialogsum"):
    if not (data_dir / folder).is_dir():
      sys.exit(f"--data_dir={data_dir} has no {folder}/ folder (the shared corpora)")
  workdir = Path(args.workdir)
  (workdir / "cache").mkdir(parents=True, exist_ok=True)

  path, test = write_rocstories(data_dir, workdir / "data", args.test_prompts)
  minutes = {
    "roc_sld_ae": args.sld_ae_minutes,
    "roc_sld_diff": args.sld_diff_minutes,
    "roc_ld4lg_ae": args.ld4lg_ae_minutes,
    "roc_ld4lg_diff": args.ld4lg_diff_minutes,
    "roc_ar": args.ar_minutes,
  }
  half = args.dialogsum_minutes / 2
  minutes.update(
    ds_sld_ae=half, ds_sld_diff=half, ds_ld4lg_ae=half, ds_ld4lg_diff=half, ds_ar=2 * half
  )
  methods, paired, cfgs, roc_info = run_task("roc", path, test, workdir, args, minutes)
  vs = paired["sld_minus_ld4lg"]
  # A claim holds when the difference is in its direction and exceeds the bootstrap spread.
  result = {
    "methods": methods,
    "paired": paired,
    "claims": {
      "sld_beats_ld4lg_rouge_l": vs["rouge_l"]["low"] > 0,
      "sld_beats_ld4lg_ppl": vs["log_ppl"]["high"] < 0,
    },
  }
  config = {
    "data_dir": "shared corpora: rocstories, dialogsum (see ../shared/data)",
    "rocstories": {
      "split": "95/5 seeded (seed 0) over 5,000 stories; prompt = sentence 1, target = the rest",
      "test_prompts": len(test),
      **roc_info,
      "sld": {"latents": "4 segments x 8 x 32", "sample": dict(cfgs["roc_sld_diff"].sample)},
      "ld4lg": {
        "latents": "32 x 32",
        "max_len": LD4LG_MAX_LEN,
        "sample": dict(cfgs["roc_ld4lg_diff"].sample),
      },
      "ar": "causal LM on whole stories, nucleus p = 0.9 from [bos] prompt",
      "judge": "SmolLM2-135M-Instruct, per-sample perplexity of the continuation given the prompt",
    },  # fmt: skip
    "budget_minutes": minutes if not args.steps else f"{args.steps} steps per run (smoke)",
  }
  # The file is written after each part, "incomplete" naming the parts still to come, so a run
  # stopped later keeps what it measured (a rerun resumes the rest).
  todo = ["robustness", "latent_pca"] + ([] if args.skip_dialogsum else ["dialogsum"])
  write_result(args.result, {**result, "incomplete": todo}, config)

  # Robustness: the SLD autoencoder vs one without the contrastive + adversarial losses.
  plain_steps = train_run(
    cfgs["roc_sld_ae_plain"], workdir, "roc_sld_ae_plain", args.sld_ae_minutes, args
  )
  held_out = [s for d in test for s in split_segments(d["text"], "sentences")][
    : args.robust_segments
  ]
  robust = {
    "with_losses": robustness(workdir / "roc_sld_ae", held_out, args.seed),
    "without_losses": robustness(workdir / "roc_sld_ae_plain", held_out, args.seed),
  }
  png = RESULTS_DIR / f"{args.result}_latents.png"
  pca = latent_pca(workdir / "roc_sld_ae", [d["story"] for d in test], png)
  result["robustness"] = robust
  result["latent_pca"] = {**pca, "plot": str(png.relative_to(REPO))}
  result["claims"]["losses_make_latents_more_robust"] = (
    robust["with_losses"]["0.2"] > robust["without_losses"]["0.2"]
  )
  config["rocstories"]["robustness_ablation_steps"] = plain_steps
  todo = todo[2:]
  write_result(args.result, {**result, "incomplete": todo} if todo else result, config)

  if not args.skip_dialogsum:
    ds_path, ds_test = write_dialogsum(data_dir, workdir / "data", args.dialogsum_test)
    ds, ds_paired, _, ds_info = run_task("ds", ds_path, ds_test, workdir, args, minutes)
    result["dialogsum"] = {**ds, "paired": ds_paired}
    config["dialogsum"] = {
      "train": "dialogsum.dev.jsonl (500 dialogues)",
      "test": f"dialogsum.test.jsonl, first {len(ds_test)} dialogues, 3 references each",
      **ds_info,
    }
    write_result(args.result, result, config)


if __name__ == "__main__":
  main()
