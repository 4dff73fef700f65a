"""Where LD4LG's Yelp samples sit in the autoencoder's latent space, against real sentences.

    python benchmarks/ld4lg_latents.py [--workdir runs/bench/ld4lg]

Reuses the autoencoder and denoiser that `benchmarks/ld4lg.py` trained in `--workdir` and measures,
on 512 latents of each kind (distances are per-dimension RMS over the flattened 8 x 32 latent; each
latent vector lies on the sqrt(d) sphere, so 1.0 is the scale of one coordinate):
- nn_train: distance to the nearest of the first 20,000 training sentences' latents, for held-out
  sentences (validation rows [1512, 2024)), denoiser samples (p(x), w = 1, DDPM 100 steps, sphere
  projection; the ablation's seed-1 samples) and midpoints of two held-out latents (their mean,
  projected onto the sphere);
- cycle: distance between a latent z and enc(dec(z)), greedy decoding. A latent the decoder reads
  as a sentence that encodes back to it has cycle ~0;
- noise_bleu: BLEU of greedy decodings of held-out latents plus isotropic Gaussian noise of std s
  against the sentences themselves (the AE trains with per-example noise std ~ U(0, 0.3)).
The question: are samples off the data (far from every sentence) or in the gaps between sentences
that the decoder does not read consistently? Writes benchmarks/results/ld4lg_latents.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import write_result
from ld4lg import load_trained, log, prior_labels, validation_texts
from ld4lg_ablation import ValidationScorer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lsd import api  # noqa: E402
from lsd.data import split_documents  # noqa: E402
from lsd.data.sentences import load_sentences  # noqa: E402
from lsd.eval.metrics import bleu  # noqa: E402
from lsd.nn.layers import normalize_to_sphere  # noqa: E402

N = 512
N_TRAIN = 20_000
NOISE_STDS = (0.1, 0.2, 0.3, 0.5)


def encode(ae, texts: list[str], chunk: int = 512) -> np.ndarray:
  parts = [
    np.asarray(api.encode_texts(ae, texts[i : i + chunk])) for i in range(0, len(texts), chunk)
  ]
  return np.concatenate(parts)


def rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-row RMS distance of [N, l, d] arrays."""
  return np.sqrt(np.mean(np.square(a - b).reshape(len(a), -1), -1))


def nn_distance(z: np.ndarray, train: np.ndarray) -> np.ndarray:
  """Per-row RMS distance to the nearest row of `train` (both [N, l, d])."""
  a, b = z.reshape(len(z), -1), train.reshape(len(train), -1)
  d2 = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None] - 2.0 * a @ b.T
  return np.sqrt(np.maximum(d2.min(1), 0.0) / a.shape[1])


def summary(x: np.ndarray) -> dict:
  p10, p50, p90 = np.percentile(x, [10, 50, 90])
  return {"mean": float(np.mean(x)), "p10": float(p10), "median": float(p50), "p90": float(p90)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="runs/bench/ld4lg")
  args = p.parse_args()
  workdir = Path(args.workdir)
  ae, diff = load_trained(workdir)
  greedy = ValidationScorer.greedy(diff)

  def decode(z: np.ndarray) -> list[str]:
    return api.decode_latents(ae, jnp.asarray(z, jnp.float32), sample=greedy)

  data = ae.config.data
  train_docs, _ = split_documents(load_sentences(data), data.eval_fraction, data.split_seed)
  log(f"encoding {N_TRAIN} training sentences")
  z_train = encode(ae, [d["text"] for d in train_docs[:N_TRAIN]])
  valid = validation_texts(ae.config)
  held = valid[:N]
  z_held = encode(ae, held)
  diff.config.sample.update({"steps": 100, "sampler": "ddpm", "project": True})
  labels = prior_labels(ae.config, N, seed=1)
  z_samp = np.asarray(diff.task.sample_latents(diff.model(), jax.random.key(1), N, labels=labels))
  partner = np.random.default_rng(0).permutation(N)
  z_mid = np.asarray(normalize_to_sphere(jnp.asarray((z_held + z_held[partner]) / 2.0)))

  metrics = {"nn_train": {}, "cycle": {}}
  for name, z in [("held_out", z_held), ("samples", z_samp), ("midpoints", z_mid)]:
    metrics["nn_train"][name] = summary(nn_distance(z, z_train))
    metrics["cycle"][name] = summary(rms(z, encode(ae, decode(z))))
    log(f"{name}: nn_train {metrics['nn_train'][name]} cycle {metrics['cycle'][name]}")
  rng = np.random.default_rng(0)
  metrics["noise_bleu"] = {}
  for s in NOISE_STDS:
    noisy = z_held + s * rng.standard_normal(z_held.shape).astype(np.float32)
    metrics["noise_bleu"][str(s)] = bleu(decode(noisy), held)
    log(f"noise {s}: BLEU {metrics['noise_bleu'][str(s)]:.1f}")
  metrics["noise_bleu"]["0"] = bleu(decode(z_held), held)
  write_result(
    "ld4lg_latents",
    metrics,
    {
      "protocol": "benchmarks/ld4lg_latents.py docstring",
      "n": N,
      "n_train": N_TRAIN,
      "latents": list(z_held.shape[1:]),
      "decoding": "greedy",
      "sampling": "DDPM, 100 steps, sphere projection, w = 1, labels from the class prior, seed 1",
    },
  )


if __name__ == "__main__":
  main()
