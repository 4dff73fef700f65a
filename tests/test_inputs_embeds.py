"""Input embeddings in place of token ids (`Transformer(inputs_embeds=...)`), in the plain forward and
in KV-cached decoding (soft prompts before or between tokens), and generation from an embedding
prefix through the shared decoding loop (`lsd.sampling.autoregressive`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsd.nn import Transformer, TransformerConfig, causal_mask
from lsd.sampling.autoregressive import cached_decode, generate, generate_from_embeds

V = 61
CONFIGS = {
  "rope": TransformerConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2),
  "learned_pos": TransformerConfig(
    vocab_size=V,
    d_model=32,
    n_layers=2,
    n_heads=4,
    rope_base=0.0,
    learned_pos=32,
    norm="layer",
    mlp="gelu",
    use_bias=True,
    tie_embeddings=False,
  ),
  "cross_attention": TransformerConfig(
    vocab_size=V, d_model=32, n_layers=2, n_heads=4, cross_attention=True, d_context=16
  ),
}
ATOL = 1e-5


def _model(name: str, scale: float = 1.0) -> tuple[Transformer, dict]:
  """A model (params times `scale`: > 1 peaks the next-token distributions, for decoding tests) and
  the kwargs every call passes (cross-attention memory for the cross-attending decoder)."""
  model = Transformer(CONFIGS[name], rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(lambda x: scale * x, params))
  ctx = jax.random.normal(jax.random.key(9), (2, 5, 16))
  return model, ({"context": ctx} if name == "cross_attention" else {})


def _tokens(t: int, seed: int = 1):
  return jax.random.randint(jax.random.key(seed), (2, t), 0, V)


@jax.jit
def _call(model, kw, tokens=None, inputs_embeds=None, cache=None):
  """model(tokens | inputs_embeds) under a causal mask over the new positions, jitted."""
  t = (tokens if inputs_embeds is None else inputs_embeds).shape[1]
  return model(tokens, inputs_embeds=inputs_embeds, mask=causal_mask(t), cache=cache, **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_embeddings_of_tokens_give_the_logits_of_the_tokens(name):
  model, kw = _model(name)
  tokens = _tokens(9)
  emb = model.embed_tokens(tokens)
  assert emb.shape == (2, 9, 32) and emb.dtype == jnp.float32
  want, _ = _call(model, kw, tokens)
  got, _ = _call(model, kw, inputs_embeds=emb)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_prefilled_from_embeddings_continues_like_one_prefilled_from_tokens(name):
  model, kw = _model(name)
  tokens = _tokens(11)

  def run(**prefill):
    logits, cache = _call(model, kw, cache=model.init_cache(2, 16), **prefill)
    outs = [logits]
    for i in range(6, 11):
      logits, cache = _call(model, kw, tokens[:, i : i + 1], cache=cache)
      outs.append(logits)
    assert int(cache.length) == 11
    return jnp.concatenate(outs, 1)

  want = run(tokens=tokens[:, :6])
  got = run(inputs_embeds=model.embed_tokens(tokens[:, :6]))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  full, _ = _call(model, kw, tokens)
  np.testing.assert_allclose(got, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_soft_prompt_between_prefix_and_continuation_cached_equals_uncached(name):
  """[embed(prefix); soft prompt; embed(continuation)]: the prefix prefilled from tokens, the soft
  prompt appended as one chunk of embeddings, the continuation fed a token at a time, equals the
  uncached forward of the whole embedding sequence."""
  model, kw = _model(name)
  prefix, cont = _tokens(4, seed=2), _tokens(5, seed=3)
  soft = 0.5 * jax.random.normal(jax.random.key(4), (2, 3, 32))
  seq = jnp.concatenate([model.embed_tokens(prefix), soft, model.embed_tokens(cont)], 1)
  full, _ = _call(model, kw, inputs_embeds=seq)

  l0, cache = _call(model, kw, prefix, cache=model.init_cache(2, 12))
  l1, cache = _call(model, kw, inputs_embeds=soft, cache=cache)
  outs = [l0, l1]
  for i in range(5):
    logits, cache = _call(model, kw, cont[:, i : i + 1], cache=cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=ATOL, rtol=0)
  # The same sequence prefilled in one call from embeddings, then the rest as embeddings.
  l0, cache = _call(model, kw, inputs_embeds=seq[:, :7], cache=model.init_cache(2, 12))
  l1, cache = _call(model, kw, inputs_embeds=seq[:, 7:], cache=cache)
  np.testing.assert_allclose(jnp.concatenate([l0, l1], 1), full, atol=ATOL, rtol=0)


def test_tokens_xor_inputs_embeds():
  model, _ = _model("rope")
  tokens = _tokens(3)
  with pytest.raises(ValueError, match="exactly one of tokens"):
    model()
  with pytest.raises(ValueError, match="exactly one of tokens"):
    model(tokens, inputs_embeds=model.embed_tokens(tokens))
  with pytest.raises(ValueError, match=r"expected \[B, T, 32\]"):
    model(inputs_embeds=jnp.zeros((2, 3, 16)))


def _greedy_reference(model, seq, n, kw):
  """Greedy continuation by full uncached forwards: the embedding sequence is laid out in a buffer
  of its final length (causal, so the unfilled tail is never read) and grown a token at a time."""
  p = seq.shape[1]
  buf = jnp.concatenate([seq, jnp.zeros((seq.shape[0], n, seq.shape[2]), seq.dtype)], 1)
  out = []
  for i in range(n):
    logits, _ = _call(model, kw, inputs_embeds=buf)
    tok = jnp.argmax(logits[:, p + i - 1], -1).astype(jnp.int32)
    out.append(tok)
    buf = buf.at[:, p + i].set(model.embed_tokens(tok))
  return jnp.stack(out, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_decoding_from_a_soft_prompt_prefix_equals_uncached_argmax(name):
  model, kw = _model(name, scale=4.0)
  prefix = _tokens(4, seed=5)
  soft = 0.5 * jax.random.normal(jax.random.key(6), (2, 3, 32))
  seq = jnp.concatenate([model.embed_tokens(prefix), soft], 1)
  got = jax.jit(
    lambda m, s: cached_decode(m, jax.random.key(0), inputs_embeds=s, max_new_tokens=8, **kw)
  )(model, seq)
  np.testing.assert_array_equal(got, _greedy_reference(model, seq, 8, kw))


@pytest.mark.parametrize("top_p", [0.0, 0.9])
def test_generate_from_embeds_of_the_prompt_equals_generate(top_p):
  for name in ("rope", "learned_pos"):
    model, _ = _model(name, scale=4.0)
    graphdef, params = nnx.split(model)
    prompt = _tokens(5, seed=7)
    args = dict(max_new_tokens=10, top_p=top_p, temperature=0.8)
    want = generate(graphdef, params, jax.random.key(8), prompt, **args)
    got = generate_from_embeds(
      graphdef, params, jax.random.key(8), model.embed_tokens(prompt), **args
    )
    assert got.shape == (2, 10) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
