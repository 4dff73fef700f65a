"""LD4LG: sentence data, autoencoder (compressor, overfit + exact greedy reconstruction), denoiser,
the two trainer tasks end to end, the configs, and the pure functions of loaded runs."""

import dataclasses
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import lsd.api
import lsd.models.autoencoder as ae_mod
from lsd.api import train
from lsd.config import ConfigError, load_config_file
from lsd.data.latent_cache import latent_rows
from lsd.data.sentences import (
  build_sentence_data,
  default_sentence_data_config,
  encode_sentences,
  sentence_dataset,
  split_into_sentences,
)
from lsd.data.tokenizer import train_bpe
from lsd.diffusion.latent import diffusion_training_loss
from lsd.main import main as lsd_main
from lsd.methods import get_task
from lsd.models.autoencoder import AutoencoderConfig, LatentAutoencoder, reconstruction_loss
from lsd.models.denoiser import DenoiserConfig, LatentDenoiser
from lsd.sampling import latent as ls
from lsd.train.trainer import check_freeze

SENTENCES = [
  "the food was great .",
  "service was slow and rude .",
  "i love the pizza here !",
  "never coming back again .",
  "the staff are very friendly .",
  "cold fries and a dirty table .",
]

AE_TEST = dict(
  max_len=24,
  d_encoder=32,
  encoder_layers=1,
  encoder_heads=2,
  num_latents=4,
  d_latent=8,
  compressor_layers=1,
  compressor_head_dim=16,
  d_model=32,
  reconstruct_layers=1,
  decoder_layers=1,
  n_heads=2,
)


@pytest.fixture(scope="module")
def tokenizer():
  return train_bpe(SENTENCES * 4, 300)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def test_sentence_rows_labels_truncation_and_resumable_iterator(tmp_path, tokenizer):
  (tmp_path / "s.0").write_text("\n".join(SENTENCES[1::2]) + "\n")
  (tmp_path / "s.1").write_text("\n".join(SENTENCES[0::2] + ["good " * 30]) + "\n")
  cfg = default_sentence_data_config()
  cfg.update(
    source="text",
    path=str(tmp_path / "s.*"),
    label_per_file=True,
    max_len=12,
    batch_size=2,
    eval_fraction=0.0,
  )
  data = build_sentence_data(cfg, tmp_path / "run", seed=0, tokenizer=tokenizer)
  assert data.num_labels == 2
  labels = {d["text"]: d["label"] for d in data.train_docs}
  assert labels[SENTENCES[0]] == 1 and labels[SENTENCES[1]] == 0
  it = data.train_iter()
  first = next(it)
  assert first["tokens"].shape == (2, 12) and first["label"].dtype == np.int32
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  again = data.train_iter()
  again.set_state(state)
  for want in expected:
    got = next(again)
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_array_equal(got["label"], want["label"])
  tokens, valid = encode_sentences(["good " * 30, SENTENCES[0]], tokenizer, 12)
  assert valid[0].all() and tokens[0, 0] == tokenizer.bos_id and tokens[0, -1] == tokenizer.eos_id
  n = int(valid[1].sum())
  assert tokenizer.decode(tokens[1, 1 : n - 1]) == SENTENCES[0] and tokens[1, n - 1] == 2


def test_length_buckets_partition_each_epoch_by_width_across_processes(tokenizer):
  words = " ".join(SENTENCES).split()
  texts = [" ".join(words[: 1 + i // 2]) for i in range(28)]  # 14 lengths, twice each
  docs = [{"text": t, "label": i + 1} for i, t in enumerate(texts)]  # label = index + 1
  widths = (8, 16, 32)
  bucket = [min(w for w in widths if w >= min(len(tokenizer.encode(t)) + 2, 32)) for t in texts]
  per_epoch = {w: bucket.count(w) // 4 * 4 for w in widths}  # rows each bucket serves an epoch
  assert all(per_epoch.values()) and max(len(tokenizer.encode(t)) for t in texts) > 30
  kw = dict(max_len=32, global_batch_size=4, seed=3, length_buckets=widths[:2])

  def rows(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]

  n_batches = sum(per_epoch.values()) // 4
  full = rows(sentence_dataset(docs, tokenizer, **kw), 2 * n_batches)
  epochs = [full[:n_batches], full[n_batches:]]
  for epoch in epochs:
    served = {w: [] for w in widths}
    for b in epoch:
      width = b["tokens"].shape[1]
      assert b["valid"].shape == (4, width)
      served[width] += b["label"].tolist()
      for toks, valid, label in zip(b["tokens"], b["valid"], b["label"], strict=True):
        assert bucket[label - 1] == width  # the narrowest bucket that holds the row
        assert tokenizer.decode(toks[valid]) == tokenizer.decode(  # truncated to max_len
          encode_sentences([texts[label - 1]], tokenizer, 32)[0][0]
        )
    for w in widths:
      assert len(served[w]) == len(set(served[w])) == per_epoch[w]  # no repeats within an epoch
  assert [b["label"].tolist() for b in epochs[0]] != [b["label"].tolist() for b in epochs[1]]
  # two processes: same width at each step, and their rows put together are the global batch
  parts = [
    rows(sentence_dataset(docs, tokenizer, process_index=p, process_count=2, **kw), 2 * n_batches)
    for p in (0, 1)
  ]
  for g, a, b in zip(full, *parts, strict=True):
    np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), g["tokens"])
    np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]), g["label"])
  with pytest.raises(ConfigError, match=r"data.length_buckets=\(10, 6\)"):
    sentence_dataset(
      docs, tokenizer, max_len=16, global_batch_size=4, seed=0, length_buckets=(10, 6)
    )
  with pytest.raises(ConfigError, match="no bucket holds a full batch"):
    sentence_dataset(
      docs[:3], tokenizer, max_len=16, global_batch_size=4, seed=0, length_buckets=(6,)
    )


def test_split_into_sentences():
  text = "Headline here\nFirst one. Second one! Third?  Tiny."
  assert split_into_sentences(text, min_words=2) == ["Headline here", "First one.", "Second one!"]


# ---------------------------------------------------------------------------------------------------
# Models. Built and called through `_compiled`: XLA compilation dominates these tests on CPU (eager
# NNX compiles every op separately), and backend optimisation level 0 halves it.
# ---------------------------------------------------------------------------------------------------
def _compiled(fn, *args):
  """fn jitted and compiled for `args` without backend optimisation; call it with the same args."""
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def _init(build):
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  return graphdef, _compiled(lambda: nnx.state(build()))()


@pytest.fixture(scope="module")
def trained_ae(tokenizer):
  """A test-size autoencoder overfitted (120 Adam steps) on SENTENCES."""
  cfg = AutoencoderConfig(vocab_size=tokenizer.vocab_size, **AE_TEST)
  graphdef, params = _init(lambda: LatentAutoencoder(cfg, rngs=nnx.Rngs(0)))
  tokens, valid = (jnp.asarray(x) for x in encode_sentences(SENTENCES, tokenizer, 24))
  tx = optax.adam(3e-3)
  # Adam on one flat vector: a handful of fused ops instead of a few per parameter, which keeps
  # the XLA compile (the bulk of this test's time on CPU) short.
  flat, unravel = ravel_pytree(params)

  def step(flat, opt):
    loss_fn = lambda f: reconstruction_loss(nnx.merge(graphdef, unravel(f)), tokens, valid)[0]
    loss, grads = jax.value_and_grad(loss_fn)(flat)
    updates, opt = tx.update(grads, opt, flat)
    return flat + updates, opt, loss

  opt, losses = tx.init(flat), []
  step = _compiled(step, flat, opt)
  for _ in range(120):
    flat, opt, loss = step(flat, opt)
    losses.append(float(loss))
  params = unravel(flat)
  encode = lambda params, tokens, valid: nnx.merge(graphdef, params).encode(tokens, valid)
  return types.SimpleNamespace(
    graphdef=graphdef,
    params=params,
    tokens=tokens,
    valid=valid,
    losses=losses,
    encode=_compiled(encode, params, tokens, valid),
  )


def test_autoencoder_overfits_and_greedy_decoding_reconstructs(trained_ae, tokenizer):
  ae = trained_ae
  assert ae.losses[-1] < 0.2 * ae.losses[0], (ae.losses[0], ae.losses[-1])
  latents = ae.encode(ae.params, ae.tokens, ae.valid)
  out = ls.decode(
    ae.graphdef, ae.params, jax.random.key(0), latents, bos_id=tokenizer.bos_id, max_new_tokens=23
  )
  texts = []
  for row in np.asarray(out).tolist():
    assert tokenizer.eos_id in row
    texts.append(tokenizer.decode(row[: row.index(tokenizer.eos_id)]))
  assert texts == SENTENCES
  # Beam search with the reference's processors finds the same (high-probability) texts.
  beams = ls.beam_decode(
    ae.graphdef,
    ae.params,
    latents,
    bos_id=tokenizer.bos_id,
    eos_id=tokenizer.eos_id,
    max_new_tokens=23,
    num_beams=4,
    repetition_penalty=1.2,
    no_repeat_ngram=3,
  )
  rows = np.asarray(beams).tolist()
  assert [tokenizer.decode(r[: r.index(tokenizer.eos_id)]) for r in rows] == SENTENCES


def test_compressor_latents_on_the_sphere_and_blind_to_padding(trained_ae):
  ae = trained_ae
  z = ae.encode(ae.params, ae.tokens, ae.valid)
  assert z.shape == (6, 4, 8) and z.dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), math.sqrt(8), rtol=1e-5)
  other = jnp.where(ae.valid, ae.tokens, 5)  # change only the padded positions
  np.testing.assert_allclose(ae.encode(ae.params, other, ae.valid), z, atol=1e-5)


def test_word_dropout_masks_decoder_inputs_only_in_training(trained_ae, tokenizer):
  ae = trained_ae
  model = nnx.merge(ae.graphdef, ae.params)
  model.cfg = dataclasses.replace(model.cfg, word_dropout=0.5)
  seen = {}

  def spy(latents, tokens_in, rngs=None):
    seen["tokens_in"] = tokens_in
    return LatentAutoencoder.decode_logits(model, latents, tokens_in, rngs)

  model.decode_logits = spy
  clean, _ = reconstruction_loss(model, ae.tokens, ae.valid)
  np.testing.assert_array_equal(seen["tokens_in"], ae.tokens[:, :-1])  # no key: teacher forcing
  key = jax.random.key(3)
  noisy, _ = reconstruction_loss(
    model, ae.tokens, ae.valid, word_dropout_key=key, mask_id=tokenizer.mask_id
  )
  got, want = np.asarray(seen["tokens_in"]), np.asarray(ae.tokens[:, :-1])
  dropped = got != want
  assert np.all(got[dropped] == tokenizer.mask_id) and not dropped[:, 0].any()
  assert 0.3 < dropped[:, 1:].mean() < 0.7  # about half of 6 x 23 inputs
  assert float(noisy) > float(clean)  # the overfitted decoder loses the inputs it relied on
  with pytest.raises(ValueError, match="mask_id"):
    reconstruction_loss(model, ae.tokens, ae.valid, word_dropout_key=key)
  with pytest.raises(ConfigError, match="model.word_dropout"):
    dataclasses.replace(model.cfg, word_dropout=1.0).validate()


def test_latent_noise_perturbs_decoder_latents_on_the_sphere_only_in_training(trained_ae):
  ae = trained_ae
  model = nnx.merge(ae.graphdef, ae.params)
  model.cfg = dataclasses.replace(model.cfg, latent_noise=0.6)
  seen = {}

  def spy(latents, tokens_in, rngs=None):
    seen["latents"] = latents
    return LatentAutoencoder.decode_logits(model, latents, tokens_in, rngs)

  model.decode_logits = spy
  z = ae.encode(ae.params, ae.tokens, ae.valid)
  clean, _ = reconstruction_loss(model, ae.tokens, ae.valid)
  np.testing.assert_allclose(seen["latents"], z, atol=1e-6)  # no key: clean latents
  noisy, _ = reconstruction_loss(model, ae.tokens, ae.valid, latent_noise_key=jax.random.key(4))
  got = np.asarray(seen["latents"])
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), math.sqrt(8), rtol=1e-5)
  moved = np.linalg.norm(got - np.asarray(z), axis=(1, 2))
  assert np.all(moved > 0) and len(set(np.round(moved, 4))) == 6  # one noise level per example
  assert float(noisy) > float(clean)  # the overfitted decoder is thrown off by the noise

  # noise_latents: per-example std ~ U(0, max_std), zero-mean Gaussian increments.
  x = jnp.zeros((4000, 4, 8))
  d = np.asarray(ae_mod.noise_latents(x, jax.random.key(5), 0.5))
  per_example_std = d.reshape(4000, -1).std(axis=1)
  assert per_example_std.max() < 0.5 * 1.3 and per_example_std.min() < 0.05
  np.testing.assert_allclose(per_example_std.mean(), 0.25, atol=0.01)
  np.testing.assert_allclose(d.mean(), 0.0, atol=0.005)
  with pytest.raises(ConfigError, match="model.latent_noise"):
    dataclasses.replace(model.cfg, latent_noise=-0.1).validate()


@pytest.fixture(scope="module")
def denoiser():
  cfg = DenoiserConfig(
    num_latents=4, d_latent=8, d_model=32, n_layers=2, n_heads=2, num_classes=3, d_context=6
  )
  return _init(lambda: LatentDenoiser(cfg, rngs=nnx.Rngs(0)))


def test_denoiser_is_zero_at_init_and_drops_conditions_to_null(denoiser):
  graphdef, params = denoiser
  keys = jax.random.split(jax.random.key(0), 2)
  z = jnp.tile(jax.random.normal(keys[0], (1, 4, 8)), (4, 1, 1))
  ab = jnp.full((4,), 0.6)
  ctx = jax.random.normal(keys[1], (4, 5, 6))
  # Rows 0/1: the same latents with different conditions, both dropped; rows 2/3: kept.
  labels, drop = jnp.array([0, 2, 0, 2]), jnp.array([True, True, False, False])
  forward = _compiled(
    lambda p: nnx.merge(graphdef, p)(z, ab, labels=labels, context=ctx, drop_cond=drop), params
  )
  np.testing.assert_array_equal(forward(params), 0.0)
  # Give the zero-initialised head and AdaLN projections weights so outputs depend on conditions.
  wiggle = lambda x: x + 0.1 * jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape)
  params = _compiled(lambda p: jax.tree.map(wiggle, p), params)(params)
  out = forward(params)
  np.testing.assert_allclose(out[0], out[1], atol=1e-5)  # dropped: the condition is ignored
  assert float(jnp.max(jnp.abs(out[2] - out[3]))) > 1e-3
  assert float(jnp.max(jnp.abs(out[0] - out[2]))) > 1e-3


def test_diffusion_loss_at_init_is_the_v_target_energy(denoiser):
  graphdef, params = denoiser
  x0 = jax.random.normal(jax.random.key(0), (64, 4, 8))
  labels = jnp.arange(64) % 3
  context = jax.random.normal(jax.random.key(1), (64, 5, 6))
  loss_fn = _compiled(
    lambda p, key: diffusion_training_loss(
      nnx.merge(graphdef, p), x0, key, labels=labels, context=context
    )[0],
    params,
    jax.random.key(0),
  )
  # The zero-initialised head predicts v = 0, so the loss is E|v|^2 = a + (1 - a) = 1 for unit
  # Gaussian x0, whichever branch the self-conditioning coin takes (keys 0 and 3 differ).
  for seed in (0, 3):
    assert float(loss_fn(params, jax.random.key(seed))) == pytest.approx(1.0, abs=0.06)


# ---------------------------------------------------------------------------------------------------
# Configs and the two tasks through the trainer
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["ae", "diffusion", "decoder"])
@pytest.mark.parametrize("size", ["test", "tiny", "base"])
def test_configs_initialise_under_eval_shape(stage, size):
  config = load_config_file(f"configs/ld4lg_yelp.py:stage={stage},size={size}")
  if stage == "decoder":  # stage 3 tunes the stage-1 model: the model configs are one
    ae_config = load_config_file(f"configs/ld4lg_yelp.py:stage=ae,size={size}")
    assert config.model.to_dict() == ae_config.model.to_dict()
    assert tuple(config.train.freeze) == ("encoder", "compressor")
    config.ld4lg.autoencoder_workdir, config.ld4lg.denoiser_workdir = "ae", "diffusion"
  task = get_task(config)
  task.tokenizer = types.SimpleNamespace(vocab_size=config.data.tokenizer.vocab_size)
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  if size == "base" and stage == "diffusion":
    assert (model.cfg.d_model, model.cfg.n_layers, model.cfg.num_latents) == (768, 12, 32)
    assert 120e6 < n < 200e6, n
  assert n > 0


def test_bad_config_errors_name_the_field():
  with pytest.raises(ConfigError, match="stage"):
    load_config_file("configs/ld4lg_yelp.py:stage=both")
  config = load_config_file("configs/ld4lg_yelp.py:stage=diffusion,size=test")
  with pytest.raises(ConfigError, match="ld4lg.autoencoder_workdir"):
    get_task(config).autoencoder()
  config.ld4lg.objective = "score"
  with pytest.raises(ConfigError, match="ld4lg.objective"):
    get_task(config)


def _toy_yelp(path):
  """Two label files of 40 four-word sentences drawn from SENTENCES' words."""
  rng = np.random.default_rng(0)
  words = [s.split()[:-1] for s in SENTENCES]
  for label in (0, 1):
    lines = [
      " ".join(rng.choice(words[label * 3 + int(rng.integers(3))], 4)) + " ." for _ in range(40)
    ]
    (path / f"yelp.{label}").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_two_stages_train_load_sample_edit_and_interpolate(tmp_path):
  _toy_yelp(tmp_path)
  # Every decode below uses batches of 2, so the compiled decoder is reused.
  common = {"progress": False, "num_samples": 2, "log_every": 5, "ckpt_every": 100}

  ae_cfg = load_config_file("configs/ld4lg_yelp.py:stage=ae,size=test,steps=10")
  ae_cfg.data.path = str(tmp_path / "yelp.*")
  ae_cfg.data.length_buckets = (10, 12)  # batches 10, 12 or 16 wide go through one trainer run
  ae_cfg.train.update(common)
  ae_res = train(ae_cfg, tmp_path / "ae")
  assert len(ae_res.samples) == 2 and {"text", "source", "exact"} <= set(ae_res.samples[0])

  diff_cfg = load_config_file("configs/ld4lg_yelp.py:stage=diffusion,size=test,steps=10")
  diff_cfg.data.path = str(tmp_path / "yelp.*")
  diff_cfg.ld4lg.autoencoder_workdir = str(tmp_path / "ae")
  diff_cfg.sample.steps = 4
  diff_cfg.train.update(common)
  diff_res = train(diff_cfg, tmp_path / "diff")
  assert np.isfinite(diff_res.losses[10])
  assert [s["label"] for s in diff_res.samples] == [0, 1]
  assert all(isinstance(s["text"], str) and s["nfe"] == 4 for s in diff_res.samples)

  ae, diff = lsd.api.load(tmp_path / "ae"), lsd.api.load(tmp_path / "diff")
  assert diff.tokenizer.vocab_size == ae.tokenizer.vocab_size
  z = lsd.api.encode_texts(ae, SENTENCES[:2])
  assert z.shape == (2, 4, 8)
  ends = lsd.api.interpolate_texts(ae, SENTENCES[0], SENTENCES[1], n=2)
  assert ends == lsd.api.decode_latents(ae, z)
  edited = lsd.api.edit_text(
    diff, ae, jax.random.key(0), SENTENCES[:2], 0.5, labels=[1, 0], guidance_scale=2.0
  )
  assert len(edited) == 2 and all(isinstance(t, str) for t in edited)
  samples = lsd.api.sample(diff, jax.random.key(1), 2)
  assert [s["label"] for s in samples] == [0, 1]
  # Conditional generation (Task.generate): per-input labels draw the same latents as sample's
  # cycling classes; an absent label is the null class; a seq2seq field is refused.
  gen = lsd.api.generate(diff, jax.random.key(1), [{"label": 0}, {"label": 1}])
  assert gen == samples
  none, null = (lsd.api.generate(diff, jax.random.key(1), [x]) for x in ({}, {"label": 2}))
  assert none[0]["text"] == null[0]["text"] and "label" not in none[0]
  with pytest.raises(ConfigError, match=r"input 0 has \['source'\], which this 'ld4lg_diffusion'"):
    lsd.api.generate(diff, jax.random.key(1), [{"source": "x"}])
  with pytest.raises(ConfigError, match=r"label=3 must be an int in \[0, 2\)"):
    lsd.api.generate(diff, jax.random.key(1), [{"label": 3}])
  with pytest.raises(ConfigError, match=r"options \['candidates'\] are not read"):
    lsd.api.generate(diff, jax.random.key(1), [{"label": 1}], candidates=3)


@pytest.mark.slow  # three trainings and the CLI: about 3 minutes on 2 CPU cores
def test_stage3_tunes_only_the_decoder_and_diffusion_runs_decode_with_it(tmp_path, capsys):
  _toy_yelp(tmp_path)
  # One eval batch and no end-of-run samples, to keep each stage's compiles few.
  common = {"progress": False, "num_samples": 0, "eval_batches": 1, "log_every": 2}
  stages = {}
  for stage, steps in (("ae", 6), ("diffusion", 4), ("decoder", 6)):
    cfg = load_config_file(f"configs/ld4lg_yelp.py:stage={stage},size=test,steps={steps}")
    cfg.data.path = str(tmp_path / "yelp.*")
    cfg.train.update(common)
    if stage != "ae":
      cfg.ld4lg.autoencoder_workdir = str(tmp_path / "ae")
    if stage == "decoder":
      cfg.ld4lg.denoiser_workdir = str(tmp_path / "diffusion")
      cfg.train.weight_decay = 0.5  # frozen parameters must not even decay
    stages[stage] = cfg
    res = train(cfg, tmp_path / stage)
    assert np.isfinite(res.losses[steps])
  ae, dec = lsd.api.load(tmp_path / "ae"), lsd.api.load(tmp_path / "decoder")
  assert dec.config.method == "ld4lg_decoder" and dec.step == 6
  for name in ("encoder", "compressor"):  # frozen: bitwise the stage-1 weights
    jax.tree.map(np.testing.assert_array_equal, ae.params[name], dec.params[name])
  moved = jax.tree.map(
    lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
    ae.params["decoder"],
    dec.params["decoder"],
  )
  assert all(jax.tree.leaves(moved))  # every decoder weight was trained
  np.testing.assert_array_equal(
    lsd.api.encode_texts(ae, SENTENCES), lsd.api.encode_texts(dec, SENTENCES)
  )
  # The diffusion run decodes with the stage-3 decoder once ld4lg.decoder_workdir names it.
  diff_cfg = stages["diffusion"].copy_and_resolve_references()
  task = get_task(diff_cfg)
  assert task.decoder() is task.autoencoder()
  diff_cfg.ld4lg.decoder_workdir = str(tmp_path / "decoder")
  decoder = get_task(diff_cfg).decoder()
  assert decoder.config.method == "ld4lg_decoder" and decoder.step == 6
  jax.tree.map(np.testing.assert_array_equal, decoder.params, dec.params)
  # `lsd sample` overrides a field of the loaded run's config for this sampling only.
  argv = ["sample", "--workdir", str(tmp_path / "ae"), "--config.ld4lg.decoder_workdir=x"]
  assert lsd_main(argv) == 2
  assert "ld4lg has no field 'decoder_workdir'" in capsys.readouterr().err
  out = tmp_path / "samples.jsonl"
  argv = ["sample", "--workdir", str(tmp_path / "diffusion"), "--num_samples", "2"]
  decode_with = f"--config.ld4lg.decoder_workdir={tmp_path / 'decoder'}"
  assert lsd_main([*argv, decode_with, "--out", str(out)]) == 0
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r["label"] for r in rows] == [0, 1] and all(isinstance(r["text"], str) for r in rows)
  assert (
    json.loads((tmp_path / "diffusion" / "config.json").read_text())["ld4lg"]["decoder_workdir"]
    == ""
  )  # not saved
  # Class labels as inputs (Task.generate): the same latents as the samples of classes 0, 1.
  argv = ["sample", "--workdir", str(tmp_path / "diffusion"), "--label", "0", "--label", "1"]
  assert lsd_main([*argv, decode_with, "--out", str(tmp_path / "gen.jsonl")]) == 0
  gen = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
  assert gen == rows
  # Config errors name the field.
  bad = stages["decoder"].copy_and_resolve_references()
  bad.train.freeze = ("encoder",)
  with pytest.raises(
    ConfigError, match=r"train.freeze=\['encoder'\] must include \['compressor'\]"
  ):
    get_task(bad)
  bad = stages["decoder"].copy_and_resolve_references()
  bad.ld4lg.denoiser_workdir = ""
  with pytest.raises(ConfigError, match="ld4lg.denoiser_workdir is empty"):
    get_task(bad)
  bad = stages["decoder"].copy_and_resolve_references()
  bad.ld4lg.tune_t_max = 0.0
  with pytest.raises(ConfigError, match="ld4lg.tune_t_max=0.0"):
    get_task(bad)
  bad = stages["decoder"].copy_and_resolve_references()
  bad.model.decoder_layers = 2
  with pytest.raises(ConfigError, match="model.decoder_layers=2 vs 1"):
    get_task(bad).autoencoder()
  diff_cfg.ld4lg.decoder_workdir = str(tmp_path / "ae")
  with pytest.raises(ConfigError, match="is a 'ld4lg_ae' run; it must be a ld4lg_decoder run"):
    get_task(diff_cfg).decoder()


def test_stage3_loss_reads_the_denoisers_estimates_or_the_clean_latents(tokenizer):
  from lsd.api import LoadedRun
  from lsd.diffusion.gaussian import CosineSchedule, q_sample

  cfg = load_config_file("configs/ld4lg_yelp.py:stage=decoder,size=test")
  cfg.ld4lg.autoencoder_workdir, cfg.ld4lg.denoiser_workdir = "ae", "diffusion"
  task = get_task(cfg)
  task.tokenizer = tokenizer
  model_cfg = AutoencoderConfig.from_config(cfg.model, vocab_size=tokenizer.vocab_size)
  ae = LatentAutoencoder(model_cfg, rngs=nnx.Rngs(0))
  diff_cfg = load_config_file("configs/ld4lg_yelp.py:stage=diffusion,size=test")
  # A freshly initialised denoiser: its output layer is zero, so it predicts v_hat = 0.
  den = LatentDenoiser(DenoiserConfig.from_config(diff_cfg.model), rngs=nnx.Rngs(1))
  task._denoiser = LoadedRun(diff_cfg, None, *nnx.split(den), 0)
  tokens, valid = encode_sentences(SENTENCES, tokenizer, 16)
  batch = {"tokens": jnp.asarray(tokens), "valid": jnp.asarray(valid)}
  batch["label"] = jnp.arange(len(SENTENCES), dtype=jnp.int32) % 2
  key = jax.random.key(3)
  z0 = ae.encode(batch["tokens"], batch["valid"])
  x0_hat, t = task.estimates(z0, batch["label"], key)
  # v_hat = 0 gives x0_hat = sqrt(alpha_bar) z_t, which projects onto the sphere as z_t does.
  _, k_noise, _ = jax.random.split(key, 3)
  z_t, _ = q_sample(k_noise, z0, t, CosineSchedule(scale=float(diff_cfg.ld4lg.schedule_scale)))
  np.testing.assert_allclose(x0_hat, ae_mod.normalize_to_sphere(z_t), atol=1e-5)
  assert float(t.min()) > 0 and float(t.max()) <= cfg.ld4lg.tune_t_max
  cfg.ld4lg.tune_t_max = 0.25
  assert float(task.estimates(z0, batch["label"], key)[1].max()) <= 0.25
  # tune_clean_prob 1: the plain reconstruction loss; 0: reconstruction from the estimates.
  cfg.ld4lg.tune_clean_prob = 1.0
  clean = reconstruction_loss(ae, batch["tokens"], batch["valid"])[0]
  np.testing.assert_allclose(task.loss(ae, batch, key, train=False)[0], clean, rtol=1e-5)
  cfg.ld4lg.tune_clean_prob = 0.0
  k_est = jax.random.split(key, 3)[0]
  estimated = task.estimates(z0, batch["label"], k_est)[0]
  want = reconstruction_loss(ae, batch["tokens"], batch["valid"], latents=estimated)[0]
  got = task.loss(ae, batch, key, train=False)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(float(got) - float(clean)) > 1e-4  # the estimates are not the clean latents

  # ld4lg.tune_latent_noise (training only) replaces model.latent_noise in this stage; None keeps
  # the model's. Test sizes have no dropout or word dropout, so without noise train = eval.
  cfg.ld4lg.tune_clean_prob = 1.0
  assert cfg.ld4lg.tune_latent_noise is None and ae.cfg.latent_noise == 0.0
  np.testing.assert_allclose(task.loss(ae, batch, key, train=True)[0], clean, rtol=1e-5)
  cfg.ld4lg.tune_latent_noise = 0.6
  tuned = float(task.loss(ae, batch, key, train=True)[0])
  assert abs(tuned - float(clean)) > 1e-4
  np.testing.assert_allclose(task.loss(ae, batch, key, train=False)[0], clean, rtol=1e-5)
  ae.cfg = dataclasses.replace(ae.cfg, latent_noise=0.6)
  cfg.ld4lg.tune_latent_noise = None
  np.testing.assert_allclose(task.loss(ae, batch, key, train=True)[0], tuned, rtol=1e-6)
  cfg.ld4lg.tune_latent_noise = 0.0
  np.testing.assert_allclose(task.loss(ae, batch, key, train=True)[0], clean, rtol=1e-5)
  cfg.ld4lg.tune_latent_noise = -0.1
  with pytest.raises(ConfigError, match=r"ld4lg.tune_latent_noise=-0.1 must be >= 0"):
    type(task)(cfg)


def test_decoding_loss_adds_the_frozen_decoders_ce_of_the_estimates_with_gradient(tokenizer):
  from lsd.api import LoadedRun
  from lsd.diffusion.gaussian import COSINE, q_sample

  ae_cfg = load_config_file("configs/ld4lg_yelp.py:stage=ae,size=test")
  ae = LatentAutoencoder(
    AutoencoderConfig.from_config(ae_cfg.model, vocab_size=tokenizer.vocab_size),
    rngs=nnx.Rngs(0),
  )
  cfg = load_config_file("configs/ld4lg_yelp.py:stage=diffusion,size=test")
  cfg.ld4lg.autoencoder_workdir = "ae"
  task = get_task(cfg)
  assert cfg.ld4lg.decoding_loss_weight == 0.0  # off by default
  task._autoencoder = LoadedRun(
    ae_cfg, types.SimpleNamespace(tokenizer=tokenizer), *nnx.split(ae), 0
  )
  den = LatentDenoiser(DenoiserConfig.from_config(cfg.model), rngs=nnx.Rngs(1))
  tokens, valid = encode_sentences(SENTENCES, tokenizer, 16)
  batch = {"tokens": jnp.asarray(tokens), "valid": jnp.asarray(valid)}
  batch["latents"] = ae.encode(batch["tokens"], batch["valid"])
  batch["label"] = jnp.arange(len(SENTENCES), dtype=jnp.int32) % 2
  key = jax.random.key(5)
  plain, plain_metrics = task.loss(den, batch, key)
  assert "decode_ce" not in plain_metrics

  cfg.ld4lg.decoding_loss_weight = 0.5
  loss, metrics = task.loss(den, batch, key)
  np.testing.assert_allclose(metrics["l2_loss"], plain, rtol=1e-6)  # the same t, noise and coin
  # The zero-initialised denoiser predicts v = 0, so x0_hat = sqrt(alpha_bar) z_t; the loss adds
  # 0.5 x the decoder's cross-entropy of each sentence read from x0_hat on the sphere.
  k_t, k_noise = jax.random.split(key, 6)[:2]
  t = jax.random.uniform(k_t, (len(SENTENCES),))
  z_t, _ = q_sample(k_noise, batch["latents"], t, COSINE)
  x0_hat = jnp.sqrt(COSINE.alpha_bar(t))[:, None, None] * z_t
  ce = reconstruction_loss(
    ae, batch["tokens"], batch["valid"], latents=ae_mod.normalize_to_sphere(x0_hat)
  )[0]
  np.testing.assert_allclose(metrics["decode_ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(loss, plain + 0.5 * ce, rtol=1e-5)
  # It reaches the denoiser's weights (gradient through x0_hat) ...
  graphdef, params = nnx.split(den)

  def grads(weight):
    cfg.ld4lg.decoding_loss_weight = weight
    return jax.grad(lambda p: task.loss(nnx.merge(graphdef, p), batch, key)[0])(params)

  g0, g1 = ravel_pytree(grads(0.0))[0], ravel_pytree(grads(0.5))[0]
  assert float(jnp.linalg.norm(g1 - g0)) > 1e-3 * float(jnp.linalg.norm(g0))
  # ... and only from the rows with t <= decoding_loss_t_max: none here, so the plain loss.
  cfg.ld4lg.decoding_loss_t_max = float(t.min()) / 2
  np.testing.assert_allclose(task.loss(den, batch, key)[0], plain, rtol=1e-6)
  # With cached latents, the rows carry the tokens the loss reads.
  encode = lambda t, v: ae.encode(jnp.asarray(t), jnp.asarray(v))
  docs = [{"text": s, "label": 0} for s in SENTENCES[:3]]
  rows = latent_rows(docs, tokenizer, 16, encode, keep_tokens=True)
  np.testing.assert_array_equal(rows["tokens"], tokens[:3])
  np.testing.assert_allclose(rows["latents"], batch["latents"][:3], atol=1e-5)
  for field, value in (("decoding_loss_weight", -1.0), ("decoding_loss_t_max", 0.0)):
    bad = cfg.copy_and_resolve_references()
    bad.ld4lg[field] = value
    with pytest.raises(ConfigError, match=f"ld4lg.{field}={value}"):
      get_task(bad)


@pytest.mark.parametrize("encoder", ["scratch", "minilm"])
def test_decoder_stage_freeze_names_existing_parameters(encoder):
  # Stage 3 must freeze exactly the modules that have parameters: a frozen MiniLM is not in the
  # train state, so naming it would fail the trainer's check (and the task must accept that).
  cfg = load_config_file(f"configs/ld4lg_yelp.py:stage=decoder,size=test,encoder={encoder}")
  cfg.ld4lg.autoencoder_workdir = cfg.ld4lg.denoiser_workdir = "unused"
  task = get_task(cfg)
  task.tokenizer = types.SimpleNamespace(vocab_size=cfg.data.tokenizer.vocab_size)
  params = nnx.state(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))), nnx.Param)
  check_freeze(cfg.train.freeze, params)  # raises ConfigError on a name without parameters
  want = ("encoder", "compressor") if encoder == "scratch" else ("compressor",)
  assert tuple(cfg.train.freeze) == want


def test_decoder_init_copies_a_causal_lm_and_leaves_only_cross_attention_fresh(tmp_path):
  # ld4lg.decoder_init: every weight of a causal LM with the decoder's sizes goes into the AE
  # decoder; the cross-attention to the latents keeps its random init; the LM's tokenizer is used.
  from flax import traverse_util

  _toy_yelp(tmp_path)
  lm_cfg = load_config_file("configs/causal_lm.py:size=test,data=text,steps=2")
  lm_cfg.data.path = str(tmp_path / "yelp.*")
  lm_cfg.data.tokenizer.vocab_size = 300
  lm_cfg.model.update(d_model=32, n_layers=1, n_heads=2, mlp="gelu", norm="layer")
  lm_cfg.train.update(progress=False, num_samples=0)
  train(lm_cfg, tmp_path / "lm")
  lm = lsd.api.load(tmp_path / "lm")

  ae_cfg = load_config_file("configs/ld4lg_yelp.py:stage=ae,size=test")
  ae_cfg.data.path = str(tmp_path / "yelp.*")
  ae_cfg.ld4lg.decoder_init = str(tmp_path / "lm")
  task = get_task(ae_cfg)
  task.tokenizer = task.data_tokenizer()
  assert task.tokenizer.vocab_size == lm.tokenizer.vocab_size
  assert task.tokenizer.encode(SENTENCES[0]) == lm.tokenizer.encode(SENTENCES[0])
  params = nnx.state(task.build_model(nnx.Rngs(0)), nnx.Param)
  init = traverse_util.flatten_dict(params.to_pure_dict())
  out = task.initial_params(params)
  got = traverse_util.flatten_dict(out.to_pure_dict())
  for key, value in traverse_util.flatten_dict(params.to_pure_dict()).items():
    np.testing.assert_array_equal(value, init[key])  # the random init itself is not overwritten
  lm_flat = traverse_util.flatten_dict(lm.params.to_pure_dict())
  for key, value in lm_flat.items():
    np.testing.assert_array_equal(got[("decoder", *key)], value)
  fresh = [k for k in got if k[0] == "decoder" and k[1:] not in lm_flat]
  assert fresh and all(any("cross" in str(p) for p in k) for k in fresh)
  for key in got:  # the rest (fresh cross-attention, encoder, compressor, ...) is the random init
    if key[0] != "decoder" or key in fresh:
      np.testing.assert_array_equal(got[key], init[key])

  ae_cfg.model.decoder_layers = 2  # no longer the LM's depth: a clear error naming the field
  task = get_task(ae_cfg)
  task.tokenizer = task.data_tokenizer()
  params = nnx.state(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))), nnx.Param)
  with pytest.raises(ConfigError, match=r"n_layers: LM 1, AE decoder 2"):
    task.initial_params(params)
  ae_cfg.ld4lg.decoder_init = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="missing.*holds no config.json"):
    get_task(ae_cfg).data_tokenizer()
