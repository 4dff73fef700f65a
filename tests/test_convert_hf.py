"""HF checkpoint import/export: parity with transformers (PyTorch) on tiny random models and on the
real MiniLM. The measurement helpers live in benchmarks/import_parity.py, which reports the same
numbers.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import import_parity as ip  # noqa: E402

from lsd.convert import hf  # noqa: E402
from lsd.convert.safetensors_io import (  # noqa: E402
  flatten,
  load_safetensors,
  save_safetensors,
  unflatten,
)
from lsd.models.t5 import relative_position_buckets  # noqa: E402

TOL = 1e-4


@pytest.mark.parametrize("name", list(ip.REFERENCES))
def test_import_and_export_match_transformers(name, tmp_path):
  result = ip.parity(name, tmp_path)
  assert result["max_abs_diff"] < TOL
  # transformers finds every tensor it needs in our export, and computes what we compute.
  assert result["export_loading_info"] == {}
  assert result["export_max_abs_diff"] < TOL
  assert result["reimport_bitwise"]


def test_minilm_real_embeddings_match_pytorch():
  result = ip.minilm_parity()
  assert result["max_abs_diff"] < TOL
  assert result["min_cosine"] > 0.9999


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (16, 40)])
def test_t5_buckets_match_reference(num_buckets, max_distance):
  from transformers.models.t5.modeling_t5 import T5Attention

  n = 300  # beyond max_distance, and across every bucket edge
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  ref = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
  np.testing.assert_array_equal(relative_position_buckets(n, n, num_buckets, max_distance), ref)


def test_bert_task_checkpoint_imports_encoder(tmp_path):
  """`bert.` prefix stripped, MLM head ignored, missing pooler filled with zeros."""
  model = transformers.BertForMaskedLM(
    transformers.BertConfig(
      num_hidden_layers=1,
      hidden_size=16,
      num_attention_heads=2,
      intermediate_size=32,
      vocab_size=50,
      max_position_embeddings=16,
    )
  ).eval()
  model.save_pretrained(tmp_path, safe_serialization=True)
  ours, cfg = hf.import_hf("bert", tmp_path)
  ids = np.random.default_rng(0).integers(0, 50, (2, 7))
  with torch.no_grad():
    ref = model.bert(torch.from_numpy(ids)).last_hidden_state.numpy()
  assert np.max(np.abs(np.asarray(ours(ids)) - ref)) < TOL
  assert cfg.n_layers == 1 and not np.any(np.asarray(ours.pooler.kernel[...]))


def test_import_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="accepted"):
    hf.import_hf("llama", tmp_path)
  ref = ip.reference_model("gpt2")
  ref.save_pretrained(tmp_path, safe_serialization=True)
  flat = load_safetensors(tmp_path / "model.safetensors")
  del flat["transformer.h.1.ln_2.weight"]
  save_safetensors(flat, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"h\.1\.ln_2\.weight"):
    hf.import_hf("gpt2", tmp_path)
  with pytest.raises(FileNotFoundError):
    hf.import_hf("gpt2", tmp_path / "no" / "such" / "dir")


def test_safetensors_io_roundtrip(tmp_path):
  from safetensors.torch import save_file

  t = {"a.w": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.arange(5, dtype=torch.int64)}
  save_file(t, tmp_path / "bf16.safetensors")
  got = load_safetensors(tmp_path / "bf16.safetensors")
  np.testing.assert_array_equal(got["a.w"].astype(np.float32), t["a.w"].float().numpy())
  np.testing.assert_array_equal(got["b"], t["b"].numpy())

  tree = {
    "blocks": {0: {"k": np.ones(2, np.float32)}, 1: {"k": np.zeros(2, np.float32)}},
    "embed": {"embedding": np.eye(3, dtype=np.float32)},
  }
  flat = flatten(tree)
  assert sorted(flat) == ["blocks.0.k", "blocks.1.k", "embed.embedding"]
  save_safetensors(flat, tmp_path / "x.safetensors")
  back = unflatten(load_safetensors(tmp_path / "x.safetensors"))
  assert back.keys() == tree.keys() and back["blocks"].keys() == {0, 1}
  np.testing.assert_array_equal(back["embed"]["embedding"], tree["embed"]["embedding"])
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
