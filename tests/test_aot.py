"""Ahead-of-time compilation (`lsd compile`, lsd.train.aot) on the CPU backend's 8 simulated devices;
one slow test compiles for a TPU topology when libtpu is installed."""

import importlib.util
import json
import sys

import jax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from lsd.config import ConfigError, load_config_file
from lsd.main import main
from lsd.methods import abstract, get_task
from lsd.parallel import make_mesh, rules_from_config, sharded_init
from lsd.train import aot
from lsd.train.state import init_sharded_state, make_optimizer

GiB = 1024**3


def _sbd(mesh=(2, 2, 2), **train):
  c = load_config_file("configs/sbd.py:size=test")
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  c.train.ema_decay = 0.999
  c.train.update(train)
  return c


def _specs(tree):
  return [x.sharding.spec for x in jax.tree.leaves(tree)]


def test_abstract_state_allocates_nothing_and_matches_the_trainer():
  c = _sbd()
  task = get_task(c)
  task.prepare_abstract()
  assert task.tokenizer.vocab_size == 512 and task.tokenizer.mask_id == 3
  t = aot.abstract_train(c, task, jax.devices())
  leaves = jax.tree.leaves(t.state)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert all(isinstance(x.sharding, NamedSharding) for x in leaves)
  # Adam moments and EMA follow their parameters (FSDP shards the whole state).
  params = _specs(t.state.params)
  mu, nu = t.state.opt_state[1][0].mu, t.state.opt_state[1][0].nu
  assert _specs(mu) == params and _specs(nu) == params and _specs(t.state.ema) == params
  assert any(s != jax.sharding.PartitionSpec() for s in params)
  # The same layout the trainer creates with real arrays on the same mesh.
  mesh, rules = make_mesh(c.mesh), rules_from_config(c.mesh)
  _, real, _ = sharded_init(lambda: task.build_model(nnx.Rngs(0)), mesh, rules)
  state = init_sharded_state(real, make_optimizer(c.train), True, mesh)
  assert _specs(state) == _specs(t.state)
  assert [x.shape for x in jax.tree.leaves(state)] == [x.shape for x in leaves]
  assert {k: (v.shape, v.sharding.spec) for k, v in t.batch.items()} == {
    "tokens": ((8, 32), jax.sharding.PartitionSpec(("data", "fsdp"), None)),
    "valid": ((8, 32), jax.sharding.PartitionSpec(("data", "fsdp"), None)),
  }
  # Per-device state bytes: each leaf's shard.
  want = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
  assert aot.per_device_bytes(t.state) == want


def test_config_tokenizer_needs_a_size_when_it_cannot_be_built():
  import ml_collections

  tok = aot.config_tokenizer(ml_collections.ConfigDict({"kind": "bpe", "vocab_size": 300}))
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (300, 0, 1, 2, 3)
  with pytest.raises(ConfigError, match="vocab_size"):
    aot.config_tokenizer(ml_collections.ConfigDict({"kind": "hub", "vocab_size": None}))


def test_compile_train_step_on_cpu_reports_memory_and_flops():
  c = _sbd()
  task = get_task(c)
  task.prepare_abstract()
  r = aot.compile_train_step(c, task, aot.local_topology())
  m = r.memory
  assert r.error is None and m is not None and r.fits is True and r.levers == []
  assert r.required_bytes == m.argument_bytes + m.output_bytes - m.alias_bytes + m.temp_bytes
  assert m.alias_bytes > 0  # the state is donated
  assert r.n_devices == 8 and r.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
  assert r.flops_per_step == pytest.approx(8 * r.flops_per_device)
  # Compiled FLOPs agree with the analytic count (tokens x flops_per_token) within 30 %.
  assert 0.9 < r.flops_per_step / r.model_flops_per_step < 1.3
  # Microbatches: XLA counts the scan body once; the report scales it back to the whole step.
  r2 = aot.compile_train_step(_sbd(grad_accum=2), task, aot.local_topology())
  assert r2.settings["grad_accum"] == 2
  assert r2.flops_per_device == pytest.approx(r.flops_per_device, rel=0.05)
  d = r.to_dict()
  assert d["fits"] is True and d["hbm_gb"] is None and d["step_time_s_at_40pct_mfu"] is None
  assert d["total_gb"] == round(r.required_bytes / GiB, 3)


def test_memory_math_and_oom_message():
  m = aot.Memory(argument_bytes=10, output_bytes=4, alias_bytes=3, temp_bytes=5, code_bytes=7)
  assert m.total_bytes == 16
  msg = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
    "(107.34G) exceeds available HBM (15.75G)."
  )
  need, have = aot.oom_bytes(msg)
  assert need == int(107.34 * GiB) and have == int(15.75 * GiB)
  assert aot.oom_bytes("INVALID_ARGUMENT: shapes differ (3G)") is None

  def report(required, hbm, memory=None):
    return aot.CompileReport(
      what="train_step", topology="t", device_kind="TPU v4", n_devices=16, mesh={}, global_batch=8,
      settings={}, hbm_bytes=hbm, memory=memory, required_bytes=required, state_bytes=0,
      flops_per_device=2.2e14, model_flops_per_step=None, peak_flops=275e12,
    )  # fmt: skip

  assert report(need, have).fits is False
  assert report(10 * GiB, have, m).fits is True
  assert report(16 * GiB, 16 * GiB, m).fits is True  # equal is enough
  # 2.2e14 FLOPs per device at 40 % of 275 TFLOP/s: 2 s.
  assert report(1, 2).step_time(0.4) == pytest.approx(2.0)
  assert report(1, 2).flops_per_step == pytest.approx(16 * 2.2e14)


def test_levers_for_the_sbd_base_probe_numbers():
  # SBD base, batch 512 on v5e-16 (16-way data parallel): 61.34 GiB needed, 1.84 GiB of state.
  kw = dict(remat="none", grad_accum=1, rows_per_device=32, dtype="bfloat16", fsdp=1, batch_ways=16)
  levers = aot.advise_levers(int(61.34 * GiB), int(15.75 * GiB), int(1.84 * GiB), **kw)
  assert [lv.override for lv in levers] == [
    "--config.model.remat=full",
    # 1.84 + 59.5 / k <= 0.9 x 15.75 first holds at k = 8 (powers of two).
    "--config.train.grad_accum=8",
  ]
  assert aot.advise_levers(int(15 * GiB), int(15.75 * GiB), int(1.84 * GiB), **kw) == []
  # Already rematerialised, fp32, with a state too big for one device: grad_accum cannot help.
  kw.update(remat="full", dtype="float32")
  levers = aot.advise_levers(int(40 * GiB), int(15.75 * GiB), int(16 * GiB), **kw)
  assert [lv.override for lv in levers] == [
    "--config.mesh.fsdp=16 --config.mesh.data=-1",
    "--config.model.dtype=bfloat16",
  ]


def test_topology_names_and_device_specs(monkeypatch):
  assert aot.topology_options("v4-32") == ("v4:2x2x4", {"chip_config_name": "megacore"})
  assert aot.topology_options("v5e-16") == ("v5e:4x4", {})
  assert aot.topology_options("v5e:4x4") == ("v5e:4x4", {})
  assert aot.topology_options("v5p:4x4x4")[1] == {"chip_config_name": "megacore"}
  assert aot.topology_options("v5e:1x1")[1] == {"chips_per_host_bounds": (1, 1, 1)}
  with pytest.raises(ConfigError, match="slice name"):
    aot.topology_options("v5litepod-16")
  assert aot.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert aot.peak_flops("TPU v5 lite") == 197e12
  assert aot.peak_flops("cpu") is None
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
  with pytest.raises(ConfigError, match=r"lsd\[aot\]"):
    aot.describe_topology("v5e-16")


def test_lsd_compile_cli_on_local_devices(tmp_path, capsys):
  out = tmp_path / "r.json"
  args = ["compile", "--config", "configs/sbd.py:size=test", "--topology", "local"]
  code = main([*args, "--mesh", "4,2,1", "--config.model.remat=full", "--out", str(out)])
  assert code == 0
  r = json.loads(out.read_text())
  assert r["config"] == "configs/sbd.py:size=test" and r["overrides"] == ["model.remat=full"]
  assert r["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1} and r["remat"] == "full"
  assert r["fits"] is True and r["what"] == "train_step" and r["flops_per_step"] > 0
  assert "train_step on local:8" in capsys.readouterr().out
  assert main([*args, "--sampler", "--num_samples", "4", "--out", str(out)]) == 0
  r = json.loads(out.read_text())
  assert r["what"] == "sampler" and r["global_batch"] == 4 and r["temp_gb"] is not None
  assert main([*args, "--mesh", "3,1,1", "--out", str(out)]) == 2  # 3 does not divide 8 devices


def test_latent_diffusion_stage_compiles_without_its_autoencoder_run():
  c = load_config_file("configs/ld4lg_yelp.py:stage=diffusion,size=test")
  task = abstract.prepare(get_task(c))
  batch = abstract.batch(task, c.data.batch_size)
  assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == {
    "latents": ((8, 4, 8), "float32"),
    "label": ((8,), "int32"),
  }
  r = aot.compile_train_step(c, task, aot.local_topology(), batch)
  assert r.error is None and r.fits is True and r.flops_per_device > 0
  c.ld4lg.cache_latents = False
  with pytest.raises(ConfigError, match="autoencoder_workdir"):
    abstract.prepare(get_task(c))


@pytest.mark.slow
def test_compile_tiny_for_a_tpu_topology():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'lsd[aot]')")
  c = load_config_file("configs/sbd.py:size=tiny")
  task = get_task(c)
  task.prepare_abstract()
  topo = aot.describe_topology("v5e:2x2")
  assert (len(topo.devices), topo.device_kind) == (4, "TPU v5 lite")
  r = aot.compile_train_step(c, task, topo)
  assert r.error is None and r.fits is True and r.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
  assert r.hbm_bytes == int(15.75 * GiB) and 0 < r.required_bytes < r.hbm_bytes
  assert 0.9 < r.flops_per_step / r.model_flops_per_step < 1.3


def test_sbd_pod_presets_set_only_the_memory_levers():
  base = load_config_file("configs/sbd.py:size=base")
  assert (base.model.remat, base.train.grad_accum) == ("none", 1)
  pod = load_config_file("configs/sbd.py:size=base,pod=v5e-16")
  assert (pod.model.remat, pod.train.grad_accum) == ("full", 2)
  pod.model.remat, pod.train.grad_accum = "none", 1
  assert pod.to_dict() == base.to_dict()
  assert load_config_file("configs/sbd.py:size=base,pod=v4-32").model.remat == "dots_saveable"
  with pytest.raises(ConfigError, match="pod"):
    load_config_file("configs/sbd.py:size=base,pod=v5e-8")
