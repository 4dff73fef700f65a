"""Samplers: each one jitted call whose time loop is a `lax.scan` over a struct.dataclass carry."""

from lsd.sampling.block import DraftConfig, DraftOutput, denoise_block, draft, draft_blocks
from lsd.sampling.categorical import nucleus_log_probs, sample_categorical
from lsd.sampling.revise import (
  SampleOutput,
  SBDSamplerConfig,
  StageConfig,
  draft_then_revise,
  heldout_scores,
  heldout_split,
  mdlm_sample,
  posthoc_scores,
  remask,
  revise_stage,
)

__all__ = [
  "DraftConfig",
  "DraftOutput",
  "SBDSamplerConfig",
  "SampleOutput",
  "StageConfig",
  "denoise_block",
  "draft",
  "draft_blocks",
  "draft_then_revise",
  "heldout_scores",
  "heldout_split",
  "mdlm_sample",
  "nucleus_log_probs",
  "posthoc_scores",
  "remask",
  "revise_stage",
  "sample_categorical",
]
