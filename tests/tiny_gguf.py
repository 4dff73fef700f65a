"""A tiny random-weight llama written as a GGUF file with the `gguf` package (quantised and fp32
tensors, tied or untied head, a byte-level BPE vocabulary of 262 tokens with SmolLM2's three
control tokens), shared by the GGUF import and DGLM decoder tests."""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, rope_base=500.0, eps=1e-5)
# Merges that build " the" and "he"; their tokens follow the specials and the 256 byte symbols.
MERGES = ["Ġ t", "h e", "Ġt he"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_symbols() -> list[str]:
  """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return [out[b] for b in range(256)]


def write_tiny_gguf(path, *, tied: bool, seed: int = 0) -> None:
  """Writes the tiny llama (`TINY` sizes, `SPECIALS` + byte symbols + the `MERGES` tokens) to
  `path`; bos = <|im_start|>, eos = pad = <|im_end|> (as SmolLM2-Instruct)."""
  tokens = SPECIALS + byte_symbols() + ["Ġt", "he", "Ġthe"]
  vocab, e, f = len(tokens), TINY["d_model"], TINY["d_ff"]
  hd = e // TINY["n_heads"]
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(TINY["n_layers"])
  w.add_context_length(256)
  w.add_embedding_length(e)
  w.add_feed_forward_length(f)
  w.add_head_count(TINY["n_heads"])
  w.add_head_count_kv(TINY["n_kv_heads"])
  w.add_rope_freq_base(TINY["rope_base"])
  w.add_rope_dimension_count(hd)
  w.add_layer_norm_rms_eps(TINY["eps"])
  w.add_vocab_size(vocab)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_merges(MERGES)
  w.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)

  def add(name, shape, quant=None, scale=0.2):
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if quant is None:
      w.add_tensor(name, x)
    else:
      w.add_tensor(name, gguf.quants.quantize(x, quant), raw_dtype=quant)

  add("token_embd.weight", (vocab, e), Q.Q8_0, scale=1.0)
  for i in range(TINY["n_layers"]):
    p = f"blk.{i}."
    add(p + "attn_norm.weight", (e,), scale=1.0)
    add(p + "attn_q.weight", (e, e), Q.Q4_1)
    add(p + "attn_k.weight", (TINY["n_kv_heads"] * hd, e), Q.Q8_0)
    add(p + "attn_v.weight", (TINY["n_kv_heads"] * hd, e))
    add(p + "attn_output.weight", (e, e), Q.Q4_1)
    add(p + "ffn_norm.weight", (e,), scale=1.0)
    add(p + "ffn_gate.weight", (f, e), Q.Q4_1)
    add(p + "ffn_up.weight", (f, e))
    add(p + "ffn_down.weight", (e, f), Q.Q8_0)
  add("output_norm.weight", (e,), scale=1.0)
  if not tied:
    add("output.weight", (vocab, e), Q.Q8_0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
