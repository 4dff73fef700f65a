"""LD4LG (Latent Diffusion for Language Generation, arXiv 2212.09462) as three trainer tasks.

Stage 1, "ld4lg_ae" (`LD4LGAutoencoderTask`): a `LatentAutoencoder` trained on teacher-forced
reconstruction; its encoder is trained from scratch or is a frozen pretrained one (`model.encoder`,
a name of the registry `lsd.convert.encoder_specs`), its decoder optionally starts from a causal-LM
run (`ld4lg.decoder_init`) (`lsd.methods.latent.LatentAutoencoderTask`).
Stage 2, "ld4lg_diffusion": a `LatentDenoiser` learns the v-prediction (cosine schedule, unweighted
L2) with self-conditioning and condition dropout for CFG on the latents of the frozen stage-1 run
(encoded once, `ld4lg.cache_latents`), optionally plus a decoding loss; seq2seq: a frozen
encoder's states of each source (`ld4lg.context_encoder`) are the denoiser's context
(`lsd.methods.latent.LatentDiffusionTask`). Conditional generation (class labels, sources) is
`Task.generate` (`lsd.api.generate`, `lsd sample --label / --source`).
Stage 3 (optional), "ld4lg_decoder": the stage-1 decoder tuned to read the stage-2 denoiser's
estimates (`lsd.methods.latent.DecoderTuningMixin`); diffusion runs decode with it when
`ld4lg.decoder_workdir` names it.

The recipe only: the stages, the math, the stage runs, the latent cache and text <-> latents are
shared (`lsd.methods.latent`, `lsd.diffusion.latent`, `lsd.train.stages`, `lsd.data.latent_cache`,
`lsd.sampling.text_latent`; `lsd.api.encode_texts`, `decode_latents`, `interpolate_texts`,
`edit_text`, `generate` and `generate_from_sources` for loaded runs). Each stage's `config.ld4lg` section is
read into its dataclass at every use, so edits to a loaded run's config take effect.
"""

from __future__ import annotations

import dataclasses

from lsd.config import ConfigError, check_range
from lsd.methods import latent
from lsd.methods.latent import DecoderTuningMixin, LatentAutoencoderTask, LatentDiffusionTask


class DiffusionStage(latent.DiffusionStage):
  """`config.ld4lg` of stage 2 (the fields of `LatentDiffusionTask`); configs/ld4lg_yelp.py sets
  them all."""

  section = "ld4lg"


@dataclasses.dataclass(frozen=True)
class DecoderStage:
  """`config.ld4lg` of stage 3 (the fields of `DecoderTuningMixin`)."""

  autoencoder_workdir: str
  denoiser_workdir: str
  tune_clean_prob: float
  tune_t_max: float
  cond_drop_prob: float
  tune_latent_noise: float | None = None  # None = model.latent_noise

  def validate(self) -> None:
    for name in ("tune_clean_prob", "cond_drop_prob"):
      check_range(f"ld4lg.{name}", getattr(self, name), 0.0, 1.0)
    noise = self.tune_latent_noise
    if noise is not None and not float(noise) >= 0.0:
      raise ConfigError(f"ld4lg.tune_latent_noise={noise!r} must be >= 0 (0 = clean latents)")
    if not 0.0 < float(self.tune_t_max) <= 1.0:
      raise ConfigError(f"ld4lg.tune_t_max={self.tune_t_max!r} must be in (0, 1]")
    for field in ("autoencoder_workdir", "denoiser_workdir"):
      if not getattr(self, field):
        raise ConfigError(
          f"ld4lg.{field} is empty; stage 3 tunes the decoder of a trained stage-1 run on the "
          "estimates of a trained stage-2 run: pass --config.ld4lg.autoencoder_workdir=<stage-1 "
          "dir> --config.ld4lg.denoiser_workdir=<stage-2 dir>"
        )


class LD4LGAutoencoderTask(LatentAutoencoderTask):
  """Stage 1: the autoencoder, trained on teacher-forced reconstruction (word dropout and latent
  noise in training); its samples are greedy reconstructions of held-out sentences."""

  name = "ld4lg_ae"
  section, stage_config = "ld4lg", latent.AutoencoderStage


class LD4LGDiffusionTask(LatentDiffusionTask):
  """Stage 2: the denoiser on the frozen stage-1 (or stage-3) run's latents."""

  name = "ld4lg_diffusion"
  section, stage_config = "ld4lg", DiffusionStage
  autoencoder_methods, decoder_method = ("ld4lg_ae", "ld4lg_decoder"), "ld4lg_decoder"
  hints = {
    "autoencoder_workdir": "(configs/ld4lg_yelp.py:stage=ae)",
    "decoder_workdir": "(configs/ld4lg_yelp.py:stage=decoder)",
  }


class LD4LGDecoderTask(DecoderTuningMixin, LD4LGAutoencoderTask):
  """Stage 3: the stage-1 run's decoder tuned on the stage-2 denoiser's estimates, encoder and
  compressor frozen; a complete autoencoder run that `ld4lg.decoder_workdir` can name."""

  name = "ld4lg_decoder"
  section, stage_config, denoiser_stage_config = "ld4lg", DecoderStage, DiffusionStage
  autoencoder_method, denoiser_method = "ld4lg_ae", "ld4lg_diffusion"
