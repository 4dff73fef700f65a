"""The registry of frozen pretrained encoders (`lsd.convert.encoder_specs`, `lsd.convert.encoders`):
names, widths, poolings, tokenizers and loading, on a tiny random-weight BERT checkpoint written by
the project's exporter into a tmp directory (`bert:DIR`), and the names in config validation."""

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import lsd.api
from lsd.api import train
from lsd.config import ConfigError, from_json_file, load_config_file, to_json
from lsd.convert.encoder_specs import encoder_spec
from lsd.convert.encoders import frozen_encoder, pool
from lsd.convert.hf import export_hf
from lsd.data.tokenizer import build_tokenizer, check_tokenizer_config, encoder_tokenizer
from lsd.methods import get_task
from lsd.models.bert import BertConfig, BertEncoder

WORDS = "the food was great service slow and rude i love pizza here never coming back".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "!", *WORDS, "##s"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  """A tiny random BERT (width 32) exported with a WordPiece vocab.txt: the bert:DIR layout."""
  folder = tmp_path_factory.mktemp("tiny_bert")
  cfg = BertConfig(vocab_size=len(VOCAB), d_model=32, n_layers=1, n_heads=2, d_ff=64,
                   max_positions=40)  # fmt: skip
  export_hf("bert", BertEncoder(cfg, rngs=nnx.Rngs(0)), folder)
  (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  return folder


def test_spec_reads_width_pooling_and_length_without_the_weights(bert_dir, tmp_path):
  spec = encoder_spec(f"bert:{bert_dir}")
  assert (spec.width, spec.pooling, spec.max_len, spec.arch) == (32, "cls", 40, "bert")
  assert spec.name == f"bert:{bert_dir.resolve()}"
  # Another spelling of the same directory is the same encoder.
  assert encoder_spec(f"bert:{bert_dir}/../{bert_dir.name}").name == spec.name
  minilm = encoder_spec("minilm")  # known without downloading anything
  assert (minilm.width, minilm.pooling, minilm.max_len) == (384, "mean", 512)


@pytest.mark.parametrize(
  "name, match",
  [
    ("bert-large", r"model.encoder='bert-large' is not a frozen pretrained encoder; accepted: "
                   r"'minilm' .* or 'bert:<dir>'"),
    ("bert:", r"model.encoder='bert:': '.*' is not a checkpoint directory with a config.json"),
    ("bert:/no/such/dir", r"model.encoder='bert:/no/such/dir': '/no/such/dir' is not"),
    (384, r"model.encoder=384 is not a frozen pretrained encoder"),
  ],
)  # fmt: skip
def test_unknown_names_are_config_errors_listing_the_registry(name, match):
  with pytest.raises(ConfigError, match=match):
    encoder_spec(name, "model.encoder")


def test_tokenizer_keeps_bert_ids_with_lsd_special_names(bert_dir):
  tok = encoder_tokenizer(f"bert:{bert_dir}")
  assert tok.special_ids == (0, 2, 3, 4)  # [PAD] [CLS] [SEP] [MASK]
  assert tok.vocab_size == len(VOCAB)
  # BERT's normaliser (lower case) and pre-tokeniser, WordPiece continuation pieces.
  ids = tok.encode("The food was GREAT, pizzas!")
  assert ids == [VOCAB.index(w) for w in ("the", "food", "was", "great")] + [1] + [
    VOCAB.index("pizza"), VOCAB.index("##s"), VOCAB.index("!")
  ]  # fmt: skip
  assert tok.decode(ids) == "the food was great [UNK] pizzas!"  # BERT's decoder cleanup
  # data.tokenizer.kind names the same tokenizer.
  cfg = ml_collections.ConfigDict({"kind": f"bert:{bert_dir}", "vocab_size": 0, "path": ""})
  check_tokenizer_config(cfg)
  assert build_tokenizer(cfg, []).encode("the food") == tok.encode("the food")


def test_tokenizer_kind_errors_list_the_kinds_and_the_encoders():
  cfg = ml_collections.ConfigDict({"kind": "wordpiece", "vocab_size": 0, "path": ""})
  kinds = r"\['bpe', 'gpt2', 'file', 'hub'\] or .*'minilm'.*'bert:<dir>'"
  with pytest.raises(ConfigError, match=r"kind='wordpiece' is not supported; accepted: " + kinds):
    check_tokenizer_config(cfg)
  cfg.kind = "bert:/no/such/dir"
  with pytest.raises(ConfigError, match=r"data.tokenizer.kind='bert:/no/such/dir'"):
    check_tokenizer_config(cfg)


def test_frozen_encoder_states_and_pooling(bert_dir):
  enc = frozen_encoder(f"bert:{bert_dir}")
  assert enc is frozen_encoder(f"bert:{bert_dir.resolve()}")  # loaded once per process
  assert (enc.width, enc.pooling, enc.max_len) == (32, "cls", 40)
  states, valid = enc.encode_texts(["the food was great .", "i love pizza"], max_len=8)
  assert states.shape == (2, 8, 32) and valid.tolist()[1] == [True] * 5 + [False] * 3
  # The same numbers as the exported model called directly on BERT's own [CLS] ids [SEP] rows.
  model = encoder_spec(enc.name).load_model()
  ids = [[2, 7, 8, 9, 10, 5, 3, 0], [2, 15, 16, 17, 3, 0, 0, 0]]
  want = model(jnp.asarray(ids), valid)
  np.testing.assert_allclose(states, want, atol=1e-6)
  np.testing.assert_allclose(enc.hidden_states(jnp.asarray(ids), valid), want, atol=1e-6)
  # No gradient reaches a frozen encoder's input through its states.
  grad = jax.grad(lambda h: jnp.sum(enc.hidden_states(jnp.asarray(ids), valid) * h))(states)
  assert grad.shape == states.shape
  np.testing.assert_allclose(enc.pool(states, valid), states[:, 0])
  h = jnp.arange(12.0).reshape(1, 4, 3)
  m = jnp.array([[True, True, False, False]])
  np.testing.assert_allclose(pool(h, m, "mean"), [[1.5, 2.5, 3.5]])
  np.testing.assert_allclose(pool(h, m, "cls"), [[0.0, 1.0, 2.0]])
  assert pool(h, m, "none") is h
  with pytest.raises(ValueError, match="tokens exceed"):
    enc.hidden_states(jnp.zeros((1, 41), jnp.int32), jnp.ones((1, 41), bool))


def test_tokenizer_json_is_read_before_vocab_txt(bert_dir, tmp_path):
  # A directory with a tokenizer.json (the transformers fast-tokenizer file) uses it.
  from tokenizers import Tokenizer, models, pre_tokenizers

  folder = tmp_path / "with_json"
  folder.mkdir()
  for f in ("config.json", "model.safetensors"):
    (folder / f).write_bytes((bert_dir / f).read_bytes())
  vocab = {t: i for i, t in enumerate(VOCAB)}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
  spec = encoder_spec(f"bert:{folder}")
  assert spec.tokenizer_file().name == "tokenizer.json" and not spec.lowercase
  ours = encoder_tokenizer(spec.name)
  assert ours.encode("the Food") == [VOCAB.index("the"), 1]  # no lower-casing: Food is unknown


def _sentences(folder):
  """Two label files of 24 sentences in the tiny BERT's vocabulary, seeded."""
  rng = np.random.default_rng(0)
  for label in (0, 1):
    lines = [" ".join(rng.choice(WORDS, 5)) + " ." for _ in range(24)]
    (folder / f"yelp.{label}").write_text("\n".join(lines) + "\n")
  return str(folder / "yelp.*")


def test_ld4lg_autoencoder_trains_on_a_bert_dir_encoder(bert_dir, tmp_path):
  name = f"bert:{bert_dir}"
  cfg = load_config_file(f"configs/ld4lg_yelp.py:stage=ae,size=test,encoder={name},steps=3")
  # The config asks the registry for the width and the tokenizer.
  assert (cfg.model.d_encoder, cfg.data.tokenizer.kind) == (32, name)
  dec = load_config_file(f"configs/ld4lg_yelp.py:stage=decoder,size=test,encoder={name}")
  assert tuple(dec.train.freeze) == ("compressor",)  # a frozen encoder is not in the train state
  cfg.data.path = _sentences(tmp_path)
  cfg.train.update(progress=False, num_samples=0, log_every=1, ckpt_every=100, eval_batches=1)
  res = train(cfg, tmp_path / "ae", record_every_step=True)
  assert all(np.isfinite(v) for v in res.losses.values())
  run = lsd.api.load(tmp_path / "ae")
  assert "encoder" not in nnx.state(run.model()).to_pure_dict()
  assert run.tokenizer.encode("the food") == [VOCAB.index("the"), VOCAB.index("food")]
  # encode_texts == the compressor on the checkpoint's states of BERT's own [CLS] ids [SEP] rows.
  enc = frozen_encoder(name)
  ids = jnp.asarray([[2, 7, 8, 9, 10, 5, 3, 0]])
  valid = ids != 0
  want = run.model().encode_hidden(encoder_spec(name).load_model()(ids, valid), valid)
  got = lsd.api.encode_texts(run, ["the food was great ."])
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert enc.tokenizer.vocab_size == run.tokenizer.vocab_size
  # The encoder's width and tokenizer are checked before any data is read.
  bad = cfg.copy_and_resolve_references()
  bad.model.d_encoder = 64
  with pytest.raises(
    ConfigError, match=rf"model.d_encoder=64: model.encoder='{name}' gives 32-wide"
  ):
    get_task(bad).validate()
  bad = cfg.copy_and_resolve_references()
  bad.data.tokenizer.kind = "minilm"
  with pytest.raises(ConfigError, match=r"data.tokenizer.kind='minilm': model.encoder='bert:"):
    get_task(bad).validate()


def test_seq2seq_context_encoder_from_a_bert_dir(bert_dir):
  name = f"bert:{bert_dir}"
  cfg = load_config_file(f"configs/ld4lg_e2e.py:stage=diffusion,size=test,context={name}")
  assert cfg.model.d_context == 32 and cfg.ld4lg.context_encoder == name
  task = get_task(cfg)
  assert task.context_encoder is frozen_encoder(name)
  cfg.model.d_context = 384
  with pytest.raises(ConfigError, match=rf"model.d_context=384: ld4lg.context_encoder='{name}'"):
    get_task(cfg)


def test_a_stored_minilm_run_config_still_validates():
  # config.json of a run trained before the registry: encoder and tokenizer kind "minilm",
  # d_encoder 384. Validation reads the registry only (nothing is downloaded or loaded).
  cfg = load_config_file("configs/ld4lg_yelp.py:stage=ae,size=test,encoder=minilm")
  (tmp := Path(tempfile.mkdtemp()) / "config.json").write_text(to_json(cfg))
  stored = from_json_file(tmp)
  assert (stored.model.encoder, stored.model.d_encoder, stored.data.tokenizer.kind) == (
    "minilm",
    384,
    "minilm",
  )
  get_task(stored).validate()
