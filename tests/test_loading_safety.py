"""Loading is safe: nothing in the package unpickles, evaluates text or runs code it reads, except
the one deliberate place, `lsd.config.load_config_file`, which executes a Python config file.

The checker walks the syntax tree of every module under lsd/; its own tests below feed it each
forbidden pattern, so a checker that stops seeing them fails here too.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lsd"

# Modules whose loaders run code or rebuild arbitrary objects from the bytes they read.
UNSAFE_MODULES = set("pickle cPickle _pickle dill cloudpickle joblib shelve marshal".split())
# The one deliberate execution of code: `--config FILE.py` runs the file's get_config (configs are
# Python by design). (file relative to the package's parent, enclosing function, called attribute)
ALLOWED = {("lsd/config.py", "load_config_file", "exec_module")}


def _keyword(call: ast.Call, name: str):
  for kw in call.keywords:
    if kw.arg == name:
      return kw.value
  return None


def _is_true(node) -> bool:
  return isinstance(node, ast.Constant) and node.value is True


def _dotted(node) -> str:
  """The dotted name of a call target ('np.load', 'torch.load'); '' if it is not a name chain."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    parts.append(node.id)
    return ".".join(reversed(parts))
  return ""


def violations(source: str, filename: str) -> list[str]:
  """Every unsafe loading construct in `source`, as "file:line: what"."""
  tree = ast.parse(source, filename)
  found = []
  # The enclosing function of every node, for the allow list.
  owner: dict[ast.AST, str] = {}
  for fn in ast.walk(tree):
    if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
      for child in ast.walk(fn):
        owner.setdefault(child, fn.name)

  def flag(node, what):
    found.append(f"{filename}:{node.lineno}: {what}")

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] in UNSAFE_MODULES:
          flag(node, f"imports {alias.name}")
    elif isinstance(node, ast.ImportFrom):
      if (node.module or "").split(".")[0] in UNSAFE_MODULES:
        flag(node, f"imports from {node.module}")
    elif isinstance(node, ast.Attribute) and node.attr in ("read_pickle", "to_pickle"):
      flag(node, f"uses {node.attr}")
    elif isinstance(node, ast.Call):
      name = _dotted(node.func)
      last = name.rsplit(".", 1)[-1]
      if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "compile"):
        flag(node, f"calls {node.func.id}()")
      elif last == "load" and name.split(".")[0] in ("np", "numpy", "jnp"):
        if _is_true(_keyword(node, "allow_pickle")):
          flag(node, f"{name}(..., allow_pickle=True)")
      elif name == "torch.load":
        if not _is_true(_keyword(node, "weights_only")):
          flag(node, "torch.load without weights_only=True")
      elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
        flag(node, f"{name} (use yaml.safe_load)")
      elif isinstance(node.func, ast.Attribute) and node.func.attr in ("exec_module", "run_path"):
        key = (filename, owner.get(node, ""), node.func.attr)
        if key not in ALLOWED:
          flag(node, f"executes code with {node.func.attr}()")
  return found


def test_the_package_loads_nothing_unsafely():
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 30  # the walk sees the package
  found = []
  for path in files:
    rel = path.relative_to(PACKAGE.parent).as_posix()
    found += violations(path.read_text(encoding="utf-8"), rel)
  assert found == []


def test_the_allowed_config_execution_is_still_where_the_allow_list_says():
  # If load_config_file stops executing config files this way, the allow list must shrink with it.
  source = (PACKAGE / "config.py").read_text(encoding="utf-8")
  assert violations(source, "lsd/config.py") == []
  found = violations(source, "lsd/other.py")
  assert len(found) == 1 and found[0].endswith(": executes code with exec_module()"), found


@pytest.mark.parametrize(
  "source, what",
  [
    ("import pickle", "imports pickle"),
    ("import cloudpickle as cp", "imports cloudpickle"),
    ("from joblib import load", "imports from joblib"),
    ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", "np.load(..., allow_pickle=True)"),
    ("import torch\ntorch.load('m.pt')", "torch.load without weights_only=True"),
    ("import torch\ntorch.load('m.pt', weights_only=False)", "torch.load without weights_only"),
    ("x = eval(open('c.txt').read())", "calls eval()"),
    ("exec(text)", "calls exec()"),
    ("import pandas as pd\npd.read_pickle('f')", "uses read_pickle"),
    ("import yaml\nyaml.load(s)", "yaml.load (use yaml.safe_load)"),
    ("def f(spec):\n  spec.loader.exec_module(m)", "executes code with exec_module()"),
  ],
)
def test_the_checker_flags_each_unsafe_pattern(source, what):
  found = violations(source, "lsd/x.py")
  assert len(found) == 1 and what in found[0], found


@pytest.mark.parametrize(
  "source",
  [
    "import numpy as np\nnp.load('a.npz', allow_pickle=False)",
    "import numpy as np\nnp.load('a.npy')",
    "import torch\ntorch.load('m.pt', weights_only=True)",
    "import re\nre.compile('a+')",
    "import json\njson.loads(s)",
    "import yaml\nyaml.safe_load(s)",
  ],
)
def test_the_checker_passes_safe_loading(source):
  assert violations(source, "lsd/x.py") == []
