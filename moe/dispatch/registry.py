"""Dispatch implementations, selected by name.

Adding one is one function plus one `register_dispatch` call; `MoeLayer`
validates its `dispatch=` argument against `available_dispatches()`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from moe.dispatch.dispatchers import DispatchOutput, einsum_dispatch, make_sort_dispatch
from moe.dispatch.expert_parallel import expert_parallel_dispatch
from moe.kernels import api as kernel_api
from moe.kernels import xla_gmm
from moe.validation import check_one_of

Dispatcher = Callable[..., DispatchOutput]

_DISPATCHERS: dict[str, Dispatcher] = {}


def register_dispatch(name: str, fn: Dispatcher) -> Dispatcher:
    if name in _DISPATCHERS:
        raise ValueError(f"dispatch {name!r} is already registered")
    _DISPATCHERS[name] = fn
    return fn


def available_dispatches() -> tuple[str, ...]:
    return tuple(_DISPATCHERS)


def get_dispatch(name: str) -> Dispatcher:
    check_one_of("dispatch", name, _DISPATCHERS)
    return _DISPATCHERS[name]


def _ragged_dot(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


register_dispatch("einsum", einsum_dispatch)
# Capacity: [E, C, d] buffers. Dropless: sorted groups through the tile-loop XLA
# grouped matmul, fast on CPU (work = useful work + one tile per group boundary).
register_dispatch("sort", make_sort_dispatch(xla_gmm.gmm, "sort"))
# Dropless through jax.lax.ragged_dot: native on GPU/TPU, ~E times the work on CPU.
register_dispatch("ragged_dot", make_sort_dispatch(_ragged_dot, "ragged_dot"))
# Dropless through moe.kernels.gmm: Pallas on TPU/GPU, the XLA tile loop on CPU.
register_dispatch("pallas", make_sort_dispatch(kernel_api.dispatch_gmm, "pallas"))
# Expert parallelism over the context mesh (all_to_all in shard_map); the sharding config selects
# it for the MoE layers when the "expert" rule maps to mesh axes of size > 1
# (experiments/runtime/mesh.py `Sharding.configure_dispatch`, moe/dispatch/expert_parallel.py).
register_dispatch("expert_parallel", expert_parallel_dispatch)
