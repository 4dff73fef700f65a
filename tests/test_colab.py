"""The Colab notebooks run top to bottom on CPU (code cells executed in order, shell lines skipped)."""

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "colab").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
  # From a directory outside the checkout, as on a Colab runtime after `pip install`: the
  # notebooks name shipped configs (`sbd:size=...`), never a path relative to the repository.
  monkeypatch.chdir(tmp_path)
  namespace: dict = {}
  for cell in json.loads(path.read_text())["cells"]:
    if cell["cell_type"] != "code":
      continue
    code = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
    exec(compile(code, f"{path.name}", "exec"), namespace)  # noqa: S102
  assert os.path.isdir(tmp_path / "runs")
