"""Scores a samples JSONL and writes the result as `<prefix>.json` plus a markdown table.

A samples file holds one JSON object per line: {"text": str, "tokens": [int]?, "label": any?,
"pred_label": any?, "nfe": number?}. Metrics that need a model (generative perplexity from the
judge LM, MAUVE over encoder features) are computed elsewhere and passed in through `extra`, so this
module stays model-free.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from lsd.config import ConfigError
from lsd.eval import metrics as text_metrics
from lsd.fileio import as_path, atomic_write_text

METRICS = ("entropy", "dist_n", "diversity", "rouge", "bleu", "attribute_accuracy")
DEFAULT_METRICS = ("entropy", "dist_n", "diversity")
DIST_NS = (1, 2, 3)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads one JSON object per non-blank line; errors name the file and line."""
  records = []
  path = as_path(path)  # local or remote (gs://, ...)
  if not path.is_file():
    raise ConfigError(f"{str(path)!r} does not exist or is not a file")
  text = path.read_bytes().decode("utf-8", errors="replace")
  for line_no, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{line_no} is not valid JSON ({e.msg})") from e
    if not isinstance(record, dict):
      raise ConfigError(f"{path}:{line_no} holds a {type(record).__name__}; expected an object")
    records.append(record)
  return records


def read_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
  """A samples JSONL: at least one record, each with a string "text"."""
  samples = read_jsonl(path)
  if not samples:
    raise ConfigError(f"--samples {str(path)!r} holds no records (one JSON object per line)")
  for i, s in enumerate(samples):
    where = f"--samples {str(path)!r} record {i + 1}"
    if not isinstance(s.get("text"), str):
      got = f"fields {sorted(s)}" if "text" not in s else f"text={s['text']!r}"
      raise ConfigError(f"{where}: needs a string field 'text'; it has {got}")
    # Optional fields the metrics read: NFE counts and model token ids.
    nfe = s.get("nfe", 0)
    if isinstance(nfe, bool) or not isinstance(nfe, int | float):
      raise ConfigError(f"{where}: nfe={nfe!r} must be a number (function evaluations)")
    tokens = s.get("tokens", [])
    if not isinstance(tokens, list) or not all(
      isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
      raise ConfigError(f"{where}: tokens={tokens!r} must be a list of token ids (ints)")
  return samples


def load_references(path: str | os.PathLike, field: str = "text") -> list[str] | list[list[str]]:
  """References, one entry per sample, from .jsonl (`field` of each record) or .txt (one per line).

  In a .jsonl the field may hold a string or a list of strings (several references per sample).
  """
  path = as_path(path)
  if path.suffix == ".txt":
    return path.read_text(encoding="utf-8").splitlines()
  if path.suffix != ".jsonl":
    raise ConfigError(
      f"references path {str(path)!r} has suffix {path.suffix!r}; accepted: .jsonl, .txt"
    )
  refs = []
  for i, record in enumerate(read_jsonl(path)):
    if field not in record:
      raise ConfigError(
        f"references record {i} in {str(path)!r} has no field {field!r}; "
        f"its fields: {sorted(record)}"
      )
    refs.append(record[field])
  return refs


def _field(samples: Sequence[Mapping[str, Any]], key: str, user: str) -> list[Any]:
  missing = [i for i, s in enumerate(samples) if key not in s]
  if missing:
    raise ConfigError(
      f"{user} needs field {key!r} in every sample; missing in samples {missing[:5]}"
      f"{' ...' if len(missing) > 5 else ''}"
    )
  return [s[key] for s in samples]


def _entropy(samples: Sequence[Mapping[str, Any]], texts: list[str]) -> dict[str, Any]:
  if all("tokens" in s for s in samples):
    entropy = text_metrics.mean_unigram_entropy([s["tokens"] for s in samples])
    return {"entropy": entropy, "entropy_source": "tokens"}
  # Without model token ids, fall back to whitespace words mapped one-to-one to ids; entropy only
  # depends on the histogram, so any collision-free id assignment gives the same value.
  vocab: dict[str, int] = {}
  ids = [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]
  return {"entropy": text_metrics.mean_unigram_entropy(ids), "entropy_source": "whitespace"}


def evaluate_samples(
  samples: Sequence[Mapping[str, Any]],
  references: Sequence[str | Sequence[str]] | None = None,
  metrics: Iterable[str] = DEFAULT_METRICS,
  extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Computes the requested metrics over N samples.

  Args:
    samples: N records as in a samples JSONL (each needs "text").
    references: N references (a string or a list of strings each); needed by "rouge" and "bleu".
    metrics: names from `METRICS`:
      "entropy" -> entropy (mean unigram entropy, nats) and entropy_source ("tokens" when every
        sample has "tokens", else "whitespace");
      "dist_n" -> dist_1, dist_2, dist_3; "diversity" -> diversity, rep_2, rep_3, rep_4;
      "rouge" -> rouge1, rouge2, rougeL (F1 x 100); "bleu" -> bleu (x 100);
      "attribute_accuracy" -> fraction of samples whose "pred_label" equals "label".
    extra: values computed elsewhere (e.g. {"gen_ppl": 31.2, "mauve": 0.91}) merged into the result.

  Returns:
    A flat {name: value} dict that always holds num_samples, and nfe (mean) when every sample has
    "nfe".
  """
  metrics = list(metrics)
  unknown = [m for m in metrics if m not in METRICS]
  if unknown:
    raise ConfigError(f"metrics {unknown} are unknown; accepted: {list(METRICS)}")
  if not samples:
    raise ConfigError("samples is empty; pass at least one sample record")
  texts = _field(samples, "text", "evaluate_samples")
  out: dict[str, Any] = {"num_samples": len(samples)}
  if all("nfe" in s for s in samples):
    out["nfe"] = float(np.mean([s["nfe"] for s in samples]))
  needs_refs = [m for m in metrics if m in ("rouge", "bleu")]
  if needs_refs and references is None:
    raise ConfigError(
      f"metrics {needs_refs} need references; pass references= (see load_references)"
    )
  for name in metrics:
    if name == "entropy":
      out.update(_entropy(samples, texts))
    elif name == "dist_n":
      out.update({f"dist_{n}": text_metrics.dist_n(texts, n) for n in DIST_NS})
    elif name == "diversity":
      out["diversity"] = text_metrics.diversity(texts)
      out.update({f"rep_{n}": text_metrics.rep_n(texts, n) for n in text_metrics.DIVERSITY_NS})
    elif name == "rouge":
      out.update(text_metrics.rouge(texts, references))
    elif name == "bleu":
      out["bleu"] = text_metrics.bleu(texts, references)
    elif name == "attribute_accuracy":
      user = f"metric {name!r}"
      out["attribute_accuracy"] = text_metrics.attribute_accuracy(
        _field(samples, "pred_label", user), _field(samples, "label", user)
      )
  for key, value in (extra or {}).items():
    if key in out:
      raise ConfigError(f"extra key {key!r} clashes with a computed metric; rename it")
    out[key] = value
  return out


def _format(value: Any, digits: int) -> str:
  if value is None:
    return "-"
  if isinstance(value, float | np.floating):
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"
  if isinstance(value, np.generic):
    value = value.item()
  return str(value).replace("|", "\\|")


def _markdown(results: Mapping[str, Any], digits: int) -> str:
  nested = bool(results) and all(isinstance(v, Mapping) for v in results.values())
  if not nested:
    rows = [f"| {k} | {_format(v, digits)} |" for k, v in results.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) + "\n"
  columns = list(dict.fromkeys(k for variant in results.values() for k in variant))
  lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for variant, row in results.items():
    cells = [_format(row.get(c), digits) for c in columns]
    lines.append(f"| {_format(variant, digits)} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic | np.ndarray):
    return value.tolist()
  raise TypeError(f"result value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def write_report(
  results: Mapping[str, Any], out_prefix: str | os.PathLike, *, digits: int = 3
) -> tuple[epath.Path, epath.Path]:
  """Writes `<out_prefix>.json` (full precision) and `<out_prefix>.md` (floats to `digits` places).

  `results` is either {metric: value} (one table row per metric) or {variant: {metric: value}}
  (one row per variant, one column per metric seen in any variant; "-" where a variant lacks it).
  Returns the (json, markdown) paths.
  """
  prefix = as_path(out_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  json_path = prefix.with_name(prefix.name + ".json")
  md_path = prefix.with_name(prefix.name + ".md")
  text = json.dumps(results, indent=2, default=_json_default) + "\n"
  atomic_write_text(json_path, text)  # a kill leaves the old report or the new one, never half
  atomic_write_text(md_path, _markdown(results, digits))
  return json_path, md_path
