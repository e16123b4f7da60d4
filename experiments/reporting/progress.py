"""Run order and the progress line of a sweep (`experiments.reporting.sweep.run_sweep`).

A sweep is a list of runs (variant x seed). `schedule` orders them: variant by
variant (`order='variant'`: all seeds of the first variant, then the next) or
seed by seed (`order='seed'`: every variant at seed 0, then at seed 1, ...), the
order that leaves *paired* partial results when a sweep is interrupted.

`progress_line` is the one line printed before and after every run:

    [sweep NAME] 5/12 runs done; next: micro_batch seed 1; ETA 1 h 10 min (7 runs x 10.0 min/run)

The time per run is the mean wall time of the runs this invocation trained, or,
before the first of them finishes, of the sweep's runs finished earlier (their
`wall_seconds.txt`); with neither, the ETA is unknown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

ORDERS = ("variant", "seed")


def schedule(runs: Sequence[tuple[str, Mapping[str, Any]]], seeds: Sequence[int],
             order: str = "variant") -> list[tuple[str, Mapping[str, Any], int]]:
    """`[(variant, bindings, seed)]` of every run, in `order` ('variant' or 'seed')."""
    if order not in ORDERS:
        raise ValueError(f"sweep order must be one of {list(ORDERS)}, got {order!r}")
    if order == "variant":
        return [(v, b, s) for v, b in runs for s in seeds]
    return [(v, b, s) for s in seeds for v, b in runs]


def format_duration(seconds: float) -> str:
    """`42 s`, `7 min`, `1 h 05 min`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def progress_line(name: str, done: int, total: int, seconds_per_run: Sequence[float],
                  next_run: str | None = None) -> str:
    """The sweep's progress: runs done of `total`, the next run, and the ETA of the rest
    from the mean of `seconds_per_run` (the wall times it is estimated from)."""
    if not 0 <= done <= total:
        raise ValueError(f"runs done must be in [0, {total}], got {done}")
    line = f"[sweep {name}] {done}/{total} runs done"
    if next_run is not None:
        line += f"; next: {next_run}"
    left = total - done
    times = [t for t in seconds_per_run if t is not None and math.isfinite(t)]
    if left == 0:
        return line + "; finished"
    if not times:
        return line + f"; ETA unknown until a run finishes ({left} to go)"
    per_run = sum(times) / len(times)
    return (line + f"; ETA {format_duration(left * per_run)} "
            f"({left} runs x {per_run / 60:.1f} min/run)")
