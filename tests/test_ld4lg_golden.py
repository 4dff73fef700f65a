"""LD4LG end to end against a recorded golden: the per-step losses of all three stages (autoencoder,
diffusion, decoder tuning) and the seeded samples each stage prints, at the test size.

The golden (tests/golden/ld4lg_test_e2e.json) was recorded before the latent-core restructure; a
refactor of the latent stack must leave every number in it unchanged. Sample texts must be equal
exactly. Losses must be equal to 1e-5 relative: the same program gives bitwise-equal losses on one
machine, and the tolerance only absorbs XLA's freedom to reorder a float reduction between versions.

Regenerate (only when a change is meant to move the numbers, and say so in the commit):
  LSD_REGENERATE_GOLDEN=1 python -m pytest tests/test_ld4lg_golden.py
"""

import json
import os
from pathlib import Path

import jax
import numpy as np

import lsd.api
from lsd.api import train
from lsd.config import load_config_file

GOLDEN = Path(__file__).parent / "golden" / "ld4lg_test_e2e.json"
WORDS = (
  "the food was great and the staff friendly".split(),
  "service was slow cold rude and the table dirty".split(),
)


def _yelp(path: Path) -> None:
  """Two label files of 40 five-word sentences, seeded."""
  rng = np.random.default_rng(0)
  for label, words in enumerate(WORDS):
    lines = [" ".join(rng.choice(words, 5)) + " ." for _ in range(40)]
    (path / f"yelp.{label}").write_text("\n".join(lines) + "\n")


def _run(tmp_path: Path) -> dict:
  _yelp(tmp_path)
  common = {"progress": False, "num_samples": 2, "eval_batches": 1, "log_every": 2}
  out = {}
  for stage, steps in (("ae", 6), ("diffusion", 4), ("decoder", 6)):
    cfg = load_config_file(f"configs/ld4lg_yelp.py:stage={stage},size=test,steps={steps}")
    cfg.data.path = str(tmp_path / "yelp.*")
    cfg.train.update(common)
    if stage != "ae":
      cfg.ld4lg.autoencoder_workdir = str(tmp_path / "ae")
    if stage == "diffusion":
      cfg.sample.steps = 4
    if stage == "decoder":
      cfg.ld4lg.denoiser_workdir = str(tmp_path / "diffusion")
    res = train(cfg, tmp_path / stage, record_every_step=True)
    out[stage] = {
      "losses": [res.losses[s] for s in range(1, steps + 1)],
      "eval_loss": res.eval_loss,
      "samples": [{k: s[k] for k in ("text", "label") if k in s} for s in res.samples],
    }
  # The diffusion run sampled through the API, decoded by the stage-3 decoder.
  run = lsd.api.load(tmp_path / "diffusion")
  run.task.config.ld4lg.decoder_workdir = str(tmp_path / "decoder")
  out["api_sample_stage3_decoder"] = [
    {"text": s["text"], "label": s["label"]} for s in lsd.api.sample(run, jax.random.key(3), 2)
  ]
  return out


def test_three_stage_losses_and_samples_equal_the_recorded_golden(tmp_path):
  got = _run(tmp_path)
  if os.environ.get("LSD_REGENERATE_GOLDEN"):
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
  want = json.loads(GOLDEN.read_text())
  assert set(got) == set(want)
  for stage in ("ae", "diffusion", "decoder"):
    np.testing.assert_allclose(got[stage]["losses"], want[stage]["losses"], rtol=1e-5, atol=0)
    np.testing.assert_allclose(got[stage]["eval_loss"], want[stage]["eval_loss"], rtol=1e-5)
    assert got[stage]["samples"] == want[stage]["samples"], stage
  assert got["api_sample_stage3_decoder"] == want["api_sample_stage3_decoder"]
