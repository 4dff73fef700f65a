"""safetensors files <-> flat {dotted name: numpy array} dicts <-> our nested pure-dict params.

Reading is done here rather than through `safetensors.numpy` because checkpoints are often bfloat16,
which numpy has no dtype for: we map it to `ml_dtypes.bfloat16` (a jax dependency). The file format
is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} and
one byte buffer; tensors are returned as views of a read-only memory map (no copy until used).
Writing goes through the `safetensors` library into a temporary file that is renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file by name; bf16 tensors come back as ml_dtypes.bfloat16."""
  path = Path(path)
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  if not header:
    return {}
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise ValueError(
        f"{path}: tensor {name!r} has dtype {info['dtype']}; supported: {sorted(_DTYPES)}"
      )
    begin, end = info["data_offsets"]
    out[name] = data[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def save_safetensors(
  flat: Mapping[str, Any], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
  """Writes {name: array} (numpy or jax) to `path` atomically: a crash leaves the old file or
  none. `metadata` goes into the header (transformers requires {"format": "pt"})."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    save_file(arrays, tmp, metadata=metadata)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def flatten(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
  """Nested pure dict (e.g. `nnx.state(model).to_pure_dict()`) -> {"blocks.0.attn.q.kernel": ...}.

  Integer keys (layers of an `nnx.List`) become their decimal string.
  """
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[Any, Any]:
  """Inverse of `flatten`: dotted names -> nested dict; all-digit parts become int keys."""
  out: dict[Any, Any] = {}
  for name, value in flat.items():
    parts = [int(p) if p.isdigit() else p for p in name.split(".")]
    node = out
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return out
