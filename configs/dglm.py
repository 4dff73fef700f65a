"""DGLM (Diffusion Guided Language Modeling), the diffusion stage: a denoiser that proposes the
sentence embedding (frozen all-MiniLM-L6-v2, 384-d, standardised per dimension) of a continuation,
conditioned on the prefix's MiniLM states. Each sentence is cut into prefix and continuation at a
seeded word boundary. See docs/dglm.md.

  lsd train --config configs/dglm.py:size=tiny --workdir runs/dglm_diff \
    --config.data.path='/path/to/yelp/sentiment.*'

Arguments (`:key=value,...`): size in {test, tiny, base}; steps (0 = size default). `base` has the
paper's denoiser sizes (12 layers of width 768, 32 embedding tokens, bs 256, lr 1e-3, 250k steps,
EMA 0.9999, 250 DDPM steps) over MiniLM's 384-d embedding (the paper's Sentence-T5-XL is 768-d).
The decoder stage (soft prompts into a causal LM) is not a config yet.
"""

import ml_collections

from lsd.config import check_choice, parse_arg
from lsd.data.sentences import default_sentence_data_config
from lsd.parallel import default_mesh_config
from lsd.train.state import default_train_config

WIDTH = 384  # all-MiniLM-L6-v2
SIZES = {
  "test": dict(
    max_len=16,
    batch_size=8,
    denoiser=dict(num_latents=8, d_model=32, n_layers=2, n_heads=2, d_ff=0, dropout=0.0),
    train=dict(steps=10, lr=1e-3, warmup_steps=2),
    sample_steps=4,
    stats_sentences=256,
  ),
  "tiny": dict(
    max_len=32,
    batch_size=64,
    denoiser=dict(num_latents=8, d_model=128, n_layers=4, n_heads=4, d_ff=0, dropout=0.0),
    train=dict(steps=3000, lr=1e-3, warmup_steps=100, ema_decay=0.999),
    sample_steps=100,
    stats_sentences=10_000,
  ),
  "base": dict(
    max_len=64,
    batch_size=256,
    denoiser=dict(num_latents=32, d_model=768, n_layers=12, n_heads=12, d_ff=2048, dropout=0.0),
    # AdamW weight decay 0.1 = the reference's lr-independent 1e-4 / lr 1e-3.
    train=dict(
      steps=250_000, lr=1e-3, warmup_steps=1000, weight_decay=0.1, b2=0.999, ema_decay=0.9999
    ),
    sample_steps=250,
    stats_sentences=100_000,
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, {"size": "tiny", "steps": 0})
  check_choice("size", a["size"], sorted(SIZES))
  size = SIZES[a["size"]]
  c = ml_collections.ConfigDict()
  c.method = "dglm_diffusion"
  c.seed = 0
  c.data = default_sentence_data_config()
  c.data.update(source="text", label_per_file=True)
  c.data.max_len = c.data.seq_len = size["max_len"]
  c.data.max_source_len = size["max_len"]
  c.data.batch_size = size["batch_size"]
  c.data.eval_fraction = 0.02
  c.data.tokenizer.kind = "minilm"  # the frozen encoder's WordPiece (the run keeps it)
  den = dict(size["denoiser"])
  c.model = dict(
    den,
    d_latent=WIDTH // den["num_latents"],
    mlp="geglu",
    norm="layer",
    self_condition=True,
    num_classes=0,
    d_context=WIDTH,
    dtype="float32",
  )
  c.train = default_train_config()
  c.train.update(size["train"])
  if a["steps"]:
    c.train.steps = a["steps"]
  c.train.ema_warmup_power = 0.75
  c.mesh = default_mesh_config()
  c.dglm = {
    "encoder": "minilm",
    "objective": "v",
    "self_condition_prob": 0.5,
    "cond_drop_prob": 0.1,
    "schedule_scale": 1.0,
    "stats_sentences": size["stats_sentences"],
    "split_seed": 0,
  }
  c.sample = {
    "steps": size["sample_steps"],
    "sampler": "ddpm",
    "eta": 0.0,
    "guidance_scale": 1.0,
    "project": False,  # standardised embeddings are not on a sphere
  }
  return c
