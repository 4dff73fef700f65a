"""SBD end to end: the task's sampler glue, config errors, and a tiny run through the CLI."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_sbd_task

from lsd.config import ConfigError, apply_override, load_config_file
from lsd.methods import get_task
from lsd.methods.sbd import sampler_config

WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()


class Tok:
  vocab_size, pad_id, bos_id, eos_id, mask_id = 40, 36, 37, 38, 39

  def decode(self, ids):
    return " ".join(str(i) for i in ids if i < 36)


def tiny_task(**sample):
  return tiny_sbd_task(Tok(), **sample)


def test_sample_text_returns_draft_and_revision_with_nfe():
  task, model = tiny_task(stages=[[0, 0.25, 4, "snapshot"]])
  rows = task.sample_text(model, jax.random.key(0), 3)
  assert len(rows) == 3
  for r in rows:
    assert len(r["tokens"]) == len(r["draft_tokens"]) == 32
    assert len(r["nfe_per_stage"]) == 2 and r["nfe"] == sum(r["nfe_per_stage"])
    assert r["nfe_per_stage"][1] == 4  # one global stage of 4 steps
    assert Tok.mask_id not in r["tokens"]
    changed = sum(a != b for a, b in zip(r["tokens"], r["draft_tokens"], strict=True))
    assert changed <= round(0.25 * 32)  # only remasked positions may change


def test_gamma_zero_revision_keeps_the_draft():
  task, model = tiny_task(stages=[[0, 0.0, 4, "snapshot"]])
  rows = task.sample_text(model, jax.random.key(1), 2)
  assert all(r["tokens"] == r["draft_tokens"] and r["text"] == r["draft_text"] for r in rows)


def test_sampler_config_errors_name_the_field():
  c = load_config_file("configs/sbd.py:size=test")
  apply_override(c, "sample.stages", "[[5, 0.25, 4]]")
  with pytest.raises(
    ConfigError, match=r"sample.stages\[0\].block_size=5 must be >= 1 and divide L=32"
  ):
    sampler_config(c.sample, 32)
  c = load_config_file("configs/sbd.py:size=test")
  c.sample.draft.top_p = 1.5
  with pytest.raises(ConfigError, match=r"sample.draft.top_p=1.5"):
    sampler_config(c.sample, 32)


def test_block_size_must_divide_canvas():
  c = load_config_file("configs/sbd.py:size=test")
  c.sbd.block_small = 5
  with pytest.raises(ConfigError, match=r"data.seq_len=32 must be divisible by sbd.block_small=5"):
    get_task(c)


def test_tiny_sbd_trains_and_samples_through_the_cli(tmp_path, capsys):
  from lsd.main import main

  rng = np.random.default_rng(0)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(
    "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(300))
  )
  workdir = tmp_path / "sbd"
  args = ["--config.train.progress=false", '--config.sample.stages=[[0, 0.5, 4, "snapshot"]]']
  rc = main(
    [
      "train",
      "--config",
      "configs/sbd.py:size=test,data=text",
      "--workdir",
      str(workdir),
      f"--config.data.path={corpus}",
      "--config.data.tokenizer.vocab_size=300",
      "--config.train.steps=30",
      "--config.train.lr=3e-3",
      *args,
    ]
  )
  assert rc == 0
  out = capsys.readouterr().out
  assert "[draft]" in out and "[revised]" in out
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  assert train_losses[-1] < train_losses[0]
  assert main(["sample", "--workdir", str(workdir), "--num_samples", "2"]) == 0
  assert capsys.readouterr().out.count("[revised]") == 2
  # Past the trained canvas (data.seq_len 32): 4x as many tokens through the sliding window.
  long = tmp_path / "long.jsonl"
  argv = ["sample", "--workdir", str(workdir), "--num_samples", "2", "--max_new_tokens", "128"]
  assert main([*argv, "--out", str(long)]) == 0
  rows = [json.loads(x) for x in long.read_text().splitlines()]
  assert [len(r["tokens"]) for r in rows] == [128, 128]
  assert main([*argv[:3], "--prompt", "the cat", "--max_new_tokens", "40"]) == 0
  capsys.readouterr()


def test_global_only_variant_uses_l_forward_with_the_mix_scale_loss_value():
  from lsd.diffusion.masked import mix_scale_loss

  c = load_config_file("configs/sbd.py:size=test,variant=mdlm")
  task = get_task(c)
  task.tokenizer = Tok()
  assert task.global_only
  model = task.build_model(nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, 36)
  batch = {"tokens": tokens, "valid": np.ones((4, 32), bool)}
  key = jax.random.key(3)
  fast, _ = task.loss(model, batch, key)
  ref, _ = mix_scale_loss(
    model, tokens, batch["valid"], key, lam=1.0, small=32, large=32, noise=task.noise
  )
  np.testing.assert_allclose(float(fast), float(ref), rtol=1e-5)
