"""Every config file loads, validates, and its model initialises under jax.eval_shape (no memory)."""

from pathlib import Path

import jax
import pytest
from flax import nnx

from lsd.config import ConfigError, check_positive, check_range, load_config_file
from lsd.methods import get_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(p for p in CONFIGS.glob("*.py") if "get_config" in p.read_text())


class FakeTokenizer:
  def __init__(self, n):
    self.vocab_size = n + 4
    self.pad_id, self.bos_id, self.eos_id, self.mask_id = n, n + 1, n + 2, n + 3


def variants(path: Path) -> list[str]:
  """Each config's variants: every size it accepts (and the paper-scale one); a size it rejects
  must be rejected with a ConfigError naming the `size` field."""
  sizes = []
  for s in ("test", "tiny", "small", "base"):
    try:
      load_config_file(f"{path}:size={s}")
    except ConfigError as e:
      assert "size=" in str(e), e
      continue
    sizes.append(s)
  return [f"size={s}" for s in sizes] or [""]


CASES = [(p, v) for p in FILES for v in variants(p)]


def test_there_are_configs():
  assert {"causal_lm.py", "sbd.py"} <= {p.name for p in FILES}


@pytest.mark.parametrize("path,arg", CASES, ids=[f"{p.stem}:{v}" for p, v in CASES])
def test_config_initialises_under_eval_shape(path, arg):
  config = load_config_file(f"{path}:{arg}" if arg else str(path))
  task = get_task(config)
  vocab = config.data.tokenizer.vocab_size
  if config.data.tokenizer.kind == "gpt2":
    vocab = 50257
  task.tokenizer = FakeTokenizer(vocab)
  model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  assert n_params > 0
  if arg == "size=base" and config.method in ("sbd", "causal_lm"):
    assert 100e6 < n_params < 130e6  # the paper's 110M-class model


def test_number_checks_reject_booleans():
  # True is an int in Python: a boolean where a number belongs is a mistake to name, not 1.
  check_positive("train.steps", 3)
  check_positive("train.warmup_steps", 0, allow_zero=True)
  check_range("train.b1", 1, 0.0, 1.0)
  check_range("train.b1", 0.9, 0.0, 1.0)
  with pytest.raises(ConfigError, match=r"^train.steps=True must be a number > 0$"):
    check_positive("train.steps", True)
  with pytest.raises(ConfigError, match=r"^train.warmup_steps=False must be a number >= 0$"):
    check_positive("train.warmup_steps", False, allow_zero=True)
  with pytest.raises(ConfigError, match=r"^train.b1=True must be a number in \[0.0, 1.0\]$"):
    check_range("train.b1", True, 0.0, 1.0)
  with pytest.raises(ConfigError, match=r"^train.lr='1e-3' must be a number > 0$"):
    check_positive("train.lr", "1e-3")
