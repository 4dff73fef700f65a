"""Runs that build on earlier runs. A multi-stage method (LD4LG: autoencoder -> denoiser -> tuned
decoder; a causal LM whose weights start a decoder; ...) names a finished run in a config field,
loads it, checks it is the run it expects, and copies its weights into a fresh run's parameters.

Every check raises `ConfigError` naming the config field and what differs. Loading a run needs the
method registry's task factory (`lsd.methods.get_task`), which callers pass in: this module sits
below the methods and never imports them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from lsd.config import ConfigError, from_json_file
from lsd.fileio import as_path, is_remote, local_copy, one_line

MODEL_FILE = "model.safetensors"  # an exported model directory's weights (`lsd.train.export`)
EMA_PREFIX = "ema/"  # the EMA copy of each tensor in it
# Config fields (last name) that name a file or directory a run's model is built from at load time
# (beside the `*_workdir` fields, which name other runs): an export copies what they name.
FILE_FIELDS = ("decoder_checkpoint",)
# In an exported directory's config.json, a path field whose value starts with one of these is
# relative to that directory (the exporter writes them: "./stages/<run>", "../<run>", "./files/<f>").
RELATIVE_PREFIXES = ("./", "../")

TaskFactory = Callable[[ml_collections.ConfigDict], Any]  # config -> lsd.train.task.Task


@dataclasses.dataclass
class LoadedRun:
  """A finished run: its stored config, its task (tokenizer attached), model graph and params."""

  config: ml_collections.ConfigDict
  task: object  # lsd.train.task.Task with its tokenizer attached
  graphdef: nnx.GraphDef
  params: nnx.State
  step: int

  @property
  def tokenizer(self):
    return self.task.tokenizer

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params)


def load_run(
  workdir: str | os.PathLike,
  make_task: TaskFactory,
  *,
  step: int | None = None,
  use_ema: bool = True,
) -> LoadedRun:
  """Restores the latest (or `step`) checkpoint of a training run directory (local, or remote:
  gs://, ...; see lsd.fileio); `make_task` builds
  its task from the stored config (`lsd.methods.get_task`). EMA params when the run has them and
  `use_ema`. An exported model directory (`lsd export`: model.safetensors, no checkpoints/) loads
  the same way (`load_exported`)."""
  if is_exported(as_path(workdir)):
    return load_exported(workdir, make_task, step=step, use_ema=use_ema)
  config, task, graphdef, state = restore_run(workdir, make_task, step=step)
  params = state.ema if (use_ema and state.ema is not None) else state.params
  return LoadedRun(config, task, graphdef, params, int(state.step))


def path_fields(config: Any) -> Iterator[tuple[str, str, str]]:
  """(dotted field, value, kind) of every non-empty config field naming a path a run loads: kind
  "run" for `*_workdir` fields (another run), "file" for `FILE_FIELDS` (a checkpoint)."""

  def walk(node: Any, prefix: str) -> Iterator[tuple[str, str, str]]:
    for key, value in node.items():
      if isinstance(value, Mapping):
        yield from walk(value, f"{prefix}{key}.")
      elif isinstance(value, str) and value:
        if str(key).endswith("_workdir"):
          yield f"{prefix}{key}", value, "run"
        elif key in FILE_FIELDS:
          yield f"{prefix}{key}", value, "file"

  return walk(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config, "")


def stage_fields(config: Any) -> list[tuple[str, str]]:
  """(dotted field, value) of every non-empty config field naming another run (`*_workdir`)."""
  return [(f, v) for f, v, kind in path_fields(config) if kind == "run"]


def join_relative(root: str | os.PathLike, value: str) -> str:
  """`value` (relative, "./x" or "../x") joined to the directory `root`, normalised ("a/b/../c"
  is "a/c"), so two spellings of one directory compare equal; remote roots keep their scheme."""
  base = os.fspath(root)
  if is_remote(base):
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, value))}"
  return os.path.normpath(os.path.join(base, value))


def resolve_relative_paths(config: ml_collections.ConfigDict, root: epath.Path) -> None:
  """Rewrites, in place, the path fields of an exported directory's config whose value is
  relative to it (`RELATIVE_PREFIXES`) to paths under `root`."""
  for field, value, _ in list(path_fields(config)):
    if value.startswith(RELATIVE_PREFIXES):
      *parents, last = field.split(".")
      node = config
      for name in parents:
        node = node[name]
      node[last] = join_relative(root, value)


def open_run(
  workdir: epath.Path,
  make_task: TaskFactory,
  *,
  what: str = "a training run",
  relative_paths: bool = False,
):
  """(config, task with its tokenizer) of the run directory `workdir`, its config validated; with
  `relative_paths` (an exported directory), its relative path fields are resolved against it."""
  from lsd.data.tokenizer import Tokenizer

  try:
    found = (workdir / "config.json").is_file()
  except Exception as e:  # a remote store's client missing, or refusing (credentials)
    raise ConfigError(f"workdir={str(workdir)!r} cannot be read: {one_line(e)}") from e
  if not found:
    raise ConfigError(f"workdir={str(workdir)!r} holds no config.json: is it {what}?")
  try:
    config = from_json_file(workdir / "config.json")
  except ValueError as e:
    raise ConfigError(f"{workdir / 'config.json'} is not valid JSON ({e})") from e
  if relative_paths:
    resolve_relative_paths(config, workdir)
  task = make_task(config)
  task.validate()  # a hand-edited config.json fails here, with the field, not in a trace
  task.tokenizer = Tokenizer.load(workdir / "tokenizer.json")
  return config, task


def _run_mesh(config: ml_collections.ConfigDict):
  """(mesh, rules) to load a run on: its own mesh, or data-parallel over the devices there are
  when its mesh does not fit here (a run trained on another slice)."""
  from lsd.parallel import make_mesh, rules_from_config

  try:
    mesh = make_mesh(config.mesh)
  except ConfigError as e:
    mesh = make_mesh(ml_collections.ConfigDict(dict(config.mesh, data=-1, fsdp=1, tensor=1)))
    print(
      f"lsd: the run's mesh does not fit here ({e}); loading it data-parallel over "
      f"{mesh.size} device(s)",
      flush=True,
    )
  return mesh, rules_from_config(config.mesh)


def abstract_run_params(config: ml_collections.ConfigDict, task):
  """(graphdef, params as ShapeDtypeStructs with their shardings, mesh) of a run's model: what a
  checkpoint is restored into, or loaded tensors are placed by, with no random init to compile."""
  from lsd.parallel import abstract_sharded

  mesh, rules = _run_mesh(config)
  graphdef, params = abstract_sharded(lambda: task.build_model(nnx.Rngs(config.seed)), mesh, rules)
  return graphdef, params, mesh


def restore_run(workdir: str | os.PathLike, make_task: TaskFactory, *, step: int | None = None):
  """(config, task, graphdef, TrainState) of the latest (or `step`) checkpoint of a training run:
  `load_run` without the choice between EMA and raw params."""
  from lsd.train.checkpoint import Checkpointer
  from lsd.train.state import abstract_train_state, make_optimizer

  workdir = as_path(workdir)
  config, task = open_run(workdir, make_task)
  if not (workdir / "checkpoints").is_dir():
    raise ConfigError(f"workdir={str(workdir)!r} has no checkpoint yet; train first")
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False, create=False)
  if ckpt.latest_step() is None:
    raise ConfigError(f"workdir={str(workdir)!r} has no checkpoint yet; train first")
  task.load_run_files(workdir)
  graphdef, params, mesh = abstract_run_params(config, task)
  tx = make_optimizer(config.train)
  target = abstract_train_state(params, tx, config.train.ema_decay > 0, mesh)
  state = ckpt.restore(target, step=step, set_aside=False)
  ckpt.close()
  return config, task, graphdef, state


def is_exported(path: epath.Path) -> bool:
  """Whether `path` is an exported model directory (model.safetensors + config.json, no
  checkpoints/)."""
  try:
    return (
      (path / MODEL_FILE).is_file()
      and (path / "config.json").is_file()
      and not (path / "checkpoints").exists()
    )
  except Exception:  # unreadable: load_run reports it
    return False


def load_exported(
  path: str | os.PathLike, make_task: TaskFactory, *, step: int | None = None, use_ema: bool = True
) -> LoadedRun:
  """The `LoadedRun` of an exported model directory (EMA params when it has them and `use_ema`)."""
  from safetensors import safe_open

  from lsd.convert.safetensors_io import load_safetensors

  path = as_path(path)
  config, task = open_run(path, make_task, what="an exported model directory", relative_paths=True)
  with local_copy(path / MODEL_FILE) as local:
    with safe_open(local, "np") as f:
      metadata = f.metadata() or {}
    stored = {k: np.array(v) for k, v in load_safetensors(local).items()}
  have = int(metadata.get("step", -1))
  if step is not None and step != have:
    raise ConfigError(f"step={step}: {str(path)!r} is an export of step {have} only")
  task.load_run_files(path)
  graphdef, params, _ = abstract_run_params(config, task)
  ema = any(k.startswith(EMA_PREFIX) for k in stored)
  prefix = EMA_PREFIX if (use_ema and ema) else ""
  chosen = {
    k[len(prefix) :]: v for k, v in stored.items() if k.startswith(EMA_PREFIX) == bool(prefix)
  }
  names = {".".join(map(str, k)): k for k in traverse_util.flatten_dict(params.to_pure_dict())}
  missing, extra = sorted(set(names) - set(chosen)), sorted(set(chosen) - set(names))
  if missing or extra:
    raise ConfigError(
      f"{path / MODEL_FILE} does not fit the model of its config.json: missing "
      f"{missing[:5]}, unexpected {extra[:5]}"
    )
  current = traverse_util.flatten_dict(params.to_pure_dict())
  new = {}
  for name, key in names.items():
    value, like = chosen[name], current[key]
    if tuple(value.shape) != tuple(like.shape):
      raise ConfigError(
        f"{path / MODEL_FILE}: tensor {prefix}{name} has shape {tuple(value.shape)}, the model "
        f"{tuple(like.shape)}"
      )
    new[key] = jax.device_put(value.astype(like.dtype), like.sharding)
  params.replace_by_pure_dict(traverse_util.unflatten_dict(new))
  return LoadedRun(config, task, graphdef, params, have)


def load_stage_run(
  field: str, path: str, make_task: TaskFactory, methods: str | Iterable[str], hint: str = ""
) -> LoadedRun:
  """The finished run that config field `field` names (`path`), which must be a run of one of
  `methods` (checked from its config.json before anything is restored); `hint` (e.g. the config
  that trains such a run) ends the error messages."""
  methods = (methods,) if isinstance(methods, str) else tuple(methods)
  want = " or ".join(methods)
  if not path:
    raise ConfigError(
      f"{field} is empty; it must be the workdir of a finished {want} run {hint}".rstrip()
      + f": pass --config.{field}=<dir>"
    )
  config = as_path(path) / "config.json"
  if not config.is_file():
    raise ConfigError(f"{field}={path!r} holds no config.json: is it a training run?")
  try:
    method = json.loads(config.read_text()).get("method")
  except ValueError as e:
    raise ConfigError(f"{field}={path!r}: its config.json is not valid JSON ({e})") from e
  if method not in methods:
    raise ConfigError(
      f"{field}={path!r} is a {method!r} run; it must be a {want} run {hint}".rstrip()
    )
  return load_run(path, make_task)


def check_same_run(field_a: str, a: str, field_b: str, b: str, why: str) -> None:
  """Raises unless workdirs `a` (config field `field_a`) and `b` are one directory; `why` says
  what requires it."""
  if run_location(a) != run_location(b):
    raise ConfigError(f"{field_a}={a!r} and {field_b}={b!r} differ: {why}")


def run_location(path: str) -> str:
  """A workdir's location, for comparing two spellings of it (a remote URL is compared as text)."""
  if is_remote(path):
    return os.fspath(path).rstrip("/")
  return str(as_path(path).resolve())


def _fields(config: Any) -> dict[str, Any]:
  if dataclasses.is_dataclass(config):
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  if isinstance(config, ml_collections.ConfigDict):
    return config.to_dict()
  return dict(config)


def config_diff(a: Any, b: Any, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
  """(name, value in a, value in b) for every field where configs a and b (dataclasses, ConfigDicts
  or mappings) differ, sorted by name; a field one side lacks is None there."""
  fa, fb, ignore = _fields(a), _fields(b), set(ignore)
  names = sorted((set(fa) | set(fb)) - ignore)
  return [(k, fa.get(k), fb.get(k)) for k in names if fa.get(k) != fb.get(k)]


def check_same_section(section: str, field: str, want: Mapping, have: Mapping) -> None:
  """Raises unless this run's config section `section` (`want`) equals that of the run named by
  config field `field` (`have`), e.g. a stage that continues an earlier run's model."""
  diff = config_diff(want, have)
  if diff:
    raise ConfigError(
      f"{section} fields differ from the run in {field}: "
      + "; ".join(f"{section}.{k}={w!r} vs {h!r}" for k, w, h in diff)
    )


def check_fields_match(
  field: str,
  path: str,
  source: Any,
  target: Any,
  *,
  names: tuple[str, str],
  what: str,
  hint: str = "",
  ignore: Iterable[str] = (),
) -> None:
  """Raises unless the model config `source` of the run named by config field `field` (`path`)
  equals `target`, the config of the model its weights go into (fields in `ignore` may differ).
  The message names every differing field with both values, labelled by `names`."""
  diff = config_diff(source, target, ignore)
  if diff:
    fields = "; ".join(f"{k}: {names[0]} {s!r}, {names[1]} {t!r}" for k, s, t in diff)
    raise ConfigError(f"{field}={path!r}: {what} ({fields})" + (f"; {hint}" if hint else ""))


def copy_params(
  params: nnx.State,
  source: nnx.State,
  *,
  field: str,
  path: str,
  into: tuple[str, ...] = (),
  names: tuple[str, str] = ("source", "model"),
  complete: bool = False,
) -> tuple[nnx.State, list[tuple]]:
  """`params` (a fresh init) with every parameter of `source`, the params of the run named by
  config field `field` (`path`), copied to the same path under `into` (cast to the init's dtype).

  Returns (new params, the paths under `into` left at their init). Raises ConfigError naming the
  parameter when `params` has none of that shape there, and, with `complete`, when any parameter
  under `into` would stay fresh. `params` itself is not modified."""
  flat = traverse_util.flatten_dict(params.to_pure_dict())
  src = traverse_util.flatten_dict(source.to_pure_dict())
  for key, value in src.items():
    target = (*into, *key)
    if target not in flat or tuple(flat[target].shape) != tuple(value.shape):
      raise ConfigError(
        f"{field}={path!r}: {names[0]} parameter {'.'.join(map(str, key))} "
        f"{tuple(value.shape)} has no counterpart of that shape in the {names[1]}"
      )
    flat[target] = jnp.asarray(value, flat[target].dtype)
  n = len(into)
  fresh = [k for k in flat if k[:n] == into and k[n:] not in src]
  if complete and fresh:
    missing = ", ".join(".".join(map(str, k)) for k in fresh[:5])
    raise ConfigError(
      f"{field}={path!r}: the {names[0]} has no parameter for {len(fresh)} of the {names[1]}'s "
      f"({missing}{', ...' if len(fresh) > 5 else ''})"
    )
  out = jax.tree.map(lambda x: x, params)
  out.replace_by_pure_dict(traverse_util.unflatten_dict(flat))
  return out, fresh
