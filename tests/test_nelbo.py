"""Held-out likelihood (lsd.eval.likelihood, `lsd eval --nelbo`): the masked-diffusion NELBO against
a float64 recomputation, its zero for a perfect model, the causal LM's exact NLL by hand, block size
L against the MDLM forward, and the CLI with its errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_masked_lm

from lsd.config import ConfigError
from lsd.eval import likelihood as lk
from lsd.models.masked_lm import MaskedLM
from lsd.nn import Transformer, TransformerConfig, causal_mask

VOCAB, MASK, L = 11, 10, 16


@pytest.fixture(scope="module")
def model() -> MaskedLM:
  return tiny_masked_lm(VOCAB, MASK)


@pytest.fixture(scope="module")
def batch():
  x0 = jax.random.randint(jax.random.key(1), (3, L), 0, MASK, jnp.int32)
  valid = jnp.ones((3, L), bool).at[2, 11:].set(False)  # one row ends in padding
  return {"tokens": x0, "valid": valid, "row": jnp.arange(3, dtype=jnp.int32)}


def _reference_nelbo(model, batch, key, block_size, k_samples):
  """float64 numpy: mean over draws of sum over masked valid tokens of -log p(x0) / t, per row."""
  x0, valid = batch["tokens"], batch["valid"]
  total = np.zeros(x0.shape[0])
  for k in range(k_samples):
    t, x_t = lk.eval_noise(key, batch["row"], x0, valid, block_size, k, k_samples, MASK)
    from lsd.diffusion.masked import bd3_forward

    logp = np.asarray(bd3_forward(model, x_t, x0, valid, block_size), np.float64)
    x0n, x_tn, tn = np.asarray(x0), np.asarray(x_t), np.asarray(t, np.float64)
    masked = (x_tn == MASK) & np.asarray(valid)
    nll = -np.take_along_axis(logp, x0n[..., None], axis=-1)[..., 0]
    total += np.where(masked, nll / tn, 0.0).sum(axis=1)
  return total / k_samples


def test_nelbo_matches_float64_reference_on_the_same_draws(model, batch):
  key, k_samples = jax.random.key(5), 8
  nll, tokens = lk.nelbo_sums(model, batch, key, block_size=4, num_samples=k_samples)
  ref = _reference_nelbo(model, batch, key, 4, k_samples)
  np.testing.assert_allclose(np.asarray(nll, np.float64), ref, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokens), [16, 16, 11])
  assert np.all(ref > 0)


def test_times_are_stratified_per_block(batch):
  """The K draws of each (canvas, block) fall one in each stratum of [0, 1), shared by the block's
  positions; padding is never masked."""
  key, k_samples = jax.random.key(2), 4
  ts = []
  for k in range(k_samples):
    t, x_t = lk.eval_noise(
      key, batch["row"], batch["tokens"], batch["valid"], 4, k, k_samples, MASK, t_min=0.0
    )
    assert not np.any(np.asarray(x_t)[2, 11:] == MASK)
    ts.append(np.asarray(t))
  ts = np.stack(ts)  # [K, B, L]
  per_block = ts.reshape(k_samples, 3, L // 4, 4)
  assert np.all(per_block == per_block[..., :1])  # one t per block
  strata = np.floor(per_block[..., 0] * k_samples)
  np.testing.assert_array_equal(strata, np.arange(k_samples)[:, None, None] * np.ones((1, 3, 4)))


class PerfectModel:
  """Log-probs with probability 1 on the true token everywhere (finite log 0 elsewhere)."""

  mask_id = MASK

  def __init__(self, x0):
    self.x0 = x0
    self.cfg = type("Cfg", (), {"dropout": 0.0})()

  def __call__(self, tokens, *, positions=None, mask=None, rngs=None, num_outputs=None, **kw):
    n = num_outputs or tokens.shape[1]
    onehot = jax.nn.one_hot(self.x0[:, :n], VOCAB, dtype=jnp.float32)
    return jnp.where(onehot > 0, 0.0, -1e9), None


def test_perfect_model_has_zero_nelbo(batch):
  stub = PerfectModel(batch["tokens"])
  for block_size in (4, L):
    nll, tokens = lk.nelbo_sums(
      stub, batch, jax.random.key(0), block_size=block_size, num_samples=3
    )
    np.testing.assert_array_equal(np.asarray(nll), 0.0)
    assert float(jnp.sum(tokens)) == 43.0


def test_causal_lm_exact_nll_by_hand(batch):
  cfg = TransformerConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2)
  lm = Transformer(cfg, rngs=nnx.Rngs(3))
  nll, tokens = lk.causal_nll_sums(lm, batch)
  x, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid"])
  logits = np.asarray(lm(batch["tokens"][:, :-1], mask=causal_mask(L - 1))[0], np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  want, count = np.zeros(3), np.zeros(3)
  for b in range(3):
    for pos in range(1, L):
      if valid[b, pos] and valid[b, pos - 1]:
        want[b] -= logp[b, pos - 1, x[b, pos]]
        count[b] += 1
  np.testing.assert_allclose(np.asarray(nll, np.float64), want, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokens), count)
  assert count.tolist() == [15, 15, 10]


def test_block_size_l_with_context_equals_mdlm_forward(model, batch):
  """B = L: the 2L forward [x_t ; x0] (x_t never sees x0) equals the L-length MDLM forward on the
  same draws of t and the mask."""
  key = jax.random.key(11)
  two_l, _ = lk.nelbo_sums(model, batch, key, block_size=L, num_samples=4, full_context=True)
  mdlm, _ = lk.nelbo_sums(model, batch, key, block_size=L, num_samples=4, full_context=False)
  np.testing.assert_allclose(np.asarray(two_l), np.asarray(mdlm), rtol=1e-5)
  small, _ = lk.nelbo_sums(model, batch, key, block_size=4, num_samples=4)
  assert not np.allclose(np.asarray(small), np.asarray(mdlm))  # block size matters


def test_evaluate_does_not_depend_on_batching(model, batch):
  """Per-canvas keys: the totals are the same whatever the batch size."""
  import functools

  fn = functools.partial(lk.nelbo_sums, block_size=4, num_samples=2)
  graphdef, params = nnx.split(model)
  tokens, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid"])
  a = lk.evaluate(fn, graphdef, params, tokens, valid, jax.random.key(4), batch_size=2)
  b = lk.evaluate(fn, graphdef, params, tokens, valid, jax.random.key(4), batch_size=3)
  assert a["tokens"] == b["tokens"] == 43 and a["canvases"] == 3
  np.testing.assert_allclose(a["nats_per_token"], b["nats_per_token"], rtol=1e-6)
  np.testing.assert_allclose(a["ppl"], np.exp(a["nats_per_token"]), rtol=1e-12)


WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()


def _corpus(path, n, seed):
  rng = np.random.default_rng(seed)
  lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(n)]
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
  """A tiny sbd run and a tiny causal LM run on the same corpus (a few seconds each)."""
  from lsd.main import main

  root = tmp_path_factory.mktemp("nelbo")
  corpus = _corpus(root / "corpus.txt", 300, 0)
  runs = {}
  for name, spec in (
    ("sbd", "configs/sbd.py:size=test,data=text"),
    ("ar", "configs/causal_lm.py:size=test,data=text"),
  ):
    runs[name] = root / name
    rc = main(
      [
        "train",
        "--config",
        spec,
        "--workdir",
        str(runs[name]),
        f"--config.data.path={corpus}",
        "--config.data.tokenizer.vocab_size=300",
        "--config.train.steps=30",
        "--config.train.lr=3e-3",
        "--config.train.progress=false",
        "--config.train.num_samples=0",
      ]
    )
    assert rc == 0
  return root, runs


@pytest.mark.slow  # two tiny trainings and five evaluations: about two minutes on 2 CPU cores
def test_cli_nelbo_on_tiny_runs(tiny_runs, capsys):
  from lsd.main import main

  root, runs = tiny_runs
  held_out = _corpus(root / "held_out.txt", 20, 1)
  out = root / "report_sbd"
  args = ["eval", "--nelbo", "--workdir", str(runs["sbd"]), "--data", str(held_out)]
  assert main([*args, "--nelbo_samples", "4", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "NELBO" in printed and "nats/token" in printed and "PPL <=" in printed
  rep = json.loads(out.with_name(out.name + ".json").read_text())
  assert rep["method"] == "sbd" and rep["block_size"] == 4 and rep["nelbo_samples"] == 4
  assert rep["tokens"] > 100 and 0 < rep["nats_per_token"] < np.log(300) * 3
  np.testing.assert_allclose(rep["ppl"], np.exp(rep["nats_per_token"]), rtol=1e-12)
  # The same seed gives the same estimate; the default report lands in the run directory.
  assert main([*args, "--nelbo_samples", "4"]) == 0
  again = json.loads((runs["sbd"] / "nelbo.json").read_text())
  assert again["nats_per_token"] == rep["nats_per_token"]
  # The global block (MDLM view) of the same model, and the run's own held-out split.
  assert main([*args, "--block_size", "0", "--out", str(root / "global")]) == 0
  glob = json.loads((root / "global.json").read_text())
  assert glob["block_size"] == 32 and glob["tokens"] == rep["tokens"]
  assert main(["eval", "--nelbo", "--workdir", str(runs["sbd"]), "--out", str(root / "h")]) == 0
  assert json.loads((root / "h.json").read_text())["data"] == "held-out split"

  ar_out = root / "report_ar"
  ar_args = ["eval", "--nelbo", "--workdir", str(runs["ar"]), "--data", str(held_out)]
  assert main([*ar_args, "--out", str(ar_out)]) == 0
  assert "NLL" in capsys.readouterr().out
  ar = json.loads(ar_out.with_name("report_ar.json").read_text())
  assert ar["method"] == "causal_lm" and ar["estimate"] == "exact nll"
  # The causal LM scores one token fewer per canvas (the first is given).
  assert ar["tokens"] == rep["tokens"] - rep["canvases"]
  assert 0 < ar["nats_per_token"] < np.log(300)


@pytest.mark.slow  # shares the tiny runs of the test above
def test_cli_nelbo_errors(tiny_runs, capsys):
  from lsd.main import main

  root, runs = tiny_runs
  cases = [
    (["--workdir", str(runs["sbd"]), "--data", str(root / "absent.txt")], "--data"),
    (["--workdir", str(runs["sbd"]), "--data", str(root / "corpus.csv")], "--data"),
    (["--workdir", str(runs["sbd"]), "--block_size", "5"], "--block_size 5"),
    (["--workdir", str(runs["ar"]), "--block_size", "4"], "--block_size 4"),
    (["--workdir", str(root / "nothing")], "holds no config.json"),
    ([], "--nelbo needs --workdir"),
  ]
  (root / "corpus.csv").write_text("text\nhello\n")
  for extra, needle in cases:
    assert main(["eval", "--nelbo", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
  with pytest.raises(SystemExit) as e:
    main(["eval", "--nelbo", "--workdir", str(runs["sbd"]), "--nelbo_samples", "0"])
  assert e.value.code == 2
  assert "--nelbo_samples" in capsys.readouterr().err


def test_other_methods_refuse_likelihood():
  from lsd.config import load_config_file
  from lsd.methods import get_task

  task = get_task(load_config_file("configs/sld.py"))
  with pytest.raises(
    ConfigError, match=r"not supported for method 'sld.*accepted: runs of method sbd"
  ):
    task.likelihood(num_samples=1)
