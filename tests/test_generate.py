"""Task.generate, the one path of conditional generation for the CLI (`lsd sample --inputs / --prompt
/ --source / --label`) and the API (`lsd.api.generate`): the default refusal, input checks, the
causal LM's prompt continuation and the CLI's input parsing. LD4LG's (class labels, seq2seq sources)
runs on trained runs in tests/test_ld4lg.py and tests/test_ld4lg_frozen.py."""

import argparse
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lsd.config import ConfigError, load_config_file
from lsd.data.tokenizer import train_bpe
from lsd.main import _sample_inputs
from lsd.methods import get_task
from lsd.sampling.autoregressive import generate

TEXTS = ["the food was great .", "service was slow and rude .", "i love the pizza here !"] * 4


@pytest.fixture(scope="module")
def lm():
  """A causal-LM task with a corpus BPE and its randomly initialised test-size model."""
  cfg = load_config_file("configs/causal_lm.py:size=test,data=text")
  cfg.sample.update(max_new_tokens=5, top_p=0.0)
  task = get_task(cfg)
  task.tokenizer = train_bpe(TEXTS, 300)
  return task, task.build_model(nnx.Rngs(0))


def test_causal_lm_continues_each_prompt_in_input_order(lm):
  task, model = lm
  inputs = [{"prompt": "the food"}, {}, {"prompt": "service was slow"}, {"prompt": "the pizza"}]
  key = jax.random.key(0)
  out = task.generate(model, key, inputs, max_new_tokens=4)
  assert [{k: o[k] for k in o if k == "prompt"} for o in out] == inputs
  tok, (graphdef, params) = task.tokenizer, nnx.split(model)
  for x, o in zip(inputs, out, strict=True):
    prompt = [tok.bos_id, *tok.encode(x.get("prompt", ""))]
    # Prompts of one token length share a call keyed by that length: the same tokens alone.
    want = generate(
      graphdef,
      params,
      jax.random.fold_in(key, len(prompt)),
      jnp.asarray([prompt]),
      max_new_tokens=4,
      top_p=0.0,
      temperature=1.0,
    )[0].tolist()
    want = want[: want.index(tok.eos_id)] if tok.eos_id in want else want
    assert o["tokens"] == want and o["text"] == tok.decode(want) and o["nfe"] == len(want)
  with pytest.raises(ConfigError, match=r"input 1 has \['label'\], which this 'causal_lm' run"):
    task.generate(model, key, [{"prompt": "a"}, {"label": 1}])
  with pytest.raises(ConfigError, match=r"options \['guidance_scale'\] are not read by causal_lm"):
    task.generate(model, key, [{}], guidance_scale=2.0)


def test_a_method_without_conditional_generation_refuses_naming_it():
  # An autoencoder stage: it encodes and decodes, it does not generate from inputs.
  task = get_task(load_config_file("configs/ld4lg_yelp.py:stage=ae,size=test"))
  with pytest.raises(ConfigError, match=r"method 'ld4lg_ae' has no conditional generation"):
    task.generate(None, jax.random.key(0), [{"prompt": "x"}])


def _args(**kw):
  base = dict(
    inputs=None, prompt=[], prompts=None, infill=[], source=[], label=[], text=[], segment=[],
    num_samples=None,
  )  # fmt: skip
  return argparse.Namespace(**{**base, **kw})


def test_cli_inputs_zip_the_flags_or_read_jsonl(tmp_path):
  assert _sample_inputs(_args()) == []
  assert _sample_inputs(_args(label=[1, 0])) == [{"label": 1}, {"label": 0}]
  both = _sample_inputs(_args(prompt=["a", "b"], label=[0, 1], num_samples=2))
  assert both == [{"prompt": "a", "label": 0}] * 2 + [{"prompt": "b", "label": 1}] * 2
  with pytest.raises(ConfigError, match="2 --source, 1 --label: give as many of each"):
    _sample_inputs(_args(source=["x", "y"], label=[0]))
  edit = _sample_inputs(_args(text=["a. b."], segment=[1], source=["p"]))
  assert edit == [{"source": "p", "text": "a. b.", "segment": 1}]
  f = tmp_path / "in.jsonl"
  f.write_text(json.dumps({"source": "name[Zizzi]"}) + "\n\n" + json.dumps({"label": 1}) + "\n")
  assert _sample_inputs(_args(inputs=str(f))) == [{"source": "name[Zizzi]"}, {"label": 1}]
  with pytest.raises(ConfigError, match="--inputs and --label exclude each other"):
    _sample_inputs(_args(inputs=str(f), label=[1]))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ConfigError, match="holds no records"):
    _sample_inputs(_args(inputs=str(tmp_path / "empty.jsonl")))
