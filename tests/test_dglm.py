"""DGLM pieces: standardised sentence-embedding latents (statistics, round trip, the split into
denoiser tokens, the stats file), a denoiser training step on them, and plug-and-play attribute
guidance (finite-difference gradients, the composition sum)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lsd.diffusion import embedding as emb
from lsd.diffusion.attribute_guidance import (
  LinearClassifier,
  attribute_guide,
  composed_log_prob,
  embedding_log_prob,
)
from lsd.diffusion.latent import diffusion_training_loss
from lsd.models.denoiser import DenoiserConfig, LatentDenoiser
from lsd.nn import causal_mask


def _unit_rows(key, n, e):
  x = jax.random.normal(key, (n, e)) * jnp.linspace(0.5, 3.0, e) + jnp.linspace(-1.0, 1.0, e)
  return np.asarray(x / jnp.linalg.norm(x, axis=-1, keepdims=True))


def test_stats_standardise_the_corpus_per_dimension():
  x = _unit_rows(jax.random.key(0), 500, 12)
  stats = emb.embedding_stats(x)
  np.testing.assert_allclose(stats.mean, x.mean(0), atol=1e-6)
  np.testing.assert_allclose(stats.std, x.std(0), rtol=1e-5)
  z = np.asarray(emb.standardize(stats, x))
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)


def test_standardisation_round_trip_returns_the_unit_embeddings():
  x = _unit_rows(jax.random.key(1), 64, 384)
  stats = emb.embedding_stats(x)
  tokens = emb.to_tokens(emb.standardize(stats, x), 8)
  assert tokens.shape == (64, 8, 48)
  # token j holds dimensions [48 j, 48 j + 48)
  np.testing.assert_allclose(tokens[:, 1, :], np.asarray(emb.standardize(stats, x))[:, 48:96])
  back = emb.unstandardize(stats, emb.from_tokens(tokens))
  np.testing.assert_allclose(back, x, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(back, axis=-1), 1.0, atol=1e-6)
  raw = emb.unstandardize(stats, jnp.zeros((1, 384)), normalize=False)
  np.testing.assert_allclose(raw[0], stats.mean)


def test_constant_dimension_gets_a_floored_std_and_bad_input_is_refused():
  x = np.ones((10, 3), np.float32)
  x[:, 0] = np.arange(10)
  stats = emb.embedding_stats(x)
  assert stats.std[1] == pytest.approx(1e-6) and np.isfinite(emb.standardize(stats, x)).all()
  with pytest.raises(ValueError, match="N >= 2"):
    emb.embedding_stats(x[:1])
  with pytest.raises(ValueError, match="NaN"):
    emb.embedding_stats(np.full((4, 3), np.nan))
  with pytest.raises(ValueError, match="not divisible by num_tokens=5"):
    emb.to_tokens(jnp.zeros((2, 384)), 5)


def test_stats_file_round_trip(tmp_path):
  stats = emb.embedding_stats(_unit_rows(jax.random.key(2), 32, 16))
  path = tmp_path / "run" / emb.STATS_FILE
  emb.save_stats(path, stats)
  assert [p.name for p in path.parent.iterdir()] == [emb.STATS_FILE]  # no temporary file left
  loaded = emb.load_stats(path, width=16)
  np.testing.assert_array_equal(loaded.mean, stats.mean)
  np.testing.assert_array_equal(loaded.std, stats.std)
  with pytest.raises(ValueError, match="width 16, the encoder gives 384"):
    emb.load_stats(path, width=384)
  emb.save_stats(path, emb.EmbeddingStats(stats.mean, np.zeros(16, np.float32)))
  with pytest.raises(ValueError, match="std must be > 0"):
    emb.load_stats(path)


def test_prefix_conditioned_denoiser_trains_on_embedding_tokens():
  """The shared latent denoiser on 384-d embeddings as 8 tokens of 48, conditioned on prefix
  encoder states (cross-attention context), v-prediction, self-conditioning, CFG dropout."""
  cfg = DenoiserConfig(num_latents=8, d_latent=48, d_model=32, n_layers=2, n_heads=2, d_context=16)
  model = LatentDenoiser(cfg, rngs=nnx.Rngs(0))
  x = _unit_rows(jax.random.key(3), 4, 384)
  stats = emb.embedding_stats(_unit_rows(jax.random.key(4), 64, 384))
  x0 = emb.to_tokens(emb.standardize(stats, x), 8)
  context = jax.random.normal(jax.random.key(5), (4, 5, 16))
  valid = jnp.arange(5)[None, :] < jnp.array([[5], [3], [1], [4]])
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, key):
    def loss_fn(m):
      return diffusion_training_loss(m, x0, key, context=context, context_valid=valid)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, jax.random.key(0))) for _ in range(30)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------------------------
# Plug-and-play attribute guidance
# ---------------------------------------------------------------------------------------------
def _classifiers():
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  binary = LinearClassifier(jax.random.normal(k1, (384,)) * 3, 0.2)
  topic = LinearClassifier(jax.random.normal(k2, (4, 384)) * 3, jax.random.normal(k3, (4,)))
  return binary, topic


def test_linear_classifier_log_probs():
  binary, topic = _classifiers()
  x = _unit_rows(jax.random.key(8), 3, 384)
  logit = x @ np.asarray(binary.weight) + 0.2
  np.testing.assert_allclose(binary.log_prob(1)(x), -np.log1p(np.exp(-logit)), rtol=1e-5)
  np.testing.assert_allclose(binary.log_prob(0)(x), -np.log1p(np.exp(logit)), rtol=1e-5)
  logits = x @ np.asarray(topic.weight).T + np.asarray(topic.bias)
  ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(topic.log_prob(2)(x), ref[:, 2], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"target=4 must be a class index in \[0, 4\)"):
    topic.log_prob(4)
  with pytest.raises(ValueError, match="expected"):
    LinearClassifier(np.zeros((3, 4)), np.zeros(4))


def test_composition_is_the_scaled_sum_of_log_probs():
  binary, topic = _classifiers()
  x = _unit_rows(jax.random.key(9), 5, 384)
  composed = composed_log_prob([(binary.log_prob(1), 5.0), (topic.log_prob(3), 2.0)])
  want = 5.0 * binary.log_prob(1)(x) + 2.0 * topic.log_prob(3)(x)
  np.testing.assert_allclose(composed(x), want, rtol=1e-6)
  with pytest.raises(ValueError, match="at least one"):
    composed_log_prob([])


def test_guide_gradient_matches_finite_differences():
  """The guide's step is scale x grad of the composed log-prob through tokens -> un-standardised
  -> unit-norm embedding; checked coordinate-wise by central differences in float64."""
  binary, topic = _classifiers()
  stats = emb.embedding_stats(_unit_rows(jax.random.key(10), 64, 384))
  terms = [(binary.log_prob(1), 5.0), (topic.log_prob(0), 2.0)]
  guide = attribute_guide(stats, terms)
  x0 = emb.to_tokens(emb.standardize(stats, _unit_rows(jax.random.key(11), 2, 384)), 8)
  step = np.asarray(guide(x0) - x0)
  f = embedding_log_prob(stats, composed_log_prob(terms))
  mean, std = np.float64(stats.mean), np.float64(stats.std)
  w1, b1 = np.float64(binary.weight), np.float64(binary.bias)
  w2, b2 = np.float64(topic.weight), np.float64(topic.bias)

  def f64(x):  # the same log-prob in numpy float64
    e = x.reshape(x.shape[0], -1) * std + mean
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    logit = e @ w1 + b1
    logits = e @ w2.T + b2
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return 5.0 * -np.log1p(np.exp(-logit)) + 2.0 * log_softmax[:, 0]

  x64, h = np.float64(x0), 1e-6
  for b, j, d in [(0, 0, 0), (0, 3, 17), (1, 7, 47), (1, 2, 5)]:
    dx = np.zeros_like(x64)
    dx[b, j, d] = h
    fd = (f64(x64 + dx)[b] - f64(x64 - dx)[b]) / (2 * h)
    assert step[b, j, d] == pytest.approx(fd, rel=1e-3, abs=1e-5)
  # the float32 log-prob the guide differentiates agrees with the float64 reference
  np.testing.assert_allclose(f(x0), f64(x64), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Soft prompts
# ---------------------------------------------------------------------------------------------
def _soft_prompt_decoder(p=3):
  from lsd.models.soft_prompt import SoftPromptConfig, SoftPromptDecoder
  from lsd.nn import TransformerConfig

  cfg = SoftPromptConfig(d_embedding=24, num_prompts=p, d_model=16, n_layers=1, n_heads=2)
  dec = TransformerConfig(vocab_size=11, d_model=32, n_layers=2, n_heads=2)
  return SoftPromptDecoder(cfg, dec, rngs=nnx.Rngs(0))


def test_splice_places_prompts_between_prefix_and_continuation():
  from lsd.models.soft_prompt import splice

  toks = jnp.arange(1, 6, dtype=jnp.float32)[None, :, None] * jnp.ones((2, 1, 1))  # 1..5
  prompts = -jnp.arange(1, 3, dtype=jnp.float32)[None, :, None] * jnp.ones((2, 1, 1))  # -1, -2
  inputs, is_prompt, index = splice(toks, prompts, jnp.array([2, 0]))
  np.testing.assert_array_equal(inputs[..., 0], [[1, 2, -1, -2, 3, 4, 5], [-1, -2, 1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(is_prompt[0], [0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(index[1], [0, 0, 0, 1, 2, 3, 4])


def test_soft_prompts_reach_the_continuation_logits_only():
  model = _soft_prompt_decoder(p=3)
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 11)
  split = jnp.array([2, 4])
  ab = jnp.array([0.9, 0.5])
  e1, e2 = jax.random.normal(jax.random.key(1), (2, 2, 24))
  l1, is_prompt, index = model(tokens, split, e1, ab)
  l2, _, _ = model(tokens, split, e2, ab)
  assert l1.shape == (2, 9, 11)
  diff = np.abs(np.asarray(l1 - l2)).max(-1)
  for b, s in enumerate([2, 4]):
    assert diff[b, :s].max() == 0.0  # prefix positions cannot see the prompts (causal)
    assert diff[b, s:].min() > 1e-4  # prompt slots and the continuation do
  # the noise level reaches them too, and the prefix logits are the plain LM's
  plain, _ = model.decoder(tokens, mask=causal_mask(6))
  np.testing.assert_allclose(l1[1, :4], plain[1, :4], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(index[0])[~np.asarray(is_prompt[0])], np.arange(6))
  assert is_prompt.sum() == 6
  # AdaLN-zero starts blind to the noise level; once its weights move, the level reaches the prompts
  params = nnx.state(model.generator, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(params))))
  nnx.update(
    model.generator,
    jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params),
  )
  l4, _, _ = model(tokens, split, e1, ab)
  l5, _, _ = model(tokens, split, e1, jnp.array([0.1, 0.1]))
  moved = np.abs(np.asarray(l5 - l4)).max(-1)
  assert moved[0, :2].max() == 0.0 and moved[0, 2:].min() > 1e-6


def test_decoder_stage_learns_to_read_the_noised_embedding():
  """A tiny decoder-stage run: the continuation token is a function of the embedding only; with
  noise augmentation (t ~ U(0, 1), alpha_bar to the generator) the loss falls well below the
  prefix-only entropy of ln 4."""
  from lsd.diffusion.gaussian import COSINE, q_sample
  from lsd.models.soft_prompt import soft_prompt_lm_loss

  model = _soft_prompt_decoder(p=2)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  codes = jax.random.normal(jax.random.key(3), (4, 24)) * 2.0

  @nnx.jit
  def step(model, opt, key):
    k_y, k_t, k_n = jax.random.split(key, 3)
    y = jax.random.randint(k_y, (32,), 0, 4)
    tokens = jnp.stack([jnp.full((32,), 10), y + 1, jnp.full((32,), 9)], axis=1)
    valid = jnp.ones_like(tokens, bool)
    t = jax.random.uniform(k_t, (32,)) * 0.5  # noise augmentation (moderate levels for speed)
    z, _ = q_sample(k_n, codes[y], t, COSINE)

    def loss_fn(m):
      logits, is_prompt, index = m(tokens, jnp.ones((32,), jnp.int32), z, COSINE.alpha_bar(t))
      return soft_prompt_lm_loss(logits, is_prompt, index, tokens, valid)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, jax.random.key(i))) for i in range(150)]
  assert np.isfinite(losses).all()
  # 2 targets per row: y + 1 (ln 4 nats if unread) and the fixed last token (-> 0)
  assert np.mean(losses[:5]) > 1.0 and np.mean(losses[-10:]) < 0.35


# ---------------------------------------------------------------------------------------------
# The diffusion stage as a run
# ---------------------------------------------------------------------------------------------
def test_split_prefixes_cuts_at_a_seeded_word_boundary():
  from lsd.methods.dglm import split_prefixes

  docs = [{"text": "a b c d e", "label": 1}, {"text": "single"}, {"text": "x y"}]
  out = split_prefixes(docs, seed=0)
  assert len(out) == 2 and out[0]["label"] == 1
  for d, src in zip(out, ["a b c d e", "x y"], strict=True):
    assert f"{d['source']} {d['text']}" == src and d["source"] and d["text"]
  assert split_prefixes(docs, seed=0) == out  # deterministic


def test_embeddings_are_length_bucketed_exactly_and_cached_once(tmp_path, monkeypatch):
  from lsd.convert.encoders import frozen_encoder
  from lsd.data.latent_cache import encode_in_chunks
  from lsd.data.sentences import encode_sentences
  from lsd.methods import dglm

  enc = frozen_encoder("minilm")
  texts = ["great food .", "the service was slow and the room was cold , never again .", "ok"] * 3
  got = dglm.embed_texts(enc, texts, max_len=32, chunk=4)  # widths 8 and 16, not 32
  tokens, valid = encode_sentences(texts, enc.tokenizer, 32)
  full = encode_in_chunks(tokens, valid, dglm._embedder(enc.name), chunk=4)  # all 32 wide
  np.testing.assert_allclose(got, full, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)

  cache = tmp_path / "emb"
  first = dglm.cached_embeddings(enc, texts, 32, str(cache))
  np.testing.assert_allclose(first, got, atol=1e-6)
  (file,) = cache.iterdir()
  assert file.name.startswith(f"{enc.name}-32-") and file.suffix == ".npy"
  monkeypatch.setattr(dglm, "embed_texts", lambda *a, **k: pytest.fail("encoded again"))
  np.testing.assert_array_equal(dglm.cached_embeddings(enc, texts, 32, str(cache)), first)
  monkeypatch.undo()
  dglm.cached_embeddings(enc, texts[:4], 32, str(cache))  # other texts: another file
  assert len(list(cache.iterdir())) == 2


def test_dglm_diffusion_run_keeps_its_statistics_and_proposes(tmp_path, shared_data):
  from lsd.api import train
  from lsd.config import ConfigError, load_config_file
  from lsd.methods import get_task

  yelp = shared_data / "yelp"
  if not (yelp / "sentiment.dev.0").exists():
    pytest.skip("the Yelp sentiment files are absent from the shared data")
  config = Path(__file__).resolve().parents[1] / "configs" / "dglm.py"
  cfg = load_config_file(f"{config}:size=test")
  data = tmp_path / "yelp"  # 60 sentences per class: the stage encodes every sentence once
  data.mkdir()
  for label in (0, 1):
    lines = (yelp / f"sentiment.dev.{label}").read_text().splitlines()[:60]
    (data / f"sentiment.{label}").write_text("\n".join(lines) + "\n")
  cfg.data.path = str(data / "sentiment.*")
  cfg.data.eval_fraction = 0.05
  cfg.train.update(progress=False, num_samples=2, log_every=1, ckpt_every=100)
  res = train(cfg, tmp_path / "run", record_every_step=True)
  assert res.final_step == 10 and np.isfinite(list(res.losses.values())).all()
  stats = emb.load_stats(tmp_path / "run" / emb.STATS_FILE, width=384)
  assert stats.mean.shape == (384,) and (stats.std > 0).all()
  # MiniLM embeddings are unit vectors: the mean's norm is below 1 and the stds are small
  assert 0.0 < np.linalg.norm(stats.mean) < 1.0 and stats.std.max() < 0.2
  assert len(res.samples) == 2
  for s in res.samples:
    assert s["source"] and s["reference"] and -1.0 <= s["cosine"] <= 1.0 and s["nfe"] == 4
  bad = cfg.copy_and_resolve_references()
  bad.model.num_latents = 5
  with pytest.raises(ConfigError, match=r"num_latents x model.d_latent = 5 x 48 must equal"):
    get_task(bad).validate()


def test_probe_folds_into_a_classifier_on_raw_embeddings():
  from lsd.eval.metrics import LinearProbe
  from lsd.methods.dglm import classifier_from_probe

  x = _unit_rows(jax.random.key(12), 200, 16)
  y2 = (x[:, 0] + 0.3 * x[:, 3] > np.median(x[:, 0] + 0.3 * x[:, 3])).astype(int)
  y3 = np.digitize(x[:, 1], np.quantile(x[:, 1], [1 / 3, 2 / 3]))
  for y in (y2, y3):
    probe = LinearProbe(c=10.0).fit(x, y)
    clf = classifier_from_probe(probe)
    logits = probe.decision_function(x)
    lp = np.asarray(clf.log_probs(x))
    if logits.ndim == 1:
      np.testing.assert_allclose(lp[:, 1] - lp[:, 0], logits, rtol=1e-4, atol=1e-4)
    else:
      ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      np.testing.assert_allclose(lp, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(probe.classes[lp.argmax(-1)], probe.predict(x))


def test_near_constant_embedding_dimensions_get_no_weight():
  from lsd.methods.dglm import fit_embedding_classifier

  x = _unit_rows(jax.random.key(13), 200, 16).astype(np.float64)
  y = (x[:, 0] > np.median(x[:, 0])).astype(int)
  # a dimension that differs only by rounding, as some of all-MiniLM-L6-v2's do (std ~1e-33)
  x[:, 5] = 0.01 + 1e-33 * np.random.default_rng(0).standard_normal(200)
  clf, classes = fit_embedding_classifier(x, y, c=1000.0)
  w = np.asarray(clf.weight)
  assert classes.tolist() == [0, 1] and w[5] == 0.0
  assert np.abs(w).max() < 1e4  # unfixed, the folded weight of dimension 5 is ~1e32
  pred = np.asarray(clf.log_probs(x)).argmax(-1)
  assert (pred == y).mean() > 0.95
  # off the training rows (dimension 5 moved by 0.05) the log-probs stay finite and moderate
  lp = np.asarray(clf.log_probs(x + 0.05 * np.eye(16)[5]))
  assert np.isfinite(lp).all() and lp.min() > -1e3


def test_sentiment_classifier_from_sst2_text(shared_data):
  import csv

  from lsd.convert.encoders import frozen_encoder
  from lsd.methods.dglm import embed_texts, fit_attribute_classifier

  sst2 = shared_data / "sst2"
  if not (sst2 / "train.tsv").exists():
    pytest.skip("SST-2 is absent from the shared data")

  def rows(name, n):
    with open(sst2 / name, encoding="utf-8") as f:
      r = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1 : n + 1]
    return [t for _, t in r], np.array([int(lab) for lab, _ in r])

  enc = frozen_encoder("minilm")
  texts, labels = rows("train.tsv", 300)
  clf, classes = fit_attribute_classifier(enc, texts, labels)
  assert classes.tolist() == [0, 1]
  dev_texts, dev_labels = rows("dev.tsv", 200)
  pred = np.asarray(clf.log_probs(embed_texts(enc, dev_texts))).argmax(-1)
  assert (pred == dev_labels).mean() > 0.65  # MiniLM + logistic regression on 300 sentences


def test_guided_sampler_raises_the_classifier_log_prob_with_cfg():
  """The composed guide in the shared DDPM sampler, with CFG on a prefix-conditioned denoiser: the
  guided proposals score higher under the attribute than unguided ones from the same noise."""
  from lsd.sampling import latent as latent_sampling

  cfg = DenoiserConfig(num_latents=8, d_latent=48, d_model=32, n_layers=2, n_heads=2, d_context=16)
  model = LatentDenoiser(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  stats = emb.embedding_stats(_unit_rows(jax.random.key(13), 64, 384))
  binary, topic = _classifiers()
  guide = attribute_guide(stats, [(binary.log_prob(1), 3.0), (topic.log_prob(2), 1.0)])
  context = jax.random.normal(jax.random.key(14), (6, 3, 16))
  kw = dict(steps=6, sampler="ddpm", guidance_scale=2.0, context=context)
  plain = latent_sampling.sample(graphdef, params, jax.random.key(15), 6, **kw)
  guided = latent_sampling.sample(graphdef, params, jax.random.key(15), 6, guide=guide, **kw)
  assert guided.shape == (6, 8, 48) and np.isfinite(guided).all()

  def score(x0):
    e = emb.unstandardize(stats, emb.from_tokens(x0))
    return np.asarray(binary.log_prob(1)(e)), np.asarray(topic.log_prob(2)(e))

  (b0, t0), (b1, t1) = score(plain), score(guided)
  assert b1.mean() > b0.mean() + 0.1 and t1.mean() > t0.mean()


def test_continuation_from_a_proposal_follows_the_spliced_logits():
  """Greedy decoding after [prefix][soft prompts] (alpha_bar = 1: no re-noising) gives, token by
  token, the argmax of the SoftPromptDecoder's logits over [prefix][prompts][generated]."""
  from lsd.sampling.soft_prompt import continue_from_proposal, renoise

  model = _soft_prompt_decoder(p=3)
  graphdef, params = nnx.split(model)
  prefix = jax.random.randint(jax.random.key(16), (2, 4), 0, 11)
  proposal = jax.random.normal(jax.random.key(17), (2, 24))
  out = continue_from_proposal(
    graphdef,
    params,
    jax.random.key(0),
    prefix,
    proposal,
    alpha_bar=1.0,
    max_new_tokens=3,
    top_p=0.0,
  )
  assert out.shape == (2, 3)
  tokens = jnp.concatenate([prefix, out], axis=1)
  logits, _, _ = model(tokens, jnp.full((2,), 4), proposal, jnp.ones((2,)))
  # position 3 + P + i (the last prompt, then generated tokens) predicts generated token i
  np.testing.assert_array_equal(logits[:, 6:9].argmax(-1), out)
  # re-noising: alpha_bar 1 keeps the proposal, a lower level moves it by the schedule's amounts
  np.testing.assert_allclose(renoise(jax.random.key(1), proposal, 1.0), proposal, atol=1e-6)
  eps = jax.random.normal(jax.random.key(1), proposal.shape)
  want = np.sqrt(0.8) * proposal + np.sqrt(0.2) * eps
  np.testing.assert_allclose(renoise(jax.random.key(1), proposal, 0.8), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The decoder stage, proposal -> text, classifiers in a run
# ---------------------------------------------------------------------------------------------
_GOOD = ["great", "friendly", "delicious", "amazing", "lovely", "perfect"]
_BAD = ["awful", "rude", "cold", "terrible", "bland", "dirty"]
_THINGS = ["the food", "the staff", "the pizza", "our waiter", "the room", "the coffee"]


def _reviews(tmp, n=48):
  """Two files of short Yelp-like review sentences (label = file index: 0 bad, 1 good)."""
  tmp.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for label, words in ((0, _BAD), (1, _GOOD)):
    lines = [
      f"{rng.choice(_THINGS)} was {rng.choice(words)} and {rng.choice(_THINGS)} was "
      f"{rng.choice(words)} ."
      for _ in range(n)
    ]
    (tmp / f"sentiment.{label}").write_text("\n".join(lines) + "\n")
  return str(tmp / "sentiment.*")


def _config(stage, data, **dglm):
  from lsd.config import load_config_file

  config = Path(__file__).resolve().parents[1] / "configs" / "dglm.py"
  cfg = load_config_file(f"{config}:size=test,stage={stage}")
  cfg.data.path = data
  cfg.data.eval_fraction = 0.05
  cfg.train.update(progress=False, num_samples=2, log_every=1, ckpt_every=100)
  cfg.dglm.update(dglm)
  return cfg


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
  """A 20-step decoder run without a diffusion run: it computes its own statistics."""
  from lsd.api import train

  tmp = tmp_path_factory.mktemp("dglm")
  data = _reviews(tmp / "data")
  cfg = _config("decoder", data)
  cfg.train.update(steps=20, lr=3e-3)
  return data, tmp / "dec", train(cfg, tmp / "dec", record_every_step=True)


@pytest.mark.slow  # a 20-step run: about 50 s on 2 busy CPU cores
def test_decoder_stage_trains_and_keeps_its_statistics(decoder_run):
  from lsd.config import ConfigError
  from lsd.methods import get_task

  data, workdir, res = decoder_run
  losses = [res.losses[k] for k in sorted(res.losses)]
  assert res.final_step == 20 and np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  # computed as the diffusion stage computes them: the training continuations' moments
  task = get_task(_config("decoder", data))
  train_docs, _ = task.split_docs()
  want = emb.embedding_stats(task.embeddings([d["text"] for d in train_docs[:256]]))
  stats = emb.load_stats(workdir / emb.STATS_FILE, width=384)
  np.testing.assert_array_equal(stats.mean, want.mean)
  np.testing.assert_array_equal(stats.std, want.std)
  # no diffusion run: the end-of-run samples read the true continuation's embedding
  assert len(res.samples) == 2
  for s in res.samples:
    assert s["proposal"] == "reference" and s["prompt"] and s["nfe"] == len(s["tokens"])
  bad = _config("decoder", data, freeze_decoder=True)
  with pytest.raises(ConfigError, match="freeze_decoder=True needs dglm.decoder_init"):
    get_task(bad)


def test_prefixes_of_different_lengths_decode_as_one_at_a_time(tmp_path):
  """Batched by token length: each continuation equals the one decoded alone (greedy tokens)."""
  from lsd.data.tokenizer import train_bpe
  from lsd.methods import get_task

  data = _reviews(tmp_path)
  task = get_task(_config("decoder", data))
  task.config.sample.renoise_alpha_bar = 1.0  # the re-noising draw then counts 0 times
  task.tokenizer = train_bpe(Path(tmp_path / "sentiment.1").read_text().splitlines(), 300)
  task.stats = emb.embedding_stats(_unit_rows(jax.random.key(20), 64, 384))
  model = task.build_model(nnx.Rngs(0))
  prefixes = ["the food", "the pizza was lovely and", "our waiter"]
  proposals = _unit_rows(jax.random.key(21), 3, 384)
  key, kw = jax.random.key(3), dict(top_p=0.0, max_new_tokens=6)
  batched = task.continue_texts(model, key, prefixes, proposals, **kw)
  lengths = [len(task.tokenizer.encode(p)) for p in prefixes]
  assert lengths[0] == lengths[2] != lengths[1], lengths  # rows 0 and 2 share a decoding call
  for i, p in enumerate(prefixes):
    alone = task.continue_texts(model, key, [p], proposals[i : i + 1], **kw)[0]
    assert alone["tokens"] == batched[i]["tokens"], (p, alone, batched[i])
    assert len(alone["tokens"]) <= 6 and alone["text"] == task.tokenizer.decode(alone["tokens"])
  # the proposal reaches the continuation: another proposal, another greedy continuation
  other = task.continue_texts(model, key, prefixes[:1], proposals[1:2], max_new_tokens=6, top_p=0.0)
  assert other[0]["tokens"] != batched[0]["tokens"]


def test_classifier_file_round_trip(tmp_path):
  from lsd.diffusion.attribute_guidance import load_classifier, save_classifier

  binary, topic = _classifiers()
  x = _unit_rows(jax.random.key(22), 4, 384)
  for clf, names in ((binary, ["negative", "positive"]), (topic, ["w", "s", "b", "t"])):
    path = tmp_path / "clf.safetensors"
    save_classifier(path, clf, names)
    loaded, classes = load_classifier(path)
    assert classes == names and [p.name for p in tmp_path.iterdir()] == ["clf.safetensors"]
    np.testing.assert_array_equal(loaded.log_probs(x), clf.log_probs(x))
  with pytest.raises(ValueError, match="need 2 distinct names"):
    save_classifier(tmp_path / "x.safetensors", binary, ["a", "a"])
  emb.save_stats(tmp_path / "stats.safetensors", emb.embedding_stats(x))
  with pytest.raises(ValueError, match="not a classifier file"):
    load_classifier(tmp_path / "stats.safetensors")


def test_attribute_flag_errors_name_the_flag_the_value_and_the_form(tmp_path, capsys):
  from lsd.main import main
  from lsd.methods.dglm import parse_attribute

  assert parse_attribute("sentiment=positive:3.0") == ("sentiment", "positive", 3.0)
  assert parse_attribute("topic=2:-1e-1") == ("topic", "2", -0.1)
  for bad in ("sentiment=positive", "sentiment:3", "=pos:1", "sentiment=pos:x", "s=p:inf"):
    code = main(["sample", "--workdir", str(tmp_path), "--prompt", "hi", "--attribute", bad])
    err = capsys.readouterr().err
    assert code == 2, bad
    assert f"--attribute {bad!r}: expected NAME=TARGET:SCALE" in err, err
  code = main(["sample", "--workdir", str(tmp_path), "--attribute", "sentiment=pos:1"])
  assert code == 2 and "give --prompt or --inputs" in capsys.readouterr().err


@pytest.mark.slow  # two trainings and the CLI: about 2 minutes on 2 busy CPU cores
def test_dglm_end_to_end_on_the_command_line(tmp_path, capsys):
  """Diffusion stage, then a decoder stage that takes its statistics, then `lsd sample --prompt`
  with `--attribute` guidance from a classifier saved by `save_attribute_classifier`."""
  import json

  from lsd.api import load
  from lsd.config import ConfigError
  from lsd.convert.encoders import frozen_encoder
  from lsd.main import main
  from lsd.methods import get_task
  from lsd.methods.dglm import save_attribute_classifier

  config = Path(__file__).resolve().parents[1] / "configs" / "dglm.py"
  data, diff, dec = _reviews(tmp_path / "data"), tmp_path / "diff", tmp_path / "dec"
  texts = [(tmp_path / "data" / f"sentiment.{y}").read_text().splitlines() for y in (0, 1)]
  labels = [0] * len(texts[0]) + [1] * len(texts[1])
  clf_path = tmp_path / "sentiment.safetensors"
  clf, names = save_attribute_classifier(
    clf_path, frozen_encoder("minilm"), texts[0] + texts[1], labels, ["negative", "positive"]
  )
  common = [f"--config.data.path={data}", "--config.train.progress=false"]
  common += ["--config.train.num_samples=1", "--config.data.eval_fraction=0.05"]
  assert main(["train", "--config", f"{config}:size=test", "--workdir", str(diff), *common]) == 0
  spec = [{"name": "sentiment", "path": str(clf_path), "target": "positive", "scale": 0.0}]
  args = [
    f"--config.dglm.diffusion_workdir={diff}",
    f"--config.dglm.classifiers={json.dumps(spec)}",
  ]
  stage = f"{config}:size=test,stage=decoder"
  assert main(["train", "--config", stage, "--workdir", str(dec), *common, *args]) == 0
  ours, theirs = emb.load_stats(dec / emb.STATS_FILE), emb.load_stats(diff / emb.STATS_FILE)
  np.testing.assert_array_equal(ours.mean, theirs.mean)
  np.testing.assert_array_equal(ours.std, theirs.std)
  capsys.readouterr()
  out = tmp_path / "samples.jsonl"
  prompts = ["--prompt", "the food was", "--prompt", "our waiter"]
  attr = ["--attribute", "sentiment=positive:3.0"]
  assert main(["sample", "--workdir", str(dec), *prompts, *attr, "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "prompt 'the food was'" in printed and "prompt 'our waiter'" in printed
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["prompt"] for r in records] == ["the food was", "our waiter"]
  for r in records:  # 4 denoiser steps, then the decoded tokens
    assert isinstance(r["text"], str) and r["nfe"] == 4 + len(r["tokens"])
  code = main(["sample", "--workdir", str(dec), *prompts, "--attribute", "topic=sports:2"])
  assert code == 2 and "accepted: ['sentiment']" in capsys.readouterr().err
  code = main(["sample", "--workdir", str(dec), *prompts, "--attribute", "sentiment=happy:2"])
  assert code == 2 and "accepted targets are ['negative', 'positive']" in capsys.readouterr().err
  # guidance moves the proposals up the classifier's log-prob (same noise, scale 0 vs 30)
  run, key = load(dec), jax.random.key(5)
  prefixes = ["the food was", "our waiter", "the room", "the staff was"]
  plain = run.task.propose(key, prefixes, [("sentiment", "positive", 0.0)])
  guided = run.task.propose(key, prefixes, [("sentiment", "positive", 30.0)])
  assert np.mean(clf.log_prob(1)(guided)) > np.mean(clf.log_prob(1)(plain)) + 0.05
  # a decoder run whose statistics differ from the diffusion run's is refused
  cfg = _config("decoder", data, diffusion_workdir=str(diff))
  task = get_task(cfg)
  emb.save_stats(tmp_path / "other" / emb.STATS_FILE, emb.EmbeddingStats(ours.mean, ours.std * 2))
  with pytest.raises(ConfigError, match="embedding statistics of .* differ"):
    task.setup_stats(tmp_path / "other", task.split_docs()[0], 0)


def test_decoder_starts_from_a_causal_lm_run_and_can_be_frozen(tmp_path):
  """dglm.decoder_init copies every weight of a causal_lm run into the decoder (and the run's
  tokenizer becomes the decoder's); freeze_decoder puts "decoder" into train.freeze."""
  from flax import traverse_util

  from lsd.api import train
  from lsd.config import load_config_file
  from lsd.methods import get_task

  data = _reviews(tmp_path / "data")
  lm = load_config_file(
    str(Path(__file__).resolve().parents[1] / "configs/causal_lm.py:size=test,data=text")
  )
  lm.data.path = str(tmp_path / "data" / "sentiment.1")
  lm.train.update(steps=2, progress=False, num_samples=1, ckpt_every=100)
  train(lm, tmp_path / "lm")
  cfg = _config("decoder", data, decoder_init=str(tmp_path / "lm"), freeze_decoder=True)
  task = get_task(cfg)
  assert list(cfg.train.freeze) == ["decoder"]
  train_docs, _ = task.split_docs()
  task.tokenizer = task.decoder_tokenizer(tmp_path / "dec", train_docs)
  run = task.decoder_init_run()
  assert (tmp_path / "dec" / "tokenizer.json").read_text() == (
    tmp_path / "lm" / "tokenizer.json"
  ).read_text()
  _, params = nnx.split(task.build_model(nnx.Rngs(1)))
  out = traverse_util.flatten_dict(task.initial_params(params).to_pure_dict())
  lm_params = traverse_util.flatten_dict(run.params.to_pure_dict())
  assert len(lm_params) > 5
  for k, v in lm_params.items():
    np.testing.assert_array_equal(out[("decoder", *k)], v)
  fresh = traverse_util.flatten_dict(params.to_pure_dict())
  gen = [k for k in fresh if k[0] == "generator"]
  assert gen and all(np.array_equal(out[k], fresh[k]) for k in gen)


def test_decoder_stage_train_step_lowers_without_data():
  """`lsd compile`'s path: the decoder stage's abstract batch (split index and embedding
  included) and its train step lowered with abstract inputs only; the diffusion stage's batch."""
  from lsd.config import load_config_file
  from lsd.methods import abstract, get_task
  from lsd.train import aot

  config = Path(__file__).resolve().parents[1] / "configs" / "dglm.py"
  c = load_config_file(f"{config}:size=test,stage=decoder")
  task = abstract.prepare(get_task(c))
  batch = abstract.batch(task, c.data.batch_size)
  assert {k: (v.shape, str(v.dtype)) for k, v in batch.items()} == {
    "tokens": ((8, 16), "int32"),
    "valid": ((8, 16), "bool"),
    "split": ((8,), "int32"),
    "embedding": ((8, 384), "float32"),
  }
  assert task.tokenizer.vocab_size == 512 and task.stats.mean.shape == (384,)
  t = aot.abstract_train(c, task, jax.devices(), batch)
  lowered = jax.jit(t.step_fn, in_shardings=(t.state_shardings, None)).lower(t.state, t.batch)
  state, metrics = lowered.out_info
  assert {"loss", "ppl"} <= set(metrics) and metrics["ppl"].shape == ()
  shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]
  assert shapes(state.params) == shapes(t.state.params)
  diffusion = abstract.prepare(get_task(load_config_file(f"{config}:size=test")))
  assert {k: v.shape for k, v in abstract.batch(diffusion, 8).items()} == {
    "embedding": (8, 384),
    "source_tokens": (8, 16),
    "source_valid": (8, 16),
  }


def _tiny_gpt2(directory: Path, texts: list[str]) -> Path:
  """A random-weight GPT-2 checkpoint (d_model 24, 64 positions) written by the exporter, with a
  byte-level BPE tokenizer.json trained on `texts` that holds GPT-2's <|endoftext|>."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  from lsd.convert.hf import export_hf
  from lsd.models.gpt2 import GPT2LM, GPT2Config

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  directory.mkdir(parents=True)
  tok.save(str(directory / "tokenizer.json"))
  end = tok.token_to_id("<|endoftext|>")
  cfg = GPT2Config(
    vocab_size=tok.get_vocab_size(), n_positions=64, d_model=24, n_layers=2, n_heads=2,
    bos_id=end, eos_id=end,
  )  # fmt: skip
  export_hf("gpt2", GPT2LM(cfg, rngs=nnx.Rngs(7)), directory)
  return directory


def test_gpt2_checkpoint_imports_as_a_decoder_with_lsd_specials(tmp_path):
  """lsd.convert.hf: the checkpoint's tokenizer with <|endoftext|> as <eos> and three appended
  specials, whose rows are <eos>'s (<bos>) and the mean row; the checkpoint's logits unchanged."""
  from lsd.convert import hf
  from lsd.data.tokenizer import gpt2_with_lsd_specials

  _reviews(tmp_path / "data")
  lines = (tmp_path / "data" / "sentiment.0").read_text().splitlines()
  ckpt = _tiny_gpt2(tmp_path / "gpt2", lines)
  tok = gpt2_with_lsd_specials(ckpt)
  n, end = hf.gpt2_config(ckpt).vocab_size, hf.gpt2_config(ckpt).eos_id
  assert tok.eos_id == end and sorted((tok.pad_id, tok.bos_id, tok.mask_id)) == [n, n + 1, n + 2]
  assert tok.decode(tok.encode("the food was rude .")) == "the food was rude ."
  imported = hf.import_gpt2_decoder(ckpt, tok)
  rows = np.asarray(imported.embed.embedding[...])
  lm, _ = hf.import_hf("gpt2", ckpt)
  first = np.asarray(lm.transformer.embed.embedding[...])
  assert rows.shape == (n + 3, 24)
  np.testing.assert_array_equal(rows[:n], first)
  np.testing.assert_array_equal(rows[tok.bos_id], first[tok.eos_id])
  np.testing.assert_allclose(rows[tok.pad_id], first.mean(0), rtol=1e-6)
  ids = jnp.asarray([tok.encode("the staff was cold")])
  got = imported(ids, mask=causal_mask(ids.shape[1])[None, None])[0][..., :n]
  np.testing.assert_allclose(got, lm(ids), atol=1e-5)


def train_imported_decoder(tmp_path, data, checkpoint, tok, imported, width, steps):
  """Trains the decoder stage from an imported causal LM `checkpoint`, frozen then fine-tuned,
  and returns the two loaded runs. Checks: the run finishes with text samples; the generator has
  the checkpoint's `width`; frozen, every decoder weight equals `imported`'s bit for bit;
  fine-tuned, every one moved; either way the generator's projections left the trainer's init
  (the blocks' AdaLN-zero gates open only after the first update)."""
  from flax import traverse_util

  from lsd.api import load, train
  from lsd.methods import get_task

  flat = lambda state: traverse_util.flatten_dict(state.to_pure_dict())  # noqa: E731
  want = flat(nnx.state(imported, nnx.Param))
  runs = []
  for frozen in (True, False):
    cfg = _config("decoder", data, decoder_checkpoint=checkpoint, freeze_decoder=frozen)
    cfg.train.update(steps=steps, lr=3e-3, num_samples=1)
    workdir = tmp_path / f"dec_{frozen}"
    res = train(cfg, workdir)
    assert res.final_step == steps and isinstance(res.samples[0]["text"], str)
    run = load(workdir, use_ema=False)
    assert run.model().generator.proj_out.kernel.shape == (32, width)
    params = flat(run.params)
    changed = [k for k, v in want.items() if not np.array_equal(params[("decoder", *k)], v)]
    assert changed == [] if frozen else len(changed) == len(want), (frozen, changed)
    task = get_task(cfg)
    task.tokenizer = tok
    init = flat(nnx.split(task.build_model(nnx.Rngs(cfg.seed)))[1])
    for k in (("generator", "proj_in", "kernel"), ("generator", "proj_out", "kernel")):
      assert not np.array_equal(params[k], init[k]), k
    runs.append(run)
  return runs


@pytest.mark.slow  # two 2-step runs and their decoding: about 2 minutes on 2 busy CPU cores
def test_decoder_is_an_imported_gpt2_frozen_or_fine_tuned(tmp_path):
  """dglm.decoder_checkpoint: a GPT-2 exported to safetensors is the decoder (its width, its
  tokenizer); frozen, every decoder weight stays bit-identical while the generator trains;
  fine-tuned, every decoder weight moves. The runs load and continue prompts."""
  from lsd.config import ConfigError
  from lsd.convert import hf
  from lsd.data.tokenizer import gpt2_with_lsd_specials
  from lsd.methods import get_task

  data = _reviews(tmp_path / "data")
  lines = (tmp_path / "data" / "sentiment.0").read_text().splitlines()
  ckpt = _tiny_gpt2(tmp_path / "gpt2", lines)
  tok = gpt2_with_lsd_specials(ckpt)
  imported = hf.import_gpt2_decoder(ckpt, tok)
  for run in train_imported_decoder(tmp_path, data, str(ckpt), tok, imported, 24, steps=2):
    proposal = _unit_rows(jax.random.key(30), 1, 384)
    out = run.task.continue_texts(run.model(), jax.random.key(4), ["the food"], proposal)[0]
    assert 1 <= len(out["tokens"]) <= 12 and out["text"] == run.tokenizer.decode(out["tokens"])
  with pytest.raises(ConfigError, match="decoder_checkpoint='/no/such/dir' is not a directory"):
    get_task(_config("decoder", data, decoder_checkpoint="/no/such/dir"))
  both = _config("decoder", data, decoder_checkpoint=str(ckpt), decoder_init=str(tmp_path))
  with pytest.raises(ConfigError, match="starts from one of them"):
    get_task(both)


# ---------------------------------------------------------------------------------------------------
# The AR baseline's control: FUDGE reweighting by a bag-of-tokens classifier (lsd.sampling.fudge)
# ---------------------------------------------------------------------------------------------------
def _fudge_lm():
  from lsd.config import load_config_file
  from lsd.data.tokenizer import train_bpe
  from lsd.methods import get_task

  cfg = load_config_file("configs/causal_lm.py:size=test,data=text")
  task = get_task(cfg)
  task.tokenizer = train_bpe(["the food was great .", "service was slow and rude ."] * 4, 300)
  model = task.build_model(nnx.Rngs(0))
  return model.cfg.vocab_size, *nnx.split(model)


def test_fudge_log_probs_reweight_the_top_k_by_the_classifier():
  from lsd.sampling.fudge import TokenClassifier, fudge_log_probs

  lp = jax.nn.log_softmax(jnp.array([[2.0, 1.0, 0.5, -1.0, -3.0]]))
  clf = TokenClassifier.from_linear(jnp.array([0.0, 0.0, 4.0, 0.0, 9.0]), jnp.array(-1.0))
  assert clf.weight.shape == (2, 5) and clf.bias.tolist() == [0.0, -1.0]
  state = jnp.array([[0.0, 0.5]])  # the prefix's class logits
  out = np.asarray(fudge_log_probs(lp, state, clf, jnp.array([1]), strength=2.0, top_k=3))
  # candidates 0, 1, 2; log p(1 | prefix + v) = log sigmoid(0.5 + w_v)
  logsig = lambda x: -np.log1p(np.exp(-x))
  s = np.asarray(lp[0, :3]) + 2.0 * logsig(np.array([0.5, 0.5, 4.5]))
  np.testing.assert_allclose(out[0, :3], s - np.log(np.exp(s).sum()), rtol=1e-5)
  assert np.isneginf(out[0, 3:]).all()
  # strength 0: the LM's top-k renormalised
  plain = np.asarray(fudge_log_probs(lp, state, clf, jnp.array([1]), strength=0.0, top_k=5))
  np.testing.assert_allclose(plain, np.asarray(lp), rtol=1e-5)
  with pytest.raises(ValueError, match="expected"):
    TokenClassifier.from_linear(jnp.zeros((5,)), jnp.zeros((2,)))


def test_fudge_generate_is_plain_decoding_at_strength_0_and_follows_a_strong_classifier():
  from lsd.sampling.autoregressive import generate
  from lsd.sampling.fudge import TokenClassifier, fudge_generate

  vocab, graphdef, params = _fudge_lm()
  prompt = jnp.array([[1, 5, 7], [1, 9, 4]], jnp.int32)
  key = jax.random.key(0)
  plain = generate(graphdef, params, key, prompt, max_new_tokens=6, top_p=0.0)
  favoured = 17
  w = jnp.zeros((vocab,)).at[favoured].set(50.0)
  clf = TokenClassifier.from_linear(w, jnp.array(0.0))
  kw = dict(max_new_tokens=6, top_k=vocab, top_p=0.0)
  same = fudge_generate(graphdef, params, key, prompt, clf, jnp.array([1, 0]), strength=0.0, **kw)
  np.testing.assert_array_equal(same, plain)
  # target 1 (the favoured token's class) at a high strength: the favoured token first, after
  # which the classifier is satisfied; target 0 never picks it.
  out = fudge_generate(graphdef, params, key, prompt, clf, jnp.array([1, 0]), strength=30.0, **kw)
  out = np.asarray(out)
  assert out[0, 0] == favoured
  assert favoured not in out[1].tolist()
  # sampled (top_p 0.9, top_k 5): every token is one of the LM's 5 most likely at its step
  sampled = fudge_generate(
    graphdef, params, key, prompt, clf, jnp.array([1, 1]), strength=1.0, max_new_tokens=6,
    top_k=5, top_p=0.9,
  )  # fmt: skip
  assert sampled.shape == (2, 6)
  from lsd.nn import causal_mask

  full = jnp.concatenate([prompt, sampled], axis=1)  # teacher-forced: the LM's logits per step
  logits, _ = nnx.merge(graphdef, params)(full, mask=causal_mask(full.shape[1]))
  p = prompt.shape[1]
  top5 = np.argsort(-np.asarray(logits[:, p - 1 : p + 5]), axis=-1)[..., :5]
  for row in range(2):
    for i in range(6):
      assert int(sampled[row, i]) in top5[row, i].tolist(), (row, i)
