"""The workdir lock on object storage: a lease object with a heartbeat and an expiry.

A bucket has no `flock`, and a trainer killed by SIGKILL or a lost machine
cannot delete anything on its way out, so the lock is a *lease*: the object
`<workdir>/train.lock` holds JSON

    {"holder": "host:pid", "token": "<random>", "renewed_at": 1700000000.0,
     "expires_at": 1700000120.0, "ttl_seconds": 120.0}

- **Acquire.** No object, or one whose `expires_at` has passed: write our own
  lease, on condition that the object is still the generation we read
  (`ifGenerationMatch`; 0 = "must not exist"), then read it back and check the
  token is ours. A live lease (not expired) refuses the start
  (`WorkdirLockedError`, exit status 3) naming the holder and when it expires.
- **Heartbeat.** A daemon thread rewrites the lease every `ttl / 4` seconds
  (again conditional on our own last generation), pushing `expires_at` forward.
  If the lease is gone or holds another token (the run stalled past its expiry
  and another trainer took over), the lease is *lost*: `check()` raises
  `WorkdirLockedError`, and the trainer calls it before every checkpoint save,
  so a trainer that lost its lease never writes a checkpoint again.
- **Release.** Deletes the object (conditional on our generation).
- **After a crash** the lease stays until `expires_at`; a restart within the
  TTL is refused with the time to wait. Clocks: `expires_at` is the holder's
  wall clock compared with the contender's; hosts synchronised by NTP (all
  cloud VMs) differ by far less than the TTL.

The conditional writes make two trainers starting at the same moment safe on
real GCS; the local test emulator ignores preconditions, and there the
read-back check still catches the loser of the race in all but the tightest
interleaving (which the heartbeat then detects).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Self

import gin

from experiments.runtime import paths

_log = logging.getLogger(__name__)


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock (or this one lost its lease)."""

    exit_code = 3  # the scripts' exit status (experiments.runtime.cli)


def _bucket_and_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.removeprefix("gs://").partition("/")
    return bucket, key


@gin.configurable(denylist=["lock_path"])
class LeaseLock:
    """Context manager holding a lease on the object `lock_path` (`gs://...`).

    Args:
      ttl_seconds: how long a lease lives without a heartbeat (gin
        `LeaseLock.ttl_seconds`); a crashed trainer's workdir is free after it.
      clock: wall clock (tests).
    """

    def __init__(self, lock_path: str, *, ttl_seconds: float = 120.0,
                 clock: Callable[[], float] = time.time):
        if ttl_seconds <= 0:
            raise ValueError(f"LeaseLock.ttl_seconds must be > 0, got {ttl_seconds}")
        paths.check_gcs_support(lock_path)
        self.path, self.ttl = lock_path, float(ttl_seconds)
        self._clock = clock
        self._token = uuid.uuid4().hex
        self._holder = f"{socket.gethostname()}:{os.getpid()}"
        self._generation: int | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bucket_handle = None

    # -- storage ------------------------------------------------------------------------

    def _bucket(self):
        if self._bucket_handle is None:
            from google.cloud import storage  # pylint: disable=g-import-not-at-top

            self._bucket_handle = storage.Client().bucket(_bucket_and_key(self.path)[0])
        return self._bucket_handle

    def _read(self) -> tuple[dict[str, Any], int | None] | None:
        """The lease on the store and its generation, or None when there is none."""
        from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

        blob = self._bucket().get_blob(_bucket_and_key(self.path)[1])
        if blob is None:
            return None
        try:
            data = blob.download_as_bytes(if_generation_match=blob.generation)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            return self._read()  # replaced or deleted meanwhile: read again
        try:
            record = json.loads(data)
        except json.JSONDecodeError:
            record = {}  # damaged: treated as expired
        return record, blob.generation

    def _write(self, generation: int | None) -> None:
        """Writes our lease if the object is still at `generation` (0: absent;
        None: unconditionally, for a store that reports no generations)."""
        now = self._clock()
        record = {"holder": self._holder, "token": self._token, "renewed_at": now,
                  "expires_at": now + self.ttl, "ttl_seconds": self.ttl}
        blob = self._bucket().blob(_bucket_and_key(self.path)[1])
        blob.upload_from_string(json.dumps(record), content_type="application/json",
                                if_generation_match=generation)
        self._generation = blob.generation

    # -- lock ---------------------------------------------------------------------------

    def acquire(self) -> None:
        from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

        current = self._read()
        now = self._clock()
        if current is not None:
            record, generation = current
            expires = float(record.get("expires_at", 0.0))
            if expires > now:
                raise WorkdirLockedError(
                    f"workdir {os.path.dirname(self.path)!r} is in use by another trainer "
                    f"({record.get('holder', 'unknown')}, lease {self.path!r} expires in "
                    f"{expires - now:.0f} s unless renewed); refusing to start a second one")
            _log.warning("taking over the expired lease %s of %s (expired %.0f s ago)",
                         self.path, record.get("holder", "unknown"), now - expires)
        else:
            generation = 0
        try:
            self._write(generation)
        except exceptions.PreconditionFailed:
            raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)!r}: another trainer "
                                     f"took the lease {self.path!r} at the same moment") from None
        stored = self._read()
        if stored is None or stored[0].get("token") != self._token:
            holder = "unknown" if stored is None else stored[0].get("holder", "unknown")
            raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)!r}: another trainer "
                                     f"({holder}) took the lease {self.path!r} at the same moment")
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lease",
                                        daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception as e:  # pylint: disable=broad-except  # transient: retry
                _log.warning("could not renew the workdir lease %s: %s", self.path, e)
            if self._lost is not None:
                _log.error(self._lost)
                return

    def renew(self) -> None:
        """Pushes the expiry forward; marks the lease lost when it is no longer ours."""
        from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

        stored = self._read()
        if stored is None or stored[0].get("token") != self._token:
            holder = "nobody" if stored is None else stored[0].get("holder", "unknown")
            self._lost = (f"lost the workdir lease {self.path!r} (now held by {holder}): the "
                          f"run stalled past its {self.ttl:.0f} s expiry; stopping without "
                          f"writing another checkpoint")
            return
        try:
            self._write(stored[1])
        except exceptions.PreconditionFailed:
            self._lost = f"lost the workdir lease {self.path!r} to another trainer"

    def check(self) -> None:
        """WorkdirLockedError when the lease was lost (see the module doc)."""
        if self._lost is not None:
            raise WorkdirLockedError(self._lost)

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._lost is not None:
            return
        from google.api_core import exceptions  # pylint: disable=g-import-not-at-top

        try:
            self._bucket().blob(_bucket_and_key(self.path)[1]).delete(
                if_generation_match=self._generation)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
