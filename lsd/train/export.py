"""Exported model directories (`lsd export`): a run's weights as one self-contained directory.

An exported directory holds `config.json` (the run's training config), `tokenizer.json`,
`model.safetensors` and a `README.md` model card (written last, so a directory with a card is
complete). The safetensors file has one tensor per parameter under its dotted nnx path
(`model.blocks.0.attn.q.kernel`, ...), and, when the run keeps an EMA of its params, a second copy
under `ema/`; its header metadata says `format=lsd`, the step and whether the EMA is there. Files a
method keeps beside its checkpoints (`*.safetensors` at the run's top level, e.g. DGLM's embedding
statistics) are copied as they are.

A run that loads other runs (a config field `*_workdir`, e.g. `ld4lg.autoencoder_workdir`) takes
them along under `stages/<method>/`, each an exported directory itself, and a checkpoint its model
is built from (`dglm.decoder_checkpoint`) under `files/`; its config.json names them by paths
relative to the directory ("./stages/ld4lg_ae"), so the directory is self-contained and can move.

`lsd.train.stages.load_run` loads such a directory as it loads a run (`load_exported`), to the
same `LoadedRun` with the same params, so its samples equal the run's bit for bit. A directory on
the Hugging Face hub is `hf:org/name` (`resolve_hub`).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from lsd.config import ConfigError
from lsd.convert.safetensors_io import save_safetensors
from lsd.fileio import as_path, atomic_write, atomic_write_text, one_line
from lsd.train.stages import (
  EMA_PREFIX,
  MODEL_FILE,
  is_exported,
  path_fields,
  restore_run,
  run_location,
  stage_fields,
)

CARD_FILE = "README.md"
HUB_PREFIX = "hf:"
STAGES_DIR = "stages"  # the runs an exported run loads, one directory each
FILES_DIR = "files"  # the checkpoint files its model is built from
_SKIP = {"config.json", "tokenizer.json", MODEL_FILE, CARD_FILE}


def _flat(params) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(params.to_pure_dict())
  return {".".join(map(str, k)): np.asarray(jax.device_get(v)) for k, v in flat.items()}


def _read_config(run: epath.Path, field: str | None = None) -> dict:
  """The config.json of a run directory as a dict; ConfigError naming `field` (the config field
  that named the run) or the run when it is missing or not JSON."""
  where = f"{field}={str(run)!r}" if field else f"workdir={str(run)!r}"
  try:
    return json.loads((run / "config.json").read_text())
  except FileNotFoundError as e:
    raise ConfigError(f"{where} holds no config.json: is it a training run?") from e
  except ValueError as e:
    raise ConfigError(f"{where}: its config.json is not valid JSON ({e})") from e


def _set(config: dict, field: str, value: str) -> None:
  *parents, last = field.split(".")
  for name in parents:
    config = config[name]
  config[last] = value


def _stage_plan(src: epath.Path) -> dict[str, tuple[epath.Path, str]]:
  """Every run `src` loads, directly or through another stage (`*_workdir` fields, transitively):
  location -> (its directory, its name under stages/). One run named twice (a decoder run's
  autoencoder is also its denoiser's) is one entry, so the export keeps one copy."""
  plan: dict[str, tuple[epath.Path, str]] = {}
  names: set[str] = set()

  def visit(run: epath.Path, config: dict) -> None:
    for field, value in stage_fields(config):
      where = run_location(value)
      if where in plan:
        continue
      dep = as_path(value)
      if not dep.is_dir():
        raise ConfigError(f"{field}={value!r} (in {str(run)!r}) does not exist: nothing to export")
      dep_config = _read_config(dep, field)
      base = name = str(dep_config.get("method") or "run")
      i = 1
      while name in names:  # two runs of one method: ld4lg_ae, ld4lg_ae_2
        i += 1
        name = f"{base}_{i}"
      names.add(name)
      plan[where] = (dep, name)
      if not is_exported(dep):  # an exported stage is copied whole, its own stages inside it
        visit(dep, dep_config)

  visit(src, _read_config(src))
  return plan


def export_run(
  workdir: str | os.PathLike, out: str | os.PathLike, make_task, *, step: int | None = None
) -> epath.Path:
  """Writes the latest (or `step`) checkpoint of the training run `workdir` as an exported model
  directory `out` (new, or empty) and returns its path. `make_task` is the method registry's
  task factory (`lsd.methods.get_task`).

  A run that loads other runs (`*_workdir` fields: an LD4LG denoiser's autoencoder, ...) takes
  them along: each is exported (its latest checkpoint) under `out/stages/<method>/`, and the
  fields of the written config.json point there by relative paths ("./stages/ld4lg_ae", and
  "../ld4lg_ae" between two stages), which loading resolves against the directory. Checkpoint
  files the model is built from (`FILE_FIELDS`, e.g. a DGLM decoder's GGUF) are copied into the
  run's `files/` the same way."""
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
  plan = _stage_plan(src)
  stages = {where: f"{STAGES_DIR}/{name}" for where, (_, name) in plan.items()}
  between = {w: f"../{n}" for w, (_, n) in plan.items()}  # from one stage to another
  for dep, name in plan.values():
    if is_exported(dep):
      _copy_tree(dep, dst / STAGES_DIR / name)
    else:
      _export_one(dep, dst / STAGES_DIR / name, make_task, None, between, ())
  _export_one(src, dst, make_task, step, {w: f"./{s}" for w, s in stages.items()}, stages.values())
  return dst


def _export_one(src, dst, make_task, step, stage_paths: dict, stage_dirs) -> None:
  """Exports one run `src` to `dst`, its `*_workdir` fields rewritten by `stage_paths`
  (location -> relative path) and its checkpoint files copied into `dst/files/`."""
  config, task, graphdef, state = restore_run(src, make_task, step=step)  # checks config.json
  text = (src / "config.json").read_text()
  config_json, rewritten = json.loads(text), False
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
  for field, value, kind in list(path_fields(config_json)):
    if kind == "run":
      _set(config_json, field, stage_paths[run_location(value)])
    elif as_path(value).exists():  # a checkpoint file or directory (else a registry name)
      name = as_path(value).name
      _copy_tree(as_path(value), dst / FILES_DIR / name)
      _set(config_json, field, f"./{FILES_DIR}/{name}")
    else:
      continue
    rewritten = True
  # the run's own text when no path was rewritten
  atomic_write_text(dst / "config.json", json.dumps(config_json, indent=2) if rewritten else text)
  atomic_write(dst / "tokenizer.json", lambda tmp: _copy(src / "tokenizer.json", tmp))
  for path in sorted(src.iterdir()):  # files a method keeps beside its checkpoints
    if path.name.endswith(".safetensors") and path.name not in _SKIP and path.is_file():
      atomic_write(dst / path.name, lambda tmp, path=path: _copy(path, tmp))
  atomic_write(dst / MODEL_FILE, lambda tmp: save_safetensors(flat, tmp, metadata=metadata))
  n_params = sum(int(np.prod(v.shape)) for k, v in flat.items() if not k.startswith(EMA_PREFIX))
  card = model_card(config, src, int(state.step), n_params, state, sorted(stage_dirs))
  atomic_write_text(dst / CARD_FILE, card)


def _copy(source: epath.Path, tmp: str) -> None:
  with source.open("rb") as f, open(tmp, "wb") as g:
    shutil.copyfileobj(f, g)


def _copy_tree(source: epath.Path, dest: epath.Path) -> None:
  """Copies a file, or a directory with everything under it, to `dest` (each file atomically)."""
  if source.is_dir():
    dest.mkdir(parents=True, exist_ok=True)
    for child in sorted(source.iterdir()):
      _copy_tree(child, dest / child.name)
  else:
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda tmp: _copy(source, tmp))


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


def model_card(config, workdir: epath.Path, step: int, n_params: int, state, stage_dirs=()) -> str:
  """The README.md of an exported directory: method, size, step, the runs it loads (`stage_dirs`),
  recorded metrics, the config."""
  ema = "yes (`ema/` tensors; loaded by default)" if state.ema is not None else "no"
  stages = ", ".join(f"`{d}`" for d in stage_dirs) or "none"
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
      f"- earlier-stage runs it loads (exported inside this directory): {stages}",
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
