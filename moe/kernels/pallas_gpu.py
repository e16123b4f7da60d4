"""Grouped matmul for GPU: Pallas Triton kernels.

Triton Pallas has no scalar prefetch and no data-dependent BlockSpecs, so the
kernels take the inputs as whole arrays in global memory and load their tiles
themselves, at offsets read from the group metadata (`metadata.py`).

gmm, grid `(tiles_m, tiles_n)`: one program per output tile. It loops over
the visits of its row tile (one per group with rows in the tile; a tile inside
one group has one visit), runs the k loop against that group's weights with a
float32 accumulator, and keeps that group's rows of the result. Rows past
sum(group_sizes) belong to no visit and stay zero. Every output tile is
written by exactly one program, so there are no atomics and no races.

tgmm, grid `(E, tiles_k, tiles_n)`: one program per `[tk, tn]` block of one
group's gradient. It loops over the row tiles of the group, masks rows outside
it, and accumulates `lhs_tile^T @ grad_tile`; an empty group runs no
iteration and writes zeros.

Shapes are zero-padded to whole tiles here and the result sliced back; loads
are therefore never out of bounds and need no masks. Triton wants power-of-two
block shapes of at least 16 for its dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moe.kernels.common import Array, Tiling, pad_axis, pad_gmm_operands
from moe.kernels.metadata import group_metadata, num_tiles


def compiler_params(out_rows: int, out_cols: int) -> pltriton.CompilerParams:
    """Warps by the size of the output tile a program holds; 3-stage k pipeline."""
    return pltriton.CompilerParams(num_warps=8 if out_rows * out_cols >= 128 * 128 else 4,
                                   num_stages=3)


def tile_visit_starts(group_sizes: Array, num_rows: int, tm: int) -> tuple[Array, Array, Array]:
    """Visits by row tile: offsets `[E + 1]`, visit_group `[V]`, starts `[tiles_m + 1]`.

    The visits of row tile t are `visit_group[starts[t]:starts[t + 1]]`.
    """
    meta = group_metadata(group_sizes, num_rows, tm)
    tiles_m = num_tiles(num_rows, tm)
    real = jnp.arange(meta.visit_tile.shape[0]) < meta.num_visits
    # Real visits are sorted by tile; the padding visits sort after all tiles.
    visit_tile = jnp.where(real, meta.visit_tile, tiles_m)
    starts = jnp.searchsorted(visit_tile, jnp.arange(tiles_m + 1), side="left")
    return meta.offsets, meta.visit_group, starts.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype",
                                             "interpret"))
def gmm(lhs: Array, rhs: Array, group_sizes: Array, tiling: Tiling, *,
        transpose_rhs: bool = False, out_dtype=None, interpret: bool = False) -> Array:
    """Grouped matmul `[M, K] x [E, K, N] -> [M, N]` (`out_dtype`, default lhs dtype).

    lhs: `[M, K]`, rows sorted by group. rhs: `[E, K, N]`, or `[E, N, K]` with
    `transpose_rhs`. group_sizes: `[E] int32`, sum <= M; rows past the sum
    come out zero.
    """
    tm, tk, tn = tiling
    num_rows, n = lhs.shape[0], rhs.shape[1 if transpose_rhs else 2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    lhs_p, rhs_p, tiles_k, tiles_n = pad_gmm_operands(lhs, rhs, tiling,
                                                      transpose_rhs=transpose_rhs)
    rows_p = lhs_p.shape[0]
    offsets, visit_group, starts = tile_visit_starts(group_sizes.astype(jnp.int32), rows_p, tm)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(offsets_ref, visit_group_ref, starts_ref, lhs_ref, rhs_ref, out_ref):
        t, j = pl.program_id(0), pl.program_id(1)
        row0, col0 = pl.multiple_of(t * tm, tm), pl.multiple_of(j * tn, tn)
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)

        def visit(v, out):
            group = visit_group_ref[v]

            def k_step(kk, acc):
                k0 = pl.multiple_of(kk * tk, tk)
                x = lhs_ref[pl.ds(row0, tm), pl.ds(k0, tk)]
                if transpose_rhs:
                    w = rhs_ref[group, pl.ds(col0, tn), pl.ds(k0, tk)]
                else:
                    w = rhs_ref[group, pl.ds(k0, tk), pl.ds(col0, tn)]
                return acc + jax.lax.dot_general(x, w, dims,
                                                 preferred_element_type=jnp.float32)

            acc = jax.lax.fori_loop(0, tiles_k, k_step, jnp.zeros((tm, tn), jnp.float32))
            mine = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
            return jnp.where(mine, acc, out)

        out = jax.lax.fori_loop(starts_ref[t], starts_ref[t + 1], visit,
                                jnp.zeros((tm, tn), jnp.float32))
        out_ref[...] = out.astype(out_ref.dtype)

    whole = pl.BlockSpec(memory_space=pl.ANY)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows_p, tiles_n * tn), out_dtype),
        grid=(rows_p // tm, tiles_n),
        in_specs=[whole] * 5,
        out_specs=pl.BlockSpec((tm, tn), lambda t, j: (t, j)),
        compiler_params=compiler_params(tm, tn),
        interpret=interpret,
        name="moe_gmm_triton",
    )
    out = call(offsets, visit_group, starts, lhs_p, rhs_p)
    return out[:num_rows, :n]


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def tgmm(lhs: Array, grad: Array, group_sizes: Array, tiling: Tiling, *,
         out_dtype=None, interpret: bool = False) -> Array:
    """Per-group `lhs_g^T @ grad_g`: `[M, K], [M, N] -> [E, K, N]`; empty groups are zero.

    Rows past sum(group_sizes) belong to no group and are ignored.
    """
    tm, tk, tn = tiling
    k, n = lhs.shape[1], grad.shape[1]
    num_groups = group_sizes.shape[0]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    lhs_p = pad_axis(pad_axis(lhs, 0, tm), 1, tk)
    grad_p = pad_axis(pad_axis(grad, 0, tm), 1, tn)
    tiles_k, tiles_n = lhs_p.shape[1] // tk, grad_p.shape[1] // tn
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])

    def kernel(offsets_ref, lhs_ref, grad_ref, out_ref):
        group, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        k0, col0 = pl.multiple_of(i * tk, tk), pl.multiple_of(j * tn, tn)
        start, end = offsets_ref[group], offsets_ref[group + 1]
        first = start // tm
        stop = jnp.where(end > start, (end + tm - 1) // tm, first)

        def row_step(t, acc):
            row0 = pl.multiple_of(t * tm, tm)
            x = lhs_ref[pl.ds(row0, tm), pl.ds(k0, tk)]
            g = grad_ref[pl.ds(row0, tm), pl.ds(col0, tn)]
            # Mask both operands: rows of other groups must not contribute,
            # not even as NaN from a non-finite value times zero.
            x_rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
            g_rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            x = jnp.where((x_rows >= start) & (x_rows < end), x, jnp.zeros_like(x))
            g = jnp.where((g_rows >= start) & (g_rows < end), g, jnp.zeros_like(g))
            return acc + jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(first, stop, row_step, jnp.zeros((tk, tn), jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)

    whole = pl.BlockSpec(memory_space=pl.ANY)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, tiles_k * tk, tiles_n * tn), out_dtype),
        grid=(num_groups, tiles_k, tiles_n),
        in_specs=[whole] * 3,
        out_specs=pl.BlockSpec((pl.squeezed, tk, tn), lambda g, i, j: (g, i, j)),
        compiler_params=compiler_params(tk, tn),
        interpret=interpret,
        name="moe_tgmm_triton",
    )
    out = call(offsets, lhs_p, grad_p)
    return out[:, :k, :n]
