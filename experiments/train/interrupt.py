"""Graceful interruption: SIGINT and SIGTERM stop a run after the current step, saved.

`InterruptGuard` is entered by `experiments.train.trainer.train` for the run
(in the main thread only; elsewhere it does nothing) and restores the previous
handlers on exit. The first SIGINT or SIGTERM only sets a flag. The loop asks
`stop_requested()` once per step, before the step's checkpoint; when it says
yes the trainer saves that step (forced, then waited for) and raises
`stopped(...)`, an `Interrupted` whose `exit_status` is 128 + the signal
number (130 for SIGINT, 143 for SIGTERM). A second signal aborts at once: the
default handlers come back and `Aborted` (a `KeyboardInterrupt`) is raised.

In a multi-process run every process must stop after the same step (the
checkpoint save is collective), so `stop_requested()` all-gathers the
processes' flags each step (one tiny collective; the loop already waits for
each step's metrics): a signal to any process stops them all after the same
step. jax's own preemption service is not used: it watches SIGTERM only and
is not wired to the CPU test set-up.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["Aborted", "InterruptGuard", "Interrupted", "received_signal"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active: InterruptGuard | None = None


class Interrupted(Exception):
    """The run stopped on a signal after saving the checkpoint of `step`."""

    def __init__(self, signum: int, step: int, directory: str | Path):
        self.signum, self.step, self.directory = signum, step, Path(directory)
        super().__init__(f"interrupted at step {step}; checkpoint saved in {directory}; "
                         "run the same command to resume")

    @property
    def exit_status(self) -> int:
        """The shell's status for death by this signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


class Aborted(KeyboardInterrupt):
    """A second signal: the run stops at once, the current step unsaved."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} again: aborted; the current step "
                         "is not saved")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def received_signal() -> int | None:
    """The signal the active guard of this process received, if any (for test hooks)."""
    return None if _active is None else _active.received


class InterruptGuard:
    """Context manager: SIGINT/SIGTERM set a flag instead of killing the run."""

    def __init__(self) -> None:
        self.received: int | None = None  # this process's first signal
        self._stop_signal: int | None = None  # the signal the processes agreed to stop on
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> InterruptGuard:
        global _active
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            _active = self
        return self

    def __exit__(self, *exc_info: Any) -> None:
        global _active
        for sig, previous in self._previous.items():
            # None: a handler not installed from Python (none to give back).
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        if _active is self:
            _active = None

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.received is not None:
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            _say(f"{name} again: aborting now")
            raise Aborted(signum)
        self.received = signum
        _say(f"{name} received: finishing the current step and saving a checkpoint "
             "(Ctrl-C again aborts at once)")

    def stop_requested(self) -> bool:
        """Whether to stop after this step; the same answer in every process."""
        if jax.process_count() == 1:
            self._stop_signal = self.received
        elif self._stop_signal is None:
            from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

            flags = np.asarray(multihost_utils.process_allgather(np.int32(self.received or 0)))
            if flags.any():
                self._stop_signal = int(flags[flags > 0][0])
        return self._stop_signal is not None

    def stopped(self, step: int, checkpointer: Any) -> Interrupted:
        """The exception to raise once step `step`'s checkpoint was started; waits for it."""
        assert self._stop_signal is not None, "stopped() without stop_requested()"
        checkpointer.wait()
        return Interrupted(self._stop_signal, step, checkpointer.directory)


def _say(line: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a
    # write to sys.stderr, and the buffered writer is not reentrant.
    os.write(2, f"\n{line}\n".encode())
