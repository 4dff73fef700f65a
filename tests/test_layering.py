"""The import graph of `lsd/` points one way: nn <- models <- diffusion / sampling <- methods <-
api / main, with `train` knowing no method. Every import statement the `ast` module finds counts,
function-level ones included."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lsd"


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = importer.split(".")
  base = base if is_package else base[:-1]
  base = base[: len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
  """module -> the lsd modules it imports (`from lsd.x import y` counts lsd.x.y when that is a
  module, else lsd.x)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = _resolve(name, path.name == "__init__.py", node)
        found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      else:
        continue
      for target in found:
        while target and target not in modules and "." in target:
          target = target.rsplit(".", 1)[0]
        if target in modules and target.startswith("lsd") and target != name:
          targets.add(target)
    graph[name] = targets
  return graph


def _in(module: str, package: str) -> bool:
  return module == package or module.startswith(package + ".")


# (importer package, imported package, why the arrow is forbidden)
FORBIDDEN = [
  ("lsd.diffusion", "lsd.models", "the diffusion math takes models through Protocols"),
  ("lsd.models", "lsd.convert", "loading files belongs to convert and the encoder registry"),
  ("lsd.train", "lsd.methods", "the trainer is handed a Task; the CLI resolves it"),
]


def _violations(graph) -> list[str]:
  out = []
  for importer, targets in graph.items():
    for target in sorted(targets):
      if _in(importer, "lsd.nn") and target != "lsd.config" and not _in(target, "lsd.nn"):
        out.append(f"{importer} -> {target}: lsd.nn imports nothing in lsd but lsd.config")
      for src, dst, why in FORBIDDEN:
        if _in(importer, src) and _in(target, dst):
          out.append(f"{importer} -> {target}: {why}")
      # The CLI is a front end of the API; nothing else imports either.
      if target == "lsd.main" or (target == "lsd.api" and importer != "lsd.main"):
        out.append(f"{importer} -> {target}: nothing in lsd imports the API or the CLI")
  return out


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_graph_is_read():
  graph = import_graph()
  assert "lsd.nn.transformer" in graph["lsd.models.masked_lm"] or any(
    _in(t, "lsd.nn") for t in graph["lsd.models.masked_lm"]
  )
  assert "lsd.train.trainer" in graph["lsd.main"]  # a function-level import


def test_no_forbidden_arrows():
  assert _violations(import_graph()) == []


def test_no_import_cycles():
  # Package __init__ modules re-export their submodules; a submodule importing a sibling through
  # the package is not a cycle of layers, so package inits are left out.
  graph = {
    k: {t for t in v if not (PACKAGE / Path(*t.split(".")[1:]) / "__init__.py").exists()}
    for k, v in import_graph().items()
  }
  assert _cycles(graph) == []


@pytest.mark.parametrize(
  ("importer", "target", "rule"),
  [
    ("lsd.nn.layers", "lsd.models.bert", "lsd.nn imports nothing"),
    ("lsd.diffusion.gaussian", "lsd.models.denoiser", "Protocols"),
    ("lsd.train.trainer", "lsd.methods.sbd", "handed a Task"),
    ("lsd.methods.sbd", "lsd.api", "imports the API"),
  ],
)
def test_the_rules_catch_a_planted_arrow(importer, target, rule):
  assert any(rule in v for v in _violations({importer: {target}}))
