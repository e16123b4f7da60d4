"""Grouped matmul in plain XLA: a loop over tile visits (see `metadata.py`).

This is the fast CPU path. `jax.lax.ragged_dot` lowers to a dense matmul on
CPU and costs about E times the useful work; this loop does each visited tile
with one ordinary matmul against its group's weights, so the work is the
useful work plus at most one extra tile per group boundary.

The loop runs only over the visits actually used (a dynamic trip count), so
`jax.grad` cannot differentiate it directly; `gmm` carries a custom VJP built
from the same loop (`tgmm` for the weight gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe.kernels.metadata import group_metadata, num_tiles

Array = jax.Array

DEFAULT_TILE_M = 256


def accumulator_dtype(*dtypes) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs (float32 accumulation), float64 under x64."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _pad_rows(x: Array, tile_m: int) -> Array:
    pad = num_tiles(x.shape[0], tile_m) * tile_m - x.shape[0]
    return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _row_mask(meta, group: Array, tile: Array, tile_m: int) -> Array:
    rows = tile * tile_m + jnp.arange(tile_m, dtype=jnp.int32)
    return (rows >= meta.offsets[group]) & (rows < meta.offsets[group + 1])


def gmm_forward(lhs: Array, rhs: Array, group_sizes: Array, tile_m: int,
                out_dtype=None) -> Array:
    """`[M, K] x [E, K, N] -> [M, N]`, no VJP. Rows past sum(group_sizes) are zero."""
    num_rows = lhs.shape[0]
    out_dtype = out_dtype or lhs.dtype
    meta = group_metadata(group_sizes, num_rows, tile_m)
    lhs_p = _pad_rows(lhs, tile_m)
    out = jnp.zeros((lhs_p.shape[0], rhs.shape[2]), out_dtype)
    acc_dtype = accumulator_dtype(lhs.dtype, rhs.dtype)

    def body(v, out):
        group, tile = meta.visit_group[v], meta.visit_tile[v]
        rows = jax.lax.dynamic_slice_in_dim(lhs_p, tile * tile_m, tile_m)
        weights = jax.lax.dynamic_index_in_dim(rhs, group, keepdims=False)
        result = jnp.dot(rows, weights, preferred_element_type=acc_dtype).astype(out_dtype)
        current = jax.lax.dynamic_slice_in_dim(out, tile * tile_m, tile_m)
        mask = _row_mask(meta, group, tile, tile_m)[:, None]
        return jax.lax.dynamic_update_slice_in_dim(
            out, jnp.where(mask, result, current), tile * tile_m, 0)

    out = jax.lax.fori_loop(0, meta.num_visits, body, out)
    return out[:num_rows]


def tgmm_forward(lhs: Array, grad: Array, group_sizes: Array, tile_m: int,
                 out_dtype=None) -> Array:
    """Per-group `lhs_g^T @ grad_g`: `[M, K], [M, N] -> [E, K, N]`; empty groups are zero."""
    num_rows = lhs.shape[0]
    num_groups = group_sizes.shape[0]
    out_dtype = out_dtype or lhs.dtype
    meta = group_metadata(group_sizes, num_rows, tile_m)
    lhs_p, grad_p = _pad_rows(lhs, tile_m), _pad_rows(grad, tile_m)
    acc_dtype = accumulator_dtype(lhs.dtype, grad.dtype)
    acc = jnp.zeros((num_groups, lhs.shape[1], grad.shape[1]), acc_dtype)

    def body(v, acc):
        group, tile = meta.visit_group[v], meta.visit_tile[v]
        mask = _row_mask(meta, group, tile, tile_m)[:, None]
        rows = jax.lax.dynamic_slice_in_dim(lhs_p, tile * tile_m, tile_m)
        rows = jnp.where(mask, rows, jnp.zeros_like(rows))
        grads = jax.lax.dynamic_slice_in_dim(grad_p, tile * tile_m, tile_m)
        grads = jnp.where(mask, grads, jnp.zeros_like(grads))  # 0 * NaN would leak into the group
        contribution = jnp.dot(rows.T, grads, preferred_element_type=acc_dtype)
        current = jax.lax.dynamic_index_in_dim(acc, group, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(acc, current + contribution, group, 0)

    acc = jax.lax.fori_loop(0, meta.num_visits, body, acc)
    return acc.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(lhs: Array, rhs: Array, group_sizes: Array, tile_m: int = DEFAULT_TILE_M) -> Array:
    """Differentiable grouped matmul `[M, K] x [E, K, N] -> [M, N]` in plain XLA."""
    return gmm_forward(lhs, rhs, group_sizes, tile_m)


def _gmm_fwd(lhs, rhs, group_sizes, tile_m):
    return gmm_forward(lhs, rhs, group_sizes, tile_m), (lhs, rhs, group_sizes)


def _gmm_bwd(tile_m, residuals, grad):
    lhs, rhs, group_sizes = residuals
    grad_lhs = gmm_forward(grad, jnp.swapaxes(rhs, 1, 2), group_sizes, tile_m, lhs.dtype)
    grad_rhs = tgmm_forward(lhs, grad, group_sizes, tile_m, rhs.dtype)
    return grad_lhs, grad_rhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def tgmm(lhs: Array, grad: Array, group_sizes: Array, tile_m: int = DEFAULT_TILE_M) -> Array:
    """Per-group `lhs_g^T @ grad_g` `[E, K, N]` in plain XLA."""
    return tgmm_forward(lhs, grad, group_sizes, tile_m)
