"""Runs that build on earlier runs (`lsd.train.stages`): loading the run a config field names with a
method check, checking two runs are one, comparing configs, and copying parameter subtrees into a
fresh init; every error names the field (and the parameter or config fields that differ)."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx

from lsd.config import ConfigError
from lsd.train import stages


class Reached(Exception):
  """Raised by the task factory: the loader got past its checks to restoring the run."""


def _never(config):
  raise Reached(config.method)


def _run_dir(path, method: str):
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"method": method}))
  return str(path)


def test_load_stage_run_checks_the_field_before_restoring(tmp_path):
  with pytest.raises(ConfigError, match=r"ld4lg.autoencoder_workdir is empty; .*ld4lg_ae run"):
    stages.load_stage_run("ld4lg.autoencoder_workdir", "", _never, "ld4lg_ae")
  missing = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"ld4lg.x='.*missing' holds no config.json"):
    stages.load_stage_run("ld4lg.x", missing, _never, "ld4lg_ae")
  sbd = _run_dir(tmp_path / "sbd", "sbd")
  with pytest.raises(
    ConfigError,
    match=r"ld4lg.x='.*sbd' is a 'sbd' run; it must be a ld4lg_ae or ld4lg_decoder run "
    r"\(configs/ld4lg_yelp.py\)$",
  ):
    stages.load_stage_run(
      "ld4lg.x", sbd, _never, ("ld4lg_ae", "ld4lg_decoder"), "(configs/ld4lg_yelp.py)"
    )
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match=r"ld4lg.x='.*bad': its config.json is not valid JSON"):
    stages.load_stage_run("ld4lg.x", str(bad), _never, "ld4lg_ae")
  # The right method: on to restoring the run (the task factory is called with its config).
  ae = _run_dir(tmp_path / "ae", "ld4lg_ae")
  with pytest.raises(Reached, match="ld4lg_ae"):
    stages.load_stage_run("ld4lg.x", ae, _never, "ld4lg_ae")
  with pytest.raises(ConfigError, match=r"workdir='.*missing' holds no config.json"):
    stages.load_run(missing, _never)


def test_check_same_run_compares_resolved_directories(tmp_path):
  (tmp_path / "ae").mkdir()
  a, b = str(tmp_path / "ae"), str(tmp_path / "ae" / ".." / "ae")
  stages.check_same_run("x.a", a, "x.b", b, "one autoencoder")
  with pytest.raises(ConfigError, match=r"x.a='.*ae' and x.b='.*other' differ: one autoencoder"):
    stages.check_same_run("x.a", a, "x.b", str(tmp_path / "other"), "one autoencoder")


@dataclasses.dataclass(frozen=True)
class Sizes:
  d_model: int = 32
  n_layers: int = 1
  dropout: float = 0.0


def test_config_diffs_name_every_differing_field():
  assert stages.config_diff(Sizes(), {"d_model": 32, "n_layers": 2, "extra": 1}) == [
    ("dropout", 0.0, None),
    ("extra", None, 1),
    ("n_layers", 1, 2),
  ]
  assert stages.config_diff(Sizes(), Sizes(dropout=0.1), ignore=("dropout",)) == []
  with pytest.raises(ConfigError) as e:
    stages.check_same_section("model", "ld4lg.ae", {"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0})
  assert (
    str(e.value)
    == "model fields differ from the run in ld4lg.ae: model.b=2 vs 3; model.c=None vs 0"
  )
  stages.check_same_section("model", "ld4lg.ae", {"a": 1}, {"a": 1})
  kw = dict(names=("LM", "AE decoder"), what="not the decoder", hint="train it again")
  stages.check_fields_match("x.init", "lm", Sizes(dropout=0.1), Sizes(), ignore=("dropout",), **kw)
  with pytest.raises(ConfigError) as e:
    stages.check_fields_match("x.init", "lm", Sizes(), Sizes(n_layers=2, d_model=64), **kw)
  assert str(e.value) == (
    "x.init='lm': not the decoder (d_model: LM 32, AE decoder 64; n_layers: LM 1, AE decoder 2); "
    "train it again"
  )


class Decoder(nnx.Module):
  def __init__(self, cross: bool, rngs: nnx.Rngs):
    self.embed = nnx.Linear(4, 3, rngs=rngs)
    self.out = nnx.Linear(3, 5, rngs=rngs)
    self.cross = nnx.Linear(3, 3, rngs=rngs) if cross else None


class Autoencoder(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.encoder = nnx.Linear(2, 2, rngs=rngs)
    self.decoder = Decoder(True, rngs)


def test_copy_params_transplants_a_subtree_and_names_a_misfit():
  params = nnx.state(Autoencoder(nnx.Rngs(0)), nnx.Param)
  init = jax.tree.map(np.asarray, params.to_pure_dict())
  lm = nnx.state(Decoder(False, nnx.Rngs(1)), nnx.Param)
  out, fresh = stages.copy_params(params, lm, field="x.init", path="lm", into=("decoder",))
  got, src = out.to_pure_dict(), lm.to_pure_dict()
  for name in ("embed", "out"):
    for p in ("kernel", "bias"):
      np.testing.assert_array_equal(got["decoder"][name][p], src[name][p])
  assert sorted(fresh) == [("decoder", "cross", "bias"), ("decoder", "cross", "kernel")]
  np.testing.assert_array_equal(
    got["decoder"]["cross"]["kernel"], init["decoder"]["cross"]["kernel"]
  )
  np.testing.assert_array_equal(got["encoder"]["kernel"], init["encoder"]["kernel"])
  jax.tree.map(np.testing.assert_array_equal, params.to_pure_dict(), init)  # the init untouched
  # complete=True: no parameter may stay fresh.
  with pytest.raises(
    ConfigError, match=r"x.init='lm': the LM has no parameter for 2 of the model's"
  ):
    kw = dict(field="x.init", path="lm", into=("decoder",), names=("LM", "model"))
    stages.copy_params(params, lm, complete=True, **kw)
  # A parameter without a same-shaped counterpart is named with its shape.
  wide = nnx.state(nnx.Linear(4, 6, use_bias=False, rngs=nnx.Rngs(2)), nnx.Param)
  with pytest.raises(
    ConfigError,
    match=r"x.init='lm': LM parameter kernel \(4, 6\) has no counterpart of that shape in the AE",
  ):
    stages.copy_params(
      params, wide, field="x.init", path="lm", into=("decoder", "embed"), names=("LM", "AE")
    )
  # The whole tree from an identical model: every value copied.
  same = nnx.state(Autoencoder(nnx.Rngs(3)), nnx.Param)
  out, fresh = stages.copy_params(params, same, field="x", path="p", complete=True)
  assert fresh == []
  jax.tree.map(np.testing.assert_array_equal, out.to_pure_dict(), same.to_pure_dict())


def test_relative_paths_of_an_export_resolve_against_its_directory():
  """In an exported directory's config, "./" and "../" path fields are relative to it (normalised,
  so two spellings of one stage compare equal; a remote root keeps its scheme); other values (an
  absolute path, a registry name) are left alone."""
  import ml_collections

  from lsd.train.stages import join_relative, resolve_relative_paths, run_location

  assert join_relative("/x/exp/stages/diff", "../ae") == "/x/exp/stages/ae"
  assert join_relative("gs://b/exp/stages/diff", "../ae") == "gs://b/exp/stages/ae"
  assert join_relative("gs://b/exp", "./stages/ae") == "gs://b/exp/stages/ae"
  c = ml_collections.ConfigDict(
    {
      "ld4lg": {"autoencoder_workdir": "./stages/ae", "denoiser_workdir": "/abs/run"},
      "dglm": {"decoder_checkpoint": "smollm2", "diffusion_workdir": "../d"},
      "data": {"path": "./corpus.txt"},  # not a path field a load follows
    }
  )
  resolve_relative_paths(c, epath.Path("/x/exp"))
  assert c.ld4lg.autoencoder_workdir == "/x/exp/stages/ae"
  assert c.ld4lg.denoiser_workdir == "/abs/run" and c.dglm.decoder_checkpoint == "smollm2"
  assert c.dglm.diffusion_workdir == "/x/d" and c.data.path == "./corpus.txt"
  assert run_location("/x/exp/stages/diff/../ae") == run_location("/x/exp/stages/ae")
