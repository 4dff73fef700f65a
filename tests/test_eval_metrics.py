"""Text metrics and reports on inputs small enough to check by hand."""

import json
import math

import numpy as np
import pytest

from lsd.eval import metrics, report


def test_unigram_entropy_hand_values():
  assert metrics.unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
  assert metrics.unigram_entropy([5, 5, 5]) == 0.0
  assert metrics.unigram_entropy(np.array([0, 1, 2, 3])) == pytest.approx(math.log(4))
  # Mean over samples of different lengths: (ln 2 + 0) / 2.
  assert metrics.mean_unigram_entropy([[1, 1, 2, 2], [7]]) == pytest.approx(math.log(2) / 2)


def test_dist_n_and_diversity_hand_values():
  assert metrics.dist_n(["a a b"], 1) == pytest.approx(2 / 3)
  # Bigrams (a b), (b a), (a b): 2 distinct of 3.
  assert metrics.dist_n(["a b a b"], 2) == pytest.approx(2 / 3)
  # (a b) | (a b), (b c): n-grams never cross texts, else "b a" would be a third distinct one.
  assert metrics.dist_n(["a b", "a b c"], 2) == pytest.approx(2 / 3)
  assert metrics.dist_n(["a b"], 3) == 0.0
  assert metrics.rep_n(["a b a b"], 2) == pytest.approx(1 / 3)
  # "a b a b a": 2-grams 2/4 unique, 3-grams 2/3, 4-grams 2/2 -> 1/2 * 2/3 * 1.
  assert metrics.diversity(["a b a b a"]) == pytest.approx(1 / 3)
  assert metrics.diversity(["one two three four five"]) == 1.0
  with pytest.raises(ValueError, match="n=0"):
    metrics.dist_n(["a"], 0)


def test_rouge_identical_disjoint_and_partial():
  same = metrics.rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
  assert same == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
  disjoint = metrics.rouge(["alpha beta"], ["gamma delta"])
  assert disjoint == pytest.approx({"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0})
  # Unigrams: 2 of 3 shared both ways -> F1 2/3; bigrams: 1 of 2 -> 1/2; LCS "the cat" -> 2/3.
  partial = metrics.rouge(["the cat sat"], ["the cat ran"])
  assert partial == pytest.approx({"rouge1": 200 / 3, "rouge2": 50.0, "rougeL": 200 / 3})
  # Best reference per prediction, averaged over predictions: (100 + 0) / 2.
  multi = metrics.rouge(["the cat sat", "xyz"], [["dog", "the cat sat"], "abc"])
  assert multi["rouge1"] == pytest.approx(50.0)
  assert metrics.rouge(["running"], ["runs"], use_stemmer=True)["rouge1"] == pytest.approx(100.0)
  with pytest.raises(ValueError, match="refs has 1 entries but preds has 2"):
    metrics.rouge(["a", "b"], ["a"])


def test_bleu_identical_and_multi_reference():
  text = "the cat sat on the mat today"
  assert metrics.bleu([text], [text]) == pytest.approx(100.0)
  # The second reference of prediction 0 matches exactly; prediction 1 has a single reference.
  preds = [text, "a quick brown fox jumps over it"]
  refs = [["a dog ran away from home", text], ["a quick brown fox jumps over it"]]
  assert metrics.bleu(preds, refs) == pytest.approx(100.0)
  assert metrics.bleu(["a dog ran away from home"], [text]) < 10.0


@pytest.mark.parametrize("metric", metrics.MBR_METRICS)
def test_mbr_select_keeps_the_consensus_candidate(metric):
  # Candidate 2 shares three of four bigrams with each of 0 and 1, which share two with each
  # other; 3 shares nothing. The consensus (highest mean similarity) is 2 under either metric.
  group = ["a b c d x", "q b c d e", "a b c d e", "z z z z"]
  single = ["only one candidate"]
  tied = ["the same text", "the same text"]
  assert metrics.mbr_select([group, single, tied], metric=metric) == [2, 0, 0]


def test_mbr_select_bad_input_names_the_field():
  with pytest.raises(ValueError, match="metric='rouge1'; accepted: rouge2, bleu"):
    metrics.mbr_select([["a", "b"]], metric="rouge1")
  with pytest.raises(ValueError, match=r"candidates\[1\]=\[\] must be a non-empty list"):
    metrics.mbr_select([["a"], []])


def test_mauve_same_and_separated_clouds():
  rng = np.random.default_rng(0)
  p = rng.normal(size=(200, 8))
  assert metrics.mauve(p, p.copy()) > 0.9
  shift = np.ones(8) * 5.0
  far_p = rng.normal(size=(200, 8)) + shift
  far_q = rng.normal(size=(200, 8)) - shift
  assert metrics.mauve(far_p, far_q) < 0.1
  with pytest.raises(ValueError, match="D=8 but q_features has D=4"):
    metrics.mauve(p, p[:, :4])


def test_attribute_accuracy():
  assert metrics.attribute_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
  with pytest.raises(ValueError, match="equal length"):
    metrics.attribute_accuracy([1, 0], [1])


@pytest.mark.parametrize("labels", [("neg", "pos"), (0, 1, 2)])
def test_linear_probe_separable_and_save_load(tmp_path, labels):
  rng = np.random.default_rng(1)
  centers = 6.0 * np.eye(4)[: len(labels)]
  x = np.concatenate([c + rng.normal(size=(30, 4)) for c in centers])
  y = np.repeat(np.array(labels), 30)
  probe = metrics.LinearProbe().fit(x, y)
  assert probe.accuracy(x, y) == 1.0
  path = tmp_path / "probe.npz"
  probe.save(path)
  restored = metrics.LinearProbe.load(path)
  np.testing.assert_array_equal(restored.predict(x), probe.predict(x))
  assert restored.predict(x[:1])[0] == labels[0]


def test_linear_probe_errors():
  with pytest.raises(ValueError, match="not fitted"):
    metrics.LinearProbe().predict(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="one class"):
    metrics.LinearProbe().fit(np.zeros((3, 2)), [1, 1, 1])


def test_evaluate_samples_tokens_and_whitespace():
  samples = [
    {"text": "a a b b", "tokens": [1, 1, 2, 2], "nfe": 8, "label": 1, "pred_label": 1},
    {"text": "c c c", "tokens": [5, 5, 5], "nfe": 4, "label": 0, "pred_label": 1},
  ]
  out = report.evaluate_samples(
    samples,
    references=["a a b b", ["x", "c c c"]],
    metrics=["entropy", "dist_n", "rouge", "attribute_accuracy"],
    extra={"gen_ppl": 12.5},
  )
  assert out["entropy"] == pytest.approx(math.log(2) / 2)
  assert out["entropy_source"] == "tokens"
  assert out["num_samples"] == 2 and out["nfe"] == 6.0
  assert out["dist_1"] == pytest.approx(3 / 7)
  assert out["rouge1"] == pytest.approx(100.0)
  assert out["attribute_accuracy"] == 0.5
  assert out["gen_ppl"] == 12.5
  words = report.evaluate_samples([{"text": "x y x y"}], metrics=["entropy"])
  assert words["entropy"] == pytest.approx(math.log(2))
  assert words["entropy_source"] == "whitespace"
  assert "nfe" not in words


def test_evaluate_samples_errors():
  with pytest.raises(ValueError, match=r"\['perplexity'\] are unknown; accepted: \['entropy'"):
    report.evaluate_samples([{"text": "a"}], metrics=["perplexity"])
  with pytest.raises(ValueError, match="need references"):
    report.evaluate_samples([{"text": "a"}], metrics=["bleu"])
  with pytest.raises(ValueError, match="needs field 'pred_label'"):
    report.evaluate_samples([{"text": "a", "label": 1}], metrics=["attribute_accuracy"])


def test_read_jsonl_and_load_references(tmp_path):
  samples = tmp_path / "samples.jsonl"
  samples.write_text('{"text": "a b"}\n\n{"text": "c", "refs": ["c", "d"]}\n')
  assert [s["text"] for s in report.read_jsonl(samples)] == ["a b", "c"]
  assert report.load_references(samples) == ["a b", "c"]
  with pytest.raises(ValueError, match="no field 'refs'"):
    report.load_references(samples, field="refs")
  txt = tmp_path / "refs.txt"
  txt.write_text("first line\nsecond line\n")
  assert report.load_references(txt) == ["first line", "second line"]
  with pytest.raises(ValueError, match="accepted: .jsonl, .txt"):
    report.load_references(tmp_path / "refs.csv")


def test_write_report_flat_and_per_variant(tmp_path):
  flat = {"entropy": 5.123456, "dist_1": 0.5, "entropy_source": "tokens", "gen_ppl": 31.98765}
  json_path, md_path = report.write_report(flat, tmp_path / "out" / "run")
  assert json.loads(json_path.read_text()) == flat
  md = md_path.read_text()
  for row in (
    "| entropy | 5.123 |",
    "| dist_1 | 0.500 |",
    "| entropy_source | tokens |",
    "| gen_ppl | 31.988 |",
  ):
    assert row in md
  variants = {"draft": {"entropy": 5.0, "gen_ppl": 40.0}, "revise": {"entropy": 5.25}}
  _, md_path = report.write_report(variants, tmp_path / "variants")
  lines = md_path.read_text().splitlines()
  assert lines[0] == "| variant | entropy | gen_ppl |"
  assert "| draft | 5.000 | 40.000 |" in lines
  assert "| revise | 5.250 | - |" in lines


def test_rouge_per_sample_is_what_rouge_averages():
  per = metrics.rouge_per_sample(["the cat sat", "xyz"], [["dog", "the cat sat"], "abc"])
  np.testing.assert_allclose(per["rouge1"], [100.0, 0.0])
  assert metrics.rouge(["the cat sat", "xyz"], [["dog", "the cat sat"], "abc"])["rouge1"] == 50.0


def test_paired_bootstrap_interval_covers_the_difference_and_excludes_zero_when_clear():
  rng = np.random.default_rng(1)
  b = rng.normal(size=400)
  clear = metrics.paired_bootstrap(b + 0.5, b)  # a constant shift: every resample differs by 0.5
  assert clear["diff"] == pytest.approx(0.5) and clear["low"] == pytest.approx(0.5)
  noisy = metrics.paired_bootstrap(rng.normal(size=400), rng.normal(size=400))
  assert noisy["low"] < noisy["diff"] < noisy["high"] and noisy["low"] < 0 < noisy["high"]
  assert metrics.paired_bootstrap([1.0, np.nan, 3.0], [0.0, 1.0, 1.0])["n"] == 2
  with pytest.raises(ValueError, match="paired 1-D scores"):
    metrics.paired_bootstrap([1.0, 2.0], [1.0])
