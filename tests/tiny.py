"""Tiny models and tasks shared by the masked-diffusion and SBD tests (random weights, seed 0)."""

import jax
from flax import nnx

from lsd.models.masked_lm import MaskedLM
from lsd.nn import TransformerConfig


def tiny_masked_lm(vocab: int, mask_id: int) -> MaskedLM:
  """A 2-layer, width-16 masked LM over `vocab` tokens, `mask_id` its mask token."""
  cfg = TransformerConfig(vocab_size=vocab, d_model=16, n_layers=2, n_heads=2)
  return MaskedLM(cfg, mask_id, rngs=nnx.Rngs(0))


def split_tiny_masked_lm(vocab: int, mask_id: int):
  """(graphdef, state) of `tiny_masked_lm`, the state built under jit, as the samplers take them."""
  build = lambda: tiny_masked_lm(vocab, mask_id)  # noqa: E731
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  return graphdef, jax.jit(lambda: nnx.state(build()))()


def tiny_sbd_task(tokenizer, **sample):
  """The `configs/sbd.py:size=test` task with `tokenizer` and `sample` overrides, and its model."""
  from lsd.config import load_config_file
  from lsd.methods import get_task

  c = load_config_file("configs/sbd.py:size=test")
  c.sample.update(sample)
  task = get_task(c)
  task.tokenizer = tokenizer
  return task, task.build_model(nnx.Rngs(0))


WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()


class WordTok:
  """A word-level tokenizer over WORDS for the 40-token SBD test model (specials 36-39)."""

  vocab_size, pad_id, bos_id, eos_id, mask_id = 40, 36, 37, 38, 39

  def encode(self, text):
    return [WORDS.index(w) for w in text.split()]

  def decode(self, ids):
    return " ".join(WORDS[i] if i < len(WORDS) else f"<{i}>" for i in ids if i < 36)
