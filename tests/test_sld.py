"""SLD: segmentation, the latent core's validity mask and inpainting, the representation losses, the
configs, and both stages end to end through the CLI and the API."""

import dataclasses
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import lsd.api
from lsd.config import ConfigError, load_config_file
from lsd.data.segments import (
  SegmentConfig,
  build_segment_data,
  default_segment_data_config,
  encode_segments,
  read_delidata,
  segment_documents,
  segment_rows,
  split_segments,
)
from lsd.data.tokenizer import train_bpe
from lsd.diffusion.latent import diffusion_training_loss
from lsd.main import main as lsd_main
from lsd.methods import get_task
from lsd.models.autoencoder import AutoencoderConfig, LatentAutoencoder, reconstruction_loss
from lsd.models.denoiser import DenoiserConfig, LatentDenoiser
from lsd.models.representation import (
  RepresentationLosses,
  adversarial_direction,
  mask_encoder_inputs,
  moved_latents,
  representation_loss,
  simcse_loss,
)
from lsd.nn.layers import normalize_to_sphere
from lsd.sampling import latent as ls
from lsd.sampling import segments as seg

STORIES = [
  "Tom bought a red kite. He flew it at the beach. The wind was strong. The kite broke free. "
  "Tom laughed and ran after it.",
  "Ann baked a cake. She burned it. She tried again. The second cake was perfect. Her family ate "
  "it all.",
  "The dog barked at night. We went to look. A cat sat on the fence. The dog calmed down. We all "
  "went back to sleep.",
  "Sam lost his keys. He looked everywhere. His sister found them in the fridge. Sam was "
  "embarrassed. He laughed about it later.",
]
AE_TEST = dict(
  max_len=16,
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
  sentences = [s for t in STORIES for s in split_segments(t, "sentences")]
  return train_bpe(sentences * 4, 300)


# --------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------
def test_split_segments_into_sentences_and_utterances():
  assert split_segments(STORIES[0], "sentences")[:2] == [
    "Tom bought a red kite.",
    "He flew it at the beach.",
  ]
  dialogue = "#Person1#: Hello. How are you?\n#Person2#: Fine,\nthanks.\n\n#Person1#: Good: bye."
  assert split_segments(dialogue, "utterances") == [
    "#Person1#: Hello. How are you?",
    "#Person2#: Fine, thanks.",  # a line without a speaker tag continues the turn
    "#Person1#: Good: bye.",
  ]
  chat = "Cat: hi all\nKiwi: I think 7\nand A too\nBig Red Dog: no"
  assert split_segments(chat, "utterances") == [
    "Cat: hi all",
    "Kiwi: I think 7 and A too",
    "Big Red Dog: no",
  ]
  with pytest.raises(ConfigError, match="data.segment_mode='words'"):
    split_segments("a b", "words")


def test_segments_are_cut_to_k_and_t_and_every_cut_is_counted(tokenizer):
  cfg = SegmentConfig(max_len=8, max_segments=3, prompt_segments=1)
  docs = [{"text": STORIES[0]}, {"text": "Only a prompt."}, {"text": "One. Two words here."}]
  out, report = segment_documents(docs, cfg)
  assert [d["source"] for d in out] == ["Tom bought a red kite.", "One."]
  assert out[0]["segments"] == split_segments(STORIES[0], "sentences")[1:4]  # 4 targets, K = 3
  assert out[0]["text"] == " ".join(out[0]["segments"])
  assert (report.texts, report.segments, report.dropped_segments, report.empty_texts) == (
    3,
    4,
    1,
    1,
  )
  assert report.counts == (1, 0, 1)
  tokens, valid, segment_valid, truncated = encode_segments(
    [d["segments"] for d in out], tokenizer, 3, 8
  )
  assert tokens.shape == (2, 3, 8) and segment_valid.tolist() == [[True] * 3, [True, False, False]]
  lengths = [len(tokenizer.encode(s)) + 2 for d in out for s in d["segments"]]
  assert truncated == sum(n > 8 for n in lengths) > 0
  for (r, j), n in zip([(0, 0), (0, 1), (0, 2), (1, 0)], lengths, strict=True):
    row = tokens[r, j][valid[r, j]].tolist()
    assert len(row) == min(n, 8) and row[0] == tokenizer.bos_id and row[-1] == tokenizer.eos_id
    want = tokenizer.encode(out[r]["segments"][j])[:6]
    assert row[1:-1] == want  # exact ids, truncated to T - 2
  assert not valid[1, 1:].any() and (tokens[1, 1:] == tokenizer.pad_id).all()
  with pytest.raises(ConfigError, match="data.max_segments=0"):
    dataclasses.replace(cfg, max_segments=0).validate()


def test_segment_rows_encode_only_valid_segments_in_their_places(tokenizer):
  calls = []

  def encode(t, v):  # latents [n, 2, 3]: the token sum and length of each segment, and a marker
    calls.append(np.asarray(t))
    feat = np.stack([t.sum(1), v.sum(1), np.ones(len(t))], -1).astype(np.float32)
    return np.repeat(feat[:, None, :], 2, axis=1)

  lists = [["a b c .", "d e ."], ["f g h i j ."]]
  rows = segment_rows(lists, tokenizer, 3, 8, encode, keep_tokens=True)
  assert rows["latents"].shape == (2, 6, 3) and len(calls) == 1
  # Only the 3 valid segments are encoded (the chunk is padded with copies of the last one).
  np.testing.assert_array_equal(calls[0][:3], rows["tokens"][rows["segment_valid"]])
  assert (calls[0][3:] == calls[0][2]).all()
  z = rows["latents"].reshape(2, 3, 2, 3)
  for i in range(2):
    for j in range(3):
      if rows["segment_valid"][i, j]:
        np.testing.assert_array_equal(z[i, j, 0, 0], rows["tokens"][i, j].sum())
        np.testing.assert_array_equal(z[i, j, 0, 1], rows["valid"][i, j].sum())
      else:
        np.testing.assert_array_equal(z[i, j], 0.0)


def test_segment_data_split_is_by_document_and_shared_by_both_stages(tmp_path, tokenizer):
  path = tmp_path / "stories.jsonl"
  path.write_text("".join(json.dumps([s]) + "\n" for s in STORIES * 5))
  cfg = default_segment_data_config()
  cfg.update(source="jsonl", path=str(path), max_len=12, prompt_segments=1, batch_size=4)
  cfg.eval_fraction = 0.2
  data = build_segment_data(cfg, tmp_path / "run", seed=0, tokenizer=tokenizer)
  assert len(data.train_docs) == 16 and len(data.eval_docs) == 4
  sentences = data.sentence_data()
  assert [d["text"] for d in sentences.train_docs] == [
    s for d in data.train_docs for s in d["segments"]
  ]
  arrays = data.array_data()
  batch = next(arrays.train_iter())
  assert batch["tokens"].shape == (4, 4, 12) and batch["segment_valid"].all()
  assert data.report.counts == (0, 0, 0, 16) and data.report.truncated_segments > 0


def test_delidata_group_chats_become_utterances(shared_data):
  folder = shared_data / "delidata" / "corpus"
  docs = read_delidata(folder, max_groups=3)
  first = sorted(folder.iterdir())[0].read_text().splitlines()[1:]
  messages = [
    r.split("\t") for r in first if r.split("\t")[2] == "MESSAGE" and r.split("\t")[5].strip()
  ]
  turns = split_segments(docs[0]["text"], "utterances")
  assert len(turns) == len(messages) > 5
  assert turns[0] == f"{messages[0][3]}: {' '.join(messages[0][5].split())}"


def test_rocstories_prompt_is_the_first_sentence(shared_data, tmp_path, tokenizer):
  cfg = load_config_file("configs/sld.py:stage=ae,size=test").data
  cfg.path = str(shared_data / "rocstories" / "roc_stories_5k.json")
  data = build_segment_data(cfg, tmp_path, seed=0, tokenizer=tokenizer)
  assert len(data.train_docs) + len(data.eval_docs) + data.report.empty_texts >= 4990
  doc = data.train_docs[0]
  story = json.loads(
    (shared_data / "rocstories" / "roc_stories_5k.json").read_text().splitlines()[0]
  )[0]
  assert doc["source"] == split_segments(story, "sentences")[0]
  assert doc["segments"] == split_segments(story, "sentences")[1:5]
  assert data.report.counts[3] > 0.98 * len(data.train_docs)


# --------------------------------------------------------------------------------------------------
# The latent core: a validity mask over latents, segment embeddings, inpainting
# --------------------------------------------------------------------------------------------------
def _compiled(fn, *args):
  """fn jitted and compiled for `args` without backend optimisation (XLA compilation dominates
  these tests on CPU); call it with arguments of the same shapes."""
  return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def _init(build):
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  return graphdef, _compiled(lambda: nnx.state(build()))()


@pytest.fixture(scope="module")
def segment_denoiser():
  cfg = DenoiserConfig(
    num_latents=8, num_segments=2, d_latent=4, d_model=32, n_layers=2, n_heads=2, d_context=6
  )
  graphdef, params = _init(lambda: LatentDenoiser(cfg, rngs=nnx.Rngs(0)))
  # Give the zero-initialised head and AdaLN projections weights so outputs depend on the inputs.
  wiggle = lambda x: x + 0.1 * jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape)
  return graphdef, _compiled(lambda p: jax.tree.map(wiggle, p), params)(params)


def test_garbage_in_invalid_latents_changes_no_valid_output_and_not_the_loss(segment_denoiser):
  graphdef, params = segment_denoiser
  keys = jax.random.split(jax.random.key(0), 4)
  z = jax.random.normal(keys[0], (3, 8, 4))
  ctx = jax.random.normal(keys[1], (3, 5, 6))
  segment_valid = jnp.array([[True, True], [True, False], [True, False]])
  valid = seg.latent_valid(segment_valid, 4)
  garbage = jnp.where(valid[..., None], z, 100.0 * jax.random.normal(keys[2], z.shape))
  ab = jnp.array([0.3, 0.6, 0.9])

  def forward(p, z):
    return nnx.merge(graphdef, p)(z, ab, context=ctx, latent_valid=valid, x0_sc=z)

  fwd = _compiled(forward, params, z)
  a, b = np.asarray(fwd(params, z)), np.asarray(fwd(params, garbage))
  m = np.asarray(valid)
  np.testing.assert_allclose(a[m], b[m], rtol=1e-5, atol=1e-6)
  assert np.abs(a[~m] - b[~m]).max() > 1e-2  # the garbage itself does reach its own positions
  np.testing.assert_array_equal(a[0], np.asarray(fwd(params, garbage))[0])  # an all-valid row

  def loss(p, x0, key):
    model = nnx.merge(graphdef, p)
    return diffusion_training_loss(model, x0, key, context=ctx, latent_valid=valid)

  loss_fn = _compiled(loss, params, z, keys[3])
  (la, ma), (lb, mb) = loss_fn(params, z, keys[3]), loss_fn(params, garbage, keys[3])
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  np.testing.assert_allclose(ma["x0_mse"], mb["x0_mse"], rtol=1e-6)
  # Segment positions: the same latents in the other segment give another output.
  swapped = jnp.concatenate([z[:, 4:], z[:, :4]], axis=1)
  full = jnp.ones((3, 8), bool)
  out = _compiled(lambda zz: nnx.merge(graphdef, params)(zz, ab, context=ctx, latent_valid=full), z)
  assert float(jnp.abs(out(swapped)[:, :4] - out(z)[:, 4:]).max()) > 1e-3
  assert nnx.merge(graphdef, params).segment_embed.shape == (2, 32)


def test_all_valid_mask_computes_what_no_mask_does(segment_denoiser):
  graphdef, params = segment_denoiser
  z = jax.random.normal(jax.random.key(1), (2, 8, 4))
  ctx = jax.random.normal(jax.random.key(2), (2, 5, 6))
  ab = jnp.array([0.2, 0.7])

  def both(p):
    model = nnx.merge(graphdef, p)
    return model(z, ab, context=ctx), model(z, ab, context=ctx, latent_valid=jnp.ones((2, 8), bool))

  plain, masked = _compiled(both, params)(params)
  np.testing.assert_allclose(plain, masked, rtol=1e-6, atol=1e-7)
  with pytest.raises(ConfigError, match="num_latents=8 must be a multiple of .*num_segments=3"):
    DenoiserConfig(num_latents=8, num_segments=3).validate()


def test_inpainting_keeps_the_kept_segments_and_regenerates_the_others(segment_denoiser):
  graphdef, params = segment_denoiser
  z0 = normalize_to_sphere(jax.random.normal(jax.random.key(3), (2, 8, 4)))
  keep = seg.latent_valid(jnp.array([[True, False], [False, True]]), 4)
  ctx = jax.random.normal(jax.random.key(4), (2, 5, 6))
  out = ls.inpaint(
    graphdef, params, jax.random.key(5), z0, keep, steps=4, project=True, context=ctx
  )
  np.testing.assert_array_equal(np.asarray(out)[np.asarray(keep)], np.asarray(z0)[np.asarray(keep)])
  assert float(jnp.abs(out - z0)[~keep].max()) > 0.1
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), 2.0, rtol=1e-5)  # on the sphere
  # The regenerated latents depend on the kept ones (they are generated around them).
  other = ls.inpaint(
    graphdef, params, jax.random.key(5), -z0, keep, steps=4, project=True, context=ctx
  )
  assert float(jnp.abs(other - out)[~keep].max()) > 1e-3


def test_segment_texts_join_in_order_and_skip_invalid_and_empty_segments():
  texts = ["a .", "b .", "", "c .", "d .", "e ."]
  valid = np.array([[True, True, True], [True, False, True]])
  assert seg.join_segments(texts, valid) == ["a . b .", "c . e ."]
  assert seg.segment_valid_from_counts([1, 3], 3).tolist() == [[True, False, False], [True] * 3]
  counts = seg.draw_counts(jax.random.key(0), 4000, [0.5, 0.0, 0.5], 3)
  assert set(counts.tolist()) == {1, 3} and abs((counts == 1).mean() - 0.5) < 0.03
  z = jnp.arange(2 * 6 * 2).reshape(2, 6, 2)
  np.testing.assert_array_equal(seg.split_segments(z, 3)[4], z[1, 2:4])


# --------------------------------------------------------------------------------------------------
# Representation losses
# --------------------------------------------------------------------------------------------------
def test_contrastive_loss_equals_a_numpy_reference():
  rng = np.random.default_rng(0)
  a, p = rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 3, 4))
  row_valid = np.array([True, True, False, True, True])
  loss, acc = simcse_loss(jnp.asarray(a), jnp.asarray(p), jnp.asarray(row_valid), 0.05)
  ma, mp = a.mean(1), p.mean(1)
  ma /= np.linalg.norm(ma, axis=1, keepdims=True)
  mp /= np.linalg.norm(mp, axis=1, keepdims=True)
  idx = np.flatnonzero(row_valid)
  want, hits = [], []
  for i in idx:
    logits = np.array([ma[i] @ mp[j] / 0.05 for j in idx])
    own = list(idx).index(i)
    want.append(-(logits[own] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()))
    hits.append(logits.argmax() == own)
  np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
  np.testing.assert_allclose(acc, np.mean(hits))
  same, _ = simcse_loss(jnp.asarray(a), jnp.asarray(a), jnp.ones(5, bool), 0.05)
  assert float(same) < float(loss)  # positives equal to the anchors: the easiest batch


@pytest.fixture(scope="module")
def small_ae(tokenizer):
  cfg = AutoencoderConfig(vocab_size=tokenizer.vocab_size, **AE_TEST)
  model = nnx.merge(*_init(lambda: LatentAutoencoder(cfg, rngs=nnx.Rngs(0))))
  sentences = [s for t in STORIES for s in split_segments(t, "sentences")][:12]
  from lsd.data.sentences import encode_sentences

  tokens, valid = (jnp.asarray(x) for x in encode_sentences(sentences, tokenizer, 16))
  return model, tokens, valid


def test_adversarial_direction_raises_the_loss_more_than_random_directions(small_ae):
  model, tokens, valid = small_ae
  z = _compiled(model.encode, tokens, valid)(tokens, valid)

  def ce(latents):
    return reconstruction_loss(model, tokens, valid, latents=latents)[0]

  direction = _compiled(lambda x: adversarial_direction(ce, x, project=True), z)(z)
  np.testing.assert_allclose(jnp.sqrt(jnp.sum(direction**2, axis=(1, 2))), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(direction * z, -1), 0.0, atol=1e-5)  # tangent to the sphere
  eps = 0.5
  moved_ce = _compiled(lambda x, r, e: ce(moved_latents(x, r, e, True)), z, z, 0.0)
  adv = float(moved_ce(z, direction, eps))
  for seed in range(6):
    r = jax.random.normal(jax.random.key(seed), z.shape)
    u = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    r = r - jnp.sum(r * u, -1, keepdims=True) * u
    r = r / jnp.sqrt(jnp.sum(r**2, axis=(1, 2), keepdims=True))
    assert adv > float(moved_ce(z, r, eps))
  assert adv > float(moved_ce(z, direction, 0.0))  # the unmoved latents


def test_encoder_word_dropout_masks_only_inner_tokens(tokenizer, small_ae):
  _, tokens, valid = small_ae
  out = mask_encoder_inputs(tokens, valid, jax.random.key(0), 0.5, tokenizer.mask_id)
  changed = np.asarray(out != tokens)
  assert not changed[:, 0].any() and np.all(np.asarray(out)[changed] == tokenizer.mask_id)
  last = np.asarray(valid).sum(1) - 1
  assert not changed[np.arange(len(last)), last].any() and not changed[~np.asarray(valid)].any()
  assert 0.3 < changed.sum() / (np.asarray(valid).sum() - 2 * len(last)) < 0.7


def test_each_representation_loss_reaches_the_gradient(small_ae, tokenizer):
  model, tokens, valid = small_ae
  graphdef, params = nnx.split(model)
  off = RepresentationLosses(0.0, 0.0, 0.05, 0.0, 0.05, 0.1)
  on = RepresentationLosses(0.3, 0.15, 0.05, 0.2, 0.05, 0.1)
  variants = {
    "off": off,
    "noise": dataclasses.replace(off, latent_noise_std=0.3),
    "adversarial": dataclasses.replace(off, adversarial_weight=0.15, adversarial_epsilon=0.5),
    "contrastive": dataclasses.replace(off, contrastive_weight=0.2),
  }

  def loss(p, losses, train=True):
    m = nnx.merge(graphdef, p)
    encode = lambda t, v, rngs: m.encode(t, v, rngs=rngs)
    key, mask_id = jax.random.key(7), tokenizer.mask_id
    return representation_loss(
      m, tokens, valid, key, losses, encode=encode, mask_id=mask_id, train=train
    )

  def everything(p):  # one compiled program: XLA compilation dominates on CPU
    out = {k: jax.value_and_grad(loss, has_aux=True)(p, v) for k, v in variants.items()}
    plain = reconstruction_loss(nnx.merge(graphdef, p), tokens, valid)[0]
    return out, loss(p, on, train=False)[0], plain

  out, evaluated, plain = _compiled(everything, params)(params)
  flat = lambda name, part: ravel_pytree(out[name][1][part])[0]
  (base_loss, base_metrics), _ = out["off"]
  assert set(base_metrics) == {"recon", "accuracy"}
  np.testing.assert_allclose(base_loss, base_metrics["recon"])
  for name, part in (("noise", "decoder"), ("adversarial", "decoder"), ("contrastive", "encoder")):
    delta = float(jnp.linalg.norm(flat(name, part) - flat("off", part)))
    assert delta > 1e-4 * float(jnp.linalg.norm(flat("off", part))), (name, part)
  for name in ("adversarial", "contrastive"):
    (total, metrics), _ = out[name]
    weight = getattr(variants[name], f"{name}_weight")
    np.testing.assert_allclose(total, metrics["recon"] + weight * metrics[name], rtol=1e-5)
  # The contrastive loss reads only the encoder side: the decoder's gradient is unchanged.
  np.testing.assert_allclose(flat("contrastive", "decoder"), flat("off", "decoder"), atol=1e-8)
  # Without train, the plain reconstruction loss whatever the weights.
  np.testing.assert_allclose(evaluated, plain, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Configs and the two stages
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["ae", "diffusion"])
@pytest.mark.parametrize("size", ["test", "tiny", "base"])
def test_configs_initialise_under_eval_shape(stage, size):
  config = load_config_file(f"configs/sld.py:stage={stage},size={size}")
  task = get_task(config)
  task.tokenizer = types.SimpleNamespace(vocab_size=config.data.tokenizer.vocab_size)
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  assert n > 0
  if size == "base" and stage == "diffusion":  # the paper's: K = 4 segments of 64 x 64 latents
    assert (model.cfg.d_model, model.cfg.n_layers, model.cfg.num_latents) == (768, 12, 256)
    assert (model.cfg.num_segments, model.cfg.d_latent, model.cfg.d_context) == (4, 64, 384)
    assert 120e6 < n < 200e6, n
  if size == "base" and stage == "ae":
    assert (model.cfg.num_latents, model.cfg.d_latent, model.cfg.max_len) == (64, 64, 64)


def test_config_errors_name_the_field():
  config = load_config_file("configs/sld.py:stage=diffusion,size=test")
  config.model.num_segments = 2
  config.model.num_latents = 8
  with pytest.raises(ConfigError, match="model.num_segments=2 must equal data.max_segments=4"):
    get_task(config)
  config = load_config_file("configs/sld.py:stage=diffusion,size=test")
  config.sld.decoder_workdir = "x"
  with pytest.raises(ConfigError, match="sld.decoder_workdir='x'"):
    get_task(config)
  config = load_config_file("configs/sld.py:stage=diffusion,size=test")
  config.sld.objective = "score"
  with pytest.raises(ConfigError, match="sld.objective='score'"):
    get_task(config)
  config = load_config_file("configs/sld.py:stage=ae,size=test")
  config.sld.contrastive_temperature = 0.0
  with pytest.raises(ConfigError, match="sld.contrastive_temperature=0.0 must be > 0"):
    get_task(config)
  config = load_config_file("configs/sld.py:stage=ae,size=test")
  config.model.latent_noise = 0.3
  with pytest.raises(ConfigError, match="model.latent_noise=0.3: SLD's Gaussian latent noise"):
    get_task(config)
  config.model.latent_noise = 0.0
  config.data.segment_mode = "paragraphs"
  with pytest.raises(ConfigError, match="data.segment_mode='paragraphs'"):
    get_task(config)


def _stories(path):
  """24 five-sentence stories drawn from STORIES' sentences, seeded."""
  rng = np.random.default_rng(0)
  sentences = [split_segments(t, "sentences") for t in STORIES]
  lines = []
  for _ in range(24):
    story = [sentences[int(rng.integers(4))][j] for j in range(5)]
    lines.append(json.dumps(" ".join(story)))
  path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow  # two trainings, the CLI and the API: minutes on 2 CPU cores
def test_two_stages_train_and_sample_through_the_cli_and_the_api(tmp_path, capsys):
  _stories(tmp_path / "stories.json")
  common = [
    f"--config.data.path={tmp_path / 'stories.json'}",
    "--config.train.progress=false",
    "--config.train.eval_batches=1",
    "--config.train.log_every=2",
    "--config.data.eval_fraction=0.1",  # 2 of the 24 stories held out
  ]
  argv = ["train", "--config", "configs/sld.py:stage=ae,size=test,steps=4", "--workdir"]
  assert lsd_main([*argv, str(tmp_path / "ae"), *common, "--config.train.num_samples=2"]) == 0
  out = capsys.readouterr().out
  assert "lsd: segments: 22 texts -> 88 segments" in out
  argv = ["train", "--config", "configs/sld.py:stage=diffusion,size=test,steps=4", "--workdir"]
  diff_args = [f"--config.sld.autoencoder_workdir={tmp_path / 'ae'}", "--config.sample.steps=3"]
  assert (
    lsd_main([*argv, str(tmp_path / "diff"), *common, *diff_args, "--config.train.num_samples=0"])
    == 0
  )
  samples = tmp_path / "samples.jsonl"
  argv = [
    "sample",
    "--workdir",
    str(tmp_path / "diff"),
    "--num_samples",
    "2",
    "--out",
    str(samples),
  ]
  assert lsd_main(argv) == 0
  rows = [json.loads(x) for x in samples.read_text().splitlines()]
  assert len(rows) == 2 and all(r["nfe"] == 6 for r in rows)  # 3 steps, doubled by CFG
  assert all(r["source"] and isinstance(r["text"], str) for r in rows)

  ae, diff = lsd.api.load(tmp_path / "ae"), lsd.api.load(tmp_path / "diff")
  task, model = diff.task, diff.model()
  assert task.segment_prior() == (0.0, 0.0, 0.0, 1.0)
  prompts = [split_segments(t, "sentences")[0] for t in STORIES[:2]]
  texts = lsd.api.generate_from_sources(diff, jax.random.key(0), prompts)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  # Fewer segments on request; each text is its segments decoded one by one and joined.
  from lsd.sampling.text_latent import encode_sources

  sampler = task.sampler(model)
  one = sampler.from_sources(jax.random.key(1), prompts, num_segments=[1, 2])
  k_sample = jax.random.split(jax.random.key(1))[1]
  ctx, ctx_valid = encode_sources(task.context_encoder, prompts, task.config.data.max_source_len)
  valid = seg.latent_valid(seg.segment_valid_from_counts([1, 2], 4), 4)
  latents = sampler.latents(k_sample, 2, context=ctx, context_valid=ctx_valid, latent_valid=valid)
  segs = lsd.api.decode_latents(ae, seg.split_segments(latents, 4), sample=diff.config.sample)
  assert one == [segs[0].strip(), " ".join(s.strip() for s in segs[4:6] if s.strip())]
  # Inpainting segment 1: the kept latents are the encodings, the other segments decode as before.
  story = " ".join(split_segments(STORIES[0], "sentences")[1:5])
  z0, segment_valid = task.encode_segments([story])
  assert segment_valid.tolist() == [[True] * 4]
  parts = lsd.api.decode_latents(ae, seg.split_segments(z0, 4), sample=diff.config.sample)
  keep = np.array([[True, False, True, True]])
  z, texts = sampler.inpaint(jax.random.key(2), z0, keep, segment_valid, sources=prompts[:1])
  kept = np.asarray(seg.latent_valid(keep, 4))
  np.testing.assert_array_equal(np.asarray(z)[kept], np.asarray(z0)[kept])
  new = lsd.api.decode_latents(ae, seg.split_segments(z, 4), sample=diff.config.sample)
  assert [new[j] for j in (0, 2, 3)] == [parts[j] for j in (0, 2, 3)]
  assert texts == [" ".join(p.strip() for p in new if p.strip())]
  again = lsd.api.regenerate_segment(diff, jax.random.key(2), [story], 1, sources=prompts[:1])
  assert again == texts
  with pytest.raises(ConfigError, match="segment=4"):
    lsd.api.regenerate_segment(diff, jax.random.key(2), [story], 4, sources=prompts[:1])
  # The same edit through generate (the CLI's path): the key is folded with the segment index.
  edit = {"text": story, "segment": 1, "source": prompts[0]}
  (rec,) = lsd.api.generate(diff, jax.random.key(2), [edit])
  want = lsd.api.regenerate_segment(
    diff, jax.random.fold_in(jax.random.key(2), 1), [story], 1, sources=prompts[:1]
  )
  assert rec["text"] == want[0] and rec["original"] == story
  with pytest.raises(ConfigError, match="cannot mix"):
    lsd.api.generate(diff, jax.random.key(2), [edit, {"source": prompts[0]}])
  with pytest.raises(ConfigError, match="needs a 'text' string and a 'segment' int"):
    lsd.api.generate(diff, jax.random.key(2), [{"text": story, "segment": "1", "source": "x"}])
  out = tmp_path / "edit.jsonl"
  argv = ["sample", "--workdir", str(tmp_path / "diff"), "--seed", "2", "--out", str(out)]
  argv += ["--text", story, "--segment", "1", "--source", prompts[0]]
  assert lsd_main(argv) == 0
  assert json.loads(out.read_text().splitlines()[0])["text"] == want[0]
  # A prompt is the source of a continuation run.
  by_prompt = lsd.api.generate(diff, jax.random.key(4), [{"prompt": prompts[0]}])
  by_source = lsd.api.generate(diff, jax.random.key(4), [{"source": prompts[0]}])
  assert by_prompt[0]["text"] == by_source[0]["text"]


def test_conditional_gen_ppl_scores_only_the_continuation():
  from lsd.eval.genppl import GenPPL

  class Judge:  # the NLL of token j + 1 is a tenth of its id
    name, bos_id, pad_id, eos_id = "fake", 1, 0, 2

    def next_token_nll(self, tokens, valid, positions=None, segments=None):
      return 0.1 * np.asarray(tokens, np.float64)[:, 1:]

  class Tok:  # one id per character: ord(c) - 30
    def token_to_id(self, token):
      return None

    def encode_batch(self, texts, add_special_tokens=False):
      return [types.SimpleNamespace(ids=[ord(c) - 30 for c in t]) for t in texts]

  judge = GenPPL(Judge(), Tok(), max_len=12, batch_size=2)
  got = judge.conditional_per_sample(["ab", "abcdefghijklmn"], ["cd", "x"])
  want = math.exp(np.mean([0.1 * (ord(c) - 30) for c in " cd"]))
  np.testing.assert_allclose(got[0], want, rtol=1e-12)
  assert math.isnan(got[1])  # the prompt alone fills max_len: nothing left to score


@pytest.mark.slow  # compiles a train step that runs the frozen MiniLM
def test_segment_stage_compiles_ahead_of_time_without_its_autoencoder_run():
  from lsd.methods import abstract
  from lsd.train import aot

  c = load_config_file("configs/sld.py:stage=diffusion,size=test")
  task = abstract.prepare(get_task(c))
  batch = abstract.batch(task, c.data.batch_size)
  assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == {
    "segment_valid": ((8, 4), "bool"),
    "latents": ((8, 16, 8), "float32"),
    "source_tokens": ((8, 64), "int32"),
    "source_valid": ((8, 64), "bool"),
  }
  r = aot.compile_train_step(c, task, aot.local_topology(), batch)
  assert r.error is None and r.fits is True and r.flops_per_device > 0
