"""Sharded training equals single-device training."""

import contextlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lsd.config import ConfigError
from lsd.methods.causal_lm import CausalLMTask
from lsd.parallel import (
  batch_sharding,
  default_mesh_config,
  logical_to_spec,
  make_mesh,
  mesh_shape,
  rules_from_config,
  sharded_init,
)
from lsd.train.state import (
  default_train_config,
  init_sharded_state,
  make_optimizer,
  make_train_step,
)


class FakeTokenizer:
  vocab_size = 64
  bos_id, eos_id, pad_id, mask_id = 0, 1, 2, 3


def make_task():
  cfg = ml_collections.ConfigDict(
    {
      "seed": 0,
      "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp": "swiglu"},
      "data": {"seq_len": 16},
    }
  )
  task = CausalLMTask(cfg)
  task.tokenizer = FakeTokenizer()
  return task


def run_steps(mesh_sizes, devices, n_steps=3, ambient=False, **train):
  mcfg = default_mesh_config()
  mcfg.update(mesh_sizes)
  mesh = make_mesh(mcfg, devices)
  rules = rules_from_config(mcfg)
  task = make_task()
  tcfg = default_train_config()
  tcfg.update({"steps": 10, "warmup_steps": 2, "lr": 1e-2, "ema_decay": 0.9, **train})
  graphdef, params, shardings = sharded_init(lambda: task.build_model(nnx.Rngs(0)), mesh, rules)
  tx = make_optimizer(tcfg)
  state = init_sharded_state(params, tx, True, mesh)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  step = jax.jit(
    make_train_step(graphdef, task.loss, tx, tcfg, seed=0),
    in_shardings=(state_sh, None),
    out_shardings=(state_sh, None),
    donate_argnums=0,
  )
  rng = np.random.default_rng(0)
  losses = []
  context = jax.set_mesh(mesh) if ambient else contextlib.nullcontext()
  with context:
    return _steps(step, state, mesh, rules, rng, n_steps, losses, shardings)


def _steps(step, state, mesh, rules, rng, n_steps, losses, shardings):
  for _ in range(n_steps):
    tokens = rng.integers(0, 64, (8, 16)).astype(np.int32)
    valid = np.ones((8, 16), bool)
    valid[0, 12:] = False
    batch = {
      k: jax.device_put(v, batch_sharding(mesh, rules, v.ndim))
      for k, v in {"tokens": tokens, "valid": valid}.items()
    }
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state, shardings


def test_sharded_2x2x2_equals_single_device():
  assert len(jax.devices()) == 8
  l1, s1, _ = run_steps({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  l8, s8, sh = run_steps({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  np.testing.assert_allclose(l8, l1, rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  for a, b in zip(jax.tree.leaves(s8.ema), jax.tree.leaves(s1.ema), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Parameters really are split: the q kernel ('embed', 'heads') over (fsdp, tensor).
  q = s8.params["blocks"][0]["attn"]["q"]["kernel"].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (16, 16)


def test_adam_moments_and_ema_are_sharded_like_their_params():
  """FSDP shards the whole train state: every Adam mu / nu leaf (and the EMA) has its parameter's
  spec, after init and after a train step; counters are replicated."""
  _, state, _ = run_steps({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices(), n_steps=1)
  param_specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
  assert any(spec != jax.sharding.PartitionSpec() for spec in param_specs)
  adam = [
    s
    for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
    if hasattr(s, "mu")
  ]
  assert len(adam) == 1
  for moment in (adam[0].mu, adam[0].nu):
    specs = [x.sharding.spec for x in jax.tree.leaves(moment)]
    assert specs == param_specs
  assert [x.sharding.spec for x in jax.tree.leaves(state.ema)] == param_specs
  assert adam[0].count.sharding.spec == jax.sharding.PartitionSpec()
  assert state.step.sharding.spec == jax.sharding.PartitionSpec()


def test_frozen_parameters_keep_empty_optimizer_slots_under_sharding():
  """train.freeze: frozen parameters get no moments (optax MaskedNode), the others are sharded
  like their parameters."""
  _, state, _ = run_steps({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices(), 1, freeze=("blocks",))
  mu = next(
    s.mu
    for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
    if hasattr(s, "mu")
  )
  assert jax.tree.leaves(mu["blocks"]) == []  # frozen: empty slots
  trained = {k: v for k, v in state.params.items() if k != "blocks"}
  assert [x.sharding.spec for x in jax.tree.leaves({k: mu[k] for k in trained})] == [
    x.sharding.spec for x in jax.tree.leaves(trained)
  ]


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accum_gives_the_update_of_one_big_batch(accum):
  """Microbatches (rows of unequal valid-token counts) combined by the task's loss weight give the
  whole batch's loss and update, within fp32 tolerance, on a sharded mesh."""
  mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  l1, s1, _ = run_steps(mesh, jax.devices(), n_steps=2)
  lk, sk, _ = run_steps(mesh, jax.devices(), n_steps=2, grad_accum=accum)
  np.testing.assert_allclose(lk, l1, rtol=2e-6)
  for a, b in zip(jax.tree.leaves(sk.params), jax.tree.leaves(s1.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
  with pytest.raises(ConfigError, match="train.grad_accum=3 must divide the global batch of 8"):
    run_steps(mesh, jax.devices(), n_steps=1, grad_accum=3)


def test_activation_constraints_keep_the_losses_and_pin_the_batch_split():
  """mesh.constrain_activations: with an ambient mesh the Transformer pins block activations to the
  (data, fsdp) batch split; the training losses stay those of the unconstrained program."""
  mesh = {"data": 1, "fsdp": 4, "tensor": 2}
  plain, _, _ = run_steps(mesh, jax.devices(), n_steps=2)
  pinned, _, _ = run_steps(mesh, jax.devices(), n_steps=2, ambient=True)
  np.testing.assert_allclose(pinned, plain, rtol=1e-5)
  task = make_task()
  model = task.build_model(nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens = np.zeros((8, 16), np.int32)
  fwd = lambda p, t: nnx.merge(graphdef, p)(t)[0]
  with jax.set_mesh(make_mesh(ml_collections.ConfigDict(mesh))):
    text = jax.jit(fwd).lower(params, tokens).as_text()
  pinned_spec = "sharding_constraint %"
  constraints = [line for line in text.splitlines() if pinned_spec in line]
  # The embedding output and each of the 2 blocks' outputs: batch over (data, fsdp), rest replicated.
  assert len(constraints) == 3
  assert all('[{"data", "fsdp"}, {}, {}]' in line for line in constraints)
  assert pinned_spec not in jax.jit(fwd).lower(params, tokens).as_text()  # no ambient mesh: no-op


def test_logical_rules_replicate_indivisible_and_reused_axes():
  mesh = make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
  rules = rules_from_config(default_mesh_config())
  assert logical_to_spec(("vocab", "embed"), (63, 32), mesh, rules) == jax.sharding.PartitionSpec(
    None, "fsdp"
  )
  assert logical_to_spec(("embed", "embed"), (32, 32), mesh, rules) == jax.sharding.PartitionSpec(
    "fsdp", None
  )


def test_mesh_config_errors():
  assert mesh_shape(ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 1}), 8) == (4, 2, 1)
  with pytest.raises(ConfigError, match="at most one may be -1"):
    mesh_shape(ml_collections.ConfigDict({"data": -1, "fsdp": -1, "tensor": 1}), 8)
  with pytest.raises(ConfigError, match="mesh data\\*fsdp\\*tensor = 4 but there are 8 devices"):
    mesh_shape(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 1}), 8)
  with pytest.raises(ConfigError, match="accepted mesh axes"):
    rules_from_config(ml_collections.ConfigDict({"rules": [["embed", "model"]]}))
