"""Memory levers against the plain path: `model.remat` policies give the same loss and gradients
(and really rematerialise: the backward program holds a checkpoint), and the configs accept them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lsd.config import ConfigError, load_config_file
from lsd.nn import TransformerConfig, causal_mask
from lsd.nn.transformer import Transformer


def _loss_and_grads(remat: str):
  cfg = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, remat=remat)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, 50)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], mask=causal_mask(11))
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  fn = jax.value_and_grad(loss)
  return fn(params), str(jax.make_jaxpr(fn)(params))


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policies_give_the_plain_loss_and_gradients(policy):
  (plain_loss, plain_grads), plain_jaxpr = _loss_and_grads("none")
  (loss, grads), jaxpr = _loss_and_grads(policy)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert "checkpoint" not in plain_jaxpr and "remat" not in plain_jaxpr


def test_remat_is_a_model_config_field_with_a_clear_error():
  config = load_config_file("configs/sbd.py:size=test")
  assert config.model.remat == "none"
  with pytest.raises(ConfigError, match=r"model.remat='some' is not supported; accepted"):
    TransformerConfig.from_config(config.model, vocab_size=8, remat="some")
  # The cached (generation) path ignores remat and gives the same logits.
  cfg = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, remat="full")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.arange(6)[None] % 50
  full, _ = model(tokens, mask=causal_mask(6))
  cached, _ = model(tokens, mask=causal_mask(6), cache=model.init_cache(1, 6))
  np.testing.assert_allclose(cached, full, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_inside_the_mix_scale_branches_gives_the_plain_loss_and_gradients(policy):
  """The mix-scale loss runs its two block sizes as lax.cond branches; a remat'ed model there must
  give the plain model's loss and gradients (both branches are drawn over the keys)."""
  from lsd.diffusion.masked import mix_scale_loss
  from lsd.models.masked_lm import MaskedLM

  x0 = jax.random.randint(jax.random.key(1), (2, 16), 0, 40)
  valid = jnp.ones((2, 16), bool)

  def compiled(remat):
    cfg = TransformerConfig(vocab_size=41, d_model=32, n_layers=2, n_heads=4, remat=remat)
    graphdef, params = nnx.split(MaskedLM(cfg, 40, rngs=nnx.Rngs(0)))

    def loss(params, key):
      model = nnx.merge(graphdef, params)
      return mix_scale_loss(model, x0, valid, key, lam=0.5, small=4, large=16)

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return lambda key: step(params, key)

  plain_step, step = compiled("none"), compiled(policy)
  sizes = set()
  for k in range(4):
    (plain, metrics), plain_grads = plain_step(jax.random.key(k))
    (loss, _), grads = step(jax.random.key(k))
    sizes.add(float(metrics["block_size"]))
    np.testing.assert_allclose(loss, plain, rtol=1e-6)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
      np.testing.assert_allclose(g, ref, atol=1e-6)
  assert sizes == {4.0, 16.0}  # both branches ran


def test_dots_saveable_keeps_the_projections_and_full_keeps_none(capsys):
  """The projections run through lsd.nn.layers.linear (a custom VJP, which hides its matmul from
  JAX's dots policies): "dots_saveable" must still keep their outputs, by checkpoint name, so it
  saves more than "full" and less than no remat."""
  from jax.ad_checkpoint import print_saved_residuals

  tokens = jnp.ones((2, 8), jnp.int32)
  saved = {}
  for policy in ("none", "full", "dots_saveable"):
    cfg = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, remat=policy)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    print_saved_residuals(
      lambda p, g=graphdef: jnp.sum(nnx.merge(g, p)(tokens, mask=causal_mask(8))[0]), params
    )
    lines = capsys.readouterr().out.splitlines()
    saved[policy] = (len(lines), sum("named 'linear'" in x for x in lines))
  assert saved["full"][1] == 0 and saved["dots_saveable"][1] >= 2 * 6  # 6+ projections per layer
  assert saved["full"][0] < saved["dots_saveable"][0] < saved["none"][0]
