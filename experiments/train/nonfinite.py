"""What the trainer does with a step whose update was not finite.

The trainer never applies an update whose loss, gradient norm or updated
parameters are NaN or infinite: the train step flags it
(`experiments.train.train_step.finite_checks`), `SkipGuard.check` says the step
was skipped, and the trainer keeps the parameters and optimizer state it had
before the step. `SkipGuard` then either stops the run
(`NonFiniteLossError`, exit status 4 from scripts/train.py) naming the step, what
was non-finite and the last saved checkpoint, or, with
`train.max_skipped_steps = N`, lets up to N such steps pass: each is counted,
logged and listed in the summary (`skipped_steps`), and the run stops at the
N+1-th. The count starts afresh with each invocation of the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from experiments.runtime.checkpoints import Checkpointer

_log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A step's loss, gradient norm or update became NaN or infinite (and was not applied)."""

    exit_code = 4  # the scripts' exit status (experiments.runtime.cli)


def describe(metrics: Mapping[str, Any]) -> str:
    """What was not finite in a step's metrics, e.g. 'loss 5.57, gradient norm nan
    (non-finite gradients in: embedding, layer_1), updated parameters not finite'."""
    finite = metrics["finite"]
    parts = [f"loss {float(metrics['loss']):.6g}", f"gradient norm {float(metrics['grad_norm']):.6g}"]
    bad_groups = [group for group, ok in finite["grad_groups"].items() if not bool(ok)]
    if bad_groups:
        parts[-1] += f" (non-finite gradients in: {', '.join(bad_groups)})"
    if not bool(finite["params"]):
        parts.append("updated parameters not finite")
    return ", ".join(parts)


class SkipGuard:
    """Counts the steps whose update was not applied; raises past `max_skipped`."""

    def __init__(self, max_skipped: int, checkpointer: Checkpointer):
        self.max_skipped, self.checkpointer = max_skipped, checkpointer
        self.skipped: list[int] = []

    def check(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Whether step `step` was skipped (its update not applied); NonFiniteLossError
        when that makes more than `max_skipped` skipped steps."""
        if bool(metrics["finite"]["applied"]):
            return False
        self.skipped.append(step)
        what = describe(metrics)
        if len(self.skipped) > self.max_skipped:
            self.checkpointer.wait()
            allowance = (f"{len(self.skipped) - 1} earlier steps skipped, "
                         f"train.max_skipped_steps = {self.max_skipped}"
                         if self.max_skipped else
                         "bind train.max_skipped_steps = N to skip up to N such steps")
            last = self.checkpointer.latest_step()
            last = (f"Last good checkpoint: step {last} in {self.checkpointer.directory}"
                    if last is not None else "No checkpoint was saved")
            raise NonFiniteLossError(
                f"non-finite update at step {step} ({what}); not applied, stopping without "
                f"saving this state ({allowance}). {last}")
        message = (f"step {step}: non-finite update ({what}) not applied; skipped "
                   f"{len(self.skipped)} of at most {self.max_skipped} steps "
                   f"(train.max_skipped_steps)")
        _log.warning(message)
        return True
