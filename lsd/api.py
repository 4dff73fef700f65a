"""The public pure-function API: load a trained run, then sample with an explicit key.

import jax, lsd.api
run = lsd.api.load("runs/quickstart")          # config, tokenizer, graphdef, params (EMA if any)
samples = lsd.api.sample(run, jax.random.key(0), num_samples=4)

Latent runs (an autoencoder `ae` and a latent diffusion run `diff`, e.g. LD4LG's stages 1 and 2)
also map text to latents and back (`lsd.sampling.text_latent` for loaded runs):
z = encode_texts(ae, ["the food was great ."]); decode_latents(ae, z)
interpolate_texts(ae, a, b, 5); edit_text(diff, ae, key, texts, 0.5); generate_from_sources(...)
Conditional generation of any method: generate(run, key, [{"label": 1}, {"source": "..."}]).
Segment-level runs (SLD) also regenerate one segment of texts: regenerate_segment(diff, key, ...).
"""

from __future__ import annotations

import os

import jax

from lsd.config import ConfigError
from lsd.train.stages import LoadedRun, load_run

__all__ = [
  "LoadedRun",
  "decode_latents",
  "edit_text",
  "encode_texts",
  "export",
  "generate",
  "generate_from_sources",
  "interpolate_texts",
  "load",
  "nelbo",
  "prepare",
  "regenerate_segment",
  "sample",
  "train",
]


def load(workdir: str | os.PathLike, *, step: int | None = None, use_ema: bool = True) -> LoadedRun:
  """Restores the latest (or `step`) checkpoint of a training run directory (a local path or a
  remote URL such as gs://bucket/run), or loads an exported model directory (`export`), local,
  remote or on the Hugging Face hub as hf:org/name
  (`lsd.train.stages.load_run` with the method registry's tasks)."""
  from lsd.methods import get_task
  from lsd.train.export import HUB_PREFIX, resolve_hub

  if isinstance(workdir, str) and workdir.startswith(HUB_PREFIX) and "://" not in workdir:
    workdir = resolve_hub(workdir)
  return load_run(workdir, get_task, step=step, use_ema=use_ema)


def export(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None):
  """Writes the latest (or `step`) checkpoint of a training run as a self-contained model
  directory `out` (config.json, tokenizer.json, model.safetensors with the EMA under ema/, a
  README.md model card) that `load` reads (`lsd.train.export.export_run`); returns its path."""
  from lsd.methods import get_task
  from lsd.train.export import export_run

  return export_run(workdir, out, get_task, step=step)


def train(config, workdir: str | os.PathLike, **kwargs):
  """Trains `config` in `workdir` (local or remote; resuming if it holds a run): `lsd.train.trainer.train` with the
  method's task from the registry (`lsd.methods.get_task`). `kwargs` go to the trainer."""
  from lsd.methods import get_task
  from lsd.train.trainer import train as run_trainer

  return run_trainer(config, workdir, task=kwargs.pop("task", None) or get_task(config), **kwargs)


def prepare(config, out: str | os.PathLike, *, shards: int = 1) -> dict:
  """Tokenises the corpus of `config.data` once into `shards` ArrayRecord files in `out` (local or
  remote), with the tokenizer `lsd train` would build, and returns the manifest
  (`lsd.data.prepared.prepare`). Train on it with data.source='prepared', data.path=out."""
  from lsd.data import prepare as prepare_data

  return prepare_data(config.data, out, shards=shards)


def sample(run: LoadedRun, key: jax.Array, num_samples: int) -> list[dict]:
  """Samples from a loaded run with the run's sampler settings (`config.sample`)."""
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ConfigError(f"num_samples={num_samples!r} must be an int >= 1")
  return run.task.sample_text(run.model(), key, num_samples)


def generate(run: LoadedRun, key: jax.Array, inputs: list[dict], **options) -> list[dict]:
  """Conditional generation with a loaded run, one output record per input (`Task.generate`):
  inputs carry "prompt" (causal LM: a text to continue), "source" (seq2seq: a source text) or
  "label" (class-conditional: a class id), as the run's method reads them; `options` (e.g.
  guidance_scale, candidates) default to the run's `config.sample`."""
  return run.task.generate(run.model(), key, list(inputs), **options)


def nelbo(
  run: LoadedRun,
  data: str | os.PathLike | list[str] | None = None,
  *,
  num_samples: int = 8,
  block_size: int | None = None,
  seed: int = 0,
  batch_size: int | None = None,
) -> dict:
  """Held-out likelihood of a loaded run (`lsd.eval.likelihood`): masked / block diffusion (sbd)
  runs give the NELBO bound, causal LM runs the exact NLL, as nats_per_token and ppl (exp), over
  `data` (a .txt / .jsonl file, a list of texts, or None = the run's held-out split) packed into
  canvases as in training. num_samples: draws of t per block; block_size: sbd runs only (default
  sbd.block_small, 0 = one global block); seed: the noise key."""
  from lsd.eval import likelihood

  if data is None or isinstance(data, list):
    docs = None if data is None else [{"text": t} for t in data]
  else:
    docs = likelihood.read_documents(data, run.config.data)
  return likelihood.run_likelihood(
    run, docs, num_samples=num_samples, block_size=block_size, seed=seed, batch_size=batch_size
  )


# ---------------------------------------------------------------------------------------------------
# Text <-> latents with loaded latent runs
# ---------------------------------------------------------------------------------------------------
def encode_texts(ae_run: LoadedRun, texts: list[str]) -> jax.Array:
  """Texts -> latents [N, l, d] (fp32) with a loaded autoencoder run; texts longer than the run's
  data.max_len are truncated."""
  from lsd.sampling import text_latent as tl

  return tl.encode_texts(
    ae_run.tokenizer, ae_run.graphdef, ae_run.params, list(texts), ae_run.config.data.max_len
  )


def decode_latents(
  ae_run: LoadedRun, latents: jax.Array, *, key: jax.Array | None = None, sample=None
) -> list[str]:
  """Latents [N, l, d] -> texts with the autoencoder run's decoder; `sample` (max_new_tokens, top_p,
  temperature, num_beams, ...) defaults to the run's `config.sample` (greedy when top_p = 0)."""
  from lsd.sampling import text_latent as tl

  decoding = tl.DecodeConfig.from_config(ae_run.config.sample if sample is None else sample)
  return tl.decode_texts(ae_run.tokenizer, ae_run.graphdef, ae_run.params, latents, decoding, key)


def interpolate_texts(ae_run: LoadedRun, text_a: str, text_b: str, n: int = 5) -> list[str]:
  """n texts decoded along the slerp between the latents of text_a and text_b (ends included)."""
  from lsd.sampling import text_latent as tl

  max_len, decoding = ae_run.config.data.max_len, tl.DecodeConfig.from_config(ae_run.config.sample)
  args = (ae_run.tokenizer, ae_run.graphdef, ae_run.params, text_a, text_b, n)
  return tl.interpolate_texts(*args, max_len=max_len, decoding=decoding)


def edit_text(
  diffusion_run: LoadedRun,
  ae_run: LoadedRun,
  key: jax.Array,
  texts: list[str],
  t_edit: float,
  *,
  labels: list[int] | None = None,
  guidance_scale: float | None = None,
  steps: int | None = None,
) -> list[str]:
  """Encodes texts, noises their latents to t_edit in (0, 1], denoises them and decodes the result.

  With a class-conditional denoiser, `labels` (one per text) is the target class of the edit; None
  denoises unconditionally (the null class). `steps` defaults to the run's sample.steps scaled by
  t_edit; the other sampler settings come from the diffusion run's `config.sample`.
  """
  from lsd.sampling import text_latent as tl

  task = diffusion_run.task
  z = tl.edit_latents(
    diffusion_run.graphdef,
    diffusion_run.params,
    key,
    encode_texts(ae_run, texts),
    t_edit,
    task.sampling,
    objective=task.stage.objective,
    schedule=task.schedule,
    num_classes=diffusion_run.config.model.num_classes,
    labels=labels,
    guidance_scale=guidance_scale,
    steps=steps,
  )
  return decode_latents(ae_run, z)


def generate_from_sources(
  diffusion_run: LoadedRun,
  key: jax.Array,
  sources: list[str],
  *,
  guidance_scale: float | None = None,
  candidates: int | None = None,
) -> list[str]:
  """Seq2seq with a loaded diffusion run that has a context encoder: one output text per source
  (guidance_scale defaults to the run's sample.guidance_scale, 1 = no guidance; candidates to its
  sample.candidates, 1 = no MBR: k > 1 samples k outputs per source and keeps the MBR choice).
  `generate` with {"source": ...} inputs."""
  inputs = [{"source": s} for s in sources]
  out = generate(diffusion_run, key, inputs, guidance_scale=guidance_scale, candidates=candidates)
  return [o["text"] for o in out]


def regenerate_segment(
  diffusion_run: LoadedRun,
  key: jax.Array,
  texts: list[str],
  segment: int,
  *,
  sources: list[str] | None = None,
  guidance_scale: float | None = None,
) -> list[str]:
  """Segment-level runs (SLD): each text with its segment `segment` (0-based) regenerated given its
  other segments and, seq2seq, its source (inpainting in latent space); the other segments keep
  their latents. guidance_scale defaults to the run's sample.guidance_scale."""
  task = diffusion_run.task
  if not hasattr(task, "regenerate_segment"):
    raise ConfigError(
      f"regenerate_segment needs a segment-level diffusion run; this is a "
      f"{diffusion_run.config.method!r} run"
    )
  return task.regenerate_segment(
    diffusion_run.model(), key, list(texts), segment, sources=sources, guidance_scale=guidance_scale
  )
