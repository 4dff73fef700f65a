"""SLD (segment-level diffusion): each text is at most K segments (sentences or utterances), each
segment its own l x d latents; a denoiser over the K x l latents, cross-attending to a frozen
MiniLM's states of the prompt or source. Two stages, each its own run.

ROCStories, first sentence -> the next four (data.prompt_segments = 1, K = 4):
  lsd train --config configs/sld.py:stage=ae,size=tiny --workdir runs/sld_ae \
    --config.data.path=/path/to/roc_stories.json
  lsd train --config configs/sld.py:stage=diffusion,size=tiny --workdir runs/sld_diff \
    --config.data.path=/path/to/roc_stories.json --config.sld.autoencoder_workdir=runs/sld_ae
  lsd sample --workdir runs/sld_diff --num_samples 4   # held-out prompts -> continuations
DialogSum, dialogue -> summary (`:data=dialogsum`; jsonl with `dialogue` and `summary` fields):
  lsd train --config configs/sld.py:stage=ae,size=tiny,data=dialogsum --workdir runs/ds_ae \
    --config.data.path=/path/to/dialogsum.train.jsonl
Unconditional multi-segment texts: `context=none` for stage 2.

Data: `rocstories` reads a jsonl file of stories (one JSON string, list of strings or object with
`text` per line); `dialogsum` a jsonl file with `dialogue` (the source) and `summary` (the text).
Arguments (`:key=value,...`): stage in {ae, diffusion}; size in {test, tiny, base}; data in
{rocstories, dialogsum}; encoder in {scratch, minilm} (the autoencoder's; minilm: the frozen
all-MiniLM-L6-v2 and its WordPiece); context in {minilm, none} (stage 2); steps (0 = size default).

`base` is the paper's setting (l = 64 x d = 64 latents per segment of <= 64 tokens, 3-layer
compressor and reconstruction network, 768 x 12 denoiser with dropout 0.1, AE bs 64 at lr 1e-4,
diffusion bs 64 for 100k steps at lr 2e-4 with EMA 0.9999, 250 DDPM steps, CFG w = 2, 3 candidates
with ROUGE-2 MBR), with Flan-T5 replaced by a 6-layer encoder and decoder trained from scratch.
The representation losses are the paper's: Gaussian latent noise std 0.05, adversarial epsilon
0.05 (weight 0.15, the reference code's), SimCSE weight 0.2 at temperature 0.05.
"""

import ml_collections

from lsd.config import check_choice, parse_arg
from lsd.data.segments import default_segment_data_config
from lsd.parallel import default_mesh_config
from lsd.train.state import default_train_config

SIZES = {
  "test": dict(
    max_len=16,
    vocab_size=300,
    batch_size=8,
    ae=dict(
      d_encoder=32,
      encoder_layers=1,
      encoder_heads=2,
      num_latents=4,
      d_latent=8,
      compressor_layers=1,
      compressor_head_dim=16,
      d_model=32,
      reconstruct_layers=1,
      decoder_layers=1,
      n_heads=2,
      dropout=0.0,
    ),
    denoiser=dict(d_model=32, n_layers=2, n_heads=2, d_ff=0, dropout=0.0),
    ae_train=dict(steps=20, lr=1e-3, warmup_steps=2),
    diffusion_train=dict(steps=20, lr=1e-3, warmup_steps=2),
    sample_steps=8,
    num_beams=1,
    candidates=1,
  ),
  "tiny": dict(
    max_len=32,
    vocab_size=4096,
    batch_size=64,
    length_buckets=(16, 24),
    ae=dict(
      d_encoder=128,
      encoder_layers=2,
      encoder_heads=4,
      num_latents=8,
      d_latent=32,
      compressor_layers=3,
      compressor_head_dim=32,
      d_model=128,
      reconstruct_layers=2,
      decoder_layers=2,
      n_heads=4,
      dropout=0.0,
    ),
    denoiser=dict(d_model=128, n_layers=4, n_heads=4, d_ff=0, dropout=0.0),
    ae_train=dict(steps=2000, lr=1e-3, warmup_steps=100),
    diffusion_train=dict(steps=3000, lr=1e-3, warmup_steps=100, ema_decay=0.999, batch_size=64),
    sample_steps=100,
    candidates=1,
  ),
  "base": dict(
    max_len=64,
    vocab_size=8192,
    batch_size=64,
    length_buckets=(16, 32, 48),
    ae=dict(
      d_encoder=768,
      encoder_layers=6,
      encoder_heads=12,
      num_latents=64,
      d_latent=64,
      compressor_layers=3,
      compressor_head_dim=64,
      d_model=768,
      reconstruct_layers=3,
      decoder_layers=6,
      n_heads=12,
      dropout=0.1,
    ),
    denoiser=dict(d_model=768, n_layers=12, n_heads=12, d_ff=3072, dropout=0.1),
    ae_train=dict(steps=20_000, lr=1e-4, warmup_steps=500, b2=0.999),
    diffusion_train=dict(
      steps=100_000,
      lr=2e-4,
      warmup_steps=1000,
      weight_decay=1e-6,
      b2=0.999,
      ema_decay=0.9999,
      batch_size=64,
    ),
    sample_steps=250,
    candidates=3,
  ),
}
DATA = {
  "rocstories": dict(
    source="jsonl", segment_mode="sentences", max_segments=4, prompt_segments=1, max_source_len=64
  ),
  "dialogsum": dict(
    source="jsonl",
    text_field="summary",
    source_field="dialogue",
    segment_mode="sentences",
    max_segments=4,
    max_source_len=256,
  ),
}
# Latents -> text, as the reference decodes: 4 beams, repetition penalty 1.2, no repeated trigram.
DECODE = {
  "num_beams": 4,
  "length_penalty": 1.0,
  "repetition_penalty": 1.2,
  "no_repeat_ngram": 3,
  "min_new_tokens": 0,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(
    arg,
    {
      "stage": "ae",
      "size": "tiny",
      "data": "rocstories",
      "encoder": "scratch",
      "context": "minilm",
      "steps": 0,
    },
  )
  check_choice("stage", a["stage"], ["ae", "diffusion"])
  check_choice("size", a["size"], sorted(SIZES))
  check_choice("data", a["data"], sorted(DATA))
  check_choice("encoder", a["encoder"], ["scratch", "minilm"])
  check_choice("context", a["context"], ["minilm", "none"])
  size = SIZES[a["size"]]
  c = ml_collections.ConfigDict()
  c.method = {"ae": "sld_ae", "diffusion": "sld_diffusion"}[a["stage"]]
  c.seed = 0

  c.data = default_segment_data_config()
  c.data.update(DATA[a["data"]])
  c.data.max_len = c.data.seq_len = size["max_len"]  # T, tokens per segment with bos and eos
  c.data.batch_size = size["batch_size"]
  c.data.tokenizer.vocab_size = size["vocab_size"]
  c.data.eval_fraction = 0.05
  k = c.data.max_segments

  ae = dict(
    size["ae"],
    max_len=size["max_len"],
    encoder=a["encoder"],
    normalize_latents=True,
    word_dropout=0.0,
    latent_noise=0.0,  # LD4LG's uniform noise; SLD's is sld.latent_noise_std
    mlp="gelu",
    norm="layer",
    dtype="float32",
  )
  if a["encoder"] == "minilm":
    ae["d_encoder"] = 384
    ae["compressor_head_dim"] = 64 if ae["compressor_head_dim"] >= 64 else 32
    c.data.tokenizer.kind = "minilm"
  c.train = default_train_config()
  c.mesh = default_mesh_config()
  decode = dict(DECODE, num_beams=size.get("num_beams", DECODE["num_beams"]))
  if a["stage"] == "ae":
    # The autoencoder trains on single segments: batches grouped by length as LD4LG's sentences.
    c.data.length_buckets = size.get("length_buckets", ())
    c.model = ae
    c.train.update(size["ae_train"])
    c.sample = {"max_new_tokens": size["max_len"] - 1, "top_p": 0.0, "temperature": 1.0, **decode}
    c.sld = {
      "decoder_init": "",  # a causal-LM run whose weights start the decoder; "" = random
      "latent_noise_std": 0.05,  # Gaussian noise on the latents the decoder reads (0 = off)
      "adversarial_weight": 0.15,  # weight of the loss on adversarially moved latents (0 = off)
      "adversarial_epsilon": 0.05,  # L2 norm of each segment's adversarial move
      "contrastive_weight": 0.2,  # SimCSE in latent space (0 = off)
      "contrastive_temperature": 0.05,
      "contrastive_word_dropout": 0.1,  # encoder inputs masked in the positive view
    }
  else:
    train = dict(size["diffusion_train"])
    c.data.batch_size = train.pop("batch_size", c.data.batch_size)
    context = "" if a["context"] == "none" else a["context"]
    c.model = dict(
      size["denoiser"],
      num_latents=k * ae["num_latents"],
      num_segments=k,
      d_latent=ae["d_latent"],
      mlp="geglu",
      norm="layer",
      self_condition=True,
      num_classes=0,
      d_context=384 if context == "minilm" else 0,
      dtype="float32",
    )
    c.train.update(train)
    c.train.ema_warmup_power = 0.75
    c.sld = {
      "autoencoder_workdir": "",  # the stage-1 run
      "objective": "v",
      "self_condition_prob": 0.5,
      "cond_drop_prob": 0.1,  # the prompt / source dropped to the null context (CFG)
      "schedule_scale": 1.0,
      "context_encoder": context,
      "cache_latents": True,  # each text's K segments encoded once by the frozen stage-1 run
      "decoder_workdir": "",  # SLD has no decoder-tuning stage
      # The frozen decoder's cross-entropy of each segment read from x0_hat (the paper's L_cnv,
      # with gradient); 0 = off.
      "decoding_loss_weight": 0.0,
      "decoding_loss_t_max": 1.0,
    }
    c.sample = {
      "steps": size["sample_steps"],
      "sampler": "ddpm",
      "eta": 0.0,
      "guidance_scale": 2.0 if context else 1.0,  # the paper's CFG w
      "project": True,  # x0_hat onto the latents' sphere at every step
      "max_new_tokens": size["max_len"] - 1,
      "top_p": 0.0,
      "temperature": 1.0,
      "candidates": size["candidates"],  # per source; > 1: the ROUGE-2 MBR choice
      "mbr_metric": "rouge2",
      **decode,
    }
  if a["steps"]:
    c.train.steps = a["steps"]
  return c
