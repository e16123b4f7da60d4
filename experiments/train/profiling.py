"""`train.profile_steps = 'N:M'`: a jax profiler trace of steps N..M of a run.

The trace goes to the run's TensorBoard directory (`<workdir>/tensorboard/
plugins/profile/<timestamp>/*.xplane.pb`), where TensorBoard's profile plugin
(`pip install tensorboard-plugin-profile`) or XProf shows it: the trace viewer
(every XLA op and Pallas kernel on a time line) and the op profile (time per
op). See docs/training.md, "Profiling a step".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import jax

_log = logging.getLogger(__name__)

FORMAT = "'N:M' with integers 1 <= N <= M (steps N to M inclusive), e.g. '5:7'"


class StepRange(NamedTuple):
    """Steps `first..last`, both included (1-based optimizer steps)."""

    first: int
    last: int


def parse_profile_steps(value: str | None, name: str = "train.profile_steps",
                        num_steps: int | None = None) -> StepRange | None:
    """`'N:M'` -> `StepRange(N, M)`; None or '' -> None.

    Raises ValueError naming `name` (the gin binding or CLI flag) for anything
    else, and for M > `num_steps` (steps that the run never reaches).
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be {FORMAT}, got {value!r}")
    parts = value.split(":")
    try:
        first, last = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        first = last = None
    if first is None or not 1 <= first <= last:
        raise ValueError(f"{name} must be {FORMAT}, got {value!r}")
    if num_steps is not None and last > num_steps:
        raise ValueError(f"{name} = {value!r} ends after the run's last step "
                         f"(train.num_steps = {num_steps})")
    return StepRange(first, last)


class StepProfiler:
    """Starts the jax profiler before step `first` and stops it after step `last`.

    A resumed run that starts inside the range traces the rest of it; one that
    starts after it traces nothing. `close()` stops a trace still running (an
    exception or an interrupt inside the range), so the files are written.
    """

    def __init__(self, steps: StepRange | None, log_dir: Path):
        self.steps, self.log_dir = steps, Path(log_dir)
        self.active = False
        self.trace_dir: Path | None = None

    def before_step(self, step: int) -> None:
        if self.steps is None or self.active or not self.steps.first <= step <= self.steps.last:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(self.log_dir))
        self.active = True
        _log.info("profiling steps %d..%d into %s", step, self.steps.last, self.log_dir)

    def after_step(self, step: int, result=None) -> None:
        """After step `step`; `result` (the step's outputs) is waited for before stopping."""
        if self.active and step >= self.steps.last:
            if result is not None:
                jax.block_until_ready(result)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            self.trace_dir = self.log_dir / "plugins" / "profile"
