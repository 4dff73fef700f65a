"""benchmarks/peers.py without the reference or torch: its argument checks and its call order."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peers.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402


def run(*args):
  return subprocess.run(
    [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
  )


def test_no_reference_path_names_the_flag_and_how_to_fetch():
  r = run()
  assert r.returncode != 0
  assert "--bd3lms" in r.stderr
  assert "git clone https://github.com/kuleshov-group/bd3lms" in r.stderr


def test_a_folder_that_is_not_a_checkout_is_refused(tmp_path):
  (tmp_path / "models").mkdir()
  (tmp_path / "diffusion.py").write_text("")
  r = run("--bd3lms", str(tmp_path))
  assert r.returncode != 0
  assert "not a bd3lms checkout" in r.stderr
  assert "models/dit.py" in r.stderr and "configs/config.yaml" in r.stderr
  assert "diffusion.py," not in r.stderr  # only the missing files are named
  assert "git clone" in r.stderr


def test_a_checkout_passes_the_argument_checks(tmp_path):
  for f in peers.CHECKOUT_FILES:
    (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / f).write_text("")
  args = peers.parse_args(["--bd3lms", str(tmp_path), "--repeats", "1", "--result", "x"])
  assert args.repeats == 1 and args.result == "x" and args.threads >= 1


def test_an_ld4lg_folder_that_is_not_a_checkout_is_refused(tmp_path):
  bd3 = tmp_path / "bd3lms"
  for f in peers.CHECKOUT_FILES:
    (bd3 / f).parent.mkdir(parents=True, exist_ok=True)
    (bd3 / f).write_text("")
  (tmp_path / "ld4lg" / "model").mkdir(parents=True)
  (tmp_path / "ld4lg" / "model" / "diffusion_transformer.py").write_text("")
  r = run("--bd3lms", str(bd3), "--ld4lg", str(tmp_path / "ld4lg"))
  assert r.returncode != 0
  assert "not a latent-diffusion-for-language checkout" in r.stderr
  assert "diffusion/text_denoising_diffusion.py" in r.stderr
  assert "model/diffusion_transformer.py" not in r.stderr  # only the missing file is named
  assert peers.LD4LG_FETCH in r.stderr
  for f in peers.LD4LG_FILES:
    (tmp_path / "ld4lg" / f).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "ld4lg" / f).write_text("")
  args = peers.parse_args(["--bd3lms", str(bd3), "--ld4lg", str(tmp_path / "ld4lg")])
  assert args.ld4lg_batches == "1,16,128"


def test_interleaved_calls_one_side_at_a_time_and_alternates_who_goes_first():
  log = []
  calls = {"lsd": lambda: log.append("lsd") or 1, "ref": lambda: log.append("ref") or 2}
  turn = [0]
  out = peers.interleaved(calls, 3, turn)
  assert log == ["lsd", "ref", "ref", "lsd", "lsd", "ref"]
  assert out == {"lsd": [1, 1, 1], "ref": [2, 2, 2]}
  log.clear()
  peers.interleaved(calls, 1, turn)  # the alternation carries on across lengths
  assert log == ["ref", "lsd"]


def test_compare_takes_the_best_and_the_median_of_each_side():
  """Seconds: the minimum is best and lsd is faster by ref / lsd; throughput: the maximum, lsd /
  ref."""
  r = peers.compare("s", [2.0, 1.0, 3.0], [4.0, 6.0, 5.0], lower_is_better=True)
  assert r == {
    "lsd_s": 1.0, "ref_s": 4.0, "ratio": 4.0,
    "lsd_s_median": 2.0, "ref_s_median": 5.0, "ratio_median": 2.5,
  }  # fmt: skip
  r = peers.compare("tok_s", [10.0, 30.0, 20.0], [5.0, 10.0, 15.0], lower_is_better=False)
  assert (r["lsd_tok_s"], r["ref_tok_s"], r["ratio"], r["ratio_median"]) == (30.0, 15.0, 2.0, 2.0)


def test_the_lsd_sides_sample_complete_canvases_and_count_their_calls():
  side = peers.Lsd()
  assert side.build_sampler(32) > 0.0
  first, second = side.sample(), side.sample()
  assert side.calls == 2
  for out in (first, second):
    assert out["masked_left"] == 0  # every position drafted
    assert out["nfe"] >= 32 // peers.BLOCK * peers.STEPS  # at least one peek per draft step
  latent = peers.LsdLatent()
  latent.build_sampler(2, 5)
  out = latent.sample()
  assert out["nfe"] == 5 and out["finite"]
  assert latent.calls == 1
