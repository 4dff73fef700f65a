"""Latents of a frozen autoencoder computed once per sentence (`lsd.data.latent_cache`), and the
small pure pieces of text <-> latents (`lsd.sampling.text_latent`): the cached rows equal encoding
the sentences on the fly, whatever the chunking; each process caches its own training rows."""

import types

import numpy as np
import pytest

from lsd.config import ConfigError
from lsd.data.latent_cache import cached_latent_data, encode_in_chunks, latent_rows
from lsd.data.sentences import encode_sentences
from lsd.data.tokenizer import train_bpe
from lsd.sampling import text_latent as tl

TEXTS = [
  "the food was great .",
  "service was slow and rude .",
  "i love the pizza here !",
  "never coming back again .",
  "the staff are very friendly .",
]


@pytest.fixture(scope="module")
def tokenizer():
  return train_bpe(TEXTS * 4, 300)


class Encoder:
  """A stand-in for a frozen autoencoder's encoder, [n, T] -> [n, 2, 3]; records each call's
  row count."""

  def __init__(self):
    self.calls = []
    self.widths = []

  def __call__(self, tokens, valid):
    self.calls.append(len(tokens))
    self.widths.append(tokens.shape[1])
    w = np.where(valid, tokens, 0).astype(np.float64)
    feats = np.stack([w.sum(-1), valid.sum(-1), w.max(-1)], -1)  # [n, 3]
    return np.stack([feats, 2 * feats], 1)


def test_latent_rows_equal_encoding_every_sentence_at_once(tokenizer):
  docs = [{"text": t, "label": i % 2, "source": t.upper()} for i, t in enumerate(TEXTS)]
  tokens, valid = encode_sentences(TEXTS, tokenizer, 12)
  want = Encoder()(tokens, valid)
  enc = Encoder()
  rows = latent_rows(docs, tokenizer, 12, enc, chunk=2)
  assert enc.calls == [2, 2, 2]  # the last chunk padded to the compiled shape
  assert rows["latents"].dtype == np.float32 and rows["latents"].shape == (5, 2, 3)
  np.testing.assert_allclose(rows["latents"], want, rtol=1e-6)
  np.testing.assert_array_equal(rows["label"], [0, 1, 0, 1, 0])
  assert "tokens" not in rows and "source_tokens" not in rows
  rows = latent_rows(
    docs, tokenizer, 12, Encoder(), keep_tokens=True, source_tokenizer=tokenizer, max_source_len=9
  )
  np.testing.assert_array_equal(rows["tokens"], tokens)
  np.testing.assert_array_equal(rows["valid"], valid)
  src, src_valid = encode_sentences([d["source"] for d in docs], tokenizer, 9)
  np.testing.assert_array_equal(rows["source_tokens"], src)
  np.testing.assert_array_equal(rows["source_valid"], src_valid)
  np.testing.assert_allclose(encode_in_chunks(tokens, valid, Encoder(), chunk=8), want, rtol=1e-6)


def test_length_buckets_cut_padding_and_keep_the_rows_in_order(tokenizer):
  texts = [" ".join(TEXTS[: 1 + i % 5]) for i in range(11)]  # 1 to 5 sentences, mixed order
  tokens, valid = encode_sentences(texts, tokenizer, 40)
  want = Encoder()(tokens, valid)
  enc = Encoder()
  got = encode_in_chunks(tokens, valid, enc, chunk=4, bucket=8)
  np.testing.assert_allclose(got, want, rtol=1e-6)  # input order, equal values
  lengths = np.sort(valid.sum(1))
  # chunks of 4 rows by increasing length, each cut to its longest row rounded up to 8 (<= 40)
  assert enc.calls == [4, 4, 4]
  assert enc.widths == [min(40, -(-int(lengths[i : i + 4].max()) // 8) * 8) for i in (0, 4, 8)]
  assert enc.widths[0] < 40 and enc.widths == sorted(enc.widths)
  with pytest.raises(ValueError, match="bucket=-1"):
    encode_in_chunks(tokens, valid, Encoder(), bucket=-1)


def test_cached_latent_data_holds_all_rows_each_process_encoding_its_share(tokenizer, monkeypatch):
  from jax.experimental import multihost_utils

  docs = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS * 2)]
  data = types.SimpleNamespace(
    tokenizer=tokenizer,
    train_docs=docs[:8],
    eval_docs=docs[8:],
    max_len=12,
    batch_size=4,
    seed=0,
    process_index=1,
    process_count=2,
    source_tokenizer=None,
    max_source_len=64,
    num_labels=2,
  )
  every = latent_rows(docs[:8], tokenizer, 12, Encoder(), keep_tokens=True)  # one process's rows
  encoded = []

  def allgather(x):  # process 0 contributes rows 0, 2, 4, 6; this process (1) rows 1, 3, 5, 7
    if np.ndim(x) == 0:
      return np.array([4, int(x)])
    key = next(k for k, v in every.items() if v.dtype == x.dtype and v.ndim == x.ndim)
    encoded.append(key)
    np.testing.assert_allclose(x, every[key][1::2], rtol=1e-6)  # it encoded only its share
    return np.stack([every[key][0::2], x])

  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  cached = cached_latent_data(data, Encoder(), keep_tokens=True, field="x.cache_latents")
  assert sorted(encoded) == sorted(every)
  for key, want in every.items():
    np.testing.assert_allclose(cached.train[key], want, rtol=1e-6)
  assert len(cached.eval["latents"]) == 2 and cached.num_labels == 2
  assert cached.local_batch_size == 2
  batch = next(cached.train_iter())
  assert batch["latents"].shape == (2, 2, 3) and batch["tokens"].shape == (2, 12)


def test_decoding_and_sampler_settings_read_the_sample_section():
  sample = {"max_new_tokens": 7, "top_p": 0, "temperature": 1.0, "steps": 4, "sampler": "ddim"}
  decoding = tl.DecodeConfig.from_config(sample)  # fields of other consumers are ignored
  assert (decoding.max_new_tokens, decoding.num_beams, decoding.no_repeat_ngram) == (7, 1, 0)
  with pytest.raises(ConfigError, match=r"sample.num_beams=0 must be >= 1"):
    tl.DecodeConfig.from_config(dict(sample, num_beams=0))
  sampling = dict(sample, eta=0.0, guidance_scale=2.0, project=True)
  cfg = tl.LatentSampleConfig.from_config(sampling)
  assert (cfg.steps, cfg.sampler, cfg.candidates, cfg.mbr_metric) == (4, "ddim", 1, "rouge2")
  with pytest.raises(ConfigError, match="sample.sampler='euler' is not supported"):
    tl.LatentSampleConfig.from_config(dict(sampling, sampler="euler"))
  for bad in (0, True, 1.5):
    with pytest.raises(ConfigError, match=f"sample.candidates={bad!r} must be an int"):
      tl.LatentSampleConfig.from_config(dict(sampling, candidates=bad))


def test_mbr_choose_keeps_each_inputs_consensus_candidate():
  texts = ["a b c", "x y z", "a b d", "q r s", "q r t", "q r s"]
  assert tl.mbr_choose(texts, 1) == texts
  # Input 0's candidates: "a b c", "x y z", "a b d" -> the ones sharing "a b" beat the outlier.
  assert tl.mbr_choose(texts, 3) == ["a b c", "q r s"]
