"""Trainer end to end on a tiny local corpus: resume exactness, NaN guard, artefacts, CLI."""

import json

import numpy as np
import pytest

from lsd.api import train
from lsd.config import ConfigError, apply_override, load_config_file
from lsd.train.trainer import TrainingDiverged

WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()


@pytest.fixture
def corpus(tmp_path):
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(300)]
  path = tmp_path / "corpus.txt"
  path.write_text("\n".join(lines))
  return path


def tiny_config(corpus, **train):
  c = load_config_file("configs/causal_lm.py:size=test,data=text")
  c.data.path = str(corpus)
  c.data.tokenizer.vocab_size = 300
  c.train.update(
    {
      "steps": 8,
      "log_every": 1,
      "ckpt_every": 3,
      "warmup_steps": 2,
      "num_samples": 0,
      "progress": False,
      "ema_decay": 0.9,
      **train,
    }
  )
  return c


def test_resume_gives_identical_per_step_losses(corpus, tmp_path):
  full = train(tiny_config(corpus), tmp_path / "full", record_every_step=True)
  part = train(tiny_config(corpus), tmp_path / "resumed", stop_after=5, record_every_step=True)
  assert part.final_step == 5
  rest = train(tiny_config(corpus), tmp_path / "resumed", record_every_step=True)
  assert rest.final_step == 8
  resumed = {**part.losses, **rest.losses}
  assert sorted(resumed) == list(range(1, 9))
  for step in range(1, 9):
    assert resumed[step] == full.losses[step], step  # exact, fp32 on CPU


def test_loss_falls_and_artefacts_are_written(corpus, tmp_path):
  res = train(tiny_config(corpus, steps=40, lr=3e-3, log_every=5, ckpt_every=20), tmp_path / "run")
  first, last = res.losses[5], res.losses[40]
  assert last < 0.8 * first
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss_curve.png"):
    assert (tmp_path / "run" / name).is_file(), name
  assert list((tmp_path / "run" / "tensorboard").iterdir())
  steps = sorted(
    int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()
  )
  assert steps == [20, 40]
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(records[0])


def test_nan_guard_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
  workdir = tmp_path / "nan"
  train(tiny_config(corpus, steps=3), workdir)  # a good checkpoint at step 3
  config = tiny_config(corpus, steps=9, lr=1e30, warmup_steps=0)
  with pytest.raises(TrainingDiverged, match=r"NaN/Inf.*last good checkpoint \(step 3\)"):
    train(config, workdir)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3]
  with pytest.raises(ConfigError, match=r"does not fit the current config"):
    train(tiny_config(corpus, steps=9, ema_decay=0.0), workdir)


def test_config_overrides_and_errors():
  c = load_config_file("configs/causal_lm.py:size=test")
  apply_override(c, "train.steps", "7")
  apply_override(c, "model.dtype", "bfloat16")
  assert c.train.steps == 7 and c.model.dtype == "bfloat16"
  with pytest.raises(ConfigError, match=r"train has no field 'stepz'"):
    apply_override(c, "train.stepz", "7")
  with pytest.raises(ConfigError, match=r"train.steps='many' does not parse as int"):
    apply_override(c, "train.steps", "many")
  with pytest.raises(ConfigError, match=r"config argument key 'sise' is unknown"):
    load_config_file("configs/causal_lm.py:sise=tiny")
  with pytest.raises(
    ConfigError, match=r"'configs/nope.py' does not exist; .* shipped with lsd: \['causal_lm'"
  ):
    load_config_file("configs/nope.py")


def test_cli_train_then_sample(corpus, tmp_path, capsys):
  from lsd.main import main

  workdir = tmp_path / "cli"
  rc = main(
    [
      "train",
      "--config",
      "configs/causal_lm.py:size=test,data=text",
      "--workdir",
      str(workdir),
      f"--config.data.path={corpus}",
      "--config.data.tokenizer.vocab_size=300",
      "--config.train.steps=4",
      "--config.train.num_samples=2",
      "--config.train.progress=false",
      "--config.sample.max_new_tokens=8",
    ]
  )
  assert rc == 0
  out = capsys.readouterr().out
  assert "--- sample 1 ---" in out
  rc = main(
    ["sample", "--workdir", str(workdir), "--num_samples", "3", "--out", str(tmp_path / "s.jsonl")]
  )
  assert rc == 0
  lines = (tmp_path / "s.jsonl").read_text().splitlines()
  assert len(lines) == 3 and all(len(json.loads(x)["tokens"]) <= 8 for x in lines)
  assert main(["train", "--workdir", str(tmp_path / "new")]) == 2
  assert "--config is required" in capsys.readouterr().err
  assert (
    main(
      [
        "train",
        "--config",
        "configs/causal_lm.py:size=test",
        "--workdir",
        str(tmp_path / "x"),
        "--config.train.lr=-1",
      ]
    )
    == 2
  )
  assert "train.lr=-1.0 must be a number > 0" in capsys.readouterr().err


def test_cli_eval_writes_json_and_markdown(tmp_path, capsys):
  from lsd.main import main

  samples = tmp_path / "s.jsonl"
  samples.write_text(
    "\n".join(
      json.dumps(r)
      for r in [
        {"text": "the cat sat on mats", "tokens": [1, 1, 2, 2], "nfe": 4},
        {"text": "the cat ran on logs", "tokens": [5, 5, 5], "nfe": 6},
      ]
    )
  )
  refs = tmp_path / "r.txt"
  refs.write_text("the cat sat on mats\nthe cat ran on logs\n")
  rc = main(
    [
      "eval",
      "--samples",
      str(samples),
      "--references",
      str(refs),
      "--metrics",
      "entropy,dist_n,rouge,bleu",
      "--out",
      str(tmp_path / "rep"),
    ]
  )
  assert rc == 0
  res = json.loads((tmp_path / "rep.json").read_text())
  assert res["entropy"] == pytest.approx(np.log(2) / 2)  # mean of ln 2 and 0
  assert (
    res["nfe"] == 5 and res["rouge1"] == pytest.approx(100) and res["bleu"] == pytest.approx(100)
  )
  assert res["dist_1"] == pytest.approx(7 / 10)  # the, cat, sat, on, mats, ran, logs
  assert "rouge1" in (tmp_path / "rep.md").read_text()
  capsys.readouterr()
  assert (
    main(["eval", "--samples", str(samples), "--metrics", "mauve", "--out", str(tmp_path / "x")])
    == 2
  )
  assert "needs --references" in capsys.readouterr().err


@pytest.mark.parametrize("power", [0.0, 0.75])
def test_ema_follows_its_decay_schedule(power):
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from lsd.train.state import default_train_config, init_state, make_train_step

  class Scalar(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros(()))

  cfg = default_train_config()
  cfg.update(ema_decay=0.99, ema_warmup_power=power, grad_clip=0.0)
  graphdef, params = nnx.split(Scalar())
  tx = optax.sgd(1.0)  # loss -w: every step adds 1 to w, so w_n = n
  loss = lambda model, batch, key: (-model.w[...], {})
  step = jax.jit(make_train_step(graphdef, loss, tx, cfg, seed=0))
  state = init_state(params, tx, ema=True)
  want = 0.0
  for n in range(1, 31):
    state, _ = step(state, {})
    d = 0.99 if power == 0 else min(0.99, 1 - (1 + n) ** -power)
    want = d * want + (1 - d) * n
    assert float(state.ema["w"][...]) == pytest.approx(want, rel=1e-5), n
  # Warm-up: the average tracks recent weights (about the last 40 % of 30 steps), not w_0 = 0.
  assert (float(state.ema["w"][...]) > 15) == (power > 0)


def test_frozen_prefixes_get_no_update_not_even_weight_decay():
  import jax
  import jax.numpy as jnp
  import ml_collections

  from lsd.train.state import default_train_config, make_optimizer, validate_train_config
  from lsd.train.trainer import check_freeze

  cfg = ml_collections.ConfigDict(default_train_config())
  cfg.update(lr=0.1, warmup_steps=0, weight_decay=0.5, freeze=("enc",))
  params = {
    "enc": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
    "encoder2": {"w": jnp.ones((2, 2))},  # a longer name with the same prefix: trained
    "dec": {"blocks": [{"w": jnp.ones((2, 2))}]},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  tx = make_optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["enc"]))
  assert float(jnp.abs(updates["encoder2"]["w"]).min()) > 0
  assert float(jnp.abs(updates["dec"]["blocks"][0]["w"]).min()) > 0
  cfg.freeze = ("dec.blocks.0",)  # a nested prefix, list index included
  updates, _ = make_optimizer(cfg).update(grads, make_optimizer(cfg).init(params), params)
  assert float(jnp.abs(updates["dec"]["blocks"][0]["w"]).max()) == 0.0
  assert float(jnp.abs(updates["enc"]["w"]).min()) > 0
  with pytest.raises(ConfigError, match=r"train.freeze entry 'decoder' names no parameter"):
    check_freeze(("decoder",), params)
  cfg.freeze = ("enc", "")
  with pytest.raises(ConfigError, match=r"train.freeze=\('enc', ''\) must be a list"):
    validate_train_config(cfg)


def test_constant_lr_decay_does_not_depend_on_train_steps():
  from lsd.train.state import default_train_config, lr_schedule, validate_train_config

  def lrs(**fields):
    cfg = default_train_config()
    cfg.update(dict(lr=1e-3, warmup_steps=4, **fields))
    validate_train_config(cfg)
    return [float(lr_schedule(cfg)(i)) for i in (0, 2, 4, 50, 99)]

  np.testing.assert_allclose(lrs(steps=100, lr_decay="constant"), [0, 5e-4, 1e-3, 1e-3, 1e-3])
  assert lrs(steps=100, lr_decay="constant") == lrs(steps=10_000, lr_decay="constant")
  assert lrs(steps=100)[-1] < lrs(steps=10_000)[-1]  # cosine decays by train.steps
  with pytest.raises(ConfigError, match="train.lr_decay='linear'"):
    lrs(steps=100, lr_decay="linear")
