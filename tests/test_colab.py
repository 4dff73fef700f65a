"""The Colab notebooks run top to bottom on CPU, as on a fresh runtime after `pip install`: lsd and
configs come from a wheel built from this checkout, the notebook runs from a directory outside the
checkout (code cells in order as one script, shell and magic lines skipped), and its outputs are
checked: the figures it saved are PNG files, the sample texts it printed are not empty."""

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
# Per notebook, printed lines that hold a sample text (the group): at least one, none empty.
SAMPLE_LINES = {
  "sbd_quickstart": r"^revised: (.*)$",
  "ld4lg_quickstart": r"^  (?:business|entertainment|politics|sport|tech) +(.*)$",
  "sld_quickstart": r"^generated: (.*)$",
  "dglm_quickstart": r"^  [^|]+ \| (.*)$",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(args, **kw):
  return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def wheel_python(tmp_path_factory) -> Path:
  """The python of a fresh venv with lsd and configs installed from a wheel built from a copy of
  the checkout (a copy: setuptools' build/ directory in the checkout may hold stale modules). The
  heavy dependencies come from this environment: `--system-site-packages` shares the base
  interpreter's, and a .pth file adds this environment's site-packages after the venv's own. Their
  .pth files are not processed from there, so an editable install of lsd here stays invisible."""
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("lsd", "configs"):
    shutil.copytree(ROOT / name, src / name, ignore=ignore)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
  _run([*wheel, "-w", str(tmp / "dist"), str(src)])
  (whl,) = (tmp / "dist").glob("lsd-*.whl")
  venv = tmp / "venv"
  _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
  python = venv / "bin" / "python"
  purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
  (Path(purelib.stdout.strip()) / "outer_env.pth").write_text("\n".join(site.getsitepackages()))
  _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)])
  probe = "import lsd, configs; print(lsd.__file__, configs.__file__)"
  where = _run([str(python), "-c", probe], cwd=tmp)  # not the checkout: `-c` imports from cwd
  for module in where.stdout.split():
    assert not Path(module).resolve().is_relative_to(ROOT), (module, "is the checkout's")
  return python


def notebook_script(path: Path) -> str:
  """The notebook's code cells, in order, without shell (`!`) and magic (`%`) lines."""
  cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
  keep = lambda line: not line.lstrip().startswith(("!", "%"))
  return "\n\n".join("".join(filter(keep, c["source"])) for c in cells) + "\n"


def test_every_notebook_is_checked():
  assert {p.stem for p in NOTEBOOKS} == set(SAMPLE_LINES)


@pytest.mark.slow  # trains tiny models: minutes per notebook on 2 CPU cores
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, wheel_python, tmp_path):
  script = tmp_path / f"{path.stem}.py"
  script.write_text(notebook_script(path))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["MPLBACKEND"] = "Agg"
  proc = subprocess.run(
    [str(wheel_python), script.name],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=3600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "lsd is not installed" not in proc.stdout + proc.stderr
  assert (tmp_path / "runs").is_dir()
  figures = sorted(tmp_path.glob("*.png"))
  assert figures, f"{path.name} saved no figure (savefig to the working directory)"
  for fig in figures:
    assert fig.read_bytes()[:8] == PNG_MAGIC and fig.stat().st_size > 1000, fig.name
  texts = re.findall(SAMPLE_LINES[path.stem], proc.stdout, flags=re.MULTILINE)
  assert texts, f"{path.name} printed no sample text:\n{proc.stdout[-3000:]}"
  assert all(t.strip() for t in texts), texts
