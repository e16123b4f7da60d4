"""One trainer per workdir: an exclusive `fcntl.flock` on `<workdir>/train.lock`,
or, for a workdir in a bucket (`gs://`), a lease object with a heartbeat and an
expiry (`experiments.runtime.lease`): :func:`workdir_lock` picks the one that fits.

The kernel drops a flock when its holder dies (even on SIGKILL), so a lock
file left behind by a dead trainer is simply taken over; the PID written in it
is only there to name the holder in the error message.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Any, Self

from experiments.runtime import paths
from experiments.runtime.lease import LeaseLock, WorkdirLockedError

__all__ = ["LOCK_NAME", "LeaseLock", "WorkdirLock", "WorkdirLockedError", "check_workdir",
           "workdir_lock"]

_log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


def check_workdir(workdir: str | os.PathLike[str]) -> None:
    """Refuses (NotADirectoryError) a workdir that is a file or lies under one,
    before anything is created (on object storage: one that is an object)."""
    if paths.is_remote(workdir):
        remote = paths.as_path(workdir)
        if remote.is_file():
            raise NotADirectoryError(f"workdir {str(remote)!r} is an object, not a directory")
        return
    path = Path(workdir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"is under the file {str(candidate)!r}"
                raise NotADirectoryError(f"workdir {str(path)!r} {where}, not a directory")
            return


def workdir_lock(workdir: str | os.PathLike[str]) -> Any:
    """The lock of `workdir`: a `WorkdirLock` (flock) for a local directory, a
    `lease.LeaseLock` for a bucket. Both are context managers with `check()`."""
    if paths.is_remote(workdir):
        return LeaseLock(str(paths.as_path(workdir) / LOCK_NAME))
    return WorkdirLock(workdir)


class WorkdirLock:
    """Context manager holding a local workdir's lock; released on exit."""

    def __init__(self, workdir: str | os.PathLike[str]):
        self.path = Path(workdir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirLockedError(
                f"workdir {str(self.path.parent)!r} is in use by another trainer "
                f"(PID {holder}, lock file {str(self.path)!r}); refusing to start a second one"
            ) from None
        previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if previous and previous != str(os.getpid()):
            _log.warning("taking over stale lock %s left by PID %s (no longer running)",
                            self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def check(self) -> None:
        """Nothing to check: the kernel holds a flock until it is released."""

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
