"""An independent float64 numpy llama forward pass straight from a GGUF file (test reference).

Written from the llama.cpp graph, not from lsd: weights stay in GGUF layout, q/k rows keep
llama.cpp's permutation and RoPE uses GGML's interleaved convention (dimensions 2i and 2i + 1 rotate
together). lsd converts the weights to "rotate half"; agreement checks that conversion.
Shared, with the probe texts below, by tests/test_llama_gguf.py and benchmarks/judge.py.
"""

from __future__ import annotations

import gguf
import numpy as np

# Short inputs for logit parity.
PARITY_TEXTS = ["Hello world.", "The quick brown fox", "Rain fell on the quiet town all night."]
# Plain English a judge must find far likelier than the same words in random order.
NATURAL_TEXTS = [
  "The cat sat on the mat and looked out of the window at the rain.",
  "She opened the door, smiled at her neighbour and went inside to make some tea.",
  "The government announced new measures to reduce traffic in the city centre.",
  "After a long day at work, he cooked dinner and read a book before going to bed.",
  "Scientists have discovered a new species of frog in the rainforests of South America.",
]


def shuffle_words(texts: list[str], seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.permutation(t.split())) for t in texts]


def read_llama_gguf(path) -> tuple[dict, dict[str, np.ndarray]]:
  """(hparams, float64 tensors by GGUF name in numpy [out, in] layout)."""
  reader = gguf.GGUFReader(path)

  def field(key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()

  hp = {
    "n_layers": field("llama.block_count"),
    "n_heads": field("llama.attention.head_count"),
    "n_kv_heads": field("llama.attention.head_count_kv"),
    "rope_base": field("llama.rope.freq_base", 10_000.0),
    "eps": field("llama.attention.layer_norm_rms_epsilon"),
  }
  tensors = {
    t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors
  }
  return hp, tensors


def _rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_interleaved(x, base):
  """x: [T, H, D]; GGML's LLAMA_ROPE_TYPE_NORM (adjacent pairs)."""
  t, _, d = x.shape
  theta = np.arange(t)[:, None] * base ** (-np.arange(0, d, 2) / d)  # T D/2
  cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = x0 * cos - x1 * sin
  out[..., 1::2] = x0 * sin + x1 * cos
  return out


def llama_logits(hp: dict, w: dict[str, np.ndarray], tokens) -> np.ndarray:
  """Logits [T, V] (float64) of one unpadded token sequence."""
  tokens = np.asarray(tokens)
  t = len(tokens)
  h, g = hp["n_heads"], hp["n_kv_heads"]
  x = w["token_embd.weight"][tokens]  # T E
  causal = np.tril(np.ones((t, t), bool))
  for i in range(hp["n_layers"]):
    p = f"blk.{i}."
    a = _rms_norm(x, w[p + "attn_norm.weight"], hp["eps"])
    q = (a @ w[p + "attn_q.weight"].T).reshape(t, h, -1)
    k = (a @ w[p + "attn_k.weight"].T).reshape(t, g, -1)
    v = (a @ w[p + "attn_v.weight"].T).reshape(t, g, -1)
    d = q.shape[-1]
    q, k = _rope_interleaved(q, hp["rope_base"]), _rope_interleaved(k, hp["rope_base"])
    # Query head j reads kv head j // (h / g).
    k, v = np.repeat(k, h // g, axis=1), np.repeat(v, h // g, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
    s = np.where(causal, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", s, v).reshape(t, -1)
    x = x + o @ w[p + "attn_output.weight"].T
    m = _rms_norm(x, w[p + "ffn_norm.weight"], hp["eps"])
    gate = m @ w[p + "ffn_gate.weight"].T
    m = (gate / (1 + np.exp(-gate))) * (m @ w[p + "ffn_up.weight"].T)
    x = x + m @ w[p + "ffn_down.weight"].T
  x = _rms_norm(x, w["output_norm.weight"], hp["eps"])
  head = w.get("output.weight", w["token_embd.weight"])
  return x @ head.T
