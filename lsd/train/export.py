"""Exported model directories (`lsd export`): a run's weights as one self-contained directory.

An exported directory holds `config.json` (the run's training config), `tokenizer.json`,
`model.safetensors` and a `README.md` model card (written last, so a directory with a card is
complete). The safetensors file has one tensor per parameter under its dotted nnx path
(`model.blocks.0.attn.q.kernel`, ...), and, when the run keeps an EMA of its params, a second copy
under `ema/`; its header metadata says `format=lsd`, the step and whether the EMA is there. Files a
method keeps beside its checkpoints (`*.safetensors` at the run's top level, e.g. DGLM's embedding
statistics) are copied as they are.

`lsd.train.stages.load_run` loads such a directory as it loads a run (`load_exported`), to the
same `LoadedRun` with the same params, so its samples equal the run's bit for bit. Runs that load other runs (a config
field `*_workdir`, e.g. `ld4lg.autoencoder_workdir`) are refused: their exported directory would
not be self-contained. A directory on the Hugging Face hub is `hf:org/name` (`resolve_hub`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from lsd.config import ConfigError, from_json_file
from lsd.convert.safetensors_io import save_safetensors
from lsd.fileio import as_path, atomic_write, atomic_write_text, one_line
from lsd.train.stages import EMA_PREFIX, MODEL_FILE, is_exported, restore_run

CARD_FILE = "README.md"
HUB_PREFIX = "hf:"
_SKIP = {"config.json", "tokenizer.json", MODEL_FILE, CARD_FILE}


def stage_fields(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(dotted field, value) of every non-empty config field naming another run (`*_workdir`)."""

  def walk(node: Any, prefix: str) -> Iterator[tuple[str, str]]:
    for key, value in node.items():
      if isinstance(value, dict):
        yield from walk(value, f"{prefix}{key}.")
      elif str(key).endswith("_workdir") and value:
        yield f"{prefix}{key}", value

  return list(walk(config.to_dict(), ""))


def _flat(params) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(params.to_pure_dict())
  return {".".join(map(str, k)): np.asarray(jax.device_get(v)) for k, v in flat.items()}


def export_run(
  workdir: str | os.PathLike, out: str | os.PathLike, make_task, *, step: int | None = None
) -> epath.Path:
  """Writes the latest (or `step`) checkpoint of the training run `workdir` as an exported model
  directory `out` (new, or empty) and returns its path. `make_task` is the method registry's
  task factory (`lsd.methods.get_task`)."""
  src, dst = as_path(workdir), as_path(out)
  try:
    exists = src.is_dir()
  except Exception as e:
    raise ConfigError(f"workdir={str(workdir)!r} cannot be read: {one_line(e)}") from e
  if not exists:
    raise ConfigError(f"workdir={str(workdir)!r} does not exist: give a training run directory")
  if is_exported(src):
    raise ConfigError(f"workdir={str(workdir)!r} is already an exported model directory")
  if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
    raise ConfigError(f"out={str(out)!r} exists and is not empty: give a new or empty directory")
  if (src / "config.json").is_file():
    try:
      fields = stage_fields(from_json_file(src / "config.json"))
    except ValueError as e:
      raise ConfigError(f"{src / 'config.json'} is not valid JSON ({e})") from e
    if fields:
      field, value = fields[0]
      raise ConfigError(
        f"{field}={value!r}: this run loads another run, so its export would not be "
        "self-contained; lsd export takes runs that name no other run (sbd, causal_lm, a first "
        "stage such as an autoencoder run)"
      )
  config, task, graphdef, state = restore_run(src, make_task, step=step)
  flat = _flat(state.params)
  if state.ema is not None:
    flat.update({EMA_PREFIX + k: v for k, v in _flat(state.ema).items()})
  metadata = {
    "format": "lsd",
    "method": str(config.method),
    "step": str(int(state.step)),
    "ema": "true" if state.ema is not None else "false",
  }
  dst.mkdir(parents=True, exist_ok=True)
  atomic_write_text(dst / "config.json", (src / "config.json").read_text())
  atomic_write(dst / "tokenizer.json", lambda tmp: _copy(src / "tokenizer.json", tmp))
  for path in sorted(src.iterdir()):  # files a method keeps beside its checkpoints
    if path.name.endswith(".safetensors") and path.name not in _SKIP and path.is_file():
      atomic_write(dst / path.name, lambda tmp, path=path: _copy(path, tmp))
  atomic_write(dst / MODEL_FILE, lambda tmp: save_safetensors(flat, tmp, metadata=metadata))
  n_params = sum(int(np.prod(v.shape)) for k, v in flat.items() if not k.startswith(EMA_PREFIX))
  atomic_write_text(dst / CARD_FILE, model_card(config, src, int(state.step), n_params, state))
  return dst


def _copy(source: epath.Path, tmp: str) -> None:
  with source.open("rb") as f, open(tmp, "wb") as g:
    shutil.copyfileobj(f, g)


def _recorded_metrics(workdir: epath.Path) -> list[str]:
  """Lines of the card's "Benchmark numbers": what the run's own logs hold, nothing computed."""
  lines = []
  records = []
  try:
    text = (workdir / "metrics.jsonl").read_text() if (workdir / "metrics.jsonl").is_file() else ""
  except OSError:
    text = ""
  for line in text.splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue  # a line a kill tore mid-write
  skip = {"step", "split", "time"}
  for split in ("train", "eval"):
    last = [r for r in records if r.get("split") == split]
    if last:
      values = ", ".join(f"{k} {v:.4g}" for k, v in last[-1].items() if k not in skip)
      lines.append(f"- last {split} record (step {last[-1].get('step')}): {values}")
  if (workdir / "nelbo.json").is_file():
    try:
      r = json.loads((workdir / "nelbo.json").read_text())
      lines.append(
        f"- held-out likelihood (`lsd eval --nelbo`, {r.get('estimate', '?')}, data "
        f"{r.get('data', '?')}): {r['nats_per_token']:.4f} nats/token, PPL {r['ppl']:.3f}"
      )
    except (ValueError, KeyError, TypeError):
      pass
  return lines or ["None recorded in the run's logs."]


def model_card(config, workdir: epath.Path, step: int, n_params: int, state) -> str:
  """The README.md of an exported directory: method, size, step, recorded metrics, the config."""
  ema = "yes (`ema/` tensors; loaded by default)" if state.ema is not None else "no"
  return "\n".join(
    [
      "---",
      "library_name: lsd",
      "tags:",
      "- diffusion-language-model",
      f"- {config.method}",
      "---",
      f"# lsd {config.method} model",
      "",
      f"- method: `{config.method}`",
      f"- parameters: {n_params:,}",
      f"- exported step: {step}",
      f"- EMA weights: {ema}",
      "",
      "## Use",
      "",
      "```",
      "lsd sample --workdir DIR --num_samples 4",
      "```",
      "",
      "```python",
      "import jax, lsd.api",
      'run = lsd.api.load("DIR")  # or "hf:org/name" on the Hugging Face hub',
      "samples = lsd.api.sample(run, jax.random.key(0), num_samples=4)",
      "```",
      "",
      "## Benchmark numbers",
      "",
      *_recorded_metrics(workdir),
      "",
      "## Training config",
      "",
      "```json",
      config.to_json(indent=2, sort_keys=True),
      "```",
      "",
    ]
  )


def resolve_hub(ref: str) -> str:
  """`hf:org/name[@revision]` -> the local directory of its snapshot (`huggingface_hub`)."""
  repo = ref[len(HUB_PREFIX) :].strip("/")
  repo, _, revision = repo.partition("@")
  if repo.count("/") != 1 or not all(repo.split("/")):
    raise ConfigError(f"workdir={ref!r}: a hub model is hf:org/name (or hf:org/name@revision)")
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:
    raise ConfigError(
      f"workdir={ref!r} needs the huggingface_hub package: pip install huggingface_hub"
    ) from e
  try:
    return snapshot_download(repo_id=repo, revision=revision or None)
  except Exception as e:
    raise ConfigError(f"workdir={ref!r} cannot be downloaded: {one_line(e)}") from e
