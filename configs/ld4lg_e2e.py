"""LD4LG seq2seq on E2E NLG: meaning representation -> restaurant description.

The source (`mr`, e.g. "name[The Eagle], eatType[coffee shop], food[French]") goes through a
frozen pretrained encoder (`context`, a name of lsd.convert.encoder_specs; default minilm, the
registry wheel, offline); its hidden states are the denoiser's cross-attention context, dropped to a
learned null context with probability 0.1 for classifier-free guidance. The target (`ref`) is what
the autoencoder encodes.

Stage 1 (autoencoder on the references):
  lsd train --config configs/ld4lg_e2e.py:stage=ae,size=tiny --workdir runs/e2e_ae \
    --config.data.path=/path/to/e2e/trainset.csv
Stage 2 (seq2seq denoiser):
  lsd train --config configs/ld4lg_e2e.py:stage=diffusion,size=tiny --workdir runs/e2e_diff \
    --config.data.path=/path/to/e2e/trainset.csv --config.ld4lg.autoencoder_workdir=runs/e2e_ae
  lsd sample --workdir runs/e2e_diff --num_samples 8   # held-out sources -> outputs
  lsd sample --workdir runs/e2e_diff --source 'name[Zizzi], food[French]'

Data: the E2E csv files (columns `mr`, `ref`; tuetschek/e2e-dataset). Arguments as in
configs/ld4lg_yelp.py (stage, size, encoder, steps) and context; sentences are longer here (max_len
48 for tiny).
"""

import ml_collections

from configs.ld4lg_yelp import build
from lsd.config import ConfigError, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  defaults = {"stage": "ae", "size": "tiny", "encoder": "scratch", "steps": 0, "context": "minilm"}
  a = parse_arg(arg, defaults)
  if not a["context"]:
    raise ConfigError("context is empty: E2E is seq2seq, name the source's frozen encoder")
  c = build(a, dict(source="csv", text_field="ref"), num_classes=0)
  if a["stage"] == "diffusion":
    c.data.source_field = "mr"
    c.data.max_source_len = 64
    if a["size"] == "tiny":
      # The frozen encoder encodes each batch's sources at every step and costs more than the
      # tiny denoiser: a smaller batch gives several times more updates in the same time.
      c.data.batch_size = 32
      c.train.lr = 5e-4
  if a["size"] != "test":
    c.data.max_len = c.data.seq_len = 48
    if a["stage"] == "ae":
      c.model.max_len = 48
    c.sample.max_new_tokens = 47
  c.data.eval_fraction = 0.05
  return c
