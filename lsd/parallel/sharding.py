"""Sharded model state: shardings derived from logical axes under `jax.eval_shape`, and jitted init.

The model is never materialised on one device: `nnx.eval_shape` gives the abstract state with its
logical axis metadata, the rules turn that into NamedShardings, and a jitted init writes each
parameter directly into its shards.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsd.parallel.mesh import logical_to_spec


def _logical_axes(variable) -> tuple | None:
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: dict) -> nnx.State:
  """NamedSharding for every variable of an (abstract) nnx.State, from its logical axes."""

  def one(variable):
    shape = variable.get_value().shape
    axes = _logical_axes(variable)
    spec = logical_to_spec(axes, shape, mesh, rules) if axes else PartitionSpec()
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_init(
  build: Callable[[], nnx.Module], mesh: Mesh, rules: dict
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """Returns (graphdef, state, shardings) with `state` created directly in its shards."""
  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_sharded(
  build: Callable[[], nnx.Module], mesh: Mesh, rules: dict
) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, state) with every leaf a `jax.ShapeDtypeStruct` carrying its sharding: the model
  under `nnx.eval_shape`, nothing allocated or compiled. The target to restore a checkpoint into,
  or to place loaded tensors by (a random init would only be overwritten)."""
  graphdef, state = nnx.split(nnx.eval_shape(build))
  shardings = state_shardings(state, mesh, rules)
  placed = jax.tree.map(
    lambda v, s: v.replace(
      jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s.get_value())
    ),
    state,
    shardings,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return graphdef, placed


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
