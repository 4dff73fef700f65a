"""Workdirs and data globs on local disk and on a remote scheme (gs://), through etils.epath.

Every test runs the same code twice: on a local temporary directory, and on `gs://bucket/...`
served by an in-memory stand-in. etils.epath sends gs:// to its fsspec backend (TensorFlow is not
installed here); the `fake_gcs` fixture makes that backend hand out fsspec's own in-memory
filesystem for gs:// paths, shaped like an object store: no append mode, and directories that
exist only as prefixes of objects (mkdir does nothing). So epath's real gs:// code (globbing,
listing, reading, writing, renaming) runs, with storage in memory instead of on Google's servers.

Orbax is the exception: it writes arrays through tensorstore, which reaches gs:// with its own
GCS client, not through fsspec, so it cannot be pointed at the stand-in. The training runs on
gs:// therefore keep their checkpoints in a local directory (the trainer's `Checkpointer` is
swapped for one that maps gs:// to it); everything else of the run (data glob, tokenizer.json,
config.json, metrics.jsonl, samples.jsonl, the loss curve, the advisory lock) is on gs://.
"""

import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from lsd import fileio
from lsd.api import train
from lsd.config import ConfigError, from_json_file, load_config_file
from lsd.data import default_data_config
from lsd.data.sources import load_documents
from lsd.data.tokenizer import TOKENIZER_FILE, Tokenizer, build_tokenizer
from lsd.eval.report import read_jsonl
from lsd.fileio import as_path, atomic_write_text, glob_files, is_remote, move_tree
from lsd.train.logging import MetricWriter, read_metrics

WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()

if importlib.util.find_spec("tensorflow") is not None:  # epath would use tf.io.gfile for gs://
  pytest.skip("the gs:// stand-in patches epath's fsspec backend", allow_module_level=True)


class _ObjectStore(MemoryFileSystem):
  """fsspec's in-memory filesystem answering gs:// paths the way an object store does."""

  protocol = ("gs", "gcs")

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    return MemoryFileSystem._strip_protocol(path.removeprefix("gs://"))

  def makedirs(self, path, exist_ok=False):
    pass  # a prefix exists once an object lies under it

  def mkdir(self, path, create_parents=True, **kwargs):
    pass

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("object stores cannot append")
    return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch):
  """gs:// paths served from memory for this test; returns the filesystem."""
  store = type("Store", (_ObjectStore,), {"store": {}, "pseudo_dirs": [""]})
  fs = store(skip_instance_cache=True)
  backend = epath_backend.fsspec_backend
  original = backend.fs
  monkeypatch.setattr(
    backend, "fs", lambda path: fs if os.fspath(path).startswith("gs://") else original(path)
  )
  return fs


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  """A directory for the test's files: local, or on the gs:// stand-in."""
  if request.param == "local":
    return str(tmp_path)
  request.getfixturevalue("fake_gcs")
  return "gs://bucket/" + request.node.name.replace("[", "-").rstrip("]")


def test_paths_are_local_or_remote(root):
  path = as_path(root)
  assert is_remote(root) == root.startswith("gs://")
  assert str(path / "config.json") == root + "/config.json"
  assert not (path / "config.json").exists()


def test_move_tree_moves_every_file_and_removes_the_source(root):
  src, dest = as_path(root) / "ckpt" / "7", as_path(root) / "ckpt.corrupt" / "7-x"
  files = {"_METADATA": "{}", "d/a.bin": "aa", "d/sub/b.bin": "bbb"}
  for name, text in files.items():
    atomic_write_text(src / name, text)
  move_tree(src, dest)
  assert {name: (dest / name).read_text() for name in files} == files
  assert sorted(p.name for p in dest.iterdir()) == ["_METADATA", "d"]
  assert not src.exists() and not list(src.parent.glob("7*"))


def test_data_glob_matches_files_at_one_level(root):
  base = as_path(root) / "data"
  for name, text in [("b.txt", "bee one\nbee two"), ("a.txt", "ay one"), ("notes.md", "skip me")]:
    atomic_write_text(base / name, text)
  atomic_write_text(base / "sub" / "c.txt", "see one")
  found = glob_files(f"{root}/data/*.txt")
  assert [p.name for p in found] == ["a.txt", "b.txt"]
  assert [p.name for p in glob_files(f"{root}/data/*/*.txt")] == ["c.txt"]
  cfg = default_data_config()
  cfg.source, cfg.path = "text", f"{root}/data/*.txt"
  assert [d["text"] for d in load_documents(cfg)] == ["ay one", "bee one", "bee two"]
  cfg.path = f"{root}/data/b.txt"  # one file, no wildcard
  assert [d["text"] for d in load_documents(cfg)] == ["bee one", "bee two"]
  cfg.path = f"{root}/data/*.csv"
  with pytest.raises(ConfigError, match=r"matches no files"):
    load_documents(cfg)


def test_recursive_glob_is_local_only(root):
  atomic_write_text(as_path(root) / "deep" / "x" / "y" / "d.txt", "dee")
  if is_remote(root):
    with pytest.raises(ConfigError, match=r"'\*\*' does not recurse on a remote store"):
      glob_files(f"{root}/deep/**/*.txt")
  else:
    assert [p.name for p in glob_files(f"{root}/deep/**/*.txt")] == ["d.txt"]


def test_run_files_are_written_and_read_back(root):
  run = as_path(root) / "run"
  atomic_write_text(run / "config.json", json.dumps({"method": "causal_lm", "seed": 3}))
  assert from_json_file(run / "config.json").to_dict() == {"method": "causal_lm", "seed": 3}
  atomic_write_text(run / "config.json", json.dumps({"seed": 4}))  # replaced whole
  assert json.loads((run / "config.json").read_text()) == {"seed": 4}

  with warnings.catch_warnings():  # tensorboardX cannot reach the stand-in: a warning, no error
    warnings.simplefilter("ignore", RuntimeWarning)
    writer = MetricWriter(run)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.truncate_after(2)  # a resumed run replays step 3
  writer.write(3, {"loss": 0.25})
  writer.close()
  records = read_metrics(run)
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (3, 0.25)]

  samples = [{"text": "a cat sat", "nfe": 4}, {"text": "a dog ran", "nfe": 4}]
  atomic_write_text(run / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
  assert read_jsonl(run / "samples.jsonl") == samples

  cfg = default_data_config().tokenizer
  cfg.vocab_size = 300
  texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
  tok = build_tokenizer(cfg, texts, save_dir=run)
  assert (run / TOKENIZER_FILE).is_file()
  again = Tokenizer.load(run / TOKENIZER_FILE)
  assert again.encode("the red cat") == tok.encode("the red cat")
  assert build_tokenizer(cfg, [], save_dir=run).encode("big dog") == tok.encode("big dog")


@pytest.fixture
def corpus_at(root):
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(300)]
  for part in range(2):
    atomic_write_text(as_path(root) / "corpus" / f"part{part}.txt", "\n".join(lines[part::2]))
  return f"{root}/corpus/*.txt"


def tiny_config(data_glob, **train):
  c = load_config_file("configs/causal_lm.py:size=test,data=text")
  c.data.path = data_glob
  c.data.tokenizer.vocab_size = 300
  c.train.update(
    {
      "steps": 6,
      "log_every": 1,
      "ckpt_every": 3,
      "warmup_steps": 2,
      "num_samples": 2,
      "progress": False,
      **train,
    }
  )
  c.sample.max_new_tokens = 8
  return c


def test_tiny_run_checkpoints_resumes_and_writes_its_files(root, corpus_at, tmp_path, monkeypatch):
  import jax

  import lsd.api
  import lsd.train.checkpoint as checkpoint
  import lsd.train.trainer as trainer

  if is_remote(root):  # orbax cannot reach the stand-in (see the module docstring)
    local = tmp_path / "orbax"

    class LocalCheckpointer(trainer.Checkpointer):
      def __init__(self, directory, **kw):
        assert str(directory).startswith("gs://")
        super().__init__(local / str(directory).removeprefix("gs://"), **kw)

    monkeypatch.setattr(trainer, "Checkpointer", LocalCheckpointer)
    monkeypatch.setattr(checkpoint, "Checkpointer", LocalCheckpointer)  # lsd.api.load's
  workdir = f"{root}/run"
  first, second = tiny_config(corpus_at), tiny_config(corpus_at)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", RuntimeWarning)
    part = train(first, workdir, stop_after=4)
    assert part.final_step == 4 and part.samples == []
    rest = train(second, workdir)
  assert os.listdir(cwd) == []  # nothing local beside the run (no ./gs:/ folder)
  assert rest.final_step == 6
  remote_notes = [w for w in caught if "a remote workdir has no lock" in str(w.message)]
  assert len(remote_notes) == (2 if is_remote(root) else 0)
  run = as_path(workdir)
  assert str(rest.workdir) == workdir
  assert from_json_file(run / "config.json").train.steps == 6
  assert (run / TOKENIZER_FILE).is_file()
  steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
  assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once across the two calls
  written = [s["text"] for s in read_jsonl(run / "samples.jsonl")]
  assert len(written) == 2
  assert written == [s["text"] if isinstance(s, dict) else s for s in rest.samples]
  assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
  if is_remote(root):
    assert (run / ".lock").read_text() == ""  # the advisory lock names no holder after a clean exit
    checkpoints = tmp_path / "orbax" / workdir.removeprefix("gs://") / "checkpoints"
  else:
    checkpoints = run / "checkpoints"
  assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [3, 4, 6]
  if is_remote(root):  # orbax would have made this prefix on the store; the checkpoints are local
    atomic_write_text(run / "checkpoints" / "README", "this test keeps its checkpoints locally")
  loaded = lsd.api.load(workdir)  # config.json and tokenizer.json from the workdir
  assert loaded.step == 6 and loaded.config.train.steps == 6
  assert loaded.tokenizer.encode("the cat") == Tokenizer.load(run / TOKENIZER_FILE).encode(
    "the cat"
  )
  assert len(lsd.api.sample(loaded, jax.random.key(1), 2)) == 2


def _one_line_config_error(workdir, config):
  with pytest.raises(ConfigError) as err:
    train(config, workdir)
  message = str(err.value)
  assert "\n" not in message
  return message


def test_gs_workdir_without_a_client_fails_in_one_line(tmp_path, monkeypatch):
  if importlib.util.find_spec("gcsfs") is not None:
    pytest.skip("gcsfs is installed: the missing-client failure does not happen")
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(" ".join(WORDS[i:]) for i in range(10)))
  config = tiny_config(str(corpus))
  monkeypatch.chdir(tmp_path)
  message = _one_line_config_error("gs://no-bucket/run", config)
  assert message.startswith("--workdir 'gs://no-bucket/run' cannot be created: ImportError:")
  assert "gcsfs" in message
  assert os.listdir(tmp_path) == ["c.txt"]  # no local ./gs:/ folder
  cfg = default_data_config()
  cfg.source, cfg.path = "text", "gs://no-bucket/data/*.txt"
  with pytest.raises(ConfigError, match=r"^data.path='gs://no-bucket/data/\*.txt' cannot be"):
    load_documents(cfg)


def test_gs_workdir_refused_by_the_store_fails_in_one_line(tmp_path, monkeypatch):
  """With a client installed but no credentials the store refuses the first write."""

  class Refusing(_ObjectStore):
    store, pseudo_dirs = {}, [""]

    def _open(self, path, mode="rb", **kwargs):
      raise PermissionError("Anonymous caller does not have storage.objects.create access\nmore")

  fs = Refusing(skip_instance_cache=True)
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: fs)
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(" ".join(WORDS[i:]) for i in range(10)))
  config = tiny_config(str(corpus))
  monkeypatch.chdir(tmp_path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    message = _one_line_config_error("gs://bucket/run", config)
  assert message == (
    "--workdir 'gs://bucket/run' is not writable: PermissionError: Anonymous caller does not "
    "have storage.objects.create access"
  )
  assert os.listdir(tmp_path) == ["c.txt"]


def test_unknown_scheme_is_a_config_error_not_a_local_folder(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match=r"the memory:// scheme is not supported"):
    as_path("memory://bucket/run")
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(" ".join(WORDS[i:]) for i in range(10)))
  config = tiny_config(str(corpus))
  monkeypatch.chdir(tmp_path)
  message = _one_line_config_error("foo://bucket/run", config)
  assert "foo:// scheme is not supported" in message
  assert os.listdir(tmp_path) == ["c.txt"]
  assert fileio.scheme("gs://b/x") == "gs" and fileio.scheme("runs/x") is None


def test_prepared_data_written_to_gs_is_refused_for_reading_in_one_line(corpus_at, root):
  from lsd.data import load_prepared, prepare

  cfg = tiny_config(corpus_at).data
  out = f"{root}/prepared"
  manifest = prepare(cfg, out, shards=2, log=lambda _: None)
  assert (as_path(out) / "manifest.json").exists() and manifest["records"] == 300
  read = cfg.copy_and_resolve_references()
  read.source, read.path = "prepared", out
  if not is_remote(root):
    assert len(load_prepared(read, None, seed=0).train_ids) > 0
    return
  with pytest.raises(ConfigError, match=r"data.path='gs://.*opens local files only") as err:
    load_prepared(read, None, seed=0)
  assert "\n" not in str(err.value)
