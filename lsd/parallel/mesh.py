"""Device mesh over the axes (data, fsdp, tensor) and logical-axis rules that map parameters onto it.

Sizes come from the config (`config.mesh`); one size may be -1 and absorbs the remaining devices. The
mesh uses `AxisType.Auto` (GSPMD propagation): parameters and batches carry shardings, and XLA
propagates them through the computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsd.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical parameter/activation axis -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv", "tensor"),
  ("mlp", "tensor"),
  ("head_dim", None),
  ("cond", None),
  ("latent", None),
)


def default_mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "data": -1,
      "fsdp": 1,
      "tensor": 1,
      "rules": [list(r) for r in DEFAULT_RULES],
      # Pin activations to the batch split at Transformer block boundaries (a memory lever under
      # FSDP / tensor parallelism; lsd.nn.transformer.constrain_batch).
      "constrain_activations": False,
    }
  )


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  sizes = [cfg[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes, strict=True):
    if isinstance(size, bool) or not isinstance(size, int) or size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}={size!r} must be a positive integer or -1 (auto)")
  if sizes.count(-1) > 1:
    raise ConfigError(
      f"mesh sizes {dict(zip(MESH_AXES, sizes, strict=True))}: at most one may be -1"
    )
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh sizes {sizes}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      f"mesh data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices; "
      "set one axis to -1 to absorb the rest"
    )
  return tuple(sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_from_config(cfg: ml_collections.ConfigDict) -> dict[str, str | tuple[str, ...] | None]:
  rules = {}
  entries = cfg.get("rules", DEFAULT_RULES)
  shape = "[logical_axis, mesh_axis | [mesh_axes] | null] pairs, e.g. [['embed', 'fsdp']]"
  if not isinstance(entries, list | tuple):
    raise ConfigError(f"mesh.rules={entries!r} must be a list of {shape}")
  for entry in entries:
    ok = isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], str)
    target = entry[1] if ok else None
    if not ok or not (target is None or isinstance(target, str | list | tuple)):
      raise ConfigError(f"mesh.rules entry {entry!r} must be one of the {shape}")
    name = entry[0]
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    for t in targets:
      if t not in MESH_AXES:
        raise ConfigError(f"mesh.rules: {name!r} -> {t!r}; accepted mesh axes: {list(MESH_AXES)}")
    rules[name] = tuple(target) if isinstance(target, list | tuple) else target
  return rules


def logical_to_spec(
  logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec. A dimension stays replicated when its size is not
  divisible by the mesh axes it maps to, or when those axes are already used by another dimension."""
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape, strict=True):
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def batch_sharding(mesh: Mesh, rules: dict, ndim: int) -> NamedSharding:
  """Leading (batch) dim over the 'batch' rule's axes, the rest replicated."""
  target = rules.get("batch", ("data", "fsdp"))
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  return NamedSharding(mesh, PartitionSpec(axes or None, *([None] * (ndim - 1))))
