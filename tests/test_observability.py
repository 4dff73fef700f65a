"""Training observability: the logged MFU and the jax.profiler trace of train.profile_steps."""

import json
import types

import numpy as np
import pytest

from lsd.api import train
from lsd.config import ConfigError, load_config_file
from lsd.methods import get_task
from lsd.train.logging import ProfileWindow, mfu, peak_flops_total
from lsd.train.state import default_train_config, validate_train_config

WORDS = "the a cat dog sat ran on under mat log big small red blue quickly slowly".split()


def _devices(kind, n):
  return [types.SimpleNamespace(device_kind=kind)] * n


def test_mfu_formula_and_device_peaks():
  # 1e9 FLOPs per token at 2e4 tokens/s on 4 x 275 TFLOP/s (TPU v4): 2e13 / 1.1e15.
  peak = peak_flops_total(0.0, _devices("TPU v4", 4))
  assert peak == 4 * 275e12
  assert mfu(1e9, 2e4, peak) == pytest.approx(2e13 / 1.1e15)
  assert peak_flops_total(0.0, _devices("TPU v5 lite", 16)) == 16 * 197e12
  assert peak_flops_total(0.0, _devices("cpu", 8)) is None  # unknown kind: no MFU
  assert peak_flops_total(1e12, _devices("cpu", 8)) == 8e12  # train.peak_flops per device


@pytest.mark.parametrize("window", [(3,), (2, 2), (-1, 2), ("a", 2)])
def test_profile_steps_is_validated(window):
  cfg = default_train_config()
  cfg.profile_steps = window
  with pytest.raises(ConfigError, match="train.profile_steps"):
    validate_train_config(cfg)


def test_profile_window_traces_only_its_steps(tmp_path, monkeypatch):
  import jax

  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d, **kw: calls.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  w = ProfileWindow(tmp_path / "profile", (2, 4))
  for step in range(6):
    w.before(step)
    calls.append(step)
    w.after(step + 1, None)
  w.close()
  assert calls == [0, 1, ("start", str(tmp_path / "profile")), 2, 3, ("stop",), 4, 5]


def test_a_tiny_run_writes_a_trace_and_logs_mfu(tmp_path):
  rng = np.random.default_rng(0)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(
    "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(5, 15))) + "." for _ in range(300))
  )
  c = load_config_file("configs/causal_lm.py:size=test,data=text")
  c.data.path = str(corpus)
  c.data.tokenizer.vocab_size = 300
  c.train.update(
    steps=4, log_every=2, ckpt_every=4, warmup_steps=1, num_samples=0, progress=False,
    profile_steps=(1, 3), peak_flops=1e11,
  )  # fmt: skip
  task = get_task(c)
  train(c, tmp_path / "run", task=task)
  traces = list((tmp_path / "run" / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  # The window's summary: the costliest source lines of the traced train step, per step.
  costs = json.loads((tmp_path / "run" / "profile" / "top_costs.json").read_text())
  assert 1 <= len(costs) <= 5
  assert all(c["ms_per_step"] > 0 and 0 < c["share"] <= 1 for c in costs)
  assert any(c["source"].startswith("lsd/") for c in costs)
  records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in logged] == [2, 4]
  n = len(__import__("jax").devices())
  for r in logged:  # analytic FLOPs per token x tokens/s over 1e11 FLOP/s per device
    assert r["mfu"] == pytest.approx(task.flops_per_token() * r["tokens_per_s"] / (n * 1e11))
  # No peak known for CPU devices and none configured: no mfu in the logs.
  c.train.update(peak_flops=0.0, profile_steps=())
  train(c, tmp_path / "plain", task=get_task(c))
  records = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
  assert records and not any("mfu" in r for r in records)
  assert not (tmp_path / "plain" / "profile").exists()


def _lines_with(fn, text: str) -> set[int]:
  import inspect

  lines, first = inspect.getsourcelines(fn)
  return {first + i for i, line in enumerate(lines) if text in line}


def test_top_costs_name_the_source_lines_of_a_traced_program(tmp_path):
  import jax

  from lsd.nn.attention import dot_product_attention
  from lsd.train.profile import hlo_sources, time_by_kind, top_costs

  def f(q, k, v):
    return dot_product_attention(q, k, v) + 1.0

  x = jax.random.normal(jax.random.key(0), (2, 512, 4, 64))
  compiled = jax.jit(f).lower(x, x, x).compile()
  text = compiled.as_text()
  where = f"lsd/nn/attention.py:{{}} {dot_product_attention.__name__}"
  # Every matmul of the program comes from the jax.nn call in lsd's dot_product_attention (the
  # innermost frame inside lsd/, not jax's own lines).
  dots = {src for kind, src in hlo_sources(text).values() if kind == "dot_general"}
  call = _lines_with(dot_product_attention, "jax.nn.dot_product_attention(")
  assert len(call) == 1 and dots == {where.format(n) for n in call}
  with pytest.raises(FileNotFoundError, match="perfetto_trace"):
    top_costs(tmp_path, text, steps=1)
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    for _ in range(3):
      out = compiled(x, x, x)
    out.block_until_ready()
  costs = top_costs(tmp_path, text, steps=3, k=3)
  assert 1 <= len(costs) <= 3
  assert [c.ms_per_step for c in costs] == sorted((c.ms_per_step for c in costs), reverse=True)
  assert all(c.ms_per_step > 0 and 0 < c.share <= 1 for c in costs)
  assert sum(c.share for c in costs) <= 1 + 1e-9
  # The 512 x 512 attention dominates the one addition in this file.
  assert costs[0].source.startswith("lsd/nn/attention.py:")
  # By JAX operation: the same op time in other groups; the matmuls are among them.
  kinds = time_by_kind(tmp_path, text, steps=3)
  every = top_costs(tmp_path, text, steps=3, k=10**6)
  assert sum(kinds.values()) == pytest.approx(sum(c.ms_per_step for c in every), rel=1e-9)
  assert list(kinds.values()) == sorted(kinds.values(), reverse=True)
  assert kinds.get("dot_general", 0.0) > 0
  with pytest.raises(ValueError, match="steps=0"):
    top_costs(tmp_path, text, steps=0)
