"""Config helpers: loading `get_config(arg)` files, parsing `arg`, and validation with actionable errors.

Every check raises `ConfigError` naming the field, the bad value and what is accepted, so a user can fix
a launch command without reading code.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config field holds a value lsd cannot use."""


def parse_arg(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
  """Parses a `get_config` argument like "size=tiny,data=bbc" against typed defaults.

  Keys must be in `defaults`; values are converted to the type of the default.
  """
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      raise ConfigError(
        f"config argument {item!r} is not key=value; accepted keys: {sorted(defaults)}"
      )
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ConfigError(
        f"config argument key {key!r} is unknown; accepted keys: {sorted(defaults)}"
      )
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config argument {key}={value!r} must be a boolean (true/false)")
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = kind(value)
      except ValueError as e:
        raise ConfigError(f"config argument {key}={value!r} must be of type {kind.__name__}") from e
  return out


def shipped_configs_dir() -> Path | None:
  """The folder of the configs installed with lsd: the top-level `configs` package beside `lsd`
  (in a checkout, and in site-packages after `pip install`), or None when it is absent."""
  here = Path(__file__).resolve().parent.parent / "configs"
  return here if (here / "common.py").is_file() else None


def shipped_config_names() -> list[str]:
  folder = shipped_configs_dir()
  names = sorted(p.stem for p in folder.glob("*.py")) if folder else []
  return [n for n in names if n not in ("__init__", "common")]


def resolve_config_path(path: str) -> Path:
  """A config file: `path` itself when it is a file, else a shipped config's name (`sbd`, or
  `sbd.py`), so that `--config sbd:size=tiny` works from any directory after `pip install`."""
  file = Path(path).expanduser()
  if file.is_file():
    return file
  folder, name = shipped_configs_dir(), path.removesuffix(".py")
  if folder and "/" not in path and name in shipped_config_names():
    return folder / f"{name}.py"
  raise ConfigError(
    f"config file {path!r} does not exist; give a path to a .py config file or the name of a "
    f"config shipped with lsd: {shipped_config_names()}"
  )


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` (or a shipped config by name, `sbd[:arg]`) and calls its
  `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  file = resolve_config_path(path)
  if file.suffix != ".py":
    raise ConfigError(
      f"--config {path!r} is not a Python config file: give a .py file defining get_config(arg), "
      "e.g. configs/sbd.py:size=tiny (a run's config.json is reused by `--workdir RUN` alone)"
    )
  # Config files may import shared helpers as `configs.common`: put the folder above `configs/` on
  # the path for the duration of the import.
  root = str(file.resolve().parent.parent)
  added = root not in sys.path
  if added:
    sys.path.insert(0, root)
  try:
    spec_obj = importlib.util.spec_from_file_location(f"lsd_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec_obj)
    spec_obj.loader.exec_module(module)
  finally:
    if added:
      sys.path.remove(root)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg) function")
  try:
    return module.get_config(arg or None)
  except ConfigError:
    raise
  except (ValueError, KeyError, TypeError) as e:  # a config file's own argument checks
    raise ConfigError(f"config argument {arg!r} of {path}: {e}") from e


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
  choices = list(choices)
  if value not in choices:
    raise ConfigError(f"{field}={value!r} is not supported; accepted: {choices}")


def _is_number(value: Any) -> bool:
  """An int or float, but not a bool (which Python counts as an int)."""
  return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive(field: str, value: Any, *, allow_zero: bool = False) -> None:
  ok = _is_number(value) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ConfigError(f"{field}={value!r} must be a number {bound}")


def check_range(field: str, value: Any, lo: float, hi: float) -> None:
  if not _is_number(value) or not lo <= value <= hi:
    raise ConfigError(f"{field}={value!r} must be a number in [{lo}, {hi}]")


def check_divides(field: str, value: int, divisor_field: str, divisor: int) -> None:
  if divisor <= 0 or value % divisor:
    raise ConfigError(f"{field}={value} must be divisible by {divisor_field}={divisor}")


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def apply_override(config: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
  """Sets `config.<dotted>` from a command-line string, converted to the field's current type."""
  *parents, leaf = dotted.split(".")
  node = config
  for i, name in enumerate(parents):
    if name not in node:
      where = ".".join(parents[:i]) or "config"
      raise ConfigError(f"--config.{dotted}: {where} has no field {name!r}; fields: {sorted(node)}")
    node = node[name]
  if leaf not in node:
    where = ".".join(parents) or "config"
    raise ConfigError(f"--config.{dotted}: {where} has no field {leaf!r}; fields: {sorted(node)}")
  current = node[leaf]
  try:
    if isinstance(current, bool):
      if raw.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      value = raw.lower() in ("true", "1")
    elif isinstance(current, int | float | str):
      value = type(current)(raw)
    else:
      value = json.loads(raw)
  except ValueError as e:
    raise ConfigError(
      f"--config.{dotted}={raw!r} does not parse as {type(current).__name__} "
      f"(current value {current!r})"
    ) from e
  try:
    node[leaf] = value
  except TypeError as e:  # a ConfigDict field keeps its type: a list field takes no number
    raise ConfigError(
      f"--config.{dotted}={raw!r} is a {type(value).__name__}; the field holds a "
      f"{type(current).__name__} (current value {current!r})"
    ) from e


def from_json_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """A run's config.json (local, or remote: gs://, ...; lsd.fileio.as_path makes such paths)."""
  from etils import epath

  return ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))


# Field annotations whose values dataclass_from_config checks: (test, what is accepted).
_SCALAR_TYPES = {
  "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an int"),
  "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
  "bool": (lambda v: isinstance(v, bool), "true or false"),
  "str": (lambda v: isinstance(v, str), "a string"),
}


def check_field_types(cls, values: dict[str, Any], section: str = "") -> None:
  """Raises ConfigError for a value whose type does not match its dataclass field's annotation
  (int, float, bool, str, or one of those `| None`); other annotations are not checked. A config
  read from a hand-edited config.json can hold any JSON value in any field. `section` (e.g.
  "sample") prefixes the field's name in the message."""
  import dataclasses

  for f in dataclasses.fields(cls):
    if f.name not in values:
      continue
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    optional = kind.endswith(" | None")
    kind = kind.removesuffix(" | None")
    value = values[f.name]
    if kind not in _SCALAR_TYPES or (optional and value is None):
      continue
    test, accepted = _SCALAR_TYPES[kind]
    if not test(value):
      accepted += " or null" if optional else ""
      name = f"{section}.{f.name}" if section else f.name
      raise ConfigError(
        f"{name}={value!r} must be {accepted} (field {f.name!r} of {cls.__name__}; got a "
        f"{type(value).__name__})"
      )


def dataclass_from_config(cls, cfg: ml_collections.ConfigDict, section: str = "", **overrides):
  """Builds a config dataclass from the ConfigDict fields it declares (others are ignored), after
  checking their types against the annotations (errors name the field as `section.field`), then
  calls its `validate()`."""
  import dataclasses

  fields = {f.name for f in dataclasses.fields(cls)}
  values = {k: v for k, v in cfg.items() if k in fields}
  values.update(overrides)
  check_field_types(cls, values, section)
  out = cls(**values)
  out.validate()
  return out
