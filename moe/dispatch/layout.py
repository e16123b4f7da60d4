"""Where each (token, choice) assignment lives in the expert buffers.

A `RowLayout` maps assignments to rows of a flat expert buffer `[R, d]` and
back. Both directions are stored, so that moving tokens into the buffer and
the results back out are gathers in the forward *and* the backward pass (CPU
scatters are slow):

  token_rows `[T, k] int32`: buffer row of each assignment, R if dropped.
  row_token `[R] int32`: token held by each row, T if the row is empty.
  row_choice `[R] int32`: which of that token's k choices the row holds.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe.dispatch.capacity import assign_slots
from moe.kernels.padded_gmm import padded_rows, padded_starts

Array = jax.Array


class RowLayout(NamedTuple):
    token_rows: Array
    row_token: Array
    row_choice: Array
    keep: Array  # [T, k] bool


def _invert(token_rows: Array, num_rows: int) -> tuple[Array, Array]:
    num_tokens, k = token_rows.shape
    flat_rows = token_rows.reshape(-1)
    tokens = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)
    choices = jnp.tile(jnp.arange(k, dtype=jnp.int32), num_tokens)
    # Dropped assignments point at row R, which is cut off afterwards.
    row_token = jnp.full((num_rows + 1,), num_tokens, jnp.int32).at[flat_rows].set(tokens)
    row_choice = jnp.zeros((num_rows + 1,), jnp.int32).at[flat_rows].set(choices)
    return row_token[:num_rows], row_choice[:num_rows]


def capacity_layout(expert_index: Array, num_experts: int, capacity: int, *,
                    priority: Array | None = None, mask: Array | None = None) -> RowLayout:
    """Row e * C + slot for kept assignments of a `[E, C]` buffer (R = E * C)."""
    slot, keep = assign_slots(expert_index, num_experts, capacity, priority=priority,
                              mask=mask)
    num_rows = num_experts * capacity
    token_rows = jnp.where(keep, expert_index * capacity + slot, num_rows).astype(jnp.int32)
    row_token, row_choice = _invert(token_rows, num_rows)
    return RowLayout(token_rows, row_token, row_choice, keep)


def sorted_layout(expert_index: Array, num_experts: int) -> tuple[RowLayout, Array]:
    """Dropless layout: assignments sorted by expert (R = T * k).

    Returns the layout and `group_sizes [E] int32` (rows per expert).
    """
    flat_expert = expert_index.reshape(-1).astype(jnp.int32)
    num_rows = flat_expert.shape[0]
    order = jnp.argsort(flat_expert, stable=True)
    token_rows = jnp.zeros((num_rows,), jnp.int32).at[order].set(
        jnp.arange(num_rows, dtype=jnp.int32)).reshape(expert_index.shape)
    k = expert_index.shape[1]
    row_token = (order // k).astype(jnp.int32)
    row_choice = (order % k).astype(jnp.int32)
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    keep = jnp.ones(expert_index.shape, bool)
    return RowLayout(token_rows, row_token, row_choice, keep), group_sizes


def _pad_one_row(x: Array) -> Array:
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)


@jax.custom_vjp
def gather_to_rows(x: Array, layout: RowLayout) -> Array:
    """`[T, d]` tokens -> `[R, d]` buffer rows (empty rows are zero)."""
    return _pad_one_row(x)[layout.row_token]


def _gather_fwd(x, layout):
    return gather_to_rows(x, layout), layout


def _gather_bwd(layout, grad_rows):
    # Each token's gradient is the sum over its kept rows: a gather, not a scatter.
    grad_x = jnp.sum(_pad_one_row(grad_rows)[layout.token_rows], axis=1)
    return grad_x, None


gather_to_rows.defvjp(_gather_fwd, _gather_bwd)


@jax.custom_vjp
def combine_from_rows(rows: Array, weights: Array, layout: RowLayout) -> Array:
    """`[R, d]` expert outputs, `[T, k]` weights -> `[T, d]` = sum_j w_tj * row(t, j).

    Dropped assignments contribute zero (their row index R reads a zero row).
    """
    picked = _pad_one_row(rows)[layout.token_rows]  # [T, k, d]
    return jnp.einsum("tkd,tk->td", picked, weights.astype(rows.dtype))


def _combine_fwd(rows, weights, layout):
    return combine_from_rows(rows, weights, layout), (rows, weights, layout)


def row_weights(weights: Array, layout: RowLayout) -> Array:
    """`[R]`: the routing weight of the assignment each buffer row holds (0 for empty rows)."""
    k = weights.shape[1]
    padded_weights = jnp.concatenate([weights, jnp.zeros((1, k), weights.dtype)], axis=0)
    return padded_weights[layout.row_token, layout.row_choice]


def _combine_bwd(residuals, grad_out):
    rows, weights, layout = residuals
    row_weight = row_weights(weights, layout)
    grad_rows = _pad_one_row(grad_out)[layout.row_token] * row_weight[:, None].astype(rows.dtype)
    picked = _pad_one_row(rows)[layout.token_rows]
    grad_weights = jnp.einsum("tkd,td->tk", picked, grad_out).astype(weights.dtype)
    return grad_rows, grad_weights, None


combine_from_rows.defvjp(_combine_fwd, _combine_bwd)


def padded_layout(layout: RowLayout, group_sizes: Array, expert_index: Array,
                  tile_m: int) -> RowLayout:
    """A `sorted_layout` moved to tile-aligned group offsets (`moe.kernels.padded_gmm`).

    expert_index `[T, k]` int32 (values >= E, the sentinel, get no row: token row R),
    group_sizes `[E]` int32 as `sorted_layout` returned them (the rows of groups >= E
    are dropped). R = `padded_rows(T * k, E, tile_m)`; the padding rows hold token T
    (a zero row). Only gathers: the tests that wrap `sorted_layout` still see its call.
    """
    num_tokens, k = expert_index.shape
    num_groups = group_sizes.shape[0]
    num_rows = padded_rows(num_tokens * k, num_groups, tile_m)
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    new_starts, new_sizes = padded_starts(sizes, tile_m)
    shift = new_starts - starts
    expert = expert_index.astype(jnp.int32)
    valid = expert < num_groups
    token_rows = jnp.where(valid, layout.token_rows + shift[jnp.minimum(expert, num_groups - 1)],
                           num_rows)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(new_starts + new_sizes, rows, side="right"),
                        num_groups - 1)
    local = rows - new_starts[group]
    real = (local >= 0) & (local < sizes[group])
    source = jnp.where(real, starts[group] + local, 0)
    return RowLayout(token_rows.astype(jnp.int32),
                     jnp.where(real, layout.row_token[source], num_tokens).astype(jnp.int32),
                     jnp.where(real, layout.row_choice[source], 0).astype(jnp.int32),
                     layout.keep)
