"""The `tokamax` dispatch: sorted groups through tokamax's `ragged_dot` (optional).

tokamax (PyPI, the `tokamax` extra: `pip install -e '.[tokamax]'`) is a library
of Pallas kernels; its `ragged_dot(lhs [M, K], rhs [E, K, N], group_sizes [E])`
has the signature of `jax.lax.ragged_dot` and the implementations "mosaic"
(TPU, and Mosaic GPU on Hopper), "triton" (GPU) and "xla" (everywhere). This
dispatch is `sort` with that grouped matmul (capacity mode: `[E, C, d]`
buffers), so the benchmark can compare it with our kernels.

`MOE_TOKAMAX_IMPLEMENTATION` (read when traced) picks one implementation;
unset or empty lets tokamax choose (the first of its kernels that supports
the platform and shapes, falling back to "xla").
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import jax

from moe.kernels import api as kernel_api

EXTRA = "tokamax"
IMPLEMENTATION_ENV = "MOE_TOKAMAX_IMPLEMENTATION"
# What tokamax 0.0.12 runs where (its "mosaic" is Mosaic TPU on TPU, Mosaic GPU on GPU).
IMPLEMENTATIONS = {"tpu": ("mosaic", "xla"), "gpu": ("triton", "mosaic", "xla"),
                   "cpu": ("xla",)}


def missing() -> str | None:
    """Why the dispatch cannot run here (tokamax is not installed), else None."""
    if importlib.util.find_spec("tokamax") is None:
        return (f"dispatch 'tokamax' needs the optional package tokamax: install the "
                f"'{EXTRA}' extra (pip install -e '.[{EXTRA}]', or pip install tokamax)")
    return None


def _platform(*arrays) -> str:
    platform = kernel_api._platform(*arrays)
    return "gpu" if platform in ("cuda", "rocm") else platform


def implementation(platform: str) -> str | None:
    """The implementation asked for in the environment, checked against `platform`."""
    name = os.environ.get(IMPLEMENTATION_ENV) or None
    every = sorted({n for names in IMPLEMENTATIONS.values() for n in names})
    if name is not None and name not in every:
        raise ValueError(f"{IMPLEMENTATION_ENV} must be one of {tuple(every)} or unset, "
                         f"got {name!r}")
    allowed = IMPLEMENTATIONS.get(platform, ("xla",))
    if name is not None and name not in allowed:
        raise ValueError(f"{IMPLEMENTATION_ENV}={name!r}: tokamax has no {name!r} ragged_dot "
                         f"on backend {platform!r}; there use one of {allowed}, or unset it")
    return name


def _absl_flags_parsed() -> None:
    """tokamax (0.0.12) reads its options from absl flags and, on first use, parses
    `sys.argv` with absl: a host program's own flags (pytest's, a script's) then fail as
    unknown absl flags. Mark absl's flags parsed (tokamax's defaults) unless the program
    parsed them itself."""
    from absl import flags  # a dependency of tokamax

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def tokamax_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`[M, K] x [E, K, N] -> [M, N]` through `tokamax.ragged_dot` (rows past the groups
    are zero)."""
    reason = missing()
    if reason:
        raise ValueError(reason)
    tokamax = importlib.import_module("tokamax")
    _absl_flags_parsed()
    name = implementation(_platform(lhs, rhs))
    return tokamax.ragged_dot(lhs, rhs, group_sizes, implementation=name)
