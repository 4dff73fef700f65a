"""LD4LG ablations at a reduced, fixed budget on the Yelp protocol of `benchmarks/ld4lg.py`.

    python benchmarks/ld4lg_ablation.py [--workdir runs/bench/ld4lg_ablation] [--variants a,b]

Each variant trains its own tiny autoencoder (`--ae_steps`, default 5000) and class-conditional
denoiser (`--diff_steps`, default 1500) from configs/ld4lg_yelp.py with a few overrides, then
scores it on the validation slice of `benchmarks/ld4lg_decode.py` (permuted held-out rows that
the main benchmark never reports on):
- recon_bleu: greedy reconstructions of held-out rows [2024, 2536);
- 512 samples of p(x) (labels from the training class frequencies, w = 1, DDPM, 100 steps, x0_hat
  projected onto the sphere, greedy decoding): MAUVE against held-out rows [1512, 2024) on judge
  features, judge gen-PPL (median) and unigram entropy.
Step counts are fixed (not minutes), so variants with the same model sizes get the same compute.
The questions the variants answer: how the AE's training-only latent noise trades
reconstruction for the fluency of decoded denoiser samples (noise*), and whether a vocabulary of
whole words makes decoded samples more fluent (vocab*), and whether a decoder tuned on the
denoiser's estimates (stage 3, `--dec_steps`, default 1000) decodes its samples more fluently
(*_dec*, reusing another variant's AE and denoiser), and whether a decoder initialised from a
causal LM trained first on the same sentences (*lminit*, `ld4lg.decoder_init`) does, and whether
latent noise in stage 3 alone (*lminit_dec_noise*, `ld4lg.tune_latent_noise`) does, and whether
a denoiser trained to make its estimates decode to the sentence (*decloss*,
`ld4lg.decoding_loss_weight`) samples more decodable latents. Trainings
resume; a trained run directory whose stored config differs from the variant's is refused. Writes
benchmarks/results/ld4lg_ablation.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np
from common import git_commit, write_result
from ld4lg import (
  DECODINGS,
  cached_features,
  decoder_lm_config,
  log,
  prior_labels,
  reconstruct,
  validation_texts,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsd import api  # noqa: E402
from lsd.api import train  # noqa: E402
from lsd.config import apply_override, load_config_file  # noqa: E402
from lsd.eval.genppl import GenPPL  # noqa: E402
from lsd.eval.metrics import bleu, mauve, unigram_entropy  # noqa: E402
from lsd.train.checkpoint import Checkpointer  # noqa: E402

# name -> {"ae": {dotted config field: value}, "diffusion": {...}} overrides of the tiny configs.
# The noise variants ran with the 2048-entry BPE that was the tiny default then (now 4096).
V2048 = {"data.tokenizer.vocab_size": 2048}
VARIANTS = {
  "noise0.3": {"ae": {"model.latent_noise": 0.3, **V2048}, "diffusion": dict(V2048)},
  "noise0.5": {"ae": {"model.latent_noise": 0.5, **V2048}, "diffusion": dict(V2048)},
  "noise0.8": {"ae": {"model.latent_noise": 0.8, **V2048}, "diffusion": dict(V2048)},
  # A BPE vocabulary of 8192 keeps nearly every Yelp word (8268 types) one token, so a decoder
  # reading an off-manifold latent can no longer spell non-words out of subword pieces.
  "vocab8192": {
    "ae": {"model.latent_noise": 0.3, "data.tokenizer.vocab_size": 8192},
    "diffusion": {"data.tokenizer.vocab_size": 8192},
  },
  "vocab4096": {  # most Yelp words whole (the 4000 commonest cover 98 % of the tokens)
    "ae": {"model.latent_noise": 0.3, "data.tokenizer.vocab_size": 4096},
    "diffusion": {"data.tokenizer.vocab_size": 4096},
  },
}
# Half the latent width (8 x 16 = 128 numbers per sentence instead of 256): the same sentences
# packed into a smaller space, so less of it lies between encodings.
L8D16 = {"model.d_latent": 16}
VARIANTS["vocab4096_l8d16"] = {
  "ae": {"model.latent_noise": 0.3, "data.tokenizer.vocab_size": 4096, **L8D16},
  "diffusion": {"data.tokenizer.vocab_size": 4096, **L8D16},
}
# Twice the AE decoder's depth (4 layers instead of 2): more capacity to read the space between
# encodings as text.
DEC4 = {"model.decoder_layers": 4}
VARIANTS["vocab4096_declayers4"] = {
  "ae": {"model.latent_noise": 0.3, "data.tokenizer.vocab_size": 4096, **DEC4},
  "diffusion": {"data.tokenizer.vocab_size": 4096},
}
# Stage-3 variants: the AE and denoiser of the variant named by "reuse", then the decoder tuned on
# that denoiser's estimates (configs/ld4lg_yelp.py:stage=decoder) for --dec_steps, with overrides.
V4096 = {"data.tokenizer.vocab_size": 4096}
VARIANTS.update(
  {
    "vocab4096_dec": {  # (0.5 was the stage-3 default when this ran; now 0.2)
      "reuse": "vocab4096",
      "decoder": {**V4096, "ld4lg.tune_clean_prob": 0.5},
    },
    "vocab4096_dec_clean0.2": {
      "reuse": "vocab4096",
      "decoder": {**V4096, "ld4lg.tune_clean_prob": 0.2},
    },
    "vocab4096_dec_tmax0.5": {
      "reuse": "vocab4096",
      "decoder": {**V4096, "ld4lg.tune_t_max": 0.5, "ld4lg.tune_clean_prob": 0.5},
    },
    # The compute-matched control: the same stage-3 steps on clean latents only (plain
    # continued reconstruction training of reconstruction net and decoder).
    "vocab4096_dec_clean1": {
      "reuse": "vocab4096",
      "decoder": {**V4096, "ld4lg.tune_clean_prob": 1.0},
    },
    "vocab4096_dec_clean0": {
      "reuse": "vocab4096",
      "decoder": {**V4096, "ld4lg.tune_clean_prob": 0.0},
    },
    "vocab4096_dec_clean0.2_2k": {  # twice the stage-3 steps
      "reuse": "vocab4096",
      "decoder": {**V4096, "ld4lg.tune_clean_prob": 0.2},
      "dec_steps": 2000,
    },
    # Stage 3 (the default tune_clean_prob 0.2) on the other variants: does it add to the gains
    # of the 8192-entry vocabulary, the narrower latents and the deeper decoder?
    "vocab8192_dec": {"reuse": "vocab8192", "decoder": {"data.tokenizer.vocab_size": 8192}},
    "vocab4096_l8d16_dec": {"reuse": "vocab4096_l8d16", "decoder": {**V4096, **L8D16}},
    "vocab4096_declayers4_dec": {"reuse": "vocab4096_declayers4", "decoder": {**V4096, **DEC4}},
  }
)
# The paper's design at tiny scale: a frozen pretrained encoder (all-MiniLM-L6-v2, the registry
# wheel; its WordPiece vocabulary of 30,522 mostly whole words is also the decoder's) in place of
# the scratch encoder. "args" are configs/ld4lg_yelp.py arguments, used for every stage of the
# variant and of the stage-3 variants that reuse it.
VARIANTS["minilm"] = {"args": "encoder=minilm", "ae": {"model.latent_noise": 0.3}, "diffusion": {}}
VARIANTS["minilm_dec"] = {"reuse": "minilm", "decoder": {}}
# The AE decoder initialised from a causal LM with its sizes (ld4lg.decoder_init), trained first
# on the same training sentences for "lm_steps" (the benchmark's AR baseline data config): does a
# decoder that already models the language read the denoiser's samples more fluently? The paper's
# decoder is BART's pretrained one; no such weights install offline, so the LM is trained here.
# The LM-initialised decoder reconstructs better (BLEU 91.6 against 84.0) but reads samples worse
# (MAUVE 0.425 against 0.529), so the noise variants spend that headroom on more training-only
# latent noise, which blurs the decoder towards the LM it started from. "lm_reuse": the variant
# whose trained LM they share.
for _noise in (0.3, 0.5, 0.65, 0.8):
  _name = "vocab4096_lminit" + ("" if _noise == 0.3 else f"_noise{_noise}")
  VARIANTS[_name] = {
    "lm_steps": 3000,
    **({} if _noise == 0.3 else {"lm_reuse": "vocab4096_lminit"}),
    "ae": {"model.latent_noise": _noise, **V4096},
    "diffusion": dict(V4096),
  }
  VARIANTS[f"{_name}_dec"] = {"reuse": _name, "decoder": {}}
# The latent noise in stage 3 only (ld4lg.tune_latent_noise): stage 1 keeps 0.3, so the encoder,
# the denoiser's latents and the stage-1 reconstruction stay those of vocab4096_lminit, and only
# the decoder that reads the samples is blurred.
for _noise in (0.5, 0.65, 0.8):
  VARIANTS[f"vocab4096_lminit_dec_noise{_noise}"] = {
    "reuse": "vocab4096_lminit",
    "decoder": {"ld4lg.tune_latent_noise": _noise},
  }
# The decoding loss (ld4lg.decoding_loss_weight): the denoiser trained, beside its L2 loss, to
# make its estimates x0_hat decode to the sentence under the frozen stage-1 decoder, so that its
# samples land where the decoder reads text. "ae_reuse": the variant whose AE they share.
for _w, _tmax in ((0.1, 1.0), (0.3, 0.3)):
  _name = f"vocab4096_decloss{_w}" + ("" if _tmax == 1.0 else f"_tmax{_tmax}")
  VARIANTS[_name] = {
    "ae_reuse": "vocab4096",
    "ae": VARIANTS["vocab4096"]["ae"],
    "diffusion": {
      **V4096,
      "ld4lg.decoding_loss_weight": _w,
      "ld4lg.decoding_loss_t_max": _tmax,
    },
  }
SAMPLES = 512  # validation rows [0, 512) are the MAUVE references, [512, 1024) the recon source
# Fields that name where a run lives rather than what it trains.
PATH_FIELDS = {
  ("ld4lg", "autoencoder_workdir"),
  ("ld4lg", "denoiser_workdir"),
  ("ld4lg", "decoder_init"),
}


def variant_config(
  stage: str,
  overrides: dict,
  steps: int,
  data_path: str,
  ae_dir: Path | None,
  diff_dir=None,
  args: str = "",
):
  c = load_config_file(
    f"configs/ld4lg_yelp.py:stage={stage},size=tiny" + (f",{args}" if args else "")
  )
  c.data.path = data_path
  c.data.eval_fraction = 0.05
  c.train.steps = steps
  c.train.progress = False
  c.train.num_samples = 0
  if ae_dir is not None:
    c.ld4lg.autoencoder_workdir = str(ae_dir)
  if diff_dir is not None:
    c.ld4lg.denoiser_workdir = str(diff_dir)
  for k, v in overrides.items():  # checked field names, converted to the field's type
    apply_override(c, k, v if isinstance(v, str) else json.dumps(v))
  return c


def _differences(stored: dict, wanted: dict, prefix=()) -> list[str]:
  out = []
  for k in sorted(set(stored) | set(wanted)):
    key = (*prefix, k)
    if key in PATH_FIELDS:
      continue
    a, b = stored.get(k), wanted.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, key)
    elif isinstance(a, dict) and b is None or a is None and isinstance(b, dict):
      out += _differences(a or {}, b or {}, key)  # a section added since: compare its fields
    elif a != b:
      out.append(f"{'.'.join(key)}: stored {a!r}, wanted {b!r}")
  return out


def lm_config(ae_cfg, steps: int):
  """The benchmark's stage-0 LM config (`decoder_lm_config`) for `steps` steps."""
  c = decoder_lm_config(ae_cfg)
  c.train.steps = steps
  c.train.progress = False
  c.train.num_samples = 0
  return c


def train_or_reuse(cfg, run: Path) -> None:
  """Trains `cfg` in `run` to cfg.train.steps (resuming), refusing a run trained with another config."""
  if (run / "config.json").exists():
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    step = ckpt.latest_step()
    ckpt.close()
    # A run that stopped before its first checkpoint (e.g. on a config error) trained nothing:
    # it starts afresh with the new config.
    diff = _differences(json.loads((run / "config.json").read_text()), json.loads(cfg.to_json()))
    if diff and step is not None:
      sys.exit(f"{run} was trained with another config ({'; '.join(diff)}); use another --workdir")
    if step == cfg.train.steps:
      log(f"{run}: reusing the finished {cfg.train.steps}-step run")
      return
  log(f"training {run} ({cfg.train.steps} steps)")
  train(cfg, run)


class ValidationScorer:
  """Scores on the validation slice: held-out rows [0, SAMPLES) of `validation_texts` are the MAUVE
  references, [SAMPLES, 2 SAMPLES) the reconstruction source; judge features are cached in
  `feature_dir`. Labels of the p(x) samples come from the training class frequencies."""

  def __init__(self, ae_config, feature_dir: Path):
    self.judge = GenPPL(max_len=64, batch_size=32)
    self.features = functools.partial(cached_features, self.judge, feature_dir)
    valid = validation_texts(ae_config)
    self.refs, self.recon_src = valid[:SAMPLES], valid[SAMPLES : 2 * SAMPLES]
    self.ref_feats = self.features(self.refs)
    self.ae_config = ae_config

  @staticmethod
  def greedy(diff):
    sample = diff.config.sample.copy_and_resolve_references()
    sample.update(DECODINGS["greedy"])
    return sample

  def recon_bleu(self, ae, diff) -> float:
    return bleu(reconstruct(ae, self.recon_src, self.greedy(diff)), self.recon_src)

  def samples(self, ae, diff, seed: int = 1) -> dict:
    """SAMPLES latents of p(x) (w = 1, DDPM 100 steps, sphere projection), decoded greedily; `seed`
    draws the labels and the sampling noise."""
    diff.config.sample.update({"steps": 100, "sampler": "ddpm", "project": True})
    labels = prior_labels(self.ae_config, SAMPLES, seed=seed)
    z = diff.task.sample_latents(diff.model(), jax.random.key(seed), SAMPLES, labels=labels)
    texts = api.decode_latents(ae, z, sample=self.greedy(diff))
    ppl = np.array(self.judge.per_sample(texts))
    return {
      "mauve": mauve(self.ref_feats, self.judge.hidden_features(texts)),
      "gen_ppl_median": float(np.nanmedian(ppl)),
      "entropy": float(np.mean([unigram_entropy(ae.tokenizer.encode(t)) for t in texts])),
      "mean_words": float(np.mean([len(t.split()) for t in texts])),
      "examples": texts[:5],
    }


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
  p.add_argument("--workdir", default="runs/bench/ld4lg_ablation")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--ae_steps", type=int, default=5000)
  p.add_argument("--diff_steps", type=int, default=1500)
  p.add_argument("--dec_steps", type=int, default=1000)
  args = p.parse_args()
  names = [v for v in args.variants.split(",") if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    sys.exit(f"--variants: unknown {unknown}; accepted: {list(VARIANTS)}")
  data_path = str(Path(args.data_dir).resolve() / "yelp" / "sentiment.dev.*")
  if not list((Path(args.data_dir) / "yelp").glob("sentiment.dev.*")):
    sys.exit(f"--data_dir={args.data_dir} has no yelp/sentiment.dev.* files")
  workdir = Path(args.workdir)
  out_file = Path(__file__).parent / "results" / "ld4lg_ablation.json"
  results = json.loads(out_file.read_text())["metrics"] if out_file.exists() else {}

  scorer = None
  for name in names:
    over = VARIANTS[name]
    base = over.get("reuse", name)
    stages = VARIANTS[base]
    ae_dir = workdir / stages.get("ae_reuse", base) / "yelp_ae"
    diff_dir = workdir / base / "yelp_diff"
    cargs = stages.get("args", "")
    ae_cfg = variant_config("ae", stages["ae"], args.ae_steps, data_path, None, args=cargs)
    if "lm_steps" in stages:  # stage 0: the LM whose weights initialise the AE decoder
      lm_dir = workdir / stages.get("lm_reuse", base) / "yelp_lm"
      train_or_reuse(lm_config(ae_cfg, stages["lm_steps"]), lm_dir)
      ae_cfg.ld4lg.decoder_init = str(lm_dir)
    train_or_reuse(ae_cfg, ae_dir)
    train_or_reuse(
      variant_config(
        "diffusion", stages["diffusion"], args.diff_steps, data_path, ae_dir, args=cargs
      ),
      diff_dir,
    )
    if "decoder" in over:  # stage 3: score with the tuned decoder
      dec_dir = workdir / name / "yelp_dec"
      dec_steps = over.get("dec_steps", args.dec_steps)
      # The stage-1 model fields carry over (stage 3 requires them equal), then the overrides.
      dec_over = {k: v for k, v in stages["ae"].items() if k.startswith("model.")}
      dec_over.update(over["decoder"])
      dec_cfg = variant_config(
        "decoder", dec_over, dec_steps, data_path, ae_dir, diff_dir, args=cargs
      )
      train_or_reuse(dec_cfg, dec_dir)
      ae_dir = dec_dir
    ae, diff = api.load(ae_dir), api.load(diff_dir)
    if scorer is None:  # the data config is the same for every variant
      scorer = ValidationScorer(ae.config, workdir / "judge_features")
    results[name] = {
      "overrides": over,
      **({"lm_steps": stages["lm_steps"]} if "lm_steps" in stages else {}),
      "ae_steps": args.ae_steps,
      "diff_steps": args.diff_steps,
      **({"dec_steps": over.get("dec_steps", args.dec_steps)} if "decoder" in over else {}),
      "recon_bleu": scorer.recon_bleu(ae, diff),
      **scorer.samples(ae, diff),
      "git_commit": git_commit(),  # entries of variants not rerun keep their own
    }
    log(f"{name}: " + json.dumps({k: v for k, v in results[name].items() if k != "examples"}))
    # Written after every variant: a later variant's failure keeps the scores already measured.
    write_result(
      "ld4lg_ablation",
      results,
      {
        "protocol": "benchmarks/ld4lg_ablation.py docstring",
        "samples": SAMPLES,
        "mauve_refs": "permuted held-out Yelp rows [1512, 2024) (validation)",
        "recon_rows": "permuted held-out Yelp rows [2024, 2536)",
        "sampling": "DDPM, 100 steps, sphere projection, w = 1, labels from the class prior",
        "decoding": "greedy",
        "sizes": "configs/ld4lg_yelp.py size=tiny (8 x 32 latents)",
      },
    )


if __name__ == "__main__":
  main()
