"""Metrics for generated text: entropy, n-gram diversity, ROUGE, BLEU, MBR selection, MAUVE,
attribute accuracy.

Everything here is host-side numpy/Python over finished samples; nothing is jitted. Where a
reference implementation exists (rouge-score, sacrebleu, mauve-text, scikit-learn) we call it
rather than re-derive it, and import it lazily so `import lsd.eval` stays cheap (mauve pulls in
transformers).

Conventions, so numbers compare with the papers they come from:
- unigram entropy: BD3-LM — natural-log entropy of one sample's token-id histogram, averaged over
  samples.
- dist-n: distinct n-grams / total n-grams over the whitespace tokens of the whole corpus.
- rep-n and diversity: LD4LG — rep_n = 1 - unique/total n-grams of the corpus and
  diversity = prod_{n=2..4} (1 - rep_n). LD4LG tokenises with spaCy; we split on whitespace, which
  is close on detokenised English but not identical.
- ROUGE and BLEU are F1 / corpus scores x 100; accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
DIVERSITY_NS = (2, 3, 4)


def unigram_entropy(token_ids: Sequence[int] | np.ndarray) -> float:
  """Entropy in nats of one sample's token-id histogram.

  Args:
    token_ids: int ids of one sample, shape [L] (any iterable of hashable ids).

  Returns:
    -sum_v p_v ln p_v with p_v the frequency of id v; 0.0 for an empty sample.
  """
  counts = np.fromiter(Counter(np.asarray(token_ids).ravel().tolist()).values(), dtype=np.float64)
  if counts.size == 0:
    return 0.0
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def mean_unigram_entropy(samples: Sequence[Sequence[int]]) -> float:
  """Mean of `unigram_entropy` over samples (a list of [L_i] id lists; lengths may differ)."""
  if len(samples) == 0:
    raise ValueError("mean_unigram_entropy: samples is empty; pass at least one token-id list")
  return float(np.mean([unigram_entropy(s) for s in samples]))


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
  return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _check_n(n: Any) -> None:
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f"n={n!r} must be an int >= 1")


def dist_n(texts: Sequence[str], n: int) -> float:
  """Distinct n-grams / total n-grams over the whitespace tokens of all `texts`.

  n-grams never cross a text boundary. Returns 0.0 when no text has n tokens (nothing distinct).
  """
  _check_n(n)
  grams = [g for t in texts for g in _ngrams(t.split(), n)]
  return len(set(grams)) / len(grams) if grams else 0.0


def rep_n(texts: Sequence[str], n: int) -> float:
  """LD4LG repetition: 1 - unique n-grams / total n-grams of the corpus, i.e. 1 - dist_n."""
  return 1.0 - dist_n(texts, n)


def diversity(texts: Sequence[str]) -> float:
  """LD4LG diversity prod_{n=2..4} (1 - rep_n); 1.0 means no repeated 2/3/4-gram anywhere."""
  return float(np.prod([1.0 - rep_n(texts, n) for n in DIVERSITY_NS]))


def _as_reference_lists(refs: Sequence[str | Sequence[str]], num_preds: int) -> list[list[str]]:
  """Normalises refs to one non-empty list of reference strings per prediction."""
  if len(refs) != num_preds:
    raise ValueError(
      f"refs has {len(refs)} entries but preds has {num_preds}; pass one reference (or one list "
      "of references) per prediction"
    )
  out = []
  for i, r in enumerate(refs):
    group = [r] if isinstance(r, str) else list(r)
    if not group or not all(isinstance(x, str) for x in group):
      raise ValueError(f"refs[{i}]={r!r} must be a string or a non-empty list of strings")
    out.append(group)
  return out


def rouge(
  preds: Sequence[str], refs: Sequence[str | Sequence[str]], *, use_stemmer: bool = False
) -> dict[str, float]:
  """Mean ROUGE-1/2/L F1 x 100 (rouge-score's tokenizer: lowercased alphanumeric words).

  Args:
    preds: N predicted texts.
    refs: N references; each a string or a list of strings. With several references the best
      F1 per prediction and per ROUGE type is kept (rouge-score's `score_multi`).
    use_stemmer: Porter-stem words before matching.

  Returns:
    {"rouge1": ..., "rouge2": ..., "rougeL": ...}, each in [0, 100].
  """
  per = rouge_per_sample(preds, refs, use_stemmer=use_stemmer)
  return {k: float(np.mean(v)) for k, v in per.items()}


def rouge_per_sample(
  preds: Sequence[str], refs: Sequence[str | Sequence[str]], *, use_stemmer: bool = False
) -> dict[str, np.ndarray]:
  """ROUGE-1/2/L F1 x 100 of each prediction, as in `rouge`: {"rouge1": [N], ...}."""
  from rouge_score import rouge_scorer

  groups = _as_reference_lists(refs, len(preds))
  if not preds:
    raise ValueError("rouge: preds is empty; pass at least one prediction")
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
  out = {k: np.zeros(len(preds)) for k in ROUGE_TYPES}
  for i, (pred, group) in enumerate(zip(preds, groups, strict=True)):
    scores = scorer.score_multi(group, pred)
    for k in ROUGE_TYPES:
      out[k][i] = 100.0 * scores[k].fmeasure
  return out


def paired_bootstrap(
  a: Sequence[float], b: Sequence[float], *, n: int = 2000, seed: int = 0, stat=np.mean
) -> dict[str, float]:
  """stat(a) - stat(b) over paired per-item scores (the same test items), with a 95 % interval
  from `n` bootstrap resamples of the items; NaN items (in either) are dropped.

  Returns {"diff", "low", "high", "n"}: the difference exceeds the resampling spread when the
  interval excludes 0.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(
      f"paired_bootstrap: a and b must be paired 1-D scores; got {a.shape}, {b.shape}"
    )
  keep = ~(np.isnan(a) | np.isnan(b))
  a, b = a[keep], b[keep]
  if not len(a):
    raise ValueError("paired_bootstrap: no item has both scores")
  idx = np.random.default_rng(seed).integers(0, len(a), size=(n, len(a)))
  diffs = np.array([stat(a[i]) - stat(b[i]) for i in idx])
  low, high = np.percentile(diffs, [2.5, 97.5])
  return {"diff": float(stat(a) - stat(b)), "low": float(low), "high": float(high), "n": len(a)}


def bleu(preds: Sequence[str], refs: Sequence[str | Sequence[str]], **kw: Any) -> float:
  """Corpus BLEU (sacrebleu, default 13a tokenisation) in [0, 100].

  Args:
    preds: N predicted texts.
    refs: N references; each a string or a list of strings (the count may vary per prediction).
    **kw: passed to `sacrebleu.corpus_bleu` (e.g. tokenize="none", lowercase=True).
  """
  import sacrebleu

  groups = _as_reference_lists(refs, len(preds))
  if not preds:
    raise ValueError("bleu: preds is empty; pass at least one prediction")
  # sacrebleu wants reference *streams* (stream k holds the k-th reference of every prediction);
  # predictions with fewer references are padded with None, which sacrebleu skips.
  num_streams = max(len(g) for g in groups)
  streams = [[g[k] if k < len(g) else None for g in groups] for k in range(num_streams)]
  return float(sacrebleu.corpus_bleu(list(preds), streams, **kw).score)


MBR_METRICS = ("rouge2", "bleu")


def _pair_score(metric: str):
  """(hypothesis, reference) -> similarity in [0, 100] for `mbr_select`."""
  if metric == "rouge2":
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge2"])
    return lambda hyp, ref: 100.0 * scorer.score(ref, hyp)["rouge2"].fmeasure
  import sacrebleu

  return lambda hyp, ref: float(sacrebleu.sentence_bleu(hyp, [ref]).score)


def mbr_select(candidates: Sequence[Sequence[str]], metric: str = "rouge2") -> list[int]:
  """Minimum-Bayes-risk selection: for each input, the index of the candidate with the highest mean
  similarity to its other candidates (ties: the lowest index).

  Args:
    candidates: N groups of k >= 1 candidate texts for the same input (k may vary per group).
    metric: "rouge2" (ROUGE-2 F1, LD4LG's and SLD's choice) or "bleu" (sentence sacreBLEU).

  Returns:
    N indices into the groups.
  """
  if metric not in MBR_METRICS:
    raise ValueError(f"mbr_select: metric={metric!r}; accepted: {', '.join(MBR_METRICS)}")
  score = _pair_score(metric)
  out = []
  for i, group in enumerate(candidates):
    group = list(group)
    if not group or not all(isinstance(t, str) for t in group):
      raise ValueError(f"candidates[{i}]={group!r} must be a non-empty list of strings")
    k = len(group)
    if k == 1:
      out.append(0)
      continue
    sim = np.zeros((k, k))
    for a in range(k):
      for b in range(k):
        if a != b:
          sim[a, b] = score(group[a], group[b])
    out.append(int(np.argmax(sim.sum(axis=1))))
  return out


def _check_features(name: str, x: Any, min_rows: int = 2) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] < min_rows or not np.issubdtype(x.dtype, np.number):
    raise ValueError(
      f"{name} has shape {x.shape} dtype {x.dtype}; expected a numeric [N>={min_rows}, D] array"
    )
  return x


def mauve(
  p_features: np.ndarray,
  q_features: np.ndarray,
  *,
  num_buckets: int | str = "auto",
  kmeans_num_redo: int = 5,
  kmeans_max_iter: int = 500,
  kmeans_explained_var: float = 0.9,
  mauve_scaling_factor: float = 5.0,
  seed: int = 25,
  **kw: Any,
) -> float:
  """MAUVE between two feature clouds (mauve-text), in [0, 1]; higher means closer.

  Args:
    p_features: [N_p, D] features of one text set (e.g. references), from our own encoder/judge.
    q_features: [N_q, D] features of the other (e.g. samples); same D.
    num_buckets: k-means histogram size; "auto" = max(2, round(min(N_p, N_q) / 10)), the
      mauve-text heuristic, which keeps >= ~10 points per bucket at the small N we evaluate.
    kmeans_num_redo, kmeans_max_iter, kmeans_explained_var: k-means restarts, iterations and the
      PCA variance kept before clustering (mauve-text defaults; restarts matter at small N, where
      one bad clustering moves the score).
    mauve_scaling_factor: the constant c of the paper.
    seed: k-means seed; fixed so the same features always give the same score.
    **kw: any other `mauve.compute_mauve` argument.
  """
  p = _check_features("p_features", p_features)
  q = _check_features("q_features", q_features)
  if p.shape[1] != q.shape[1]:
    raise ValueError(f"p_features has D={p.shape[1]} but q_features has D={q.shape[1]}; must match")
  from mauve import compute_mauve

  out = compute_mauve(
    p_features=p.astype(np.float32),
    q_features=q.astype(np.float32),
    num_buckets=num_buckets,
    kmeans_num_redo=kmeans_num_redo,
    kmeans_max_iter=kmeans_max_iter,
    kmeans_explained_var=kmeans_explained_var,
    mauve_scaling_factor=mauve_scaling_factor,
    seed=seed,
    verbose=False,
    **kw,
  )
  return float(out.mauve)


def attribute_accuracy(predicted_labels: Sequence[Any], target_labels: Sequence[Any]) -> float:
  """Fraction of positions where predicted == target label, in [0, 1]."""
  pred, target = np.asarray(predicted_labels), np.asarray(target_labels)
  if pred.shape != target.shape or pred.ndim != 1 or pred.size == 0:
    raise ValueError(
      f"predicted_labels has shape {pred.shape} and target_labels {target.shape}; expected two "
      "non-empty 1-D sequences of equal length"
    )
  return float(np.mean(pred == target))


class LinearProbe:
  """Logistic-regression attribute classifier over fixed feature vectors.

  Features are standardised with the training mean/std (encoder features have arbitrary scale, and
  an L2-penalised fit is scale-sensitive). Prediction is our own numpy affine map over the stored
  parameters, so a probe restored with `load` predicts exactly as the fitted one. Labels may be ints
  or strings (anything numpy stores without pickle).
  """

  def __init__(self, *, c: float = 1.0, max_iter: int = 1000):
    """c: inverse L2 strength (scikit-learn's C); max_iter: solver iterations."""
    if not c > 0:
      raise ValueError(f"c={c!r} must be > 0")
    self.c, self.max_iter = c, max_iter
    self.mean = self.scale = self.coef = self.intercept = self.classes = None

  def fit(self, features: np.ndarray, labels: Sequence[Any]) -> LinearProbe:
    """Fits on features [N, D] and labels [N] (at least two distinct labels)."""
    from sklearn.linear_model import LogisticRegression

    x = _check_features("features", features).astype(np.float64)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
      raise ValueError(f"labels has shape {y.shape}; expected ({x.shape[0]},) to match features")
    if y.dtype == object:
      raise ValueError("labels must be ints or strings (numpy dtype int/str), not mixed objects")
    if np.unique(y).size < 2:
      raise ValueError(f"labels hold one class {np.unique(y).tolist()}; need at least two to fit")
    self.mean = x.mean(axis=0)
    # Constant feature columns would divide by zero; leave them unscaled.
    self.scale = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    clf = LogisticRegression(C=self.c, max_iter=self.max_iter)
    clf.fit((x - self.mean) / self.scale, y)
    self.coef, self.intercept, self.classes = clf.coef_, clf.intercept_, clf.classes_
    return self

  def _check_fitted(self) -> None:
    if self.coef is None:
      raise ValueError("LinearProbe is not fitted; call fit(features, labels) or LinearProbe.load")

  def decision_function(self, features: np.ndarray) -> np.ndarray:
    """Logits [N, C] for C >= 3 classes, or [N] (positive = classes[1]) for two classes."""
    self._check_fitted()
    x = _check_features("features", features, min_rows=1).astype(np.float64)
    if x.shape[1] != self.coef.shape[1]:
      raise ValueError(
        f"features has D={x.shape[1]}; this probe was fitted on D={self.coef.shape[1]}"
      )
    logits = ((x - self.mean) / self.scale) @ self.coef.T + self.intercept
    return logits[:, 0] if self.coef.shape[0] == 1 else logits

  def predict(self, features: np.ndarray) -> np.ndarray:
    """Predicted labels [N] for features [N, D]."""
    logits = self.decision_function(features)
    index = (logits > 0).astype(int) if logits.ndim == 1 else logits.argmax(axis=1)
    return self.classes[index]

  def accuracy(self, features: np.ndarray, labels: Sequence[Any]) -> float:
    """Fraction of `labels` [N] predicted correctly from features [N, D]."""
    return attribute_accuracy(self.predict(features), labels)

  def save(self, path: str | Path) -> None:
    """Writes the parameters to an .npz (plain arrays, no pickle)."""
    self._check_fitted()
    np.savez(
      path,
      mean=self.mean,
      scale=self.scale,
      coef=self.coef,
      intercept=self.intercept,
      classes=self.classes,
      c=np.float64(self.c),
      max_iter=np.int64(self.max_iter),
    )

  @classmethod
  def load(cls, path: str | Path) -> LinearProbe:
    """Restores a probe written by `save`."""
    with np.load(path, allow_pickle=False) as f:
      probe = cls(c=float(f["c"]), max_iter=int(f["max_iter"]))
      probe.mean, probe.scale = f["mean"], f["scale"]
      probe.coef, probe.intercept, probe.classes = f["coef"], f["intercept"], f["classes"]
    return probe
