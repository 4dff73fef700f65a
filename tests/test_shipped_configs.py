"""Configs shipped with the package load by name from any directory (`--config sbd:size=tiny`),
and file paths keep working for user configs."""

import subprocess
import sys
from pathlib import Path

import pytest

from lsd.config import ConfigError, load_config_file, shipped_config_names, shipped_configs_dir

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_is_listed():
  assert shipped_config_names() == sorted(
    p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common")
  )
  assert (shipped_configs_dir() / "sbd.py").read_text() == (ROOT / "configs/sbd.py").read_text()


@pytest.mark.parametrize("name", ["sbd:size=tiny", "sbd.py:size=tiny"])
def test_a_name_loads_the_same_config_as_its_file_from_another_directory(
  name, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)  # no configs/ folder here
  by_name = load_config_file(name)
  by_file = load_config_file(f"{ROOT / 'configs/sbd.py'}:size=tiny")
  assert by_name.to_dict() == by_file.to_dict()
  assert by_name.model.d_model == by_file.model.d_model and by_name.method == "sbd"


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "sbd").write_text(
    "from configs.sbd import get_config as base\n\n"
    "def get_config(arg):\n  c = base(arg)\n  c.train.steps = 123\n  return c\n"
  )
  # `sbd` names the local file here, which is not a .py file: refused, not silently replaced.
  with pytest.raises(ConfigError, match=r"not a Python config file"):
    load_config_file("sbd:size=tiny")
  (tmp_path / "mine.py").write_text((tmp_path / "sbd").read_text())
  assert load_config_file("mine.py:size=tiny").train.steps == 123


def test_unknown_names_list_the_shipped_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match=r"'nope' does not exist; .*: \['causal_lm', 'dglm'"):
    load_config_file("nope:size=tiny")
  with pytest.raises(ConfigError, match=r"'sub/sbd' does not exist"):
    load_config_file("sub/sbd:size=tiny")  # a path is never a name


def test_the_cli_takes_a_name_from_another_directory(tmp_path):
  out = subprocess.run(
    [sys.executable, "-m", "lsd.main", "train", "--config", "causal_lm:size=test,data=text",
     "--config.train.steps=abc", "--workdir", str(tmp_path / "run")],
    cwd=tmp_path, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  # The config loaded by name; the override is what fails, in one line naming the field.
  assert out.returncode == 2, out.stderr
  assert "train.steps='abc' does not parse as int" in out.stderr
  assert not (tmp_path / "run" / "config.json").exists()
