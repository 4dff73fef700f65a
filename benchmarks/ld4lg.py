"""LD4LG at CPU scale: the Yelp benchmark against an AR and an MDLM baseline of the same size and
budget, E2E seq2seq, and the sweeps that chose the tiny configs' settings.

    python benchmarks/ld4lg.py [--data_dir ../shared/data] [--workdir runs/bench/ld4lg]
    python benchmarks/ld4lg.py --sweep {ablation,decode,scaling,latents} [--variants a,b]

Every run writes benchmarks/results/<name>.json; docs/ld4lg.md has one table of the results, keyed
by file, with what each run asked.

The benchmark (ld4lg.json; --only yelp|e2e and --result NAME write another file):
- Yelp review sentences (sentiment.dev.{0,1}: label 0 negative, 1 positive), the seeded 95/5 split,
  configs/ld4lg_yelp.py size=tiny; one BPE, trained by the autoencoder on the training split,
  shared by every Yelp run.
- Budgets are minutes of training on an idle machine, each converted to steps by an 80-step probe
  of its config (--*_steps overrides): an optional stage 0 causal LM initialising the AE decoder
  (--lm_minutes), the stage-1 autoencoder, the stage-2 class-conditional denoiser (label dropout
  0.1: the null class), the stage-3 decoder tuned on the denoiser's estimates (--dec_minutes 0
  skips it; samples are decoded by it). Two baselines get the LD4LG stages' total minutes
  (--baseline_minutes sets it; with --*_steps given, the stages' measured time) on the same
  sentences and tokenizer, both the tiny model preset of configs/common.py: a causal LM (AR,
  sampled from <bos>) and MDLM (configs/sbd.py variant=mdlm: masked diffusion over one global
  block of 64 tokens, 64 sampling steps, no revision; each sample is the first complete sentence
  of its packed canvas).
- Scores: recon_bleu (the stage-1 AE on 1000 held-out sentences; recon_bleu_stage3 the tuned
  decoder's); p(x) samples (labels drawn from the training class frequencies, w = 1), null-class,
  AR (ar_*) and MDLM (mdlm_*) samples: judge gen-PPL (SmolLM2-135M, per-sample mean), unigram
  entropy, MAUVE against held-out sentences on judge features, with the ceilings real_mauve
  (another held-out sample) and recon_mauve (its AE reconstructions); class accuracy at w = 1, 2, 3
  by a logistic regression on judge features trained on SST-2 (classifier_acc_real: on real Yelp).
  Claims: recon_bleu_ge_90, best_class_acc_ge_0.9_ceiling, latent_beats_token_diffusion (MAUVE
  above MDLM's); ar_mauve is a reference.
- E2E NLG seq2seq (devset.csv to train, testset_w_refs.csv grouped by MR to test): the source's
  frozen MiniLM states are the denoiser's context; multi-reference BLEU at w = 1, 2
  (--e2e_candidates k: MBR among k samples).

Sweeps (ld4lg_<sweep>.json; --result renames):
  ablation  each variant of ABLATION trains its stages at fixed steps (--ae_steps 5000,
            --diff_steps 1500, --dec_steps 1000) and is scored on the validation slice
  decode    the sampling and decoding settings of DECODE on the benchmark's runs (--bench_workdir)
  scaling   denoisers of SCALING (steps, width) on the benchmark's autoencoder
  latents   where the benchmark's samples sit in its autoencoder's latent space
The validation slice is the held-out rows the benchmark never reports on (permuted rows from 1512):
--samples (512) p(x) samples (w = 1, DDPM 100 steps, sphere projection) decoded greedily, MAUVE
against its first 512 rows, gen-PPL median, entropy, and recon BLEU of its next 512.

Runs are content-addressed: each trains in <workdir>/runs/<stage>-<digest of its config> and a
finished one is reused, so variants with equal stage configs share their runs and a changed config
never resumes another one's checkpoint. Samples and scores are cached per run set and settings.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import cached_features, git_commit, log, train_seconds, write_result

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
sys.path.insert(0, str(REPO))

from lsd import api  # noqa: E402
from lsd.config import apply_override, load_config_file  # noqa: E402
from lsd.data import split_documents  # noqa: E402
from lsd.data.sentences import load_sentences  # noqa: E402
from lsd.eval.genppl import GenPPL  # noqa: E402
from lsd.eval.metrics import LinearProbe, bleu, mauve, unigram_entropy  # noqa: E402
from lsd.nn.layers import normalize_to_sphere  # noqa: E402
from lsd.sampling.autoregressive import generate  # noqa: E402
from lsd.train import sweep  # noqa: E402
from lsd.train.sweep import quiet  # noqa: E402

# --------------------------------------------------------------------------------------- sweeps
# ablation: name -> overrides of configs/ld4lg_yelp.py size=tiny (BPE 4096 and latent noise 0.3 by
# default): "args" config arguments, "ae" / "diffusion" / "decoder" dotted fields per stage (the
# AE's data.* fields apply to every stage, its model.* fields to stage 3, which must match them);
# "decoder" present: a stage-3 run decodes the samples ("dec_steps" its steps); "lm": the steps of
# a stage-0 causal LM whose weights start the AE decoder.
V2048, D16 = {"data.tokenizer.vocab_size": 2048}, {"model.d_latent": 16}
ABLATION = {
  "noise0.3": {"ae": {"model.latent_noise": 0.3, **V2048}},
  "noise0.5": {"ae": {"model.latent_noise": 0.5, **V2048}},
  "noise0.8": {"ae": {"model.latent_noise": 0.8, **V2048}},
  "vocab4096": {"ae": {}},
  "vocab8192": {"ae": {"data.tokenizer.vocab_size": 8192}},
  "vocab4096_l8d16": {"ae": D16, "diffusion": D16},
  "vocab4096_declayers4": {"ae": {"model.decoder_layers": 4}},
  "minilm": {"args": "encoder=minilm"},
  "vocab4096_dec": {"decoder": {"ld4lg.tune_clean_prob": 0.5}},
  "vocab4096_dec_clean0.2": {"decoder": {}},
  "vocab4096_dec_tmax0.5": {"decoder": {"ld4lg.tune_t_max": 0.5, "ld4lg.tune_clean_prob": 0.5}},
  "vocab4096_dec_clean1": {"decoder": {"ld4lg.tune_clean_prob": 1.0}},  # compute-matched control
  "vocab4096_dec_clean0": {"decoder": {"ld4lg.tune_clean_prob": 0.0}},
  "vocab4096_dec_clean0.2_2k": {"decoder": {}, "dec_steps": 2000},
  "vocab4096_decloss0.1": {"diffusion": {"ld4lg.decoding_loss_weight": 0.1}},
  "vocab4096_decloss0.3_tmax0.3": {
    "diffusion": {"ld4lg.decoding_loss_weight": 0.3, "ld4lg.decoding_loss_t_max": 0.3}
  },
}
for _noise in (0.3, 0.5, 0.65, 0.8):
  ABLATION["vocab4096_lminit" + ("" if _noise == 0.3 else f"_noise{_noise}")] = {
    "lm": 3000,
    "ae": {"model.latent_noise": _noise},
  }
for _noise in (0.5, 0.65, 0.8):  # stage 3's own latent noise; stage 1 keeps 0.3
  ABLATION[f"vocab4096_lminit_dec_noise{_noise}"] = {
    "lm": 3000,
    "decoder": {"ld4lg.tune_latent_noise": _noise},
  }
for _base in ("vocab8192", "vocab4096_l8d16", "vocab4096_declayers4", "minilm", "vocab4096_lminit"):
  for _name in [n for n in list(ABLATION) if n == _base or n.startswith(_base + "_noise")]:
    ABLATION[f"{_name}_dec"] = {**ABLATION[_name], "decoder": {}}
# decode: name -> (sampling: steps and sampler / project / schedule_scale / guidance_scale; the
# decoding of DECODINGS), on the benchmark's p(x) samples.
DECODINGS = {
  "greedy": {"num_beams": 1, "top_p": 0.0},
  "beam": {"num_beams": 4, "top_p": 0.0, "repetition_penalty": 1.2, "no_repeat_ngram": 3},
  "beam_norp": {"num_beams": 4, "top_p": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram": 3},
  "top_p0.9": {"num_beams": 1, "top_p": 0.9, "temperature": 1.0},
}
DECODE = {
  **{f"greedy_s{n}": ({"steps": n}, "greedy") for n in (250, 100, 50, 25, 15, 10, 5)},
  "beam_s100": ({"steps": 100}, "beam"),
  "beam_norp_s100": ({"steps": 100}, "beam_norp"),
  "beam_s250": ({"steps": 250}, "beam"),
  "top_p0.9_s100": ({"steps": 100}, "top_p0.9"),
  "greedy_s100_noproject": ({"steps": 100, "project": False}, "greedy"),
  "greedy_ddim_s100": ({"steps": 100, "sampler": "ddim"}, "greedy"),
  "greedy_s100_scale0.5": ({"steps": 100, "schedule_scale": 0.5}, "greedy"),
  "greedy_s100_scale2": ({"steps": 100, "schedule_scale": 2.0}, "greedy"),
  **{f"greedy_s100_w{w:g}": ({"steps": 100, "guidance_scale": w}, "greedy") for w in (1.5, 2, 3)},
}
# scaling: name -> ((unit, multiple of the benchmark denoiser's steps or minutes), overrides).
SCALING = {
  "d128_x1/3": (("steps", 1 / 3), {}),
  "d128_x1": (("steps", 1.0), {}),  # the benchmark's own denoiser, not retrained
  "d128_x2": (("steps", 2.0), {}),
  "d256_x1": (("minutes", 1.0), {"model.d_model": 256}),
}
SWEEPS = {"ablation": ABLATION, "decode": DECODE, "scaling": SCALING, "latents": {}}
VALIDATION_START = 1512  # the validation slice: permuted held-out rows [1512, ...)
PATH_FIELDS = tuple(
  f"ld4lg.{f}" for f in ("autoencoder_workdir", "denoiser_workdir", "decoder_init")
)


# ------------------------------------------------------------------------------------ plumbing
def train_run(root: Path, name: str, cfg, tokenizer: Path | None = None) -> Path:
  """Trains `cfg` in root/runs/<name>-<digest> unless that run finished (`lsd.train.sweep`)."""
  return sweep.train_once(
    api.train, cfg, root / "runs", name, tokenizer=tokenizer, path_fields=PATH_FIELDS, log=log
  )


def steps_for(root: Path, name: str, cfg, minutes: float, steps: int = 0, tokenizer=None) -> int:
  """`steps` if given, else the steps of `cfg` that fit `minutes` (an 80-step probe run)."""
  if steps:
    return steps
  return sweep.steps_for_minutes(
    api.train, cfg, root / "runs", name, minutes, tokenizer=tokenizer, path_fields=PATH_FIELDS,
    log=log,
  )  # fmt: skip


def n_params(run: Path) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(api.load(run).params)))


# ------------------------------------------------------------------------------ data and configs
def tiny(stage: str, data_path: str, args: str = "", overrides: dict | None = None):
  """configs/ld4lg_yelp.py:stage=<stage>,size=tiny[,<args>] on `data_path` (5 % held out) with
  dotted `overrides` (checked field names, converted to the field's type)."""
  c = load_config_file(f"{CONFIGS}/ld4lg_yelp.py:stage={stage},size=tiny" + (args and f",{args}"))
  c.data.path, c.data.eval_fraction = data_path, 0.05
  for k, v in (overrides or {}).items():
    apply_override(c, k, v if isinstance(v, str) else json.dumps(v))
  return c


def sentence_lm_config(ae_cfg):
  """The tiny causal LM on `ae_cfg`'s sentences (one per document, [bos] ids [eos], packed)."""
  c = load_config_file(f"{CONFIGS}/causal_lm.py:size=tiny,data=text")
  c.data.path, c.data.eval_fraction = ae_cfg.data.path, ae_cfg.data.eval_fraction
  c.data.seq_len, c.data.batch_size = 64, 32
  c.data.tokenizer.vocab_size = ae_cfg.data.tokenizer.vocab_size
  return c


def decoder_lm_config(ae_cfg):
  """`sentence_lm_config` with the sizes of `ae_cfg`'s decoder, for `ld4lg.decoder_init`."""
  c, m = sentence_lm_config(ae_cfg), ae_cfg.model
  c.model.update(
    d_model=m.d_model, n_layers=m.decoder_layers, n_heads=m.n_heads, mlp=m.mlp, norm=m.norm
  )
  return c


def mdlm_config(ae_cfg):
  """MDLM with the AR baseline's preset and data: configs/sbd.py variant=mdlm, one global block
  of 64 tokens, sampled with 64 denoising steps, no revision, top_p 1 (as the AR samples)."""
  c = load_config_file(f"{CONFIGS}/sbd.py:size=tiny,data=text,variant=mdlm")
  lm = sentence_lm_config(ae_cfg)
  c.data.update({k: lm.data[k] for k in ("path", "eval_fraction", "seq_len", "batch_size")})
  c.data.tokenizer.vocab_size = lm.data.tokenizer.vocab_size
  c.sbd.block_small = c.sample.draft.block_size = c.sample.draft.steps_per_block = 64
  c.sample.draft.top_p = 1.0
  c.sample.stages = []
  c.train.judge_samples = False
  return c


def split(cfg) -> tuple[list[dict], list[dict]]:
  """(training, held-out) sentences of a sentence data config."""
  return split_documents(load_sentences(cfg.data), cfg.data.eval_fraction, cfg.data.split_seed)


def permuted_held_out(cfg) -> list[dict]:
  real = split(cfg)[1]
  return [real[i] for i in np.random.default_rng(0).permutation(len(real))]


def prior_labels(cfg, n: int, seed: int) -> jax.Array:
  """n class ids drawn from the training split's label frequencies."""
  counts = np.bincount([d["label"] for d in split(cfg)[0]])
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.choice(len(counts), n, p=counts / counts.sum()), jnp.int32)


def sst2(data_dir: Path, n_per_class: int, seed: int = 0) -> tuple[list, list, list, list]:
  """A balanced SST-2 training subset of full sentences (>= 6 words) and the SST-2 dev set."""

  def read(name):
    rows = list(csv.reader(open(data_dir / "sst2" / name), delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r[1], int(r[0])) for r in rows[1:] if len(r) == 2]

  rows, rng, pick = (
    [r for r in read("train.tsv") if len(r[0].split()) >= 6],
    np.random.default_rng(seed),
    [],
  )
  for label in (0, 1):
    idx = [i for i, r in enumerate(rows) if r[1] == label]
    pick += [rows[i] for i in rng.choice(idx, n_per_class, replace=False)]
  dev = read("dev.tsv")
  return [t for t, _ in pick], [y for _, y in pick], [t for t, _ in dev], [y for _, y in dev]


# ------------------------------------------------------------------------------------- scoring
def load_decoded(run_dir: Path, args):
  """`api.load(run_dir)` with its sample settings overridden by --decode / --sample_steps."""
  run = api.load(run_dir)
  if getattr(args, "decode", "config") != "config":
    run.config.sample.update(DECODINGS[args.decode])
  if getattr(args, "sample_steps", 0) and "steps" in run.config.sample:
    run.config.sample.steps = args.sample_steps
  return run


def reconstruct(ae, texts: list[str], sample=None, chunk: int = 250) -> list[str]:
  """AE reconstructions of `texts` (encode, then decode with `sample`), `chunk` texts per call."""
  out = []
  for i in range(0, len(texts), chunk):
    out += api.decode_latents(ae, api.encode_texts(ae, texts[i : i + chunk]), sample=sample)
  return out


def text_scores(judge: GenPPL, ref_feats, texts: list[str], tokens: list[list[int]]) -> dict:
  """gen-PPL (mean, median), unigram entropy of the token ids, MAUVE against `ref_feats`."""
  ppl = np.array(judge.per_sample(texts))
  return {
    "gen_ppl": float(np.nanmean(ppl)),
    "gen_ppl_median": float(np.nanmedian(ppl)),
    "entropy": float(np.mean([unigram_entropy(t) for t in tokens])),
    "mauve": mauve(ref_feats, judge.hidden_features(texts)),
    "n_samples": len(texts),
  }


def validation_rows(n: int) -> dict:
  a, b, c = VALIDATION_START, VALIDATION_START + n, VALIDATION_START + 2 * n
  return {"mauve_refs": f"permuted held-out Yelp rows [{a}, {b})", "recon_rows": f"[{b}, {c})"}


class ValidationScorer:
  """The validation slice: its first n rows are the MAUVE references, the next n the sentences
  reconstructed for recon BLEU; judge features cached in `feature_dir`."""

  def __init__(self, cfg, feature_dir: Path, n: int = 512):
    self.judge = GenPPL(max_len=64, batch_size=32)
    self.features = functools.partial(cached_features, self.judge, feature_dir)
    valid = [d["text"] for d in permuted_held_out(cfg)][VALIDATION_START:]
    self.n, self.refs, self.recon_src = n, valid[:n], valid[n : 2 * n]
    self.ref_feats = self.features(self.refs)
    self.cfg = cfg

  @staticmethod
  def greedy(diff):
    sample = diff.config.sample.copy_and_resolve_references()
    sample.update(DECODINGS["greedy"])
    return sample

  def recon_bleu(self, ae, diff) -> float:
    return bleu(reconstruct(ae, self.recon_src, self.greedy(diff)), self.recon_src)

  def samples(self, ae, diff, seed: int = 1) -> dict:
    """n latents of p(x) (w = 1, DDPM 100 steps, sphere projection) decoded greedily by
    `ae`; `seed` draws the labels and the noise."""
    diff.config.sample.update({"steps": 100, "sampler": "ddpm", "project": True})
    labels = prior_labels(self.cfg, self.n, seed=seed)
    z = diff.task.sample_latents(diff.model(), jax.random.key(seed), self.n, labels=labels)
    texts = api.decode_latents(ae, z, sample=self.greedy(diff))
    s = text_scores(self.judge, self.ref_feats, texts, [ae.tokenizer.encode(t) for t in texts])
    return {
      "mauve": s["mauve"],
      "gen_ppl_median": s["gen_ppl_median"],
      "entropy": s["entropy"],
      "mean_words": float(np.mean([len(t.split()) for t in texts])),
      "examples": texts[:5],
    }


# ---------------------------------------------------------------------------------- benchmark
def first_sentence(tokens: list[int], tok) -> tuple[str, bool]:
  """The first complete sentence ([bos] ids [eos]) of a packed canvas, else the canvas's text."""
  if tok.bos_id in tokens:
    rest = tokens[tokens.index(tok.bos_id) + 1 :]
    if tok.eos_id in rest:
      return tok.decode(rest[: rest.index(tok.eos_id)]), True
  return tok.decode(tokens), False


def train_yelp(root: Path, data_dir: Path, args) -> tuple[dict, dict, dict]:
  """Trains the Yelp stages and baselines; returns (run dirs, steps, budget minutes)."""
  path = str(data_dir / "yelp" / "sentiment.dev.*")
  noise = {} if args.latent_noise is None else {"model.latent_noise": args.latent_noise}
  ae = tiny("ae", path, overrides=noise)
  runs, steps, minutes = {}, {}, {}
  if args.lm_minutes or args.lm_steps:  # stage 0: its tokenizer becomes every Yelp run's
    lm = decoder_lm_config(ae)
    steps["lm"] = steps_for(root, "yelp_lm", lm, args.lm_minutes, args.lm_steps)
    runs["yelp_lm"] = train_run(root, "yelp_lm", quiet(lm, steps["lm"]))
    ae.ld4lg.decoder_init, minutes["yelp_lm"] = str(runs["yelp_lm"]), args.lm_minutes
  steps["ae"] = steps_for(root, "yelp_ae", ae, args.ae_minutes, args.ae_steps)
  runs["yelp_ae"] = train_run(root, "yelp_ae", quiet(ae, steps["ae"]))
  diff = tiny("diffusion", path, overrides={"ld4lg.autoencoder_workdir": str(runs["yelp_ae"])})
  steps["diffusion"] = steps_for(root, "yelp_diff", diff, args.diff_minutes, args.diff_steps)
  runs["yelp_diff"] = train_run(root, "yelp_diff", quiet(diff, steps["diffusion"]))
  minutes.update(yelp_ae=args.ae_minutes, yelp_diff=args.diff_minutes)
  if args.dec_minutes or args.dec_steps:
    dec = tiny(
      "decoder",
      path,
      overrides={
        **noise,
        "ld4lg.autoencoder_workdir": str(runs["yelp_ae"]),
        "ld4lg.denoiser_workdir": str(runs["yelp_diff"]),
      },
    )
    steps["decoder"] = steps_for(root, "yelp_dec", dec, args.dec_minutes, args.dec_steps)
    runs["yelp_dec"] = train_run(root, "yelp_dec", quiet(dec, steps["decoder"]))
    minutes["yelp_dec"] = args.dec_minutes
  # The baselines' budget: each stage's minutes when a probe sized it, else its measured time.
  given = {
    "yelp_lm": args.lm_steps,
    "yelp_ae": args.ae_steps,
    "yelp_diff": args.diff_steps,
    "yelp_dec": args.dec_steps,
  }
  budget = {n: train_seconds(r) / 60 if given[n] else minutes[n] for n, r in runs.items()}
  tokenizer = runs["yelp_ae"] / "tokenizer.json"
  baseline_minutes = args.baseline_minutes or sum(budget.values())
  for name, cfg, flag in (
    ("yelp_ar", sentence_lm_config(ae), "ar"),
    ("yelp_mdlm", mdlm_config(ae), "mdlm"),
  ):
    n = steps_for(root, name, cfg, baseline_minutes, getattr(args, f"{flag}_steps"), tokenizer)
    steps[flag] = n
    runs[name] = train_run(root, name, quiet(cfg, n), tokenizer)
  return runs, steps, budget


def sample_yelp(runs: dict, args, cache: Path) -> dict:
  """name -> {"texts", "tokens", "labels"?, "references"?, "seconds"}, cached per name."""
  out, loaded = {}, {}
  names = ["recon", *(["recon_dec"] if "yelp_dec" in runs else []), "uncond", "null"]
  for name in [*names, "cfg_w1", "cfg_w2", "cfg_w3", "ar", "mdlm"]:
    f = cache / f"samples_{name}.json"
    if f.exists():
      out[name] = json.loads(f.read_text())
      continue
    if not loaded:  # samples are decoded by the stage-3 decoder when there is one
      loaded["ae"] = ae = load_decoded(runs["yelp_ae"], args)
      loaded["gen"] = load_decoded(runs["yelp_dec"], args) if "yelp_dec" in runs else ae
      loaded["diff"] = load_decoded(runs["yelp_diff"], args)
    ae, gen, diff, tok = loaded["ae"], loaded["gen"], loaded["diff"], loaded["ae"].tokenizer
    key, t0 = jax.random.key(args.seed), time.perf_counter()
    if name in ("recon", "recon_dec"):
      refs = [d["text"] for d in split(ae.config)[1][: args.recon_sentences]]
      rec = {"texts": reconstruct(ae if name == "recon" else gen, refs), "references": refs}
    elif name == "ar":
      ar = api.load(runs["yelp_ar"])  # pure sampling (top_p 1) of one sentence from <bos>
      prompt = jnp.full((args.samples, 1), ar.tokenizer.bos_id, jnp.int32)
      n = ae.config.data.max_len - 1
      rows = np.asarray(generate(ar.graphdef, ar.params, key, prompt, max_new_tokens=n)).tolist()
      rows = [r[: r.index(tok.eos_id)] if tok.eos_id in r else r for r in rows]
      rec = {"texts": [ar.tokenizer.decode(r) for r in rows]}
    elif name == "mdlm":
      canvases = api.sample(api.load(runs["yelp_mdlm"]), key, args.samples)
      firsts = [first_sentence(c["tokens"], tok) for c in canvases]
      rec = {"texts": [t for t, _ in firsts], "complete": float(np.mean([c for _, c in firsts]))}
    else:
      n_cls = diff.config.model.num_classes
      if name in ("uncond", "null"):  # p(x) = sum_c p(c) p(x | c) at w = 1, or the null class
        n, w = args.samples, 1.0
        labels = prior_labels(ae.config, n, args.seed) if name == "uncond" else None
        labels = jnp.full((n,), n_cls, jnp.int32) if labels is None else labels
      else:
        n, w = args.class_samples, float(name[-1])
        labels = jnp.arange(n, dtype=jnp.int32) % n_cls
      z = diff.task.sample_latents(diff.model(), key, n, labels=labels, guidance_scale=w)
      rec = {"texts": api.decode_latents(gen, z, sample=diff.config.sample), "guidance_scale": w}
      rec["labels"] = np.asarray(labels).tolist()
    rec["seconds"] = time.perf_counter() - t0
    rec["tokens"] = [tok.encode(t) for t in rec["texts"]]
    f.write_text(json.dumps(rec))
    log(f"sampled {name}: {len(rec['texts'])} texts in {rec['seconds']:.0f} s: {rec['texts'][:2]}")
    out[name] = rec
  return out


def score_yelp(runs: dict, args, samples: dict, cache: Path, data_dir: Path, features_dir) -> dict:
  f = cache / "scores.json"
  if f.exists():
    return json.loads(f.read_text())
  judge = GenPPL(max_len=64, batch_size=32)
  features = functools.partial(cached_features, judge, features_dir)
  ae = load_decoded(runs["yelp_ae"], args)
  real = permuted_held_out(ae.config)
  mauve_refs = [d["text"] for d in real[: args.samples]]
  clf_real = real[args.samples : args.samples + args.classifier_real]
  x_tr, y_tr, x_dev, y_dev = sst2(data_dir, args.sst2_per_class)
  probe = LinearProbe(c=args.probe_c).fit(features(x_tr), y_tr)
  acc = lambda texts, labels: float(np.mean(probe.predict(features(texts)) == np.asarray(labels)))
  m = {
    "classifier_acc_sst2_dev": acc(x_dev, y_dev),
    "classifier_acc_real": acc([d["text"] for d in clf_real], [d["label"] for d in clf_real]),
  }
  ref_feats = features(mauve_refs)
  other = [d["text"] for d in real[-args.samples :]]  # ceilings at this sample size
  m["real_mauve"] = mauve(ref_feats, features(other))
  m["recon_mauve"] = mauve(ref_feats, judge.hidden_features(reconstruct(ae, other, chunk=250)))
  rec = samples["recon"]
  m["recon_bleu"] = bleu(rec["texts"], rec["references"])
  m["recon_exact"] = float(
    np.mean([a == b for a, b in zip(rec["texts"], rec["references"], strict=True)])
  )
  if "recon_dec" in samples:
    m["recon_bleu_stage3"] = bleu(samples["recon_dec"]["texts"], samples["recon_dec"]["references"])
  for name, prefix in [("uncond", ""), ("null", "null_class_"), ("ar", "ar_"), ("mdlm", "mdlm_")]:
    s = samples[name]
    scores = text_scores(judge, ref_feats, s["texts"], s["tokens"])
    m.update(
      {prefix + k: v for k, v in scores.items()}, **{prefix + "sampling_seconds": s["seconds"]}
    )
    log(f"{name}: gen_ppl {scores['gen_ppl']:.1f} mauve {scores['mauve']:.3f}")
  m["mdlm_complete_sentences"] = samples["mdlm"]["complete"]
  m["class_acc"], m["class_gen_ppl"] = {}, {}
  for w in (1, 2, 3):
    s = samples[f"cfg_w{w}"]
    m["class_acc"][str(w)] = acc(s["texts"], s["labels"])
    m["class_gen_ppl"][str(w)] = float(np.nanmean(judge.per_sample(s["texts"])))
  f.write_text(json.dumps(m))
  return m


def e2e_test(data_dir: Path) -> tuple[list[str], list[list[str]]]:
  groups: dict[str, list[str]] = {}
  with open(data_dir / "e2e" / "testset_w_refs.csv", newline="") as f:
    for row in csv.DictReader(f):
      groups.setdefault(row["mr"], []).append(row["ref"])
  return list(groups), list(groups.values())


def run_e2e(root: Path, data_dir: Path, args) -> tuple[dict, dict]:
  """Trains the E2E stages and scores multi-reference BLEU; returns (metrics, config record)."""
  path, steps, runs = str(data_dir / "e2e" / "devset.csv"), {}, {}
  for stage in ("ae", "diffusion"):
    c = load_config_file(f"{CONFIGS}/ld4lg_e2e.py:stage={stage},size=tiny")
    c.data.path = path
    if stage == "diffusion":
      c.ld4lg.autoencoder_workdir = str(runs["ae"])
    flag = "e2e_ae" if stage == "ae" else "e2e_diff"
    n = steps_for(root, flag, c, getattr(args, f"{flag}_minutes"), getattr(args, f"{flag}_steps"))
    steps[stage], runs[stage] = n, train_run(root, flag, quiet(c, n))
  k = args.e2e_candidates
  settings = (runs["diffusion"].name, args.decode, args.sample_steps, k, args.seed)
  cache = root / "cache" / f"e2e-{sweep.digest(*settings, args.e2e_guidance)}"
  cache.mkdir(parents=True, exist_ok=True)
  if (cache / "scores.json").exists():
    m = json.loads((cache / "scores.json").read_text())
  else:
    diff = load_decoded(runs["diffusion"], args)
    sources, refs = e2e_test(data_dir)
    m, chunk = {"n_sources": len(sources), "candidates": k}, max(1, 256 // k)
    for w in args.e2e_guidance:
      t0, out = time.perf_counter(), []
      for i in range(0, len(sources), chunk):
        part = sources[i : i + chunk]
        padded = part + [part[-1]] * (chunk - len(part))  # one compiled shape per call
        key = jax.random.key(args.seed + i)
        texts = api.generate_from_sources(diff, key, padded, guidance_scale=w, candidates=k)
        out += texts[: len(part)]
      m[f"bleu_w{w:g}"], m[f"seconds_w{w:g}"] = bleu(out, refs), time.perf_counter() - t0
      (cache / f"samples_w{w:g}.json").write_text(
        json.dumps([{"source": s, "text": t} for s, t in zip(sources, out, strict=True)])
      )
      log(f"e2e w={w}: BLEU {m[f'bleu_w{w:g}']:.2f}, e.g. {out[:2]}")
    flat = [r[0] for r in refs]
    m["recon_bleu"] = bleu(reconstruct(load_decoded(runs["ae"], args), flat, chunk=256), flat)
    (cache / "scores.json").write_text(json.dumps(m))
  m["train_seconds"] = {f"e2e_{s}": train_seconds(r) for s, r in runs.items()}
  return m, {
    "train": "devset.csv (all pairs, 95/5 split for the training loss eval)",
    "test": "testset_w_refs.csv grouped by MR (multi-reference sacrebleu)",
    "steps": steps,
    "context": "frozen all-MiniLM-L6-v2 hidden states of the MR",
    "sampler": dict(load_decoded(runs["diffusion"], args).config.sample),
    "candidates": k,  # overrides sampler.candidates: outputs per source (MBR)
    "runs": {s: r.name for s, r in runs.items()},
  }


def run_benchmark(args, data_dir: Path) -> None:
  root = Path(args.workdir)
  result, config = {}, {"data_dir": "shared corpora: yelp, sst2, e2e (see ../shared/data)"}
  if args.only in (None, "yelp"):
    runs, steps, budget = train_yelp(root, data_dir, args)
    (root / "benchmark_runs.json").write_text(json.dumps({k: str(v) for k, v in runs.items()}))
    flags = ("decode", "sample_steps", "seed", "samples", "class_samples", "recon_sentences",
             "classifier_real", "sst2_per_class", "probe_c")  # fmt: skip
    settings = {k: getattr(args, k) for k in flags}
    cache = root / "cache" / f"yelp-{sweep.digest(sorted(r.name for r in runs.values()), settings)}"
    cache.mkdir(parents=True, exist_ok=True)
    samples = sample_yelp(runs, args, cache)
    result = score_yelp(runs, args, samples, cache, data_dir, root.parent / "judge_features")
    best_w = max(result["class_acc"], key=result["class_acc"].get)
    result["claims"] = {
      "recon_bleu_ge_90": result["recon_bleu"] >= 90,
      "best_class_acc_ge_0.9_ceiling": result["class_acc"][best_w]
      >= 0.9 * result["classifier_acc_real"],
      "latent_beats_token_diffusion": result["mauve"] > result["mdlm_mauve"],
    }
    secs = {n: train_seconds(r) for n, r in runs.items()}
    result["train_seconds"], result["budget_minutes"] = secs, budget
    result["baseline_budget_minutes"] = args.baseline_minutes or sum(budget.values())
    result["ld4lg_train_seconds"] = sum(secs[n] for n in budget)
    result["n_params"] = {n: n_params(r) for n, r in runs.items()}
    ae_cfg = api.load(runs["yelp_ae"]).config
    config["yelp"] = {
      "split": "95/5 seeded (split_seed 0), sentiment.dev.{0,1}",
      "steps": steps,
      "runs": {n: r.name for n, r in runs.items()},
      "latents": [ae_cfg.model.num_latents, ae_cfg.model.d_latent],
      "ae_latent_noise": ae_cfg.model.latent_noise,
      "sampler": dict(load_decoded(runs["yelp_diff"], args).config.sample),
      "decode": args.decode,
      "samples": args.samples,
      "class_samples_per_w": args.class_samples,
      "mdlm": "configs/sbd.py variant=mdlm, tiny preset, one 64-token block, 64 steps, top_p 1, "
      "first complete sentence of each canvas",
      "classifier": f"logistic regression (C={args.probe_c}) on judge mean-pooled hidden states, "
      f"SST-2 train subset {args.sst2_per_class} per class (sentences >= 6 words)",
      "judge": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised), per-sample mean PPL",
    }
  if args.only in (None, "e2e"):
    result["e2e"], config["e2e"] = run_e2e(root, data_dir, args)
  write_result(
    args.result or ("ld4lg" if args.only is None else f"ld4lg_{args.only}"), result, config
  )


# ------------------------------------------------------------------------------------- sweeps
def bench_runs(bench: Path) -> dict:
  """The benchmark's run directories in `bench` (its benchmark_runs.json, or the fixed names of
  the benchmark's versions before content-addressed runs); exits naming a missing one."""
  manifest = bench / "benchmark_runs.json"
  runs = (
    {k: Path(v) for k, v in json.loads(manifest.read_text()).items()}
    if manifest.exists()
    else {n: bench / n for n in ("yelp_ae", "yelp_diff", "yelp_dec") if (bench / n).is_dir()}
  )
  for name in ("yelp_ae", "yelp_diff"):
    if not (runs.get(name, bench / name) / "checkpoints").is_dir():
      sys.exit(f"--bench_workdir={bench} has no trained {name}: run benchmarks/ld4lg.py first")
  return runs


def sweep_ablation(args, names: list[str], data_dir: Path) -> None:
  path = str(data_dir.resolve() / "yelp" / "sentiment.dev.*")
  root, results = Path(args.workdir), previous(args, lambda old: True)
  scorer = None
  for name in names:
    v, cargs = ABLATION[name], ABLATION[name].get("args", "")
    ae_over = v.get("ae", {})
    data = {k: x for k, x in ae_over.items() if k.startswith("data.")}
    ae = quiet(tiny("ae", path, cargs, ae_over), args.ae_steps)
    if v.get("lm"):  # stage 0: the LM whose weights start the AE decoder (--lm_steps overrides)
      lm = quiet(decoder_lm_config(ae), args.lm_steps or v["lm"])
      ae.ld4lg.decoder_init = str(train_run(root, "yelp_lm", lm))
    ae_run = train_run(root, "yelp_ae", ae)
    over = {**data, **v.get("diffusion", {}), "ld4lg.autoencoder_workdir": str(ae_run)}
    diff_run = train_run(
      root, "yelp_diff", quiet(tiny("diffusion", path, cargs, over), args.diff_steps)
    )
    gen_run, dec_steps = ae_run, v.get("dec_steps", args.dec_steps)
    if "decoder" in v:  # stage 3 (the stage-1 model fields carry over: it requires them equal)
      over = {k: x for k, x in ae_over.items() if k.startswith(("data.", "model."))}
      over.update(
        v["decoder"],
        **{"ld4lg.autoencoder_workdir": str(ae_run), "ld4lg.denoiser_workdir": str(diff_run)},
      )
      gen_run = train_run(root, "yelp_dec", quiet(tiny("decoder", path, cargs, over), dec_steps))
    ae, diff = api.load(gen_run), api.load(diff_run)
    scorer = scorer or ValidationScorer(ae.config, root / "judge_features", args.samples)
    results[name] = {
      "overrides": v,
      "ae_steps": args.ae_steps,
      "diff_steps": args.diff_steps,
      **({"dec_steps": dec_steps} if "decoder" in v else {}),
      "runs": [r.name for r in {ae_run, diff_run, gen_run}],
      "recon_bleu": scorer.recon_bleu(ae, diff),
      **scorer.samples(ae, diff, seed=args.seed),
      "git_commit": git_commit(),  # entries of variants not rerun keep their own
    }
    log(f"{name}: " + json.dumps({k: x for k, x in results[name].items() if k != "examples"}))
    # After every variant: a later variant's failure keeps the scores already measured.
    write_result(
      args.result or "ld4lg_ablation",
      results,
      {
        "protocol": "benchmarks/ld4lg.py docstring (sweep ablation)",
        "samples": args.samples,
        **validation_rows(args.samples),
        "sampling": "DDPM, 100 steps, sphere projection, w = 1, labels from the class prior",
        "decoding": "greedy",
        "sizes": "configs/ld4lg_yelp.py size=tiny (8 x 32 latents)",
      },
    )


def previous(args, same) -> dict:
  """The metrics of the sweep's results file when `same(old record)` (entries not rerun stay)."""
  f = REPO / "benchmarks" / "results" / f"{args.result or 'ld4lg_' + args.sweep}.json"
  old = json.loads(f.read_text()) if f.exists() else None
  return old["metrics"] if old and same(old) else {}


def sweep_decode(args, names: list[str]) -> None:
  runs = bench_runs(Path(args.bench_workdir))
  ae, diff = api.load(runs["yelp_ae"]), api.load(runs["yelp_diff"])
  scorer = ValidationScorer(
    ae.config, Path(args.bench_workdir).parent / "judge_features", args.samples
  )
  run_id = {"workdir": str(runs["yelp_diff"]), "seed": args.seed, "samples": args.samples}
  results = previous(args, lambda old: {k: old["config"].get(k) for k in run_id} == run_id)
  results["real"] = {"mauve": mauve(scorer.ref_feats, scorer.features(scorer.recon_src))}
  labels, latents, recons = prior_labels(ae.config, args.samples, args.seed), {}, {}
  base = diff.config.sample.copy_and_resolve_references()
  for name in names:
    sampling, decoding = DECODE[name]
    defaults = {"sampler": "ddpm", "project": True, "schedule_scale": 1.0, "guidance_scale": 1.0}
    sampling = {**defaults, **sampling}
    diff.config.sample = base.copy_and_resolve_references()
    diff.config.sample.update({k: v for k, v in sampling.items() if k != "schedule_scale"})
    diff.config.ld4lg.schedule_scale = sampling["schedule_scale"]  # the sampler's schedule
    key = json.dumps(sampling, sort_keys=True)
    if key not in latents:
      t0 = time.perf_counter()
      z = diff.task.sample_latents(
        diff.model(), jax.random.key(args.seed), args.samples, labels=labels
      )
      latents[key] = (jax.block_until_ready(z), time.perf_counter() - t0)
    z, secs = latents[key]
    sample = diff.config.sample.copy_and_resolve_references()
    sample.update(DECODINGS[decoding])
    t0 = time.perf_counter()
    texts = api.decode_latents(ae, z, sample=sample)
    decode_secs = time.perf_counter() - t0
    if decoding not in recons:  # reconstructions depend on the decoding only
      recon = reconstruct(ae, scorer.recon_src, sample)
      recons[decoding] = (
        bleu(recon, scorer.recon_src),
        mauve(scorer.ref_feats, scorer.judge.hidden_features(recon)),
      )
    s = text_scores(scorer.judge, scorer.ref_feats, texts, [ae.tokenizer.encode(t) for t in texts])
    results[name] = {
      "mauve": s["mauve"],
      "gen_ppl_median": s["gen_ppl_median"],
      "entropy": s["entropy"],
      "recon_bleu": recons[decoding][0],
      "recon_mauve": recons[decoding][1],
      "sample_steps": sampling["steps"],
      "sampling": sampling,
      "decoding": DECODINGS[decoding],
      "sampling_seconds": secs,
      "decode_seconds": decode_secs,
      "examples": texts[:5],
    }
    log(f"{name}: " + json.dumps({k: v for k, v in results[name].items() if k != "examples"}))
  write_result(
    args.result or "ld4lg_decode",
    results,
    {
      **run_id,
      **validation_rows(args.samples),
      "diffusion_steps": diff.config.train.steps,
    },
  )


def sweep_scaling(args, names: list[str]) -> None:
  bench = Path(args.bench_workdir)
  runs = bench_runs(bench)
  base = api.load(runs["yelp_diff"]).config
  ae = api.load(runs["yelp_ae"])
  scorer = ValidationScorer(ae.config, bench.parent / "judge_features", args.samples)
  results, root = previous(args, lambda old: True), Path(args.workdir)
  for name in names:
    (unit, mult), over = SCALING[name]
    over = {**over, "ld4lg.autoencoder_workdir": str(runs["yelp_ae"])}
    cfg = tiny("diffusion", base.data.path, overrides=over)
    if unit == "steps" and mult == 1.0 and not SCALING[name][1]:
      run, steps = runs["yelp_diff"], base.train.steps
    else:
      steps = (
        round(base.train.steps * mult)
        if unit == "steps"
        else steps_for(root, name.replace("/", "_"), cfg, args.diff_minutes * mult)
      )
      run = train_run(root, name.replace("/", "_"), quiet(cfg, steps))
    diff = api.load(run)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["loss"] for r in recs if r.get("split") == "eval"]
    per_seed = [scorer.samples(ae, diff, seed=s) for s in range(1, args.seeds + 1)]
    mauves = [s["mauve"] for s in per_seed]
    results[name] = {
      "overrides": SCALING[name][1],
      "budget": {unit: mult},
      "steps": steps,
      "run": run.name,
      "n_params": int(sum(np.size(x) for x in jax.tree.leaves(diff.params))),
      "train_loss_last10": float(
        np.mean([r["loss"] for r in recs if r.get("split") == "train"][-10:])
      ),
      "eval_loss": evals[-1] if evals else None,
      "train_seconds": train_seconds(run),
      **per_seed[0],
      "mauve_per_seed": mauves,
      "mauve_mean": float(np.mean(mauves)),
      "mauve_std": float(np.std(mauves, ddof=1)) if len(mauves) > 1 else 0.0,
      "git_commit": git_commit(),
    }
    log(f"{name}: " + json.dumps({k: v for k, v in results[name].items() if k != "examples"}))
    write_result(
      args.result or "ld4lg_scaling",
      results,
      {
        "protocol": "benchmarks/ld4lg.py docstring (sweep scaling)",
        "base_steps": base.train.steps,
        "base_minutes": args.diff_minutes,
        "autoencoder": runs["yelp_ae"].name,
        "samples": args.samples,
        **validation_rows(args.samples),
        "sampling": "DDPM, 100 steps, sphere projection, w = 1, labels from the class prior",
        "decoding": "greedy",
      },
    )


def sweep_latents(args) -> None:
  """Distances (per-coordinate RMS) to the nearest of 20k training latents and between z and
  enc(dec(z)) (greedy), for held-out, sampled and midpoint latents; BLEU of noised held-out ones."""
  runs = bench_runs(Path(args.bench_workdir))
  ae, diff = api.load(runs["yelp_ae"]), api.load(runs["yelp_diff"])
  greedy = ValidationScorer.greedy(diff)
  encode = lambda texts: np.concatenate(
    [np.asarray(api.encode_texts(ae, texts[i : i + 512])) for i in range(0, len(texts), 512)]
  )
  decode = lambda z: api.decode_latents(ae, jnp.asarray(z, jnp.float32), sample=greedy)
  rms = lambda a, b: np.sqrt(np.mean(np.square(a - b).reshape(len(a), -1), -1))
  z_train = encode([d["text"] for d in split(ae.config)[0][:20_000]]).reshape(
    -1, ae.config.model.num_latents * ae.config.model.d_latent
  )
  held = [d["text"] for d in permuted_held_out(ae.config)][
    VALIDATION_START : VALIDATION_START + args.samples
  ]
  z_held = encode(held)
  diff.config.sample.update({"steps": 100, "sampler": "ddpm", "project": True})
  labels = prior_labels(ae.config, args.samples, seed=1)
  z_samp = np.asarray(
    diff.task.sample_latents(diff.model(), jax.random.key(1), args.samples, labels=labels)
  )
  partner = np.random.default_rng(0).permutation(args.samples)
  z_mid = np.asarray(normalize_to_sphere(jnp.asarray((z_held + z_held[partner]) / 2.0)))

  def summary(x):
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"mean": float(np.mean(x)), "p10": float(p10), "median": float(p50), "p90": float(p90)}

  m = {"nn_train": {}, "cycle": {}, "noise_bleu": {}}
  for name, z in [("held_out", z_held), ("samples", z_samp), ("midpoints", z_mid)]:
    a = z.reshape(len(z), -1)
    d2 = np.sum(a * a, 1)[:, None] + np.sum(z_train * z_train, 1)[None] - 2.0 * a @ z_train.T
    m["nn_train"][name] = summary(np.sqrt(np.maximum(d2.min(1), 0.0) / a.shape[1]))
    m["cycle"][name] = summary(rms(z, encode(decode(z))))
  rng = np.random.default_rng(0)
  for s in (0.1, 0.2, 0.3, 0.5):
    m["noise_bleu"][str(s)] = bleu(
      decode(z_held + s * rng.standard_normal(z_held.shape).astype(np.float32)), held
    )
  m["noise_bleu"]["0"] = bleu(decode(z_held), held)
  write_result(
    args.result or "ld4lg_latents",
    m,
    {
      "protocol": "benchmarks/ld4lg.py docstring (sweep latents)",
      "n": args.samples,
      "n_train": len(z_train),
      "latents": list(z_held.shape[1:]),
      "decoding": "greedy",
      "sampling": "DDPM, 100 steps, sphere projection, w = 1, labels from the class prior, seed 1",
    },
  )


# --------------------------------------------------------------------------------------- main
ABLATION_STEPS = {"ae": 5000, "diff": 1500, "dec": 1000}


def main():
  p = argparse.ArgumentParser(description="LD4LG benchmark and sweeps (see the module docstring)")
  add = p.add_argument
  add("--sweep", choices=sorted(SWEEPS), help="run a sweep instead of the benchmark")
  add("--variants", help="comma-separated names from the sweep's table (default: all)")
  add("--data_dir", default=str(REPO.parent / "shared" / "data"))
  add("--workdir", help="default runs/bench/ld4lg, or runs/bench/ld4lg_<sweep>")
  add("--bench_workdir", default="runs/bench/ld4lg", help="the benchmark's runs, for sweeps")
  add("--result", help="benchmarks/results/<result>.json (letters, digits and _)")
  add("--seed", type=int, help="sampling seed (default: 0 for the benchmark, 1 for sweeps)")
  # Budgets in minutes of training, converted to steps by a probe; a positive --*_steps overrides
  # (the ablation's defaults are steps: ABLATION_STEPS). 35 + 8 + 5 + 4 + 4 = 56 of the 60 minutes.
  for flag, minutes in [
    ("ae", 35),
    ("diff", 8),
    ("dec", 5),
    ("lm", 0),
    ("e2e_ae", 4),
    ("e2e_diff", 4),
  ]:
    add(f"--{flag}_minutes", type=float, default=float(minutes))
    add(f"--{flag}_steps", type=int, default=None)
  add("--ar_steps", type=int, default=0, help="AR baseline steps (default: the LD4LG minutes)")
  add("--mdlm_steps", type=int, default=0, help="MDLM baseline steps (default: the same)")
  add(
    "--baseline_minutes",
    type=float,
    default=0.0,
    help="the baselines' budget (default: the LD4LG stages' minutes, measured when --*_steps "
    "gave their steps); converted to steps by a probe",
  )
  add("--latent_noise", type=float, help="the AE's model.latent_noise (default: the config's)")
  add("--e2e_guidance", type=float, nargs="+", default=[1.0, 2.0])
  add("--e2e_candidates", type=int, default=1, help="outputs per E2E source, the MBR one scored")
  for flag, n in [("samples", 512), ("class_samples", 256), ("recon_sentences", 1000),
                  ("classifier_real", 1000), ("sst2_per_class", 2000)]:  # fmt: skip
    add(f"--{flag}", type=int, default=n)
  add("--probe_c", type=float, default=1.0, help="the SST-2 classifier's inverse regularisation")
  add("--decode", choices=["config", *DECODINGS], default="config", help="latents -> text")
  add("--sample_steps", type=int, default=0, help="DDPM steps (0: the run's config)")
  add("--only", choices=["yelp", "e2e"], help="one half of the benchmark")
  add("--seeds", type=int, default=3, help="scaling: sampling seeds 1..N per variant")
  args = p.parse_args()
  if args.result is not None and not args.result.replace("_", "").isalnum():
    p.error(f"--result={args.result!r}: letters, digits and _ only (a file name)")
  if args.e2e_candidates < 1:
    p.error(f"--e2e_candidates={args.e2e_candidates} must be >= 1 (1 = no MBR)")
  table = SWEEPS.get(args.sweep, {})
  names = [v for v in (args.variants or ",".join(table)).split(",") if v]
  if args.sweep and any(v not in table for v in names):
    p.error(f"--variants: unknown {[v for v in names if v not in table]}; accepted: {list(table)}")
  data_dir = Path(args.data_dir)
  if not (data_dir / "yelp").is_dir():
    sys.exit(f"--data_dir={data_dir} has no yelp/ folder (the shared corpora)")
  args.workdir = args.workdir or f"runs/bench/ld4lg{'_' + args.sweep if args.sweep else ''}"
  args.seed = args.seed if args.seed is not None else int(args.sweep is not None)
  for flag in ("ae", "diff", "dec", "lm", "e2e_ae", "e2e_diff"):
    default = ABLATION_STEPS.get(flag, 0) if args.sweep == "ablation" else 0
    setattr(args, f"{flag}_steps", getattr(args, f"{flag}_steps") or default)
  if args.sweep is None:
    run_benchmark(args, data_dir)
  elif args.sweep == "ablation":
    sweep_ablation(args, names, data_dir)
  elif args.sweep == "decode":
    sweep_decode(args, names)
  elif args.sweep == "scaling":
    sweep_scaling(args, names)
  else:
    sweep_latents(args)


if __name__ == "__main__":
  main()
