"""Judge LM (SmolLM2-135M-Instruct from GGUF): parity, sanity and scoring speed.

  python benchmarks/judge.py [--data_dir ../shared/data]

Metrics: max |logit difference| against the float64 numpy llama in tests/llama_numpy_ref.py (which
reads the GGUF weights without lsd's conversion), generative perplexity of natural sentences vs the
same words shuffled (seeded), the forward's throughput (judge NLL of a [8, 128] batch, after
warm-up: `tokens_per_s`), and the scoring throughput that benchmarks see: GenPPL.per_sample of
512 Yelp review sentences (the LD4LG benchmark's sample count and max_len 64), in real (unpadded)
tokens per second, packed several texts to a row (`scoring_tokens_per_s`) and one text per row
padded to a power-of-two length bucket (`scoring_tokens_per_s_unpacked`, GenPPL's algorithm before
packing), with the largest per-sample difference between the two.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import RESULTS_DIR, write_result  # noqa: E402
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


def unpacked_nlls(gen: GenPPL, texts: list[str], rows: int) -> list[np.ndarray]:
  """Per-token NLLs the way GenPPL scored before packing: texts sorted by length, `rows` per call,
  each padded to the power of two (at least 32) that holds the longest in its call."""
  ids = gen.encode(texts)
  out = [np.zeros(0)] * len(ids)
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  for start in range(0, len(order), rows):
    chunk = order[start : start + rows]
    length = min(gen.max_len, max(32, 1 << (max(len(ids[i]) for i in chunk) - 1).bit_length()))
    tokens = np.full((rows, length), gen.pad_id, np.int32)
    valid = np.zeros((rows, length), bool)
    for r, i in enumerate(chunk):
      tokens[r, : len(ids[i])], valid[r, : len(ids[i])] = ids[i], True
    nll = np.asarray(gen.judge.next_token_nll(tokens, valid), np.float64)
    for r, i in enumerate(chunk):
      out[i] = nll[r, : len(ids[i]) - 1]
  return out


def scoring(model, tok, texts: list[str], repeats: int = 2) -> dict:
  """Real tokens per second of scoring `texts` packed and unpacked (after a warm-up call of each,
  which compiles), the two interleaved, and the largest per-sample PPL difference."""
  gen = GenPPL(model, tok, max_len=64, batch_size=32)
  n_tokens = sum(len(x) for x in gen.encode(texts))
  runs = {
    "packed": lambda: [math.exp(n.mean()) for n in gen.token_nlls(texts) if n.size],
    "unpacked": lambda: [math.exp(n.mean()) for n in unpacked_nlls(gen, texts, 32) if n.size],
  }
  values = {name: run() for name, run in runs.items()}
  best = {name: math.inf for name in runs}
  for rep in range(repeats):
    for name in runs if rep % 2 == 0 else reversed(list(runs)):
      start = time.perf_counter()
      runs[name]()
      best[name] = min(best[name], time.perf_counter() - start)
  diff = max(abs(a - b) for a, b in zip(values["packed"], values["unpacked"], strict=True))
  return {
    "scoring_tokens_per_s": n_tokens / best["packed"],
    "scoring_tokens_per_s_unpacked": n_tokens / best["unpacked"],
    "scoring_speedup": best["unpacked"] / best["packed"],
    "scoring_max_abs_ppl_diff": diff,
    "scoring_n_texts": len(texts),
    "scoring_n_tokens": n_tokens,
  }


def main() -> None:
  p = argparse.ArgumentParser(description="judge parity, sanity and speed")
  p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
  args = p.parse_args()
  yelp = Path(args.data_dir) / "yelp" / "sentiment.dev.1"
  if not yelp.is_file():
    sys.exit(f"--data_dir={args.data_dir} has no yelp/sentiment.dev.1 (the shared corpora)")
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
    **scoring(model, tok, yelp.read_text().splitlines()[:512]),
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
    "scoring": "GenPPL(max_len=64, batch_size=32).per_sample of yelp sentiment.dev.1[:512], "
    "best of 2 interleaved calls after a warm-up",
  }
  old = RESULTS_DIR / "judge.json"
  if old.is_file():  # the figures of the run this one replaces, for comparison
    before = json.loads(old.read_text())
    keep = ("tokens_per_s", "scoring_tokens_per_s")
    metrics["previous"] = {
      **{k: before["metrics"][k] for k in keep if k in before["metrics"]},
      "git_commit": before.get("git_commit"),
      "date": before.get("date"),
    }
  write_result("judge", metrics, config)


if __name__ == "__main__":
  main()
