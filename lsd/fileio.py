"""Run-facing paths and safe file writes, on local disk or on a remote store through etils.epath.

Paths: `as_path` turns a workdir, data glob or run file into an `epath.Path`. A local path (with `~`
expanded) behaves as pathlib's; a URL with a scheme etils.epath serves (`REMOTE_SCHEMES`: gs://,
s3://, az://, hf://) goes to that store through fsspec (gcsfs, s3fs, ... must be installed) or
tf.io.gfile when TensorFlow is installed. Any other `scheme://` is a ConfigError: it would
otherwise become a local directory named `scheme:`.

Writes: `atomic_write` gives a reader (another process, another user, a crash-restarted run) either
the old file or the new one, never a partial file. Locally that is a rename of a unique temporary
file beside the target, with the permissions of a plain `open` (temporary files are created 0600,
which would hide a shared run). Object stores have no atomic rename (a "rename" is a copy and a
delete), but one object upload is all-or-nothing: a remote file is written whole in one upload of
the finished bytes, and the last writer wins.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from etils import epath

REMOTE_SCHEMES = ("gs", "s3", "az", "hf")  # the URL schemes etils.epath serves
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB_CHARS = re.compile(r"[*?\[]")


def scheme(path: str | os.PathLike) -> str | None:
  """The URL scheme of `path` ('gs' for 'gs://bucket/x'), None for a local path; a scheme
  etils.epath does not serve is a ConfigError."""
  m = _SCHEME.match(os.fspath(path))
  if m is None:
    return None
  if m.group(1) not in REMOTE_SCHEMES:
    from lsd.config import ConfigError

    supported = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
    raise ConfigError(
      f"{os.fspath(path)!r}: the {m.group(1)}:// scheme is not supported (remote paths: "
      f"{supported}; anything else is a local path)"
    )
  return m.group(1)


def is_remote(path: str | os.PathLike) -> bool:
  return scheme(path) is not None


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a remote URL as is, a local path with `~` expanded."""
  text = os.fspath(path)
  if is_remote(text):
    return epath.Path(text)
  return epath.Path(os.path.expanduser(text))


def one_line(e: BaseException) -> str:
  """`Type: first line of the message` (a file system client's errors can run to pages)."""
  lines = [line for line in str(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def glob_files(pattern: str | os.PathLike) -> list[epath.Path]:
  """The files (not directories) that `pattern` matches, sorted. Locally `**` recurses; on a
  remote store `*`, `?` and `[...]` match within one path level and `**` is a ConfigError (it
  would list the whole bucket)."""
  text = os.fspath(pattern)
  if not is_remote(text):
    found = glob.glob(os.path.expanduser(text), recursive=True)
    return sorted(epath.Path(f) for f in found if os.path.isfile(f))
  if "**" in text:
    from lsd.config import ConfigError

    raise ConfigError(
      f"{text!r}: '**' does not recurse on a remote store; use one '*' per directory level"
    )
  m = _GLOB_CHARS.search(text)
  if m is None:
    path = epath.Path(text)
    return [path] if path.is_file() else []
  anchor = text[: text.rfind("/", 0, m.start())]  # the fixed directory before the first wildcard
  rest = text[len(anchor) + 1 :]
  return sorted(p for p in epath.Path(anchor).glob(rest) if p.is_file())


def umask_mode(mode: int = 0o666) -> int:
  """`mode` filtered by the process umask, as `open()` would create a file."""
  mask = os.umask(0)
  os.umask(mask)
  return mode & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)` on a unique local temporary file, then puts it at `path` whole.

  Locally the temporary file lies beside `path` and is renamed over it; its name is unique, so
  several processes (even on several hosts sharing a file system) may write the same path
  concurrently and the last rename wins whole. On a remote store the finished bytes are uploaded
  in one write (see the module docstring).
  """
  if is_remote(path):
    target = as_path(path)
    with tempfile.TemporaryDirectory(prefix="lsd-") as tmpdir:
      tmp = os.path.join(tmpdir, target.name)
      write(tmp)
      data = Path(tmp).read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return
  path = Path(os.path.expanduser(os.fspath(path)))
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


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
  """A local file path with `path`'s bytes, for readers that need one (safetensors' `load_file`,
  `safe_open`): `path` itself when local, else a temporary copy, removed on exit."""
  if not is_remote(path):
    yield os.path.expanduser(os.fspath(path))
    return
  source = as_path(path)
  with tempfile.TemporaryDirectory(prefix="lsd-") as tmpdir:
    tmp = os.path.join(tmpdir, source.name)
    Path(tmp).write_bytes(source.read_bytes())
    yield tmp


def move_tree(source: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Moves directory `source` to `dest` (which must not exist). Locally one rename; on an object
  store, where a "directory" is a prefix and renaming one is not supported everywhere, every
  object is copied under `dest`, then `source` is deleted (a crash between leaves both whole)."""
  src, dst = as_path(source), as_path(dest)
  if not is_remote(source) and not is_remote(dest):
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dst)
    return
  if dst.exists():
    raise FileExistsError(f"{dst} exists")

  def copy(folder, to) -> None:  # one listing per prefix (recursive globs are refused on GCS)
    for child in sorted(folder.iterdir()):
      if child.is_dir():
        copy(child, to / child.name)
      else:
        (to / child.name).parent.mkdir(parents=True, exist_ok=True)
        (to / child.name).write_bytes(child.read_bytes())

  copy(src, dst)
  src.rmtree()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())

  atomic_write(path, write)
