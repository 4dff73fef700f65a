"""lsd.nn against plain numpy reference computations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsd.config import ConfigError
from lsd.nn import (
  MLP,
  Attention,
  Block,
  BlockDiffusionMask,
  LayerNorm,
  RMSNorm,
  Transformer,
  TransformerConfig,
  apply_rope,
  bd3_training_mask,
  block_causal_mask,
  block_diffusion_attention,
  causal_mask,
  dense,
  dot_product_attention,
  sinusoidal_embedding,
)
from lsd.nn.layers import linear


def rows(mask):
  return ["".join(str(int(v)) for v in r) for r in np.asarray(mask)]


def test_bd3_mask_matches_spec_l4_b2():
  assert rows(bd3_training_mask(4, 2)) == [
    "11000000",
    "11000000",
    "00111100",
    "00111100",
    "00001100",
    "00001100",
    "00001111",
    "00001111",
  ]


def test_bd3_mask_traced_block_size_and_global_block():
  f = jax.jit(lambda b: bd3_training_mask(8, b))
  np.testing.assert_array_equal(f(jnp.int32(2)), bd3_training_mask(8, 2))
  np.testing.assert_array_equal(f(jnp.int32(4)), bd3_training_mask(8, 4))
  full = np.asarray(bd3_training_mask(4, 4))
  # With one block the noisy half is plain bidirectional and never sees the clean half.
  assert full[:4, :4].all() and not full[:4, 4:].any()


@pytest.mark.parametrize("block,kv_heads", [(1, 4), (4, 2), (16, 1)])
def test_block_diffusion_attention_equals_the_dense_mask(block, kv_heads):
  """The structured 2L attention gives the values and gradients of scoring every pair under
  bd3_training_mask & padding (numpy reference for values), at every valid query."""
  length, heads = 16, 4
  r = np.random.default_rng(block)
  q = r.normal(size=(2, 2 * length, heads, 8)).astype(np.float32)
  k = r.normal(size=(2, 2 * length, kv_heads, 8)).astype(np.float32)
  v = r.normal(size=(2, 2 * length, kv_heads, 8)).astype(np.float32)
  valid = np.arange(length)[None] < np.array([[length], [11]])
  mask = BlockDiffusionMask(jnp.asarray(valid), block)
  dense = np.asarray(mask.dense())
  assert dense.shape == (2, 1, 2 * length, 2 * length)
  rows = np.concatenate([valid, valid], 1)[:, :, None, None]
  out = block_diffusion_attention(q, k, v, mask)
  np.testing.assert_allclose(
    np.where(rows, out, 0), np.where(rows, np_attention(q, k, v, dense), 0), atol=2e-6
  )

  def loss(attend):
    return lambda q, k, v: jnp.sum(jnp.where(rows, attend(q, k, v), 0.0) ** 2)

  grads = jax.grad(loss(lambda *a: block_diffusion_attention(*a, mask)), (0, 1, 2))(q, k, v)
  ref = jax.grad(loss(lambda *a: dot_product_attention(*a, mask=dense)), (0, 1, 2))(q, k, v)
  for g, gr in zip(grads, ref, strict=True):
    np.testing.assert_allclose(g, gr, atol=2e-5)


def test_block_diffusion_mask_is_used_by_the_attention_module_and_checks_its_block():
  attn = Attention(32, 4, rope_base=10_000.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 16, 32))
  positions = jnp.tile(jnp.arange(8), (2, 2))
  mask = BlockDiffusionMask(jnp.ones((2, 8), bool), 2)
  out, _ = attn(x, positions=positions, mask=mask)
  ref, _ = attn(x, positions=positions, mask=mask.dense())
  np.testing.assert_allclose(out, ref, atol=2e-6)
  with pytest.raises(ValueError, match="block_size=3 must divide"):
    attn(x, positions=positions, mask=BlockDiffusionMask(jnp.ones((2, 8), bool), 3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_has_the_values_and_gradients_of_the_plain_matmul(dtype):
  """`linear` (dense layers and the tied head) only rewrites how the weight gradient is laid out:
  values and gradients equal jnp.einsum's (fp32: to rounding; bf16: the einsum's own precision)."""
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(2, 5, 8)), dtype)
  w = jnp.asarray(r.normal(size=(8, 3)), dtype)
  g = jnp.asarray(r.normal(size=(2, 5, 3)), dtype)
  tol = 1e-6 if dtype == jnp.float32 else 2e-2

  def plain(x, w):
    return jnp.einsum("...k,kn->...n", x, w)

  np.testing.assert_allclose(
    np.asarray(linear(x, w), np.float32), np.asarray(plain(x, w), np.float32), rtol=tol, atol=tol
  )
  ours = jax.vjp(linear, x, w)[1](g)
  ref = jax.vjp(plain, x, w)[1](g)
  for a, b in zip(ours, ref, strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 5
    )
  # A dense layer routes its matmul through it, and keeps lax.dot_general for anything else.
  layer = dense(8, 3, ("embed", "mlp"), dtype=dtype, rngs=nnx.Rngs(0))
  kernel = layer.kernel[...].astype(dtype)
  np.testing.assert_allclose(
    np.asarray(layer(x), np.float32), np.asarray(plain(x, kernel), np.float32), rtol=tol, atol=tol
  )


def test_causal_and_block_causal_masks():
  assert rows(causal_mask(3)) == ["100", "110", "111"]
  assert rows(block_causal_mask(4, 2)) == ["1100", "1100", "1111", "1111"]
  assert rows(causal_mask(2, 4, offset=2)) == ["1110", "1111"]


def np_attention(q, k, v, mask):
  b, t, h, d = q.shape
  g = k.shape[2]
  k = np.repeat(k, h // g, axis=2)
  v = np.repeat(v, h // g, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_dot_product_attention_matches_numpy_gqa(heads, kv_heads):
  r = np.random.default_rng(0)
  q = r.normal(size=(2, 5, heads, 8)).astype(np.float32)
  k = r.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  v = r.normal(size=(2, 7, kv_heads, 8)).astype(np.float32)
  mask = np.asarray(causal_mask(5, 7, offset=2))
  out = dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(out, np_attention(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_dot_product_attention_broadcasts_a_head_bias_and_a_padding_mask(kv_heads):
  # Shapes the models pass: a per-head bias [1, H, T, S] (T5) and a key-padding mask [B, 1, 1, S].
  r = np.random.default_rng(1)
  q = r.normal(size=(2, 5, 4, 8)).astype(np.float32)
  k = r.normal(size=(2, 6, kv_heads, 8)).astype(np.float32)
  v = r.normal(size=(2, 6, kv_heads, 8)).astype(np.float32)
  bias = r.normal(size=(1, 4, 5, 6)).astype(np.float32)
  mask = np.ones((2, 1, 1, 6), bool)
  mask[1, ..., 4:] = False
  out = dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.5)
  rep = 4 // kv_heads
  kk, vv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, kk) * 0.5 + bias
  logits = np.where(mask, logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", p, vv), atol=1e-5)
  with pytest.raises(ValueError, match=r"implementation='flash'.*accepted"):
    dot_product_attention(q, k, v, implementation="flash")


def test_rope_matches_complex_rotation_and_is_relative():
  r = np.random.default_rng(1)
  x = r.normal(size=(1, 6, 2, 8)).astype(np.float32)
  pos = np.arange(6)[None]
  out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), 10_000.0))
  # Reference: pairs (i, i + D/2) as complex numbers rotated by pos * base^(-2i/D).
  half = 4
  freqs = 10_000.0 ** (-np.arange(half) * 2 / 8)
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * pos[..., None, None] * freqs)
  np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), atol=1e-5)
  # Scores depend only on relative position.
  q = jnp.asarray(x[:, :1].repeat(6, 1))
  s1 = jnp.einsum(
    "bthd,bthd->bth", apply_rope(q, jnp.asarray(pos), 1e4), apply_rope(q, jnp.asarray(pos + 3), 1e4)
  )
  s2 = jnp.einsum(
    "bthd,bthd->bth",
    apply_rope(q, jnp.asarray(pos + 5), 1e4),
    apply_rope(q, jnp.asarray(pos + 8), 1e4),
  )
  np.testing.assert_allclose(s1, s2, atol=1e-4)


def test_attention_module_matches_numpy_with_padding():
  attn = Attention(16, 4, 2, rope_base=0.0, rngs=nnx.Rngs(0))
  x = np.random.default_rng(2).normal(size=(2, 5, 16)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  mask = valid[:, None, None, :]
  out, _ = attn(jnp.asarray(x), mask=jnp.asarray(mask))
  w = lambda lin: np.asarray(lin.kernel[...])
  q = (x @ w(attn.q)).reshape(2, 5, 4, 4)
  k = (x @ w(attn.k)).reshape(2, 5, 2, 4)
  v = (x @ w(attn.v)).reshape(2, 5, 2, 4)
  ref = np_attention(q, k, v, mask).reshape(2, 5, 16) @ w(attn.o)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_cross_attention_matches_numpy():
  attn = Attention(16, 2, d_context=12, rngs=nnx.Rngs(0))
  r = np.random.default_rng(3)
  x = r.normal(size=(1, 3, 16)).astype(np.float32)
  ctx = r.normal(size=(1, 4, 12)).astype(np.float32)
  out, _ = attn(jnp.asarray(x), context=jnp.asarray(ctx))
  w = lambda lin: np.asarray(lin.kernel[...])
  q = (x @ w(attn.q)).reshape(1, 3, 2, 8)
  k = (ctx @ w(attn.k)).reshape(1, 4, 2, 8)
  v = (ctx @ w(attn.v)).reshape(1, 4, 2, 8)
  ref = np_attention(q, k, v, np.ones((1, 1, 3, 4), bool)).reshape(1, 3, 16) @ w(attn.o)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
  cfg = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)
  full, _ = model(tokens, mask=causal_mask(12))
  cache = model.init_cache(2, 16)
  first, cache = model(tokens[:, :5], mask=causal_mask(5), cache=cache)
  step = jax.jit(lambda m, t, c: m(t, cache=c))
  outs = [first]
  for i in range(5, 12):
    logits, cache = step(model, tokens[:, i : i + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  assert int(cache.length) == 12


def test_norms_match_numpy():
  x = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32) * 3 + 1
  rms = RMSNorm(8, eps=1e-6, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
    rms(jnp.asarray(x)), x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6), atol=1e-5
  )
  ln = LayerNorm(8, eps=1e-5, rngs=nnx.Rngs(0))
  ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(ln(jnp.asarray(x)), ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu"])
def test_mlp_matches_numpy(kind):
  import math

  mlp = MLP(8, 16, kind, rngs=nnx.Rngs(0))
  x = np.random.default_rng(5).normal(size=(2, 8)).astype(np.float32)
  w = lambda lin: np.asarray(lin.kernel[...])
  silu = lambda z: z / (1 + np.exp(-z))
  gelu = np.vectorize(lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2))))
  if kind == "swiglu":
    h = silu(x @ w(mlp.gate)) * (x @ w(mlp.up))
  elif kind == "geglu":
    h = gelu(x @ w(mlp.gate)) * (x @ w(mlp.up))
  else:
    h = gelu(x @ w(mlp.up))
  np.testing.assert_allclose(mlp(jnp.asarray(x)), h @ w(mlp.down), atol=1e-5)


def test_adaln_zero_block_ignores_condition_at_init_and_uses_it_after_update():
  cfg = TransformerConfig(vocab_size=10, d_model=16, n_layers=1, n_heads=2, cond_dim=8)
  block = Block(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  c1, c2 = jax.random.normal(jax.random.key(1), (2, 2, 8))
  run = lambda c: block(x, positions=jnp.zeros((2, 3), jnp.int32), mask=None, cond=c)[0]
  # adaLN-zero: every shift/scale/gate is 0 at init, so the condition has no effect yet.
  assert all(float(jnp.abs(m).max()) == 0.0 for m in block.ada(c1))
  np.testing.assert_array_equal(run(c1), run(c2))
  block.ada.proj.kernel[...] = 0.1 * jnp.ones_like(block.ada.proj.kernel[...])
  assert float(jnp.abs(run(c1) - run(c2)).max()) > 1e-3


def test_sinusoidal_embedding_values():
  e = np.asarray(sinusoidal_embedding(jnp.array([0.0, 1.0]), 4, max_period=100.0))
  np.testing.assert_allclose(e[0], [1, 1, 0, 0], atol=1e-6)
  np.testing.assert_allclose(e[1], [np.cos(1), np.cos(0.1), np.sin(1), np.sin(0.1)], atol=1e-6)


def test_transformer_config_errors_name_field():
  with pytest.raises(ValueError, match=r"model.mlp='mish'.*accepted"):
    TransformerConfig(vocab_size=10, mlp="mish").validate()
  with pytest.raises(ValueError, match=r"model.d_model=30 must be divisible by model.n_heads=4"):
    TransformerConfig(vocab_size=10, d_model=30, n_heads=4).validate()
  with pytest.raises(ValueError, match=r"model.attention='flash'.*accepted.*cudnn"):
    TransformerConfig(vocab_size=10, attention="flash").validate()


def test_cached_attention_equals_attention_over_concatenated_keys():
  from lsd.nn.attention import LayerCache, cached_attention, dot_product_attention

  k0, k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 5)
  b, t, h, g, d, size, length = 2, 3, 4, 2, 8, 10, 6
  q = jax.random.normal(k0, (b, t, h, d))
  k, v = jax.random.normal(k1, (b, t, g, d)), jax.random.normal(k2, (b, t, g, d))
  ck, cv = jax.random.normal(k3, (b, size, g, d)), jax.random.normal(k4, (b, size, g, d))
  cache = LayerCache(jnp.swapaxes(ck, 1, 2), jnp.swapaxes(cv, 1, 2), length)  # [B, G, S, D]
  # a different visibility per head over the new keys
  mask = jax.random.bernoulli(k0, 0.6, (b, h, t, t)) | jnp.eye(t, dtype=bool)
  full_mask = jnp.concatenate(
    [jnp.broadcast_to(jnp.arange(size) < length, (b, h, t, size)), mask], axis=-1
  )
  want = dot_product_attention(
    q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1), mask=full_mask
  )
  np.testing.assert_allclose(cached_attention(q, k, v, cache, mask), want, atol=1e-5)
  causal = jnp.tril(jnp.ones((t, t), bool))
  want = dot_product_attention(
    q,
    jnp.concatenate([ck, k], 1),
    jnp.concatenate([cv, v], 1),
    mask=jnp.concatenate([jnp.broadcast_to(jnp.arange(size) < length, (t, size)), causal], -1),
  )
  np.testing.assert_allclose(cached_attention(q, k, v, cache, causal), want, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_a_padded_vocabulary_gives_the_logits_of_the_exact_one(tie):
  exact = TransformerConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, tie_embeddings=tie)
  padded = dataclasses.replace(exact, vocab_multiple=128)
  assert padded.padded_vocab == 384 and exact.padded_vocab == 300
  big = Transformer(padded, rngs=nnx.Rngs(0))
  assert big.embed.embedding.shape == (384, 32)
  small = Transformer(exact, rngs=nnx.Rngs(1))
  # The exact model with the padded one's weights, the padding rows cut off.
  small.embed.embedding.value = big.embed.embedding[...][:300]
  if not tie:
    small.head.kernel.value = big.head.kernel[...][:, :300]
  for a, b in zip(small.blocks, big.blocks, strict=True):
    nnx.update(a, nnx.state(b))
  nnx.update(small.final_norm, nnx.state(big.final_norm))
  tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 300)
  got, _ = big(tokens)
  want, _ = small(tokens)
  assert got.shape == (2, 7, 300)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ConfigError, match="model.vocab_multiple=0"):
    dataclasses.replace(exact, vocab_multiple=0).validate()
