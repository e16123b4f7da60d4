"""Paired, interleaved timing shared by the benchmark scripts.

Every candidate is compiled and called once before timing (the warm-up, never
timed); then each round times every candidate once, the order reversed every
other round, and figures are medians over rounds. A ratio between two
candidates is the **median of the per-round ratios**, so slow drift of a shared
machine cancels to first order. `load_average()` is recorded beside the
figures: paired ratios do not fully cancel heavy contention.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

Call = tuple[Callable[..., Any], Sequence[Any]]  # (fn, args)


def time_calls(fn: Callable[..., Any], args: Sequence[Any], iters: int = 1) -> float:
    """Seconds per call over `iters` back-to-back calls, waiting for the last result."""
    start = time.perf_counter()
    result = None
    for _ in range(iters):
        result = fn(*args)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / iters


def calibrate(fn: Callable[..., Any], args: Sequence[Any], min_time: float) -> int:
    """Calls per measurement so that one measurement lasts about `min_time` seconds
    (1 when `min_time` <= 0). Calls `fn` once (assumed compiled already)."""
    if min_time <= 0:
        return 1
    return max(1, round(min_time / max(time_calls(fn, args), 1e-6)))


def interleaved(calls: Mapping[str, Call], rounds: int, min_time: float = 0.0,
                warmup: bool = True) -> dict[str, list[float]]:
    """`{name: [seconds per call, one per round]}`, candidates interleaved.

    `warmup`: call each candidate once first (compiles, excluded from the figures).
    """
    return interleaved_wall_cpu(calls, rounds, min_time, warmup)[0]


def interleaved_wall_cpu(calls: Mapping[str, Call], rounds: int, min_time: float = 0.0,
                         warmup: bool = True
                         ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """`interleaved`, plus the process CPU seconds per call of each measurement (all
    threads, `time.process_time`): the work done, which a loaded machine moves much
    less than the wall time (it still counts the thread pool's spinning)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup:
        for fn, args in calls.values():
            jax.block_until_ready(fn(*args))
    iters = {name: calibrate(fn, args, min_time) for name, (fn, args) in calls.items()}
    names = list(calls)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, args = calls[name]
            start = time.process_time()
            wall[name].append(time_calls(fn, args, iters[name]))
            cpu[name].append((time.process_time() - start) / iters[name])
    return wall, cpu


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of `numerator[r] / denominator[r]`."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def ratio_summary(candidate: Sequence[float], baseline: Sequence[float]) -> dict[str, float]:
    """t_candidate / t_baseline per round: median, min, max; and both median times (ms)."""
    ratios = [c / b for c, b in zip(candidate, baseline, strict=True)]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "ms": 1e3 * statistics.median(candidate),
            "dense_ms": 1e3 * statistics.median(baseline)}


def paired_ratio(candidate: Callable, baseline: Callable, args_c: Sequence[Any],
                 args_b: Sequence[Any], rounds: int, min_time: float = 0.0) -> dict[str, float]:
    """`ratio_summary` over `rounds` interleaved rounds, warm-up excluded; each
    measurement one call, or as many as last `min_time` seconds."""
    times = interleaved({"candidate": (candidate, args_c), "baseline": (baseline, args_b)},
                        rounds, min_time)
    return ratio_summary(times["candidate"], times["baseline"])


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages of the host (None where unsupported)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
