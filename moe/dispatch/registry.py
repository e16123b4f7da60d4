"""Dispatch implementations, selected by name.

Adding one is one function plus one `register_dispatch` call; `MoeLayer`
validates its `dispatch=` argument against `available_dispatches()`, and
tests/moe/test_dispatch.py checks every registered dispatch against a
per-expert loop (filtering only on the declared `DispatchTraits`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from moe.dispatch.dispatchers import DispatchOutput, einsum_dispatch, make_sort_dispatch
from moe.dispatch.expert_parallel import expert_parallel_dispatch
from moe.dispatch.fused import pallas_fused_dispatch
from moe.dispatch.tokamax_backend import missing as tokamax_missing
from moe.dispatch.tokamax_backend import tokamax_gmm
from moe.kernels import api as kernel_api
from moe.kernels import xla_gmm
from moe.validation import check_one_of

Dispatcher = Callable[..., DispatchOutput]

# The dispatch `MoeLayer` uses unless a config names another, on every backend (the
# accelerator benchmark's verdict says where a measured device has a faster one).
DEFAULT_DISPATCH = "sort"


@dataclasses.dataclass(frozen=True)
class DispatchTraits:
    """What a dispatch guarantees beyond the common interface.

    Attributes:
      exact_dropless: with `capacity=None` and the dispatch's default options,
        every assignment is computed (keep is all True). False for a dispatch
        whose dropless mode uses bounded buffers and reports the overflow as
        dropped (keep=False).
      bounded_option: the setting, if any, that opts the dropless mode into
        bounded buffers which drop what overflows them (reported in keep);
        with it set, the dispatch is no longer exactly dropless.
      missing: for a dispatch over an optional package, a function that says
        why it cannot run here (the extra to install), or None when it can.
      interpreted_on_cpu: on CPU its kernels run in Pallas interpret mode
        (correct but slow: for tests, never timed by the benchmark).
    """

    exact_dropless: bool = True
    bounded_option: str | None = None
    missing: Callable[[], str | None] | None = None
    interpreted_on_cpu: bool = False


_DISPATCHERS: dict[str, Dispatcher] = {}
_TRAITS: dict[str, DispatchTraits] = {}


def register_dispatch(name: str, fn: Dispatcher,
                      traits: DispatchTraits = DispatchTraits()) -> Dispatcher:
    if name in _DISPATCHERS:
        raise ValueError(f"dispatch {name!r} is already registered")
    _DISPATCHERS[name] = fn
    _TRAITS[name] = traits
    return fn


def available_dispatches() -> tuple[str, ...]:
    return tuple(_DISPATCHERS)


def unavailable(name: str) -> str | None:
    """Why dispatch `name` cannot run in this installation (a missing extra), else None."""
    check_one_of("dispatch", name, _DISPATCHERS)
    missing = _TRAITS[name].missing
    return missing() if missing is not None else None


def runnable_dispatches(platform: str | None = None) -> tuple[str, ...]:
    """The registered dispatches worth running here: their optional packages installed
    and, on CPU (`platform`, default jax's backend), no Pallas interpret mode."""
    platform = platform or jax.default_backend()
    return tuple(name for name in _DISPATCHERS if unavailable(name) is None
                 and not (platform == "cpu" and _TRAITS[name].interpreted_on_cpu))


def check_dispatch(name: str) -> None:
    """ValueError naming the allowed values for an unknown name, or naming the extra to
    install for a dispatch whose optional package is missing (a CLI prints it as one line)."""
    reason = unavailable(name)
    if reason:
        raise ValueError(reason)


def get_dispatch(name: str) -> Dispatcher:
    check_dispatch(name)
    return _DISPATCHERS[name]


def dispatch_traits(name: str) -> DispatchTraits:
    check_one_of("dispatch", name, _DISPATCHERS)
    return _TRAITS[name]


def _ragged_dot(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


register_dispatch("einsum", einsum_dispatch)
# Capacity: [E, C, d] buffers (on CPU: only the kept rows, through the same grouped matmul).
# Dropless: sorted groups through a grouped matmul: on CPU tile-aligned groups through
# moe/kernels/padded_gmm.py (large matmuls per group, no masks); elsewhere the tile-loop XLA
# grouped matmul (work = useful work + one tile per group boundary).
register_dispatch("sort", make_sort_dispatch(xla_gmm.gmm, "sort", grouped_capacity_on=("cpu",),
                                             padded=True))
# Dropless through jax.lax.ragged_dot: native on GPU/TPU, ~E times the work on CPU.
register_dispatch("ragged_dot", make_sort_dispatch(_ragged_dot, "ragged_dot"))
# Dropless through moe.kernels.gmm: Pallas on TPU/GPU, the XLA tile loop on CPU.
register_dispatch("pallas", make_sort_dispatch(kernel_api.dispatch_gmm, "pallas"))
# Expert parallelism over the context mesh (all_to_all in shard_map); the sharding config selects
# it for the MoE layers when the "expert" rule maps to mesh axes of size > 1
# (experiments/runtime/mesh.py `Sharding.configure_dispatch`, moe/dispatch/expert_parallel.py).
# Its default dropless mode ("padded") sizes buffers to the worst case and drops nothing;
# `Sharding.ep_buffer_factor` opts into bounded buffers that drop what overflows (in keep).
register_dispatch("expert_parallel", expert_parallel_dispatch,
                  DispatchTraits(exact_dropless=True, bounded_option="Sharding.ep_buffer_factor"))
# Dropless with the permutation inside the kernels (moe/dispatch/fused.py): rows gathered from
# token order by the first grouped matmul, weighted and scatter-added back by the second.
register_dispatch("pallas_fused", pallas_fused_dispatch, DispatchTraits(interpreted_on_cpu=True))
# tokamax's ragged_dot (the optional `tokamax` extra; moe/dispatch/tokamax_backend.py).
register_dispatch("tokamax", make_sort_dispatch(tokamax_gmm, "tokamax"),
                  DispatchTraits(missing=tokamax_missing))
