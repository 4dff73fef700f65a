"""Safe file writes for run directories: atomic replacement with the permissions of a plain `open`.

A reader (another process, another user, a crash-restarted run) sees either the old file or the
new one, never a partial file; and a file written this way is readable by the same users as one
written by `open(path, "w")` (temporary files are created 0600, which would hide a shared run).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask_mode(mode: int = 0o666) -> int:
  """`mode` filtered by the process umask, as `open()` would create a file."""
  mask = os.umask(0)
  os.umask(mask)
  return mode & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)` on a unique temporary file beside `path`, then renames it over `path`.

  The temporary name is unique, so several processes (even on several hosts sharing a file
  system) may write the same path concurrently; the last rename wins whole.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())

  atomic_write(path, write)
