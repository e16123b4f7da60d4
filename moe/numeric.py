"""Small numeric helpers shared by routing, capacity and expert parallelism."""

from __future__ import annotations

import math

# Products such as k * T * cf / E in floating point can land just above an
# integer (2560.0000000001); a capacity must not round that up to 2561.
_CEIL_SLACK = 1e-9


def safe_ceil(value: float) -> int:
    """ceil(value), robust to float noise just above an integer."""
    return math.ceil(value - _CEIL_SLACK)


def ceil_div_float(numerator: float, denominator: float) -> int:
    """ceil(numerator / denominator), robust to float noise such as 2560.0000000001."""
    return safe_ceil(numerator / denominator)
