"""Model sizes shared by the config files. `test` is for unit tests (seconds), `tiny` for a CPU
quickstart (minutes), `small` for CPU benchmarks, `base` for accelerators."""

import ml_collections

MODEL_SIZES = {
  "test": dict(
    d_model=32, n_layers=2, n_heads=4, seq_len=32, batch_size=8, vocab_size=512, steps=20, lr=1e-3
  ),
  "tiny": dict(
    d_model=128,
    n_layers=4,
    n_heads=4,
    seq_len=128,
    batch_size=16,
    vocab_size=4096,
    steps=600,
    lr=1e-3,
  ),
  "small": dict(
    d_model=256,
    n_layers=6,
    n_heads=8,
    seq_len=128,
    batch_size=32,
    vocab_size=8192,
    steps=3000,
    lr=6e-4,
  ),
  "base": dict(
    d_model=768,
    n_layers=12,
    n_heads=12,
    seq_len=1024,
    batch_size=512,
    vocab_size=50304,
    steps=100_000,
    lr=3e-4,
  ),
}


def model_config(size: str) -> ml_collections.ConfigDict:
  if size not in MODEL_SIZES:
    raise ValueError(f"size={size!r} is not a known model size; accepted: {sorted(MODEL_SIZES)}")
  s = MODEL_SIZES[size]
  return ml_collections.ConfigDict(
    {
      "d_model": s["d_model"],
      "n_layers": s["n_layers"],
      "n_heads": s["n_heads"],
      "n_kv_heads": 0,
      "head_dim": 0,
      "d_ff": 0,
      "mlp": "swiglu",
      "norm": "rms",
      "norm_eps": 1e-6,
      "rope_base": 10_000.0,
      "learned_pos": 0,
      "qk_norm": False,
      "use_bias": False,
      "tie_embeddings": True,
      "dropout": 0.0,
      "dtype": "float32",
      # Activation rematerialisation per block: "none", "full" (keep only block inputs) or
      # "dots_saveable" (keep matmul outputs without batch dims): memory for recompute.
      "remat": "none",
      # Embedding / output rows rounded up to a multiple of this: 128 for accelerator sizes
      # (lane-aligned matmuls, e.g. GPT-2's 50,257 tokens -> 50,304); 1 keeps CPU sizes exact.
      "vocab_multiple": 128 if size == "base" else 1,
    }
  )


# Corpora: `bbc` installs from PyPI on any machine; the others read a local file given with
# --config.data.path (the launch command in each config's docstring shows how).
DATA_PRESETS = {
  "bbc": dict(source="bbc"),
  "rocstories": dict(source="jsonl", text_field="text"),
  "wikitext2": dict(source="text", text_split="line"),
  "text": dict(source="text", text_split="line"),
}


def data_preset(name: str) -> ml_collections.ConfigDict:
  from lsd.data import default_data_config

  if name not in DATA_PRESETS:
    raise ValueError(
      f"data={name!r} is not a known corpus preset; accepted: {sorted(DATA_PRESETS)}"
    )
  cfg = default_data_config()
  cfg.update(DATA_PRESETS[name])
  return cfg
