"""Method recipes: thin glue from a config to a `Task` (model + loss + sampler)."""

from __future__ import annotations

import importlib

import ml_collections

from lsd.config import check_choice
from lsd.train.task import Task

# config.method -> "module:Class"; imported lazily so one method's extras never burden another.
TASKS = {
  "causal_lm": "lsd.methods.causal_lm:CausalLMTask",
  "sbd": "lsd.methods.sbd:SBDTask",
  "ld4lg_ae": "lsd.methods.ld4lg:LD4LGAutoencoderTask",
  "ld4lg_diffusion": "lsd.methods.ld4lg:LD4LGDiffusionTask",
  "ld4lg_decoder": "lsd.methods.ld4lg:LD4LGDecoderTask",
  "sld_ae": "lsd.methods.sld:SLDAutoencoderTask",
  "sld_diffusion": "lsd.methods.sld:SLDDiffusionTask",
  "dglm_diffusion": "lsd.methods.dglm:DGLMDiffusionTask",
  "dglm_decoder": "lsd.methods.dglm_decoder:DGLMDecoderTask",
}


def get_task(config: ml_collections.ConfigDict) -> Task:
  check_choice("method", config.get("method"), sorted(TASKS))
  module, cls = TASKS[config.method].split(":")
  return getattr(importlib.import_module(module), cls)(config)
