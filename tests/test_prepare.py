"""`lsd prepare` and data.source='prepared': ArrayRecord shards that give the raw corpus's batches."""

import json

import numpy as np
import pytest

from lsd.api import train
from lsd.config import ConfigError, load_config_file
from lsd.data import build_data, load_documents, prepare, tokenize_documents
from lsd.data.prepared import MANIFEST, PreparedRecords, read_manifest
from lsd.data.sources import iter_documents
from lsd.main import main

WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()


def tiny_config(path, **data):
  c = load_config_file("configs/causal_lm.py:size=test,data=text")
  c.data.path = str(path)
  c.data.tokenizer.vocab_size = 300
  c.data.update(data)
  c.train.update({"steps": 4, "log_every": 1, "ckpt_every": 4, "warmup_steps": 1, "num_samples": 0})
  c.train.progress = False
  return c


def as_prepared(config, directory):
  c = config.copy_and_resolve_references()
  c.data.source, c.data.path = "prepared", str(directory)
  return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(300)]
  lines[7] = "   "  # an empty document: dropped by both paths
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text("\n".join(lines))
  return path


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "data"
  lines = []
  manifest = prepare(tiny_config(corpus).data, out, shards=2, log=lines.append)
  return out, manifest, lines


def test_manifest_and_shards(prepared, corpus):
  out, manifest, lines = prepared
  assert json.loads((out / MANIFEST).read_text()) == manifest
  assert manifest["format"] == "lsd-prepared" and manifest["version"] == 1
  assert manifest["records"] == 299
  assert manifest["shards"] == [
    {"file": "data-00000-of-00002.array_record", "records": 150},
    {"file": "data-00001-of-00002.array_record", "records": 149},
  ]
  for name in ("data-00000-of-00002.array_record", "data-00001-of-00002.array_record"):
    assert (out / name).is_file()
  assert manifest["spec"]["data"]["path"] == str(corpus)
  assert manifest["spec"]["tokenizer"] == {"kind": "bpe", "path": "", "vocab_size": 300}
  assert manifest["spec"]["split"] == {"eval_fraction": 0.05, "split_seed": 0}
  assert manifest["tokenizer"]["vocab_size"] == 300
  lengths = np.load(out / "lengths.npy")
  assert lengths.dtype == np.int32 and len(lengths) == 299
  assert manifest["tokens"] == int(lengths.sum())
  assert lines[0] == "lsd prepare: 299 documents (284 train, 15 held out)"
  assert lines[-1] == f"lsd prepare: 299 documents, {manifest['tokens']} tokens -> {out}"


def test_records_are_the_raw_documents_tokens(prepared, corpus, tmp_path):
  out, manifest, _ = prepared
  config = tiny_config(corpus)
  raw = build_data(config.data, tmp_path, seed=0)  # trains the same BPE into tmp_path
  assert (tmp_path / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
  expected = tokenize_documents(load_documents(config.data), raw.tokenizer)
  records = PreparedRecords(out, manifest)
  assert len(records) == len(expected) == 299
  for i, tokens in enumerate(expected):
    got = records[i]
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, tokens)


def test_prepared_batches_equal_raw_batches_on_any_process_count(prepared, corpus, tmp_path):
  out, _, _ = prepared
  config = tiny_config(corpus)
  raw = build_data(config.data, tmp_path / "raw", seed=3)
  ours = build_data(as_prepared(config, out).data, tmp_path / "prep", seed=3)
  a, b = raw.train_iter(), ours.train_iter()
  for step in range(25):  # > one epoch (284 documents, ~15 per batch)
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["tokens"], y["tokens"], err_msg=str(step))
    np.testing.assert_array_equal(x["valid"], y["valid"], err_msg=str(step))
  for u, v in zip(raw.eval_batches(), ours.eval_batches(), strict=True):
    np.testing.assert_array_equal(u["tokens"], v["tokens"])
  # Two processes: each keeps its rows of the same global batches and reads about half the records.
  halves = [
    build_data(
      as_prepared(config, out).data, tmp_path / "prep", seed=3, process_index=p, process_count=2
    )
    for p in range(2)
  ]
  a, its = raw.train_iter(), [h.train_iter() for h in halves]
  for _ in range(6):
    x = next(a)
    np.testing.assert_array_equal(np.concatenate([next(it)["tokens"] for it in its]), x["tokens"])
  one = build_data(as_prepared(config, out).data, tmp_path / "prep", seed=3)
  it = one.train_iter()
  for _ in range(6):
    next(it)
  assert all(h.records.reads < 0.7 * one.records.reads for h in halves)
  # The iterator state resumes mid-stream (a document cut at the batch edge included).
  state = it.get_state()
  assert set(state) == {"parent", "offset"}
  want = next(it)
  again = one.train_iter()
  again.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(again)["tokens"], want["tokens"])


def test_training_on_prepared_data_gives_the_raw_losses(prepared, corpus, tmp_path):
  out, _, _ = prepared
  config = tiny_config(corpus)
  raw = train(config, tmp_path / "raw", record_every_step=True)
  ours = train(as_prepared(config, out), tmp_path / "prep", record_every_step=True)
  assert sorted(ours.losses) == [1, 2, 3, 4]
  for step in range(1, 5):
    assert ours.losses[step] == raw.losses[step], step  # exact, fp32 on CPU
  # The held-out NELBO of the prepared run reads its records: the raw run's value on its texts.
  from lsd.api import load
  from lsd.eval.likelihood import run_likelihood

  nelbo = {k: run_likelihood(load(tmp_path / k), num_samples=2) for k in ("raw", "prep")}
  assert nelbo["prep"]["documents"] == nelbo["raw"]["documents"] > 0
  assert nelbo["prep"]["tokens"] == nelbo["raw"]["tokens"]
  np.testing.assert_allclose(
    nelbo["prep"]["nats_per_token"], nelbo["raw"]["nats_per_token"], rtol=1e-6
  )


def test_refusals(prepared, corpus, tmp_path, capsys):
  out, manifest, _ = prepared
  config = tiny_config(corpus)
  bad = as_prepared(config, out).data
  bad.tokenizer.vocab_size = 400
  with pytest.raises(ConfigError, match=r"data.tokenizer.vocab_size=400 .* accepted: 300"):
    build_data(bad, tmp_path, seed=0)
  bad = as_prepared(config, out).data
  bad.tokenizer.kind = "gpt2"
  with pytest.raises(ConfigError, match=r"data.tokenizer.kind='gpt2' .* accepted: 'bpe'"):
    build_data(bad, tmp_path / "a", seed=0)
  bad = as_prepared(config, out).data
  bad.eval_fraction = 0.1
  with pytest.raises(ConfigError, match=r"data.eval_fraction=0.1 .* accepted: 0.05"):
    build_data(bad, tmp_path / "b", seed=0)
  # No manifest: not a prepared directory, or a prepare that did not finish.
  half = tmp_path / "half"
  half.mkdir()
  (half / "data-00000-of-00001.array_record").write_bytes(b"")
  with pytest.raises(ConfigError, match=r"holds no manifest.json; .* finished `lsd prepare"):
    build_data(as_prepared(config, half).data, tmp_path / "c", seed=0)
  with pytest.raises(ConfigError, match=r"only the packed-canvas LM pipeline"):
    load_documents(as_prepared(config, out).data)
  # Another config into the same --out is refused; the same one is a no-op.
  other = tiny_config(corpus, max_docs=100).data
  with pytest.raises(
    ConfigError,
    match=r"already holds other prepared data \(data.max_docs=0 "
    r"there, 100 here\)",
  ):
    prepare(other, out, shards=2)
  mtime = (out / MANIFEST).stat().st_mtime_ns
  assert prepare(config.data, out, shards=2, log=lambda _: None) == manifest
  assert (out / MANIFEST).stat().st_mtime_ns == mtime
  (tmp_path / "foreign").mkdir()
  (tmp_path / "foreign" / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match=r"holds other files \(notes.txt\)"):
    prepare(config.data, tmp_path / "foreign")
  with pytest.raises(ConfigError, match=r"--shards=500 is more than the 299 documents"):
    prepare(config.data, tmp_path / "many", shards=500)
  # The CLI: one line, exit code 2.
  code = main(
    [
      "prepare",
      "--config",
      "configs/causal_lm.py:size=test,data=text",
      "--out",
      str(out),
      f"--config.data.path={corpus}",
      "--config.data.tokenizer.vocab_size=512",
      "--shards",
      "2",
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert err == [
    f"lsd prepare: error: --out {str(out)!r} already holds other prepared data "
    "(data.tokenizer.vocab_size=300 there, 512 here); use another --out or delete it first"
  ]


# -------------------------------------------------------------------------------------------------
# TFDS: a tiny dataset in TFDS's ArrayRecord format (written without TensorFlow), and streaming.
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")

  class LsdTinyStories(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({"story": tfds.features.Text(), "label": np.int64})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(1)
      for i in range(40):
        words = " ".join(rng.choice(WORDS, size=rng.integers(4, 10)))
        yield i, {"story": f"{words}.", "label": i % 3}

  root = tmp_path_factory.mktemp("tfds")
  LsdTinyStories(data_dir=str(root), file_format="array_record").download_and_prepare()
  return root


def tfds_config(root, **data):
  c = tiny_config("", source="tfds", tfds_name="lsd_tiny_stories", text_field="story", **data)
  c.data.tfds_data_dir = str(root)
  return c


def test_tfds_corpus_prepares_to_the_same_tokens(tfds_dir, tmp_path):
  config = tfds_config(tfds_dir)
  manifest = prepare(config.data, tmp_path / "p", shards=2, log=lambda _: None)
  assert manifest["records"] == 40
  raw = build_data(config.data, tmp_path / "raw", seed=0)
  expected = tokenize_documents(load_documents(config.data), raw.tokenizer)
  records = PreparedRecords(tmp_path / "p", read_manifest(tmp_path / "p"))
  for i, tokens in enumerate(expected):
    np.testing.assert_array_equal(records[i], tokens)


def test_tfds_documents_are_read_as_consumed(monkeypatch):
  """`_tfds_documents` reads example i only when document i is consumed (a stub `data_source`
  that counts reads): `lsd prepare` streams a TFDS split, max_docs stops reading early."""
  import tensorflow_datasets as tfds

  class Stub:
    reads = 0

    def __len__(self):
      return 1000

    def __getitem__(self, i):
      Stub.reads += 1
      return {"story": f"story number {i}."}

  monkeypatch.setattr(tfds, "data_source", lambda *a, **k: Stub())
  config = tfds_config("unused").data
  docs = iter_documents(config)
  assert Stub.reads == 0
  first = [next(docs) for _ in range(3)]
  assert [d["text"] for d in first] == ["story number 0.", "story number 1.", "story number 2."]
  assert Stub.reads == 3
  config.max_docs = 10
  assert len(load_documents(config)) == 10
  assert Stub.reads == 13
