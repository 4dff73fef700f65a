"""`lsd export`: a run as a self-contained model directory that loads to the same samples."""

import json
import sys
import types

import jax
import numpy as np
import pytest

from lsd import api
from lsd.config import ConfigError, load_config_file
from lsd.convert.safetensors_io import load_safetensors
from lsd.main import main

WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(200)]
  path = tmp_path_factory.mktemp("data") / "corpus.txt"
  path.write_text("\n".join(lines))
  return path


def _train(spec, corpus, workdir, **train):
  c = load_config_file(spec)
  c.data.path = str(corpus)
  c.data.tokenizer.vocab_size = 300
  c.train.update(
    {"steps": 3, "log_every": 1, "ckpt_every": 3, "warmup_steps": 1, "progress": False, **train}
  )
  c.train.num_samples = 0
  api.train(c, workdir)
  return workdir


@pytest.fixture(scope="module")
def sbd_run(corpus, tmp_path_factory):
  spec = "configs/sbd.py:size=test,data=text"
  return _train(spec, corpus, tmp_path_factory.mktemp("runs") / "sbd", ema_decay=0.9)


@pytest.fixture(scope="module")
def sbd_export(sbd_run, tmp_path_factory):
  out = tmp_path_factory.mktemp("exports") / "sbd"
  assert main(["export", "--workdir", str(sbd_run), "--out", str(out)]) == 0
  return out


def _tokens(samples):
  return [np.asarray(s["tokens"]) for s in samples]


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_writes_a_self_contained_directory(sbd_run, sbd_export):
  names = {p.name for p in sbd_export.iterdir()}
  assert {"config.json", "tokenizer.json", "model.safetensors", "README.md"} <= names
  assert "checkpoints" not in names
  assert (sbd_export / "config.json").read_text() == (sbd_run / "config.json").read_text()
  tensors = load_safetensors(sbd_export / "model.safetensors")
  plain = {k for k in tensors if not k.startswith("ema/")}
  assert plain and {f"ema/{k}" for k in plain} == set(tensors) - plain
  card = (sbd_export / "README.md").read_text()
  assert "sbd" in card and "exported step: 3" in card and "parameters:" in card
  assert "last train record (step 3)" in card and '"method": "sbd"' in card


def test_loading_the_export_reproduces_the_runs_samples(sbd_run, sbd_export, capsys):
  run, exported = api.load(str(sbd_run)), api.load(str(sbd_export))
  assert exported.step == run.step == 3
  _assert_same_params(run.params, exported.params)
  key = jax.random.key(7)
  want, got = api.sample(run, key, 3), api.sample(exported, key, 3)
  for a, b in zip(_tokens(want), _tokens(got), strict=True):
    np.testing.assert_array_equal(a, b)
  assert [s["text"] for s in want] == [s["text"] for s in got]
  # The EMA is the default; the raw params are there too.
  raw, raw_exported = api.load(sbd_run, use_ema=False), api.load(sbd_export, use_ema=False)
  _assert_same_params(raw.params, raw_exported.params)
  leaves = zip(jax.tree.leaves(raw.params), jax.tree.leaves(run.params), strict=True)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)
  # The CLI samples an exported directory like a run.
  out = sbd_export.parent / "s.jsonl"
  args = ["sample", "--workdir", str(sbd_export), "--num_samples", "3", "--seed", "7"]
  assert main([*args, "--out", str(out)]) == 0
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  assert [x["tokens"] for x in lines] == [np.asarray(t).tolist() for t in _tokens(want)]
  with pytest.raises(ConfigError, match="export of step 3"):
    api.load(sbd_export, step=2)


def test_hub_reference_loads_through_snapshot_download(sbd_export, monkeypatch):
  calls = []

  def snapshot_download(repo_id, revision=None):
    calls.append((repo_id, revision))
    return str(sbd_export)

  monkeypatch.setitem(
    sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download)
  )
  run = api.load("hf:org/name")
  assert calls == [("org/name", None)] and run.step == 3 and run.config.method == "sbd"
  with pytest.raises(ConfigError, match="hf:org/name"):
    api.load("hf:just-a-name")
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
  with pytest.raises(ConfigError, match="pip install huggingface_hub"):
    api.load("hf:org/name")


def test_causal_lm_without_ema_round_trips(corpus, tmp_path):
  spec = "configs/causal_lm.py:size=test,data=text"
  workdir = _train(spec, corpus, tmp_path / "ar", ema_decay=0.0)
  out = api.export(workdir, tmp_path / "ar_export")
  assert not any(k.startswith("ema/") for k in load_safetensors(out / "model.safetensors"))
  assert "EMA weights: no" in (out / "README.md").read_text()
  run, exported = api.load(workdir), api.load(out)
  key = jax.random.key(1)
  want, got = _tokens(api.sample(run, key, 2)), _tokens(api.sample(exported, key, 2))
  for a, b in zip(want, got, strict=True):
    np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_one_line_errors(sbd_run, sbd_export, tmp_path, capsys):
  def err(*argv):
    assert main(["export", *argv]) == 2
    return capsys.readouterr().err

  missing = err("--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
  assert "workdir=" in missing and "does not exist" in missing
  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "config.json").write_text((sbd_run / "config.json").read_text())
  (empty / "tokenizer.json").write_text((sbd_run / "tokenizer.json").read_text())
  assert "no checkpoint" in err("--workdir", str(empty), "--out", str(tmp_path / "o2"))
  assert "out=" in err("--workdir", str(sbd_run), "--out", str(sbd_export))
  assert "already an exported" in err("--workdir", str(sbd_export), "--out", str(tmp_path / "o3"))
  staged = tmp_path / "staged"
  staged.mkdir()
  c = json.loads((sbd_run / "config.json").read_text())
  c["ld4lg"] = {"autoencoder_workdir": "runs/ae"}
  (staged / "config.json").write_text(json.dumps(c))
  assert "ld4lg.autoencoder_workdir='runs/ae'" in err(
    "--workdir", str(staged), "--out", str(tmp_path / "o4")
  )
