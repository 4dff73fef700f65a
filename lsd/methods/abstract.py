"""Tasks without data or trained runs, for ahead-of-time compilation (`lsd compile`).

`prepare(task)` makes a task's model and loss traceable with no data, and `batch(task, rows)` gives
the shapes of a global training batch. Most tasks do this themselves (`Task.prepare_abstract`,
`Task.abstract_batch`). The latent-diffusion stage also needs its frozen stage-1 run, whose loss
reads only the run's config when the latents are cached: it gets a stand-in here unless
`<section>.autoencoder_workdir` names a real run.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_collections

from lsd.config import ConfigError
from lsd.train.task import Task

# Latent-diffusion methods -> their config section (autoencoder_workdir, cache_latents, ...).
LATENT_DIFFUSION = {"ld4lg_diffusion": "ld4lg", "sld_diffusion": "sld"}


def _latent_section(task: Task) -> ml_collections.ConfigDict | None:
  section = LATENT_DIFFUSION.get(task.config.get("method", ""))
  return task.config[section] if section else None


def prepare(task: Task) -> Task:
  """Makes `task.build_model`, `task.loss` and `task.flops_per_token` usable without data."""
  stage = _latent_section(task)
  if stage is None:
    if hasattr(type(task), "autoencoder_methods"):  # a latent-diffusion stage not described here
      raise ConfigError(
        f"method {task.config.method!r}: lsd compile does not know the shapes of its training "
        f"batch yet (known latent-diffusion stages: {sorted(LATENT_DIFFUSION)})"
      )
    task.prepare_abstract()
    return task
  if stage.get("autoencoder_workdir"):
    run = task.autoencoder()  # the real frozen run (checked against this config)
    task.tokenizer = run.tokenizer
    return task
  if not stage.get("cache_latents") or stage.get("decoding_loss_weight", 0.0):
    raise ConfigError(
      "compiling this latent-diffusion stage without data needs its stage-1 run: it encodes "
      "(cache_latents=false) or decodes (decoding_loss_weight > 0) with the frozen autoencoder "
      "at every step; pass --config.<section>.autoencoder_workdir=<stage-1 run>"
    )
  cfg = task.config
  # The stand-in: with cached latents the loss reads only whether the AE normalises its latents,
  # which the sampler setting `sample.project` mirrors (configs/ld4lg_yelp.py). A text's latents
  # are K segments of the AE's (SLD: model.num_segments).
  k = max(1, cfg.model.get("num_segments", 0))
  model = ml_collections.ConfigDict(
    {
      "normalize_latents": bool(cfg.sample.get("project", True)),
      "num_latents": cfg.model.num_latents // k,
      "d_latent": cfg.model.d_latent,
      "max_len": cfg.data.max_len,
    }
  )
  task._autoencoder = types.SimpleNamespace(config=ml_collections.ConfigDict({"model": model}))
  task.prepare_abstract()
  return task


def batch(task: Task, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch of `rows` rows as the task's data pipeline yields it."""
  stage = _latent_section(task)
  if stage is None:
    return task.abstract_batch(rows)
  cfg = task.config
  s = lambda *shape, dtype: jax.ShapeDtypeStruct((rows, *shape), dtype)
  k = cfg.model.get("num_segments", 0)
  per_text = (k,) if k else ()  # SLD: K segments per text, and which of them exist
  out = {"segment_valid": s(k, dtype=jnp.bool_)} if k else {}
  if stage.get("cache_latents"):
    out["latents"] = s(cfg.model.num_latents, cfg.model.d_latent, dtype=jnp.float32)
  if not stage.get("cache_latents") or stage.get("decoding_loss_weight", 0.0):
    out["tokens"] = s(*per_text, cfg.data.max_len, dtype=jnp.int32)
    out["valid"] = s(*per_text, cfg.data.max_len, dtype=jnp.bool_)
  if cfg.model.get("num_classes", 0):
    out["label"] = s(dtype=jnp.int32)
  if stage.get("context_encoder"):
    out["source_tokens"] = s(cfg.data.max_source_len, dtype=jnp.int32)
    out["source_valid"] = s(cfg.data.max_source_len, dtype=jnp.bool_)
  return out
