"""Test-only step hooks for crash and failure tests (not part of the trainer's API).

Loaded into a scripts/train.py run by gin: `--gin_param=import tests.fault_hooks`
then, e.g., `--gin_param=train.hooks = [@NanAtStep()]` and
`--gin_param=NanAtStep.step = 12`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

import gin
import numpy as np

from experiments.train import interrupt
from experiments.train.hooks import Batch, HookContext, StepHook

_log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class NanAtStep(StepHook):
    """Multiplies the loss weights of step `step`'s batch by NaN, which makes the loss
    NaN through the real step: the run must stop naming the step and keep the last
    checkpoint."""

    step: int = 0
    name = "nan_at_step"

    def before_step(self, step: int, batch: Batch) -> Batch:
        if step != self.step:
            return batch
        return dict(batch, weights=batch["weights"] * np.float32("nan"))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StallAtStep(StepHook):
    """After step `step` is logged (and its checkpoint, if any, finalised) the trainer
    sleeps until killed (kill -9 tests)."""

    step: int = 0
    name = "stall_at_step"

    def end_of_step(self, step: int, ctx: HookContext) -> None:
        if step != self.step:
            return
        ctx.flush()
        _log.warning("StallAtStep(%d): stalling (for crash tests); kill this process", step)
        sys.stderr.flush()
        while True:
            time.sleep(3600)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WaitForSignalAtStep(StepHook):
    """After step `step` is logged the trainer waits until it receives SIGINT or
    SIGTERM (graceful-interruption tests): the run then stops after step `step + 1`."""

    step: int = 0
    name = "wait_for_signal_at_step"

    def end_of_step(self, step: int, ctx: HookContext) -> None:
        if step != self.step:
            return
        ctx.flush()
        _log.warning("WaitForSignalAtStep(%d): waiting for SIGINT or SIGTERM", step)
        sys.stderr.flush()
        while interrupt.received_signal() is None:
            time.sleep(0.05)
