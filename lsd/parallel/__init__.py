"""Mesh construction, logical-axis rules and sharded initialisation."""

from lsd.parallel.mesh import (
  DEFAULT_RULES,
  MESH_AXES,
  batch_sharding,
  default_mesh_config,
  logical_to_spec,
  make_mesh,
  mesh_shape,
  rules_from_config,
)
from lsd.parallel.sharding import abstract_sharded, replicated, sharded_init, state_shardings

__all__ = [
  "DEFAULT_RULES",
  "MESH_AXES",
  "abstract_sharded",
  "batch_sharding",
  "default_mesh_config",
  "logical_to_spec",
  "make_mesh",
  "mesh_shape",
  "replicated",
  "rules_from_config",
  "sharded_init",
  "state_shardings",
]
