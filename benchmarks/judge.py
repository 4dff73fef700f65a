"""Judge LM (SmolLM2-135M-Instruct from GGUF): parity, sanity and scoring speed.

  python benchmarks/judge.py

Metrics: max |logit difference| against the float64 numpy llama in tests/llama_numpy_ref.py (which
reads the GGUF weights without lsd's conversion), generative perplexity of natural sentences vs the
same words shuffled (seeded), and scoring throughput (judge NLL of a [8, 128] batch, after warm-up).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import write_result  # noqa: E402
from llama_numpy_ref import (  # noqa: E402
  NATURAL_TEXTS,
  PARITY_TEXTS,
  llama_logits,
  read_llama_gguf,
  shuffle_words,
)

from lsd.convert.gguf import judge_gguf_path, load_judge  # noqa: E402
from lsd.eval.genppl import GenPPL  # noqa: E402

BATCH, LENGTH, REPEATS = 8, 128, 5


def logit_diff(model, tok) -> float:
  hp, weights = read_llama_gguf(judge_gguf_path())
  diffs = []
  for text in PARITY_TEXTS:
    ids = [0, *tok.encode(text).ids]
    ours = np.asarray(model.logits(np.array([ids])))[0]
    diffs.append(np.abs(ours - llama_logits(hp, weights, ids)).max())
  return float(max(diffs))


def tokens_per_s(model) -> float:
  tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (BATCH, LENGTH))
  valid = np.ones_like(tokens, bool)
  model.next_token_nll(tokens, valid).block_until_ready()  # compile
  start = time.perf_counter()
  for _ in range(REPEATS):
    model.next_token_nll(tokens, valid).block_until_ready()
  return BATCH * LENGTH * REPEATS / (time.perf_counter() - start)


def main() -> None:
  start = time.perf_counter()
  model, tok, cfg = load_judge()
  load_s = time.perf_counter() - start
  gen = GenPPL(model, tok)
  natural, shuffled = gen(NATURAL_TEXTS), gen(shuffle_words(NATURAL_TEXTS, seed=0))
  metrics = {
    "logit_max_abs_diff_vs_numpy": logit_diff(model, tok),
    "ppl_natural": natural["gen_ppl"],
    "ppl_shuffled": shuffled["gen_ppl"],
    "ppl_ratio": shuffled["gen_ppl"] / natural["gen_ppl"],
    "tokens_per_s": tokens_per_s(model),
    "load_s": load_s,
  }
  config = {
    "judge": model.name,
    "dtype": cfg.dtype,
    "genppl_bos_id": gen.bos_id,
    "n_natural": len(NATURAL_TEXTS),
    "shuffle_seed": 0,
    "parity_texts": PARITY_TEXTS,
    "throughput_batch": [BATCH, LENGTH],
    "throughput_repeats": REPEATS,
  }
  write_result("judge", metrics, config)


if __name__ == "__main__":
  main()
