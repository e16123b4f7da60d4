"""Token-choice dispatch implementations behind one interface.

A dispatcher computes, for tokens `x [T, d]` and a token-choice routing,

    y_t = sum over kept choices j of weights[t, j] * Expert_{expert_index[t, j]}(x_t)

Signature of every dispatcher (registered by name in `registry.py`):

    fn(x, expert_index, weights, ffn, *, capacity, priority=None, mask=None)
        -> DispatchOutput

`capacity=None` means dropless. `mask [T]` marks real tokens: padding takes no
capacity slot (callers also zero its weights). All implementations agree whenever nothing is
dropped; `einsum` is the reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe.dispatch.capacity import assign_slots
from moe.dispatch.layout import (
    RowLayout,
    capacity_layout,
    combine_from_rows,
    gather_to_rows,
    padded_layout,
    row_weights,
    sorted_layout,
)
from moe.experts import ExpertFFN, GroupedMatmul
from moe.kernels import padded_fused, padded_gmm

Array = jax.Array


class DispatchOutput(NamedTuple):
    """y `[T, d]` combined expert outputs; keep `[T, k] bool` (False = dropped)."""

    y: Array
    keep: Array


def einsum_dispatch(x: Array, expert_index: Array, weights: Array, ffn: ExpertFFN, *,
                    capacity: int | None, priority: Array | None = None,
                    mask: Array | None = None) -> DispatchOutput:
    """GShard-style one-hot masks. Capacity mode: `[T, E, C]` dispatch/combine
    tensors. Dropless: every expert on every token, weighted by a `[T, E]`
    combine matrix (E times the work; a reference, not a fast path)."""
    num_experts = ffn.num_experts
    expert_one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=x.dtype)  # [T, k, E]
    if capacity is None:
        combine = jnp.einsum("tke,tk->te", expert_one_hot, weights.astype(x.dtype))
        y = jnp.einsum("te,etd->td", combine, ffn.all_experts(x))
        return DispatchOutput(y, jnp.ones(expert_index.shape, bool))
    slot, keep = assign_slots(expert_index, num_experts, capacity, priority=priority, mask=mask)
    slot_one_hot = jax.nn.one_hot(jnp.where(keep, slot, capacity), capacity, dtype=x.dtype)
    dispatch_mask = jnp.einsum("tke,tkc->tec", expert_one_hot, slot_one_hot)  # [T, E, C]
    combine = jnp.einsum("tke,tkc,tk->tec", expert_one_hot, slot_one_hot,
                         weights.astype(x.dtype))
    expert_inputs = jnp.einsum("tec,td->ecd", dispatch_mask, x)
    y = jnp.einsum("tec,ecd->td", combine, ffn.batched(expert_inputs))
    return DispatchOutput(y, keep)


def capacity_sort_dispatch(x: Array, expert_index: Array, weights: Array, ffn: ExpertFFN, *,
                           capacity: int, priority: Array | None = None,
                           mask: Array | None = None) -> DispatchOutput:
    """Gather kept assignments into `[E, C, d]` buffers, one batched matmul, gather back."""
    num_experts, d = ffn.num_experts, x.shape[-1]
    layout = capacity_layout(expert_index, num_experts, capacity, priority=priority, mask=mask)
    buffers = gather_to_rows(x, layout).reshape(num_experts, capacity, d)
    outputs = ffn.batched(buffers).reshape(num_experts * capacity, d)
    return DispatchOutput(combine_from_rows(outputs, weights, layout), layout.keep)


# (tile_m, chunk_m) of `moe.kernels.padded_gmm`: the grouped rows are laid out
# tile-aligned and go through the fused padded matmuls (`moe.kernels.padded_fused`).
PaddedPlan = tuple[int, int]


def _grouped_layout(expert_index: Array, num_groups: int, num_experts: int,
                    padded: PaddedPlan | None) -> tuple[RowLayout, Array]:
    """The rows sorted by expert (`sorted_layout` over `num_groups` groups, of which the
    first `num_experts` are computed), moved to tile-aligned offsets when `padded`."""
    layout, group_sizes = sorted_layout(expert_index, num_groups)
    group_sizes = group_sizes[:num_experts]
    if padded is not None:
        layout = padded_layout(layout, group_sizes, expert_index, padded[0])
    return layout, group_sizes


def rows_through_experts(x: Array, layout: RowLayout, group_sizes: Array, weights: Array,
                          ffn: ExpertFFN, gmm: GroupedMatmul,
                          padded: PaddedPlan | None) -> Array:
    """`[T, d]`: the layout's rows through their experts, combined with `weights [T, k]`.

    Unpadded: the rows are gathered into an `[R, d]` buffer, go through `gmm`, and are
    gathered back. Padded: the gather and the weighted combine happen inside the
    grouped matmuls' loops (`padded_fused`), so no `[R, d]` buffer exists in either pass.
    """
    if padded is None:
        outputs = ffn.grouped(gather_to_rows(x, layout), group_sizes, gmm)
        return combine_from_rows(outputs, weights, layout)
    tile_m, chunk_m = padded
    rows = layout.row_token  # T on padding rows: a zero row in, dropped on the way out

    def project(w: Array) -> Array:
        return padded_fused.gather_gmm(x, w, group_sizes, rows, tile_m, chunk_m)

    gate = None if ffn.wi_gate is None else project(ffn.wi_gate)
    return padded_fused.gmm_scatter(project(ffn.wi), gate, ffn.wo, group_sizes, rows,
                                    row_weights(weights, layout), x.shape[0], ffn.activation,
                                    tile_m, chunk_m).astype(x.dtype)


def grouped_dispatch(x: Array, expert_index: Array, weights: Array, ffn: ExpertFFN,
                     gmm: GroupedMatmul, padded: PaddedPlan | None = None) -> DispatchOutput:
    """Dropless: sort the T*k assignments by expert, grouped matmul, unsort and combine.
    `padded`: tile-aligned groups through the fused padded matmuls (`gmm` unused)."""
    layout, group_sizes = _grouped_layout(expert_index, ffn.num_experts, ffn.num_experts,
                                          padded)
    y = rows_through_experts(x, layout, group_sizes, weights, ffn, gmm, padded)
    return DispatchOutput(y, layout.keep)


# Mean assignments per expert from which `make_sort_dispatch(grouped_capacity_on=...)`
# computes capacity mode through the grouped matmul (measured on CPU, f32, d_model 512:
# 2048 rows per expert 1.25x vs 1.36x dense for the buffers, 1024 rows even, 64 rows the
# buffers ~1.5x faster).
GROUPED_CAPACITY_MIN_ROWS = 1024


def grouped_capacity_dispatch(x: Array, expert_index: Array, weights: Array, ffn: ExpertFFN,
                              gmm: GroupedMatmul, *, capacity: int,
                              priority: Array | None = None,
                              mask: Array | None = None,
                              padded: PaddedPlan | None = None) -> DispatchOutput:
    """Capacity mode computing only the kept assignments: the same slots and drops as
    `capacity_sort_dispatch` (`assign_slots`), but the kept rows go sorted by expert
    through `gmm` instead of into `[E, C, d]` buffers, so the empty slots cost nothing.
    Dropped assignments (and padding) sort into a sentinel group E that `gmm` skips.
    `padded` as in `grouped_dispatch`."""
    num_experts = ffn.num_experts
    _, keep = assign_slots(expert_index, num_experts, capacity, priority=priority, mask=mask)
    layout, group_sizes = _grouped_layout(jnp.where(keep, expert_index, num_experts),
                                          num_experts + 1, num_experts, padded)
    layout = layout._replace(keep=keep)
    y = rows_through_experts(x, layout, group_sizes, weights * keep, ffn, gmm, padded)
    return DispatchOutput(y, keep)


# Platforms on which the `sort` dispatch lays its grouped rows out tile-aligned and runs
# `moe.kernels.padded_gmm` (dropless, and capacity mode's grouped path) instead of the
# tile loop of `moe.kernels.xla_gmm`; `padded_layout_on(...)` overrides it while tracing
# (the benchmarks time the tile loop beside it). Measured on CPU (docs/cpu_targets.md):
# faster at every shape timed (256 to 1024 rows per expert).
_PADDED_ON: list[tuple[str, ...]] = [("cpu",)]


@contextlib.contextmanager
def padded_layout_on(platforms: tuple[str, ...]) -> Iterator[None]:
    """Within the block, dispatches made by `make_sort_dispatch(padded=True)` trace the
    padded layout on `platforms` only (e.g. `()`: the tile loop everywhere)."""
    _PADDED_ON.append(tuple(platforms))
    try:
        yield
    finally:
        _PADDED_ON.pop()


def padded_layout_active() -> bool:
    """Whether `make_sort_dispatch(padded=True)` dispatches trace the padded layout here."""
    return jax.default_backend() in _PADDED_ON[-1]


def make_sort_dispatch(gmm: GroupedMatmul, name: str, *,
                       grouped_capacity_on: tuple[str, ...] = (),
                       padded: bool = False) -> Callable[..., DispatchOutput]:
    """A dispatcher that uses capacity buffers when given a capacity, else `gmm`.

    `grouped_capacity_on`: platforms (`jax.default_backend()` at trace time) on which
    capacity mode runs `grouped_capacity_dispatch` instead of the buffers when the
    experts average at least `GROUPED_CAPACITY_MIN_ROWS` assignments (the same drops and
    values; on CPU the empty slots cost more than the grouped matmul at that size, and
    less below it: docs/cpu_targets.md).
    `padded`: on the platforms of `_PADDED_ON`, when the experts average at least one
    tile (`padded_gmm.DEFAULT_TILE_M`) of rows, the grouped rows are laid out tile-aligned
    (`padded_layout`) and go through the fused padded matmuls (`moe.kernels.padded_fused`:
    the permutation inside `moe.kernels.padded_gmm`'s loops) instead of `gmm`."""

    def padded_plan(num_rows: int, num_experts: int) -> PaddedPlan | None:
        tile = padded_gmm.DEFAULT_TILE_M  # the layout's and the matmul's tile must agree
        # Below a tile per expert on average the padding would at least double the rows
        # (and tiny shapes would pay the padded path's longer compile for nothing).
        if padded and padded_layout_active() and num_rows >= tile * num_experts:
            return tile, padded_gmm.chunk_for(num_rows, num_experts, tile)
        return None

    def dispatch(x, expert_index, weights, ffn, *, capacity, priority=None, mask=None):
        plan = padded_plan(expert_index.size, ffn.num_experts)
        if capacity is not None:
            if (jax.default_backend() in grouped_capacity_on
                    and expert_index.size >= GROUPED_CAPACITY_MIN_ROWS * ffn.num_experts):
                return grouped_capacity_dispatch(x, expert_index, weights, ffn, gmm,
                                                 capacity=capacity, priority=priority,
                                                 mask=mask, padded=plan)
            return capacity_sort_dispatch(x, expert_index, weights, ffn, capacity=capacity,
                                          priority=priority, mask=mask)
        return grouped_dispatch(x, expert_index, weights, ffn, gmm, padded=plan)

    grouped_note = (f" (on {', '.join(grouped_capacity_on)} with large groups: the kept "
                    "rows through the grouped matmul)") if grouped_capacity_on else ""
    padded_note = (" (on CPU: tile-aligned groups through `moe.kernels.padded_fused`)"
                   if padded else "")
    dispatch.__name__ = f"{name}_dispatch"
    dispatch.__doc__ = (f"Capacity mode: `[E, C, d]` buffers{grouped_note}. Dropless: sorted "
                        f"groups through the {name} grouped matmul{padded_note}.")
    return dispatch


def expert_choice_dispatch(x: Array, token_index: Array, weights: Array,
                           ffn: ExpertFFN) -> Array:
    """Expert choice: expert e processes tokens `token_index[e]` `[E, C]`.

    Returns y `[T, d]` = sum over (e, c) with token_index[e, c] = t of
    weights[e, c] * Expert_e(x_t). A token may be processed by 0..E experts.
    """
    expert_inputs = x[token_index]  # [E, C, d]
    outputs = ffn.batched(expert_inputs) * weights[..., None].astype(x.dtype)
    d = x.shape[-1]
    return jnp.zeros_like(x).at[token_index.reshape(-1)].add(outputs.reshape(-1, d))
