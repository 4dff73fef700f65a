"""Autoregressive decoding with a fixed-size KV cache: one prefill, then a `lax.scan` of one-token
steps. The loop is written once and serves every KV-cached decoder in the project.

`prefill` runs the decoder causally over its start (token ids, or input embeddings such as a soft
prompt, alone or spliced between token embeddings) into a cache sized for the new tokens, and returns
the one-token `Step` with the decoder's conditioning closed over (`**decoder_kwargs`: nothing for a
causal LM, `context=` memory for the LD4LG decoder's cross-attention). `decode_steps` is the scan
(greedy when top_p == 0, else `sample_categorical` with nucleus and temperature); `cached_decode` is
the two together. `beam_step` adapts a `Step` to `lsd.sampling.beam.beam_search`, so beam search
shares the prefill and the step. Jitted wrappers: `generate` (prompt ids), `generate_from_embeds`
(prompt embeddings), and `lsd.sampling.latent.decode` / `beam_decode` (latents -> text).

Shapes: B batch, P prefill length, E model width, V vocabulary, N new tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from lsd.nn import KVCache, causal_mask
from lsd.sampling.categorical import first_argmax, sample_categorical

# step(cache, tokens [B]) -> (next-token logits [B, V], cache advanced by one slot)
Step = Callable[[KVCache, Int[Array, " B"]], tuple[Float[Array, "B V"], KVCache]]


def prefill(
  model: nnx.Module,
  tokens: Int[Array, "B P"] | None = None,
  *,
  inputs_embeds: Float[Array, "B P E"] | None = None,
  new_tokens: int,
  **decoder_kwargs,
) -> tuple[Step, KVCache, Float[Array, "B V"]]:
  """Starts KV-cached decoding: runs `model` causally over `tokens` or `inputs_embeds` (exactly one;
  no padding inside) into a fresh cache of P + `new_tokens` slots.

  `model` has `init_cache(batch, size)` and returns (logits [B, T, V], cache) for
  `model(tokens, mask=, cache=, **decoder_kwargs)` (a `Transformer`, or a module wrapping one);
  starting from embeddings also needs `model(inputs_embeds=..., ...)`. `decoder_kwargs` (e.g.
  `context=` for cross-attention) are passed to every call. Trace inside `jax.jit`.

  Returns (step, cache, logits of the first new token [B, V]); `step(cache, tokens [B])` feeds one
  token per row at the next position and returns the following logits and the advanced cache.
  """
  if (tokens is None) == (inputs_embeds is None):
    raise ValueError("prefill: pass exactly one of tokens [B, P] and inputs_embeds [B, P, E]")
  b, p = (tokens if inputs_embeds is None else inputs_embeds).shape[:2]
  cache = model.init_cache(b, p + new_tokens)
  if inputs_embeds is None:
    logits, cache = model(tokens, mask=causal_mask(p), cache=cache, **decoder_kwargs)
  else:
    logits, cache = model(
      inputs_embeds=inputs_embeds, mask=causal_mask(p), cache=cache, **decoder_kwargs
    )

  def step(cache: KVCache, token: Int[Array, " B"]) -> tuple[Float[Array, "B V"], KVCache]:
    logits, cache = model(token[:, None], cache=cache, **decoder_kwargs)
    return logits[:, -1], cache

  return step, cache, logits[:, -1]


def next_token(
  key: jax.Array,
  logits: Float[Array, "B V"],
  *,
  top_p: float = 0.0,
  temperature: float = 1.0,
) -> Int[Array, " B"]:
  """Greedy (argmax; `key` unused) when top_p == 0, else a draw at `temperature` from the top_p
  nucleus (`sample_categorical`, exact tails)."""
  if top_p == 0.0:
    return first_argmax(logits)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token, _ = sample_categorical(key, logp, top_p=top_p, temperature=temperature)
  return token


def decode_steps(
  step: Step,
  cache: KVCache,
  logits: Float[Array, "B V"],
  key: jax.Array,
  *,
  max_new_tokens: int,
  top_p: float = 0.0,
  temperature: float = 1.0,
) -> Int[Array, "B N"]:
  """The decoding loop, one `lax.scan` of N = max_new_tokens steps: token i is chosen from the
  current logits (`next_token` with key `fold_in(key, i)`) and fed through `step`. The cache needs
  N free slots (the last step's logits are unused). Returns the chosen tokens [B, N]."""

  def body(carry, i):
    cache, last = carry
    token = next_token(jax.random.fold_in(key, i), last, top_p=top_p, temperature=temperature)
    logits, cache = step(cache, token)
    return (cache, logits), token

  _, tokens = jax.lax.scan(body, (cache, logits), jnp.arange(max_new_tokens))
  return tokens.T


def cached_decode(
  model: nnx.Module,
  key: jax.Array,
  tokens: Int[Array, "B P"] | None = None,
  *,
  inputs_embeds: Float[Array, "B P E"] | None = None,
  max_new_tokens: int,
  top_p: float = 0.0,
  temperature: float = 1.0,
  **decoder_kwargs,
) -> Int[Array, "B N"]:
  """`prefill` from `tokens` or `inputs_embeds`, then `decode_steps`: N = max_new_tokens tokens
  continuing the prefill, greedy when top_p == 0. Trace inside `jax.jit`."""
  step, cache, logits = prefill(
    model, tokens, inputs_embeds=inputs_embeds, new_tokens=max_new_tokens, **decoder_kwargs
  )
  return decode_steps(
    step, cache, logits, key, max_new_tokens=max_new_tokens, top_p=top_p, temperature=temperature
  )


def beam_step(step: Step) -> Callable[[KVCache, Int[Array, " R"], Int[Array, " R"]], tuple]:
  """`step` as `lsd.sampling.beam.beam_search` calls it, `(cache, tokens, parents)`: the cache rows
  are first reordered by `parents` (flat row indices), so each beam's keys follow it."""

  def reordered(cache: KVCache, tokens: Array, parents: Array):
    cache = jax.tree.map(lambda x: x if x.ndim == 0 else x[:, parents], cache)
    return step(cache, tokens)

  return reordered


_STATICS = ("graphdef", "max_new_tokens", "top_p", "temperature")


@functools.partial(jax.jit, static_argnames=_STATICS)
def generate(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  key: jax.Array,
  prompt: Int[Array, "B P"],
  *,
  max_new_tokens: int,
  top_p: float = 1.0,
  temperature: float = 1.0,
) -> Int[Array, "B N"]:
  """Samples `max_new_tokens` continuations of `prompt` (no padding inside the prompt); top_p = 0
  is greedy.

  The model must return (logits [B, T, V], cache) for `model(tokens, mask=..., cache=...)`; the cache
  holds P + N positions, so each step is one token of compute against a fixed-shape buffer.
  """
  model = nnx.merge(graphdef, params)
  return cached_decode(
    model, key, prompt, max_new_tokens=max_new_tokens, top_p=top_p, temperature=temperature
  )


@functools.partial(jax.jit, static_argnames=_STATICS)
def generate_from_embeds(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  key: jax.Array,
  prompt_embeds: Float[Array, "B P E"],
  *,
  max_new_tokens: int,
  top_p: float = 1.0,
  temperature: float = 1.0,
) -> Int[Array, "B N"]:
  """`generate` from input embeddings: the cache is prefilled from `prompt_embeds` (e.g. a soft
  prompt, or `embed_tokens(prefix)` with soft-prompt vectors spliced in), then tokens follow. The
  model (a `Transformer`; for a wrapper such as `GPT2LM`, split its `transformer`) must accept
  `inputs_embeds=`. Equals `generate(prompt)` when `prompt_embeds = embed_tokens(prompt)`."""
  model = nnx.merge(graphdef, params)
  return cached_decode(
    model,
    key,
    inputs_embeds=prompt_embeds,
    max_new_tokens=max_new_tokens,
    top_p=top_p,
    temperature=temperature,
  )
