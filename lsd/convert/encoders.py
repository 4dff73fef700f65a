"""Frozen pretrained text encoders, loaded once per process and used inside jitted losses/samplers.

The names, widths, poolings and checkpoints are the registry in `lsd.convert.encoder_specs`
(`minilm`, `bert:DIR`); this module loads them:

  enc = frozen_encoder("minilm")      # .width, .pooling, .tokenizer, .max_len, .graphdef, .params
  h = enc.hidden_states(tokens, valid)  # [B, T, width], fp32, no gradient
  v = enc.pool(h, valid)                # [B, width] by enc.pooling (mean / cls); none: h itself
  enc.encode_texts(["a sentence ."], max_len=32)  # -> (states, valid) of tokenised texts

`hidden_states` is a pure function of the encoder's params, which callers close over or pass as
jit arguments; they are never part of a TrainState (nothing trains a frozen encoder: the states
are wrapped in `stop_gradient`). The tokenizer is `lsd.data.tokenizer.encoder_tokenizer(name)`:
the encoder's WordPiece with lsd's special-token names, so rows `[bos] ids [eos]` are exactly
BERT's `[CLS] ids [SEP]`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from lsd.convert.encoder_specs import (
  ENCODER_NAMES,
  POOLINGS,
  EncoderSpec,
  describe,
  encoder_spec,
  is_encoder_name,
)
from lsd.data.tokenizer import Tokenizer, encoder_tokenizer

__all__ = [
  "ENCODER_NAMES",
  "POOLINGS",
  "EncoderSpec",
  "FrozenEncoder",
  "describe",
  "encoder_spec",
  "frozen_encoder",
  "hidden_states",
  "is_encoder_name",
  "load_minilm",
  "pool",
]


@dataclasses.dataclass(frozen=True)
class FrozenEncoder:
  name: str  # the canonical registry name
  graphdef: nnx.GraphDef
  params: nnx.State
  tokenizer: Tokenizer
  width: int
  pooling: str  # one of POOLINGS
  max_len: int  # longest token sequence the encoder accepts (its position table)

  def hidden_states(self, tokens: Int[Array, "B T"], valid: Bool[Array, "B T"]) -> Array:
    """Last hidden states [B, T, width] (fp32, no gradient); padding keys are hidden."""
    return hidden_states(self, tokens, valid)

  def pool(self, hidden: Float[Array, "B T H"], valid: Bool[Array, "B T"]) -> Array:
    """Sentence vectors [B, width] by `pooling`; "none" returns the states unchanged."""
    return pool(hidden, valid, self.pooling)

  def encode_texts(self, texts: list[str], max_len: int) -> tuple[Array, Array]:
    """Texts -> (states [N, T, width], valid [N, T]), each text as `[bos] ids [eos]` cut at
    `max_len` tokens (jitted per shape)."""
    from lsd.data.sentences import encode_sentences

    tokens, valid = encode_sentences(list(texts), self.tokenizer, max_len)
    valid = jnp.asarray(valid)
    return _states(self.graphdef, self.params, jnp.asarray(tokens), valid), valid


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _states(graphdef, params, tokens, valid):
  return jax.lax.stop_gradient(nnx.merge(graphdef, params)(tokens, valid).astype(jnp.float32))


def frozen_encoder(name: str, field: str = "encoder") -> FrozenEncoder:
  """The frozen encoder `name` (a registry name, `lsd.convert.encoder_specs`), loaded once per
  process; `field` names the config field in errors, which list the accepted names."""
  return _load(encoder_spec(name, field).name)


@functools.cache
def _load(name: str) -> FrozenEncoder:
  spec: EncoderSpec = encoder_spec(name)
  # Concrete arrays even when first called inside a trace (a jitted loss): never cache tracers.
  with jax.ensure_compile_time_eval():
    model = spec.load_model()
    graphdef, params = nnx.split(model)
  if model.cfg.d_model != spec.width:
    raise ValueError(
      f"encoder {name!r}: the checkpoint is {model.cfg.d_model} wide, not {spec.width}"
    )
  return FrozenEncoder(
    name=spec.name,
    graphdef=graphdef,
    params=params,
    tokenizer=encoder_tokenizer(spec.name),
    width=spec.width,
    pooling=spec.pooling,
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


def pool(hidden: Float[Array, "B T H"], valid: Bool[Array, "B T"], pooling: str) -> Array:
  """Sentence vectors of hidden states: "mean" over valid tokens, "cls" the first token's state,
  "none" the states themselves."""
  if pooling == "mean":
    w = valid.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "none":
    return hidden
  raise ValueError(f"pooling={pooling!r} is not supported; accepted: {list(POOLINGS)}")


def load_minilm(dtype: str = "float32"):
  """The all-MiniLM-L6-v2 sentence encoder and its original WordPiece tokenizer (a `tokenizers`
  Tokenizer padding with id 0 and truncating at the model's sentence-transformers
  `max_seq_length`), for parity checks against the reference; use `frozen_encoder("minilm")` in
  lsd code."""
  import json

  from tokenizers import Tokenizer as HFTokenizer

  spec = encoder_spec("minilm")
  folder = spec.folder()
  tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
  max_len = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
  tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
  tokenizer.enable_truncation(max_length=max_len)
  return spec.load_model(dtype), tokenizer
