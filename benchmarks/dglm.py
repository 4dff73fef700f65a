"""DGLM at CPU scale: Yelp prefix -> continuation, against the same decoder trained as a plain
causal LM; sentiment control against FUDGE, sentiment x topic composition, sampling cost.

    python benchmarks/dglm.py [--data_dir ../shared/data] [--workdir runs/bench/dglm]
    python benchmarks/dglm.py --steps 10 --test_prefixes 16 --result dglm_smoke   # a smoke run

Protocol (issue "DGLM", item 4):
- Data: the Yelp review sentences (`<data_dir>/yelp/sentiment.dev.{0,1}`, label 0 negative, 1
  positive), split 95/5 by a seeded permutation (seed 0); the training split is written to
  `<workdir>/data/yelp_train.{0,1}` and is all any run trains on. Training rows are cut at the
  library's seeded random word boundary (`lsd.methods.dglm.split_prefixes`); the test items are
  held-out sentences of >= 6 words (a seeded permutation), prefix = the first 4 words,
  continuation = the rest. --test_prefixes (500) of them are scored; the next --classifier_real
  (1000) held-out sentences measure the judge classifier on real text.
- Runs (configs/dglm.py, size tiny): the diffusion stage (MiniLM embedding proposals, 100 DDPM
  steps), the decoder stage on its statistics (soft prompts, nucleus p = 0.9, up to 32 tokens),
  and the AR baseline: configs/causal_lm.py with the decoder's model fields, tokenizer and
  optimiser settings, trained on the same sentences ([bos] sentence [eos], packed, 64 x 32 tokens
  per batch like the decoder's 32 x 64), continuing [bos] prefix with nucleus p = 0.9.
- Budgets: --diff_minutes (20) + --dec_minutes (20) + --ar_minutes (= the decoder's) = 60 minutes
  of this machine, each converted to steps by an 80-step probe of its config
  (`lsd.train.sweep.steps_for_minutes`), so other load changes wall time only. --steps N trains
  every run for N steps instead (smoke runs, which also shrink the data and classifier sets).
- Fluency (unguided DGLM, i.e. guidance scale 0, and the plain AR decoder) on the test prefixes:
  gen-PPL of the continuation given its prefix under the judge (SmolLM2-135M, per-sample mean),
  MAUVE of the continuations against the held-out true continuations on judge features, dist-2 and
  the mean unigram entropy of the continuations' token ids (the shared tokenizer).
- Diagnostics (`diagnostics`): the cosine of each unguided proposal with the true continuation's
  embedding (and, as a floor, of each true embedding with another item's), the judge's median
  gen-PPL of both fluency sets, and an oracle row: the decoder fed the true continuation's
  embedding instead of a proposal, scored as the fluency sets. Together they say which stage
  limits DGLM's fluency. `guided_proposals.<scale>`: the guiding classifier's mean probability of
  the target on the proposals of each control set, and their cosine with the unguided proposals
  (does guidance move the proposals, and does the decoder carry the move into the text?).
- Control: half the prefixes (alternating) get target positive, the others negative. The judge
  classifier is LD4LG's: a logistic regression (C = 1) on the judge's mean-pooled hidden states
  fitted on a balanced SST-2 subset (--sst2_per_class sentences >= 6 words per class); a sample
  counts when the classifier gives the prefix + continuation its target.
  `control.classifier_acc_real` is its accuracy on real held-out Yelp sentences (the ceiling).
  DGLM guides its proposals with a logistic classifier on MiniLM embeddings fitted on the same
  SST-2 subset (`save_attribute_classifier`), at scales 0, 1, 3, 10. The AR baseline is FUDGE
  (`lsd.sampling.fudge`): the top-50 next tokens reweighted by a bag-of-tokens logistic
  regression (the decoder tokenizer's ids, C = 1) fitted on the same SST-2 subset, at strengths
  --fudge_strengths; `control.fudge` is the strength whose gen-PPL is closest (in log) to DGLM's at
  --compare_scale (3), all strengths under `control.fudge_sweep`.
- Composition: sentiment x topic, the topic a 4-class logistic classifier on MiniLM embeddings
  fitted on AG News (test.csv, --agnews_per_class items per class; World, Sports, Business,
  Sci/Tech). Targets: sentiment as above, topic cycling over the 4 classes. At
  --composition_scale (3): `both` = the rate of samples meeting both targets when guided by both,
  `sentiment_only` / `topic_only` = the rate meeting that target when guided by it alone. No
  independent topic judge exists here, so topic is checked by the same MiniLM AG News classifier
  that guides (on the prefix + continuation): the topic rates are not independent of the guide.
- Cost: sampling seconds per continuation (unguided DGLM: proposals and decoding; plain AR), the
  whole pass over the test prefixes divided by their number (compilation included in both).
- Claims: control_beats_baseline (DGLM at --compare_scale has a higher accuracy than the matched
  FUDGE strength and a gen-PPL no higher than it), fluency_kept (DGLM's MAUVE at least the AR
  decoder's minus 0.05). Paired bootstraps (2,000 resamples) of accuracy and log gen-PPL go with
  them.

Every stage is resumable: runs train once in <workdir>/runs/<name>-<digest of the config>, the
sample sets are cached in <workdir>/cache, judge features in <workdir>/judge_features, the
classifiers in <workdir>/classifiers, the corpus's MiniLM embeddings (`dglm.embedding_cache`,
shared by the probes and both stages) in <workdir>/embeddings. The result file is written (atomically) after control and
again after composition. Not yet run at full size: 60 minutes of training plus probes, about 20
sample sets of 500 continuations and their judge scoring; expect about two hours of a 2-core CPU.
A smoke run (--steps 10 --test_prefixes 16) takes about 18 CPU minutes, most of it compilation,
MiniLM embeddings of the classifier sets and judge features.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import cached, cached_features, log, train_seconds, write_result

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
sys.path.insert(0, str(REPO))

from ld4lg import sst2  # noqa: E402  (the SST-2 subset LD4LG's judge classifier is fitted on)

from lsd import api  # noqa: E402
from lsd.config import load_config_file  # noqa: E402
from lsd.convert.encoders import frozen_encoder  # noqa: E402
from lsd.diffusion.attribute_guidance import load_classifier  # noqa: E402
from lsd.eval.genppl import GenPPL  # noqa: E402
from lsd.eval.metrics import (  # noqa: E402
  LinearProbe,
  dist_n,
  mauve,
  mean_unigram_entropy,
  paired_bootstrap,
)
from lsd.fileio import atomic_write_text  # noqa: E402
from lsd.methods.dglm import classifier_from_probe, embed_texts, save_attribute_classifier  # noqa: E402
from lsd.sampling.autoregressive import generate  # noqa: E402
from lsd.sampling.fudge import TokenClassifier, fudge_generate  # noqa: E402
from lsd.train import sweep  # noqa: E402
from lsd.train.sweep import quiet  # noqa: E402

SCALES = (0, 1, 3, 10)
SENTIMENT = ["negative", "positive"]
TOPICS = ["world", "sports", "business", "scitech"]  # AG News classes 1..4
PREFIX_WORDS, MIN_WORDS = 4, 6
PATH_FIELDS = ("dglm.diffusion_workdir", "dglm.decoder_init", "dglm.embedding_cache")
FUDGE_TOP_K = 50
# Smoke runs (--steps): smaller data and classifier sets unless the flags are given.
SMOKE = {
  "train_sentences": 3000,
  "sst2_per_class": 150,
  "agnews_per_class": 60,
  "classifier_real": 200,
}
FULL = {
  "train_sentences": 0,
  "sst2_per_class": 2000,
  "agnews_per_class": 1500,
  "classifier_real": 1000,
}


# ------------------------------------------------------------------------------------------ data
def write_yelp(data_dir: Path, out: Path, max_train: int) -> tuple[str, list[dict]]:
  """The 95/5 split (seed 0) of the Yelp sentences: the training files' glob (one file per label,
  at most `max_train` sentences in all when > 0) and the held-out sentences {"text", "label"} in
  the permutation's order."""
  rows = []
  for label in (0, 1):
    lines = (data_dir / "yelp" / f"sentiment.dev.{label}").read_text().splitlines()
    rows += [{"text": " ".join(x.split()), "label": label} for x in lines if x.strip()]
  perm = np.random.default_rng(0).permutation(len(rows))
  n_test = round(0.05 * len(rows))
  held = [rows[i] for i in perm[:n_test]]
  train = perm[n_test:][:max_train] if max_train else perm[n_test:]
  out.mkdir(parents=True, exist_ok=True)
  for label in (0, 1):
    text = "".join(rows[i]["text"] + "\n" for i in sorted(train) if rows[i]["label"] == label)
    atomic_write_text(out / f"yelp_train.{label}", text)
  return str(out / "yelp_train.*"), held


def test_items(held: list[dict], n: int) -> list[dict]:
  """The first `n` held-out sentences of >= MIN_WORDS words as {"prefix", "reference", "text",
  "label", "sentiment", "topic"}: the first PREFIX_WORDS words, the rest; the sentiment target
  alternates (positive first), the topic target cycles every two items."""
  out = []
  for d in held:
    words = d["text"].split()
    if len(words) < MIN_WORDS:
      continue
    i = len(out)
    out.append(
      {
        **d,
        "prefix": " ".join(words[:PREFIX_WORDS]),
        "reference": " ".join(words[PREFIX_WORDS:]),
        "sentiment": 1 - i % 2,
        "topic": (i // 2) % len(TOPICS),
      }
    )
    if len(out) == n:
      break
  return out


def agnews(data_dir: Path, per_class: int) -> tuple[list, list, list, list]:
  """AG News test.csv: `per_class` items per class (seeded) to fit on, the rest held out; the text
  is "title. description", labels 0..3."""
  with open(data_dir / "agnews" / "test.csv", newline="") as f:
    rows = [(f"{r[1]}. {r[2]}".replace("\\", " "), int(r[0]) - 1) for r in csv.reader(f)]
  rng, fit, rest = np.random.default_rng(0), [], []
  for c in range(len(TOPICS)):
    idx = [i for i, r in enumerate(rows) if r[1] == c]
    pick = set(rng.choice(idx, per_class, replace=False).tolist())
    fit += [rows[i] for i in idx if i in pick]
    rest += [rows[i] for i in idx if i not in pick]
  return [t for t, _ in fit], [y for _, y in fit], [t for t, _ in rest], [y for _, y in rest]


# --------------------------------------------------------------------------------------- configs
def dglm_configs(train_glob: str, classifiers: dict, embeddings: Path) -> tuple:
  diff = load_config_file(f"{CONFIGS}/dglm.py:size=tiny")
  dec = load_config_file(f"{CONFIGS}/dglm.py:size=tiny,stage=decoder")
  for c in (diff, dec):
    c.data.path = train_glob
    c.dglm.embedding_cache = str(embeddings)  # the probes and both stages embed the corpus once
  dec.dglm.classifiers = [
    {"name": name, "path": str(path), "target": "0", "scale": 0.0}
    for name, path in classifiers.items()
  ]
  return diff, dec


def ar_config(dec):
  """The causal LM baseline: the decoder's model fields, vocabulary size, data and optimiser."""
  c = load_config_file(f"{CONFIGS}/causal_lm.py:size=tiny,data=text")
  c.data.update(path=dec.data.path, eval_fraction=dec.data.eval_fraction)
  c.data.seq_len, c.data.batch_size = 2 * dec.data.max_len, dec.data.batch_size // 2
  c.data.tokenizer.vocab_size = dec.data.tokenizer.vocab_size
  c.model = copy.deepcopy(dec.model)
  c.train = copy.deepcopy(dec.train)
  return c


def train(root: Path, name: str, cfg, minutes: float, args, tokenizer=None) -> tuple[Path, int]:
  """Trains `cfg` for --steps or the steps that fit `minutes` (an 80-step probe); (run, steps)."""
  kw = dict(tokenizer=tokenizer, path_fields=PATH_FIELDS, log=log)
  steps = args.steps or sweep.steps_for_minutes(api.train, cfg, root, name, minutes, **kw)
  run = sweep.train_once(
    api.train, quiet(cfg, steps, max(1, min(100, steps // 4))), root, name, **kw
  )
  return run, steps


# ---------------------------------------------------------------------------------- classifiers
def fit_classifiers(data_dir: Path, folder: Path, enc, args) -> dict:
  """The MiniLM guidance classifiers (sentiment on SST-2, topic on AG News), saved in `folder`
  once; their held-out accuracies."""
  folder.mkdir(parents=True, exist_ok=True)
  info_file = folder / "info.json"
  paths = {
    "sentiment": folder / "sst2_minilm.safetensors",
    "topic": folder / "agnews_minilm.safetensors",
  }
  if info_file.exists() and all(p.exists() for p in paths.values()):
    return {"paths": paths, **json.loads(info_file.read_text())}
  x_tr, y_tr, x_dev, y_dev = sst2(data_dir, args.sst2_per_class)
  sent, _ = save_attribute_classifier(paths["sentiment"], enc, x_tr, y_tr, SENTIMENT)
  a_tr, b_tr, a_te, b_te = agnews(data_dir, args.agnews_per_class)
  topic, _ = save_attribute_classifier(paths["topic"], enc, a_tr, b_tr, TOPICS)
  every = max(1, len(a_te) // 1000)  # about 1,000 held-out items score the topic classifier
  acc = lambda clf, x, y: float(
    np.mean(np.argmax(np.asarray(clf.log_probs(embed_texts(enc, x))), -1) == np.asarray(y))
  )
  info = {
    "minilm_sentiment_acc_sst2_dev": acc(sent, x_dev, y_dev),
    "minilm_topic_acc_agnews_held_out": acc(topic, a_te[::every], b_te[::every]),
    "agnews_held_out": len(a_te[::every]),
  }
  atomic_write_text(info_file, json.dumps(info))
  log(f"guidance classifiers: {info}")
  return {"paths": paths, **info}


def token_counts(tok, texts: list[str], vocab: int) -> np.ndarray:
  x = np.zeros((len(texts), vocab), np.float32)
  for i, t in enumerate(texts):
    np.add.at(x[i], tok.encode(t), 1.0)
  return x


def fudge_classifier(tok, vocab: int, texts: list[str], labels: list[int]) -> TokenClassifier:
  """A bag-of-tokens logistic regression (C = 1) on token counts, as FUDGE's `TokenClassifier`."""
  probe = LinearProbe(c=1.0, max_iter=2000).fit(token_counts(tok, texts, vocab), labels)
  clf = classifier_from_probe(probe)
  return TokenClassifier.from_linear(clf.weight, clf.bias)


# -------------------------------------------------------------------------------------- sampling
def by_length(tok, prefixes: list[str], chunk: int):
  """(indices, padded indices) per group of prefixes of one token length, `chunk` rows each (the
  last group of a length padded with its last index: one compiled shape per length)."""
  lengths = [len(tok.encode(p)) for p in prefixes]
  for n in sorted(set(lengths)):
    idx = [i for i, m in enumerate(lengths) if m == n]
    for s in range(0, len(idx), chunk):
      part = idx[s : s + chunk]
      yield n * 100_000 + s, part, part + [part[-1]] * (chunk - len(part))


def dglm_sample(run, key, items: list[dict], groups: list, chunk: int) -> dict:
  """DGLM continuations of the items' prefixes: `groups` is [(item indices, attributes)], one
  proposal call each (attributes: [(classifier, target, scale)], [] = unguided); decoding in
  fixed-size length groups."""
  t0 = time.perf_counter()
  k_prop, k_dec = jax.random.split(key)
  props = propose_all(run, k_prop, items, groups)
  rec = decode_all(run, k_dec, items, props, chunk)
  return {**rec, "seconds": time.perf_counter() - t0}


def propose_all(run, key, items: list[dict], groups: list) -> np.ndarray:
  """The diffusion run's unit-norm proposals [N, E] for the items' prefixes, one call per group."""
  task, prefixes = run.task, [d["prefix"] for d in items]
  props = np.zeros((len(items), task.encoder().width), np.float32)
  for g, (idx, attributes) in enumerate(groups):
    if idx:
      p = task.propose(jax.random.fold_in(key, g), [prefixes[i] for i in idx], attributes)
      props[idx] = np.asarray(p)
  return props


def decode_all(run, key, items: list[dict], props: np.ndarray, chunk: int) -> dict:
  """The decoder's continuations of the items' prefixes under embeddings `props` [N, E]."""
  task, model, k_dec = run.task, run.model(), key
  prefixes = [d["prefix"] for d in items]
  t0 = time.perf_counter()
  out = [None] * len(items)
  for k, part, padded in by_length(run.tokenizer, prefixes, chunk):
    recs = task.continue_texts(
      model, jax.random.fold_in(k_dec, k), [prefixes[i] for i in padded], jnp.asarray(props[padded])
    )
    for i, r in zip(part, recs, strict=False):
      out[i] = r
  return {
    "texts": [r["text"] for r in out],
    "tokens": [r["tokens"] for r in out],
    "seconds": time.perf_counter() - t0,
  }


def ar_sample(run, key, items: list[dict], chunk: int, max_new: int, fudge=None) -> dict:
  """AR continuations of [bos] prefix (nucleus p = 0.9): plain, or FUDGE with `fudge` =
  (TokenClassifier, strength) towards each item's sentiment target."""
  tok = run.tokenizer
  prefixes = [d["prefix"] for d in items]
  targets = np.array([d["sentiment"] for d in items], np.int32)
  out = [None] * len(items)
  t0 = time.perf_counter()
  for k, part, padded in by_length(tok, prefixes, chunk):
    prompt = jnp.asarray([[tok.bos_id, *tok.encode(prefixes[i])] for i in padded], jnp.int32)
    kw = dict(max_new_tokens=max_new, top_p=0.9, temperature=1.0)
    if fudge is None:
      toks = generate(run.graphdef, run.params, jax.random.fold_in(key, k), prompt, **kw)
    else:
      clf, strength = fudge
      toks = fudge_generate(
        run.graphdef,
        run.params,
        jax.random.fold_in(key, k),
        prompt,
        clf,
        jnp.asarray(targets[padded]),
        strength=jnp.float32(strength),
        top_k=FUDGE_TOP_K,
        **kw,
      )
    for i, row in zip(part, np.asarray(jax.device_get(toks)).tolist(), strict=False):
      out[i] = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
  return {"texts": [tok.decode(r) for r in out], "tokens": out, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------- scoring
class Scorer:
  """Judge gen-PPL, MAUVE features and the judge's SST-2 sentiment classifier (cached features)."""

  def __init__(self, data_dir: Path, feature_dir: Path, args):
    self.judge = GenPPL(max_len=64, batch_size=32)
    self.features = functools.partial(cached_features, self.judge, feature_dir)
    x_tr, y_tr, x_dev, y_dev = sst2(data_dir, args.sst2_per_class)
    self.probe = LinearProbe(c=1.0).fit(self.features(x_tr), y_tr)
    self.acc_sst2_dev = self.accuracy(x_dev, y_dev)
    self.memo = {}  # (texts, items) -> `control`'s scores

  def sentiment(self, texts: list[str]) -> np.ndarray:
    return self.probe.predict(self.features(texts))

  def accuracy(self, texts, labels) -> float:
    return float(np.mean(self.sentiment(texts) == np.asarray(labels)))

  def control(self, rec: dict, items: list[dict]) -> tuple[dict, dict]:
    """({acc, gen_ppl, ...}, per-item {correct, log_ppl}) of a sample set against the items'
    sentiment targets."""
    memo = (tuple(rec["texts"]), tuple((d["prefix"], d["sentiment"]) for d in items))
    if memo not in self.memo:
      self.memo[memo] = self._control(rec, items)
    return self.memo[memo]

  def _control(self, rec: dict, items: list[dict]) -> tuple[dict, dict]:
    prefixes, texts = [d["prefix"] for d in items], rec["texts"]
    ppl = np.array(self.judge.conditional_per_sample(prefixes, texts))
    full = [f"{p} {t}" for p, t in zip(prefixes, texts, strict=True)]
    correct = (self.sentiment(full) == np.array([d["sentiment"] for d in items])).astype(float)
    m = {
      "acc": float(correct.mean()),
      "gen_ppl": float(np.nanmean(ppl)),
      "gen_ppl_median": float(np.nanmedian(ppl)),
      "n": len(texts),
      "empty": sum(not t.strip() for t in texts),
    }
    return m, {"correct": correct, "log_ppl": np.log(ppl)}

  def fluency(self, rec: dict, items: list[dict], ref_feats) -> dict:
    return {
      "gen_ppl": self.control(rec, items)[0]["gen_ppl"],
      "mauve": mauve(ref_feats, self.features(rec["texts"])),
      "dist_2": dist_n(rec["texts"], 2),
      "entropy": mean_unigram_entropy(rec["tokens"]),
      "n": len(rec["texts"]),
    }


def bootstrap(a: np.ndarray, b: np.ndarray) -> dict:
  d = paired_bootstrap(a, b)
  return {**d, "exceeds_spread": bool(d["low"] > 0 or d["high"] < 0)}


def topic_hits(enc, clf, items: list[dict], rec: dict) -> np.ndarray:
  full = [f"{d['prefix']} {t}" for d, t in zip(items, rec["texts"], strict=True)]
  pred = np.argmax(np.asarray(clf.log_probs(embed_texts(enc, full))), -1)
  return pred == np.array([d["topic"] for d in items])


# ------------------------------------------------------------------------------------------ main
def main():
  p = argparse.ArgumentParser()
  p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
  p.add_argument("--workdir", default="runs/bench/dglm")
  # Minutes of training on this machine (an 80-step probe converts them to steps); 60 in all.
  p.add_argument("--diff_minutes", type=float, default=20.0)
  p.add_argument("--dec_minutes", type=float, default=20.0)
  p.add_argument("--ar_minutes", type=float, default=None, help="default: --dec_minutes")
  p.add_argument("--steps", type=int, default=0, help="every run this many steps (smoke runs)")
  p.add_argument("--test_prefixes", type=int, default=500)
  p.add_argument("--train_sentences", type=int, default=None, help="0 = the whole split")
  p.add_argument("--sst2_per_class", type=int, default=None)
  p.add_argument("--agnews_per_class", type=int, default=None)
  p.add_argument("--classifier_real", type=int, default=None)
  p.add_argument("--fudge_strengths", default="1,3,10")
  p.add_argument("--compare_scale", type=float, default=3.0, choices=[1.0, 3.0, 10.0])
  p.add_argument("--composition_scale", type=float, default=3.0)
  p.add_argument("--chunk", type=int, default=64, help="prefixes per decoding call")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--result", default="dglm", help="benchmarks/results/<result>.json")
  args = p.parse_args()
  if not args.result.replace("_", "").isalnum():
    p.error(f"--result={args.result!r}: letters, digits and _ only (a file name)")
  for k, v in (SMOKE if args.steps else FULL).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  ar_minutes = args.dec_minutes if args.ar_minutes is None else args.ar_minutes
  strengths = [float(x) for x in args.fudge_strengths.split(",")]
  data_dir, workdir = Path(args.data_dir), Path(args.workdir)
  for folder in ("yelp", "sst2", "agnews"):
    if not (data_dir / folder).is_dir():
      sys.exit(f"--data_dir={data_dir} has no {folder}/ folder (the shared corpora)")
  cache, root = workdir / "cache", workdir / "runs"
  cache.mkdir(parents=True, exist_ok=True)

  train_glob, held = write_yelp(data_dir, workdir / "data", args.train_sentences)
  items = test_items(held, args.test_prefixes)
  used = {d["text"] for d in items}
  real = [d for d in held if d["text"] not in used][: args.classifier_real]
  enc = frozen_encoder("minilm")
  clfs = fit_classifiers(data_dir, workdir / "classifiers", enc, args)

  # Training: diffusion, decoder on its statistics, the AR baseline on the decoder's tokenizer.
  diff_cfg, dec_cfg = dglm_configs(train_glob, clfs["paths"], workdir / "embeddings")
  runs, steps = {}, {}
  runs["diffusion"], steps["diffusion"] = train(
    root, "dglm_diff", diff_cfg, args.diff_minutes, args
  )
  dec_cfg.dglm.diffusion_workdir = str(runs["diffusion"])
  runs["decoder"], steps["decoder"] = train(root, "dglm_dec", dec_cfg, args.dec_minutes, args)
  ar_cfg = ar_config(dec_cfg)
  tokenizer = runs["decoder"] / "tokenizer.json"
  runs["ar"], steps["ar"] = train(root, "ar", ar_cfg, ar_minutes, args, tokenizer=tokenizer)

  # Sampling (cached per set).
  dec, ar = api.load(runs["decoder"]), api.load(runs["ar"])
  tok, n = dec.tokenizer, len(items)
  chunk, max_new = min(args.chunk, n), int(dec_cfg.sample.max_new_tokens)
  key = jax.random.key(args.seed)
  pos = [i for i, d in enumerate(items) if d["sentiment"] == 1]
  neg = [i for i, d in enumerate(items) if d["sentiment"] == 0]

  def sentiment_groups(scale):
    if not scale:
      return [(list(range(n)), [])]
    return [(pos, [("sentiment", "positive", scale)]), (neg, [("sentiment", "negative", scale)])]

  dglm = {
    s: cached(
      cache / f"dglm_s{s:g}.json",
      lambda s=s: dglm_sample(dec, jax.random.fold_in(key, 1), items, sentiment_groups(s), chunk),
    )
    for s in SCALES
  }
  plain = cached(
    cache / "ar.json", lambda: ar_sample(ar, jax.random.fold_in(key, 2), items, chunk, max_new)
  )
  sst_x, sst_y, _, _ = sst2(data_dir, args.sst2_per_class)
  fudge_clf = fudge_classifier(tok, tok.vocab_size, sst_x, sst_y)
  fudge = {
    s: cached(
      cache / f"fudge_{s:g}.json",
      lambda s=s: ar_sample(
        ar, jax.random.fold_in(key, 3), items, chunk, max_new, fudge=(fudge_clf, s)
      ),
    )
    for s in strengths
  }

  # Scoring: fluency and control.
  scorer = Scorer(data_dir, workdir / "judge_features", args)
  ref_feats = scorer.features([d["reference"] for d in items])
  fluency = {
    "dglm": scorer.fluency(dglm[0], items, ref_feats),
    "ar": scorer.fluency(plain, items, ref_feats),
  }
  log(f"fluency: {fluency}")
  # Where DGLM's errors come from: the proposals against the true continuations' embeddings
  # (the unguided set's own proposals: the same key), and the decoder fed those true embeddings
  # (an oracle proposal), scored like the others.
  truth = dec.task.embeddings([d["reference"] for d in items])
  k1 = jax.random.fold_in(key, 1)
  props0 = propose_all(dec, jax.random.split(k1)[0], items, sentiment_groups(0))
  cos = np.sum(props0 * truth, -1)
  pairs = np.sum(truth * np.roll(truth, 1, axis=0), -1)  # each item against another's truth
  oracle = cached(
    cache / "oracle.json", lambda: decode_all(dec, jax.random.fold_in(key, 4), items, truth, chunk)
  )
  diagnostics = {
    "proposal_cosine": {"mean": float(cos.mean()), "median": float(np.median(cos))},
    "other_item_cosine": {"mean": float(pairs.mean()), "median": float(np.median(pairs))},
    "oracle": {
      **scorer.fluency(oracle, items, ref_feats),
      "gen_ppl_median": scorer.control(oracle, items)[0]["gen_ppl_median"],
    },
    "gen_ppl_median": {
      "dglm": scorer.control(dglm[0], items)[0]["gen_ppl_median"],
      "ar": scorer.control(plain, items)[0]["gen_ppl_median"],
    },
  }
  # The guided proposals (the same keys as the dglm_s<scale> sets): the guiding classifier's
  # probability of each item's target, and how far guidance moved them from the unguided ones.
  sent_clf, sent_classes = load_classifier(clfs["paths"]["sentiment"])
  col = np.array([list(sent_classes).index(SENTIMENT[d["sentiment"]]) for d in items])
  diagnostics["guided_proposals"] = {}
  for s in SCALES:
    props = propose_all(dec, jax.random.split(k1)[0], items, sentiment_groups(s))
    lp = np.asarray(sent_clf.log_probs(props))
    diagnostics["guided_proposals"][f"{s:g}"] = {
      "target_prob": float(np.exp(lp[np.arange(len(items)), col]).mean()),
      "cosine_to_unguided": float(np.sum(props * props0, -1).mean()),
    }
  log(f"diagnostics: {diagnostics}")
  control, per = {"dglm": {}}, {}
  for s, rec in dglm.items():
    control["dglm"][f"{s:g}"], per[f"dglm_{s:g}"] = scorer.control(rec, items)
  sweep_fudge = {}
  for s, rec in fudge.items():
    sweep_fudge[f"{s:g}"], per[f"fudge_{s:g}"] = scorer.control(rec, items)
  target = control["dglm"][f"{args.compare_scale:g}"]
  best = min(sweep_fudge, key=lambda s: abs(np.log(sweep_fudge[s]["gen_ppl"] / target["gen_ppl"])))
  control["fudge"] = {**sweep_fudge[best], "strength": float(best)}
  control["fudge_sweep"] = sweep_fudge
  control["classifier_acc_real"] = scorer.accuracy(
    [d["text"] for d in real], [d["label"] for d in real]
  )
  control["classifier_acc_sst2_dev"] = scorer.acc_sst2_dev
  real_counts = token_counts(tok, [d["text"] for d in real], tok.vocab_size)
  real_pred = np.argmax(
    real_counts @ np.asarray(fudge_clf.weight).T + np.asarray(fudge_clf.bias), -1
  )
  control["fudge_classifier_acc_real"] = float(np.mean(real_pred == [d["label"] for d in real]))
  a, b = per[f"dglm_{args.compare_scale:g}"], per[f"fudge_{best}"]
  control["paired_dglm_minus_fudge"] = {
    "acc": bootstrap(a["correct"], b["correct"]),
    "log_ppl": bootstrap(a["log_ppl"], b["log_ppl"]),
  }
  log(f"control: {control}")
  ppl = {
    "dglm": per["dglm_0"]["log_ppl"],
    "ar": scorer.control(plain, items)[1]["log_ppl"],
  }
  claims = {
    "control_beats_baseline": bool(
      target["acc"] > control["fudge"]["acc"] and target["gen_ppl"] <= control["fudge"]["gen_ppl"]
    ),
    "fluency_kept": bool(fluency["dglm"]["mauve"] >= fluency["ar"]["mauve"] - 0.05),
  }
  cost = {"dglm_seconds": dglm[0]["seconds"] / n, "ar_seconds": plain["seconds"] / n}
  result = {
    "fluency": {**fluency, "paired_log_ppl_dglm_minus_ar": bootstrap(ppl["dglm"], ppl["ar"])},
    "diagnostics": diagnostics,
    "control": control,
    "cost": cost,
    "claims": claims,
  }
  train_info = {
    "steps": steps,
    "train_seconds": {k: train_seconds(r) for k, r in runs.items()},
    "n_params": {
      k: int(sum(np.size(x) for x in jax.tree.leaves(api.load(r).params))) for k, r in runs.items()
    },
    "runs": {k: r.name for k, r in runs.items()},
  }
  config = {
    "data_dir": "shared corpora: yelp, sst2, agnews (see ../shared/data)",
    "yelp": {
      "split": "95/5 seeded (seed 0) over sentiment.dev.{0,1}",
      "train_sentences": args.train_sentences or "all",
      "prefix": f"first {PREFIX_WORDS} words of held-out sentences of >= {MIN_WORDS}",
      "test_prefixes": n,
      "classifier_real": len(real),
    },
    "budget_minutes": {
      "diffusion": args.diff_minutes,
      "decoder": args.dec_minutes,
      "ar": ar_minutes,
    }
    if not args.steps
    else f"{args.steps} steps per run (smoke)",
    **train_info,
    "dglm": {"diffusion_sample": dict(diff_cfg.sample), "decoder_sample": dict(dec_cfg.sample)},
    "ar": "configs/causal_lm.py with the decoder's model, tokenizer and optimiser; nucleus 0.9",
    "judge": "SmolLM2-135M-Instruct: per-sample perplexity of the continuation given the prefix",
    "judge_classifier": f"logistic regression (C=1) on judge mean-pooled hidden states, SST-2 "
    f"train subset {args.sst2_per_class} per class (sentences >= 6 words); applied to prefix + "
    "continuation",
    "guidance_classifiers": {k: v for k, v in clfs.items() if k != "paths"},
    "fudge": {
      "classifier": "bag-of-tokens logistic regression (C=1) on the SST-2 subset, decoder "
      "tokenizer ids",
      "top_k": FUDGE_TOP_K,
      "strengths": strengths,
      "matched_to_dglm_scale": args.compare_scale,
    },
    "sst2_per_class": args.sst2_per_class,
    "agnews_per_class": args.agnews_per_class,
    "examples": {
      name: [
        {"prefix": d["prefix"], "text": t} for d, t in zip(items[:3], rec["texts"][:3], strict=True)
      ]
      for name, rec in (("dglm", dglm[0]), ("dglm_s10", dglm[10]), ("ar", plain))
    },
  }
  write_result(args.result, {**result, "incomplete": ["composition"]}, config)

  # Composition: sentiment x topic at --composition_scale.
  w = args.composition_scale
  both_groups = [
    (
      [i for i, d in enumerate(items) if d["sentiment"] == s and d["topic"] == t],
      [("sentiment", SENTIMENT[s], w), ("topic", TOPICS[t], w)],
    )
    for s in (0, 1)
    for t in range(len(TOPICS))
  ]
  topic_groups = [
    ([i for i, d in enumerate(items) if d["topic"] == t], [("topic", TOPICS[t], w)])
    for t in range(len(TOPICS))
  ]
  k = jax.random.fold_in(key, 1)
  comp_both = cached(
    cache / f"comp_both_s{w:g}.json", lambda: dglm_sample(dec, k, items, both_groups, chunk)
  )
  comp_topic = cached(
    cache / f"comp_topic_s{w:g}.json", lambda: dglm_sample(dec, k, items, topic_groups, chunk)
  )
  comp_sent = (
    dglm[w]
    if w in dglm
    else cached(
      cache / f"dglm_s{w:g}.json", lambda: dglm_sample(dec, k, items, sentiment_groups(w), chunk)
    )
  )
  topic_clf, _ = load_classifier(clfs["paths"]["topic"])
  sent_ok = lambda rec: scorer.control(rec, items)[1]["correct"].astype(bool)
  both_s, both_t = sent_ok(comp_both), topic_hits(enc, topic_clf, items, comp_both)
  base_s, base_t = sent_ok(dglm[0]), topic_hits(enc, topic_clf, items, dglm[0])
  result["composition"] = {
    "both": float(np.mean(both_s & both_t)),
    "sentiment_only": float(np.mean(sent_ok(comp_sent))),
    "topic_only": float(np.mean(topic_hits(enc, topic_clf, items, comp_topic))),
    "both_guided": {"sentiment": float(both_s.mean()), "topic": float(both_t.mean())},
    "unguided": {
      "sentiment": float(base_s.mean()),
      "topic": float(base_t.mean()),
      "both": float(np.mean(base_s & base_t)),
    },
    "scale": w,
    "topic_checker": "the guiding MiniLM AG News classifier (no independent topic judge)",
  }
  log(f"composition: {result['composition']}")
  write_result(args.result, result, config)


if __name__ == "__main__":
  main()
