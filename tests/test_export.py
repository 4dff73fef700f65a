"""`lsd export`: a run as a self-contained model directory that loads to the same samples."""

import json
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util
from tiny import WORDS

from lsd import api
from lsd.config import ConfigError, load_config_file
from lsd.convert.safetensors_io import load_safetensors
from lsd.main import main


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
  c.sample.max_new_tokens = 8  # short samples: cheap to compile and draw
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


def test_loading_the_export_reproduces_the_runs_samples(sbd_run, sbd_export):
  run, exported = api.load(str(sbd_run)), api.load(str(sbd_export))
  assert exported.step == run.step == 3
  _assert_same_params(run.params, exported.params)
  key = jax.random.key(7)
  want, got = api.sample(run, key, 3), api.sample(exported, key, 3)
  for a, b in zip(_tokens(want), _tokens(got), strict=True):
    np.testing.assert_array_equal(a, b)
  assert [s["text"] for s in want] == [s["text"] for s in got]
  # The EMA is the default; the raw params are there too, under their own names.
  raw = api.load(sbd_run, use_ema=False)
  tensors = load_safetensors(sbd_export / "model.safetensors")
  flat = traverse_util.flatten_dict(raw.params.to_pure_dict())
  names = {".".join(map(str, k)): v for k, v in flat.items()}
  for name, value in names.items():
    np.testing.assert_array_equal(np.asarray(value), tensors[name])
  assert any(not np.array_equal(tensors[n], tensors[f"ema/{n}"]) for n in names)
  _assert_same_params(raw.params, api.load(sbd_export, use_ema=False).params)
  with pytest.raises(ConfigError, match="export of step 3"):
    api.load(sbd_export, step=2)


def test_hub_reference_loads_through_snapshot_download(sbd_export, monkeypatch):
  calls, loaded = [], []

  def snapshot_download(repo_id, revision=None):
    calls.append((repo_id, revision))
    return str(sbd_export)

  monkeypatch.setitem(
    sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download)
  )
  monkeypatch.setattr(api, "load_run", lambda path, *a, **k: loaded.append(str(path)) or path)
  api.load("hf:org/name")
  api.load("hf:org/name@v1")
  assert calls == [("org/name", None), ("org/name", "v1")]
  assert loaded == [str(sbd_export)] * 2  # then loaded as a local exported directory
  with pytest.raises(ConfigError, match="hf:just-a-name"):
    api.load("hf:just-a-name")
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
  with pytest.raises(ConfigError, match="pip install huggingface_hub"):
    api.load("hf:org/name")


def _untrained_run(spec, corpus, workdir, tokenizer, step=3, **ld4lg):
  """A run directory as the trainer leaves it (config.json, tokenizer.json, a checkpoint at
  `step`), its params the random init and no EMA: no train step to compile. `ld4lg`: fields of
  its config's ld4lg section (`ae_workdir` stands for autoencoder_workdir)."""
  from lsd.data.tokenizer import Tokenizer
  from lsd.methods import get_task
  from lsd.train.checkpoint import Checkpointer
  from lsd.train.state import init_state, make_optimizer

  c = load_config_file(spec)
  c.data.path = str(corpus)
  c.sample.max_new_tokens = 8
  c.train.ema_decay = 0.0
  if "ae_workdir" in ld4lg:
    ld4lg["autoencoder_workdir"] = ld4lg.pop("ae_workdir")
  if ld4lg:
    c.ld4lg.update(ld4lg)
    c.sample.update(steps=4, num_beams=1)  # cheap samples: the test compares them, not quality
  workdir.mkdir()
  (workdir / "config.json").write_text(c.to_json())
  (workdir / "tokenizer.json").write_text(tokenizer.read_text())
  task = get_task(c)
  task.tokenizer = Tokenizer.load(tokenizer)
  params = nnx.state(task.build_model(nnx.Rngs(c.seed)))
  state = init_state(params, make_optimizer(c.train), ema=False)
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  ckpt.save(step, state.replace(step=np.int32(step)), force=True)
  ckpt.close()
  return workdir


def test_causal_lm_without_ema_round_trips(corpus, sbd_run, tmp_path):
  spec = "configs/causal_lm.py:size=test,data=text"
  workdir = _untrained_run(spec, corpus, tmp_path / "ar", sbd_run / "tokenizer.json")
  out = api.export(workdir, tmp_path / "ar_export")
  assert not any(k.startswith("ema/") for k in load_safetensors(out / "model.safetensors"))
  assert "EMA weights: no" in (out / "README.md").read_text()
  run = api.load(workdir)
  want = _tokens(api.sample(run, jax.random.key(1), 2))
  # The CLI samples an exported directory like a run.
  samples = tmp_path / "s.jsonl"
  args = ["sample", "--workdir", str(out), "--num_samples", "2", "--seed", "1"]
  assert main([*args, "--out", str(samples)]) == 0
  got = [json.loads(x)["tokens"] for x in samples.read_text().splitlines()]
  assert got == [t.tolist() for t in want]


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


def test_a_multi_stage_latent_run_exports_with_its_stages(corpus, sbd_run, tmp_path):
  """An LD4LG decoder-tuning run loads two runs (its denoiser and the autoencoder, which the
  denoiser loads too): the export holds each once under stages/, its config points there by
  relative paths, and with the original runs moved away the directory loads to the same samples."""
  tok = sbd_run / "tokenizer.json"
  runs = tmp_path / "runs"
  runs.mkdir()
  spec = "configs/ld4lg_yelp.py:size=test,stage="
  ae = str(_untrained_run(spec + "ae", corpus, runs / "ae", tok))
  diff = str(_untrained_run(spec + "diffusion", corpus, runs / "diff", tok, ae_workdir=ae))
  dec = _untrained_run(
    spec + "decoder", corpus, runs / "dec", tok, ae_workdir=ae, denoiser_workdir=diff
  )
  loaded = {name: api.load(run) for name, run in (("diff", diff), ("dec", dec))}
  want = api.sample(loaded["dec"], jax.random.key(2), 2)
  out = api.export(dec, tmp_path / "export")
  assert sorted(p.name for p in (out / "stages").iterdir()) == ["ld4lg_ae", "ld4lg_diffusion"]
  config = json.loads((out / "config.json").read_text())
  assert config["ld4lg"]["autoencoder_workdir"] == "./stages/ld4lg_ae"
  assert config["ld4lg"]["denoiser_workdir"] == "./stages/ld4lg_diffusion"
  inner = json.loads((out / "stages" / "ld4lg_diffusion" / "config.json").read_text())
  assert inner["ld4lg"]["autoencoder_workdir"] == "../ld4lg_ae"
  assert "`stages/ld4lg_ae`" in (out / "README.md").read_text()
  runs.rename(tmp_path / "moved")  # nothing may read the original runs now
  moved = tmp_path / "elsewhere"
  out.rename(moved)  # and the directory itself can move
  run = api.load(moved)
  assert run.config.ld4lg.autoencoder_workdir == str(moved / "stages" / "ld4lg_ae")
  _assert_same_params(run.params, loaded["dec"].params)
  assert api.sample(run, jax.random.key(2), 2) == want
  _assert_same_params(api.load(moved / "stages" / "ld4lg_diffusion").params, loaded["diff"].params)
