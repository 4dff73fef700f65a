"""Where a compiled step spends its time: a `jax.profiler` trace summed per source line.

A trace names the compiled program's ops (`fusion.12`, `dot.3`, ...); the program's HLO text says
which JAX operation and which line of Python each op comes from. `top_costs` joins the two: the
time of every op of one program in the trace, grouped by the innermost frame inside `lsd/` of the
code that emitted it (else the innermost frame at all), per traced step, with the share of the
program's summed op self time (a loop's body ops count for themselves, not for the loop).
Works on any backend whose trace records per-op events (XLA:CPU's thunk executor, GPU, TPU).

    with jax.profiler.trace(d, create_perfetto_trace=True):
      ...run the step n times...
    top_costs(d, step.lower(*args).compile().as_text(), steps=n)
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
from pathlib import Path

_TABLE = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")


@dataclasses.dataclass(frozen=True)
class Cost:
  """The ops of one source location: `ms_per_step` of op time and its `share` of the program's."""

  source: str  # "lsd/nn/attention.py:57 dot_product_attention", or "?" without metadata
  ms_per_step: float
  share: float
  ops: tuple[str, ...]  # the HLO ops, slowest first
  kinds: tuple[str, ...]  # their JAX operations (dot_general, exp, transpose, ...), slowest first

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {"ops": list(self.ops[:8]), "kinds": list(self.kinds)}


def _tables(lines: list[str]) -> dict[str, dict[int, str]]:
  tables: dict[str, dict[int, str]] = {}
  current = None
  for line in lines:
    if _TABLE.match(line):
      current = tables.setdefault(line, {})
    elif current is not None and (m := re.match(r"^(\d+) (.*)$", line)):
      current[int(m.group(1))] = m.group(2)
    else:
      current = None
  return tables


def _field(s: str, name: str) -> int:
  return int(re.search(rf"\b{name}=(\d+)", s).group(1))


def _short(path: str) -> str:
  """A source path from `lsd/` on (the project's files), else its file name."""
  parts = Path(path.strip('"')).parts
  return "/".join(parts[parts.index("lsd") :]) if "lsd" in parts else parts[-1]


def hlo_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Op name -> (JAX operation, source location) for every instruction of an HLO module's text
  (`compiled.as_text()`) that carries metadata. The location is the innermost stack frame inside
  `lsd/`, else the innermost frame; "?" without one."""
  lines = hlo_text.splitlines()
  t = _tables(lines)
  files, funcs = t.get("FileNames", {}), t.get("FunctionNames", {})
  locs, frames = t.get("FileLocations", {}), t.get("StackFrames", {})

  def location(loc_id: int) -> tuple[str, str]:
    s = locs[loc_id]
    path = files.get(_field(s, "file_name_id"), '"?"').strip('"')
    func = funcs.get(_field(s, "function_name_id"), '"?"').strip('"').split(".<locals>.")[-1]
    return path, f"{_short(path)}:{_field(s, 'line')} {func}"

  def source(frame_id: int) -> str:
    first = None
    seen = set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      s = frames[frame_id]
      path, where = location(_field(s, "file_location_id"))
      first = first or where
      if "lsd" in Path(path).parts:
        return where
      # The text prints a frame's parent as its id + 1 (0: none), so the root has 1.
      frame_id = _field(s, "parent_frame_id") - 1
    return first or "?"

  out = {}
  for line in lines:
    m = _INSTR.match(line)
    if not m:
      continue
    meta = m.group(2)
    op = _OP_NAME.search(meta)
    kind = op.group(1).rsplit("/", 1)[-1] if op else "?"
    frame = _FRAME.search(meta)
    out[m.group(1)] = (kind, source(int(frame.group(1))) if frame else "?")
  return out


def trace_events(trace_dir: str | Path) -> list[dict]:
  """The complete events of the newest Perfetto trace under `trace_dir` (written by
  `jax.profiler.trace(..., create_perfetto_trace=True)`)."""
  found = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not found:
    raise FileNotFoundError(
      f"no perfetto_trace.json.gz under {trace_dir}: trace with create_perfetto_trace=True"
    )
  with gzip.open(found[-1]) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X"]


def op_times(events: list[dict], module: str) -> dict[str, float]:
  """Summed self time in microseconds per op of the HLO module named `module` (e.g.
  "jit_step_fn"). A control-flow op (while, conditional) spans the ops of its body on the same
  thread; its self time leaves them out, so no time is counted twice."""
  threads: dict[tuple, list[dict]] = collections.defaultdict(list)
  for e in events:
    args = e.get("args") or {}
    if args.get("hlo_module") == module and "hlo_op" in args:
      threads[(e.get("pid"), e.get("tid"))].append(e)
  times: dict[str, float] = collections.defaultdict(float)
  for evs in threads.values():
    evs.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
    stack: list[tuple[float, str]] = []  # (end time, op) of the enclosing ops
    for e in evs:
      ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
      while stack and ts >= stack[-1][0]:
        stack.pop()
      op = e["args"]["hlo_op"]
      times[op] += dur
      if stack:  # inside its parent: not the parent's own time
        times[stack[-1][1]] -= dur
      stack.append((ts + dur, op))
  return {op: max(t, 0.0) for op, t in times.items()}


def module_name(hlo_text: str) -> str:
  m = re.match(r"HloModule ([\w.\-]+)", hlo_text)
  if not m:
    raise ValueError("not an HLO module's text (it should begin with 'HloModule <name>')")
  return m.group(1)


def top_costs(trace_dir: str | Path, hlo_text: str, steps: int, k: int = 5) -> list[Cost]:
  """The `k` source locations whose ops took the most time in the trace, per step (the trace
  covers `steps` runs of the program whose HLO text is `hlo_text`)."""
  times, sources = _traced_ops(trace_dir, hlo_text, steps)
  total = sum(times.values())
  groups: dict[str, list[tuple[float, str, str]]] = collections.defaultdict(list)
  for op, us in times.items():
    kind, where = sources.get(op, ("?", "?"))
    groups[where].append((us, op, kind))
  costs = []
  for where, ops in groups.items():
    ops.sort(reverse=True)
    us = sum(t for t, _, _ in ops)
    kinds = tuple(dict.fromkeys(kind for _, _, kind in ops))
    costs.append(Cost(where, us / steps / 1e3, us / total, tuple(op for _, op, _ in ops), kinds))
  costs.sort(key=lambda c: -c.ms_per_step)
  return costs[:k]


def time_by_kind(trace_dir: str | Path, hlo_text: str, steps: int) -> dict[str, float]:
  """Milliseconds of op self time per step for each JAX operation (`dot_general`, `exp`, ...; "?"
  for ops without metadata), largest first: e.g. how much of a step is matmuls at all."""
  times, sources = _traced_ops(trace_dir, hlo_text, steps)
  out: dict[str, float] = collections.defaultdict(float)
  for op, us in times.items():
    out[sources.get(op, ("?", "?"))[0]] += us / steps / 1e3
  return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _traced_ops(trace_dir, hlo_text: str, steps: int):
  if steps < 1:
    raise ValueError(f"steps={steps!r}: the number of traced runs, >= 1")
  times = op_times(trace_events(trace_dir), module_name(hlo_text))
  if not times:
    raise ValueError(f"the trace under {trace_dir} has no ops of {module_name(hlo_text)}")
  return times, hlo_sources(hlo_text)
