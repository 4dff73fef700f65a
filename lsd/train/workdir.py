"""Run-directory safety: an exclusive lock per workdir, and stopping cleanly on SIGTERM / SIGINT.

The lock is an `flock` on `<workdir>/.lock`, whose text names the holder (PID and host). The kernel
releases an flock when its process dies, however it dies, so a lock left by a crash never blocks
a rerun: the next launch takes it over and reports the dead holder. File systems without flock
support (some network mounts) get a warning and no lock. A remote workdir (gs://, s3://, ...: object
stores have no locks) gets a one-line warning and an advisory `.lock` object naming the holder:
two runs sharing it are not detected.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import warnings

from lsd.config import ConfigError
from lsd.fileio import as_path, is_remote, one_line


class WorkdirBusy(ConfigError):
  """Another live process holds the workdir's lock."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir) as lock:`; `lock.stale` names a crashed holder it took over."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = as_path(workdir) / ".lock"
    self.remote = is_remote(self.path)
    self.stale: str | None = None
    self._fd: int | None = None
    self._advisory = False

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    if self.remote:
      self._acquire_remote()
      return
    import fcntl

    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirBusy(
        f"workdir {str(self.path.parent)!r} is in use by another lsd process ({holder}; lock "
        f"file {self.path}): wait for it to finish, or use another --workdir"
      ) from None
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        warnings.warn(
          f"{self.path}: this file system does not support locks; two runs sharing this workdir "
          "would not be detected",
          RuntimeWarning,
          stacklevel=2,
        )
        return
      raise
    previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
    self.stale = self._stale_holder(previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    self._fd = fd

  def _acquire_remote(self) -> None:
    """No lock on an object store: a warning, and the holder's name written to `.lock` (which
    also proves the workdir writable before any work is done)."""
    warnings.warn(
      f"{self.path.parent}: a remote workdir has no lock; two runs sharing it would not be "
      "detected",
      RuntimeWarning,
      stacklevel=3,
    )
    try:
      self.path.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
    except Exception as e:  # a missing client library, no credentials, no permission
      raise ConfigError(
        f"--workdir {str(self.path.parent)!r} is not writable: {one_line(e)}"
      ) from e
    self._advisory = True

  @staticmethod
  def _stale_holder(text: str) -> str | None:
    """The text of a lock left by a process that is gone (its flock was released on death)."""
    parts = text.split()
    if len(parts) != 4 or parts[0] != "pid" or not parts[1].isdigit():
      return None
    pid, host = int(parts[1]), parts[3]
    if host == socket.gethostname() and (pid == os.getpid() or _alive(pid)):
      return None
    return text

  def release(self) -> None:
    if self._advisory:
      self._advisory = False
      try:
        self.path.write_text("")  # an empty lock file names no holder: a clean exit
      except OSError as e:  # a failed network write must not hide the error ending the run
        warnings.warn(f"could not clear the lock {self.path}: {e}", stacklevel=2)
      return
    if self._fd is None:
      return
    import fcntl

    os.ftruncate(self._fd, 0)  # an empty lock file names no holder: a clean exit
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


class StopSignals:
  """Records SIGTERM / SIGINT instead of dying, so the training loop can checkpoint at the next step
  boundary and exit 0 (a TPU preemption notice is a SIGTERM). A second signal of the same kind acts
  as it would have without this handler (a second Ctrl-C interrupts at once).

  Installed only in the main thread of a single-process run: in a multi-process run JAX's
  preemption service owns SIGTERM and the loop asks it for the agreed step instead.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
