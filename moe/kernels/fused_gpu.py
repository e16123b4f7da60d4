"""Fused dispatch kernels for GPU (Pallas Triton): grouped matmuls that gather or
scatter-add token rows (the operations of `fused_tpu.py`, same signatures).

As in `pallas_gpu.py`, the kernels take whole arrays in global memory and
load their tiles themselves. The gathered operand is read with an index
vector: the tile's `tm` entries of `row_token` give the rows of `x`, so a
tile load is one gather and the permuted copy is never written.

gmm_scatter, grid `(tiles_m, tiles_n)`: a program computes its output tile
one visit (group) at a time and atomically adds the visit's rows into their
tokens' rows of a float32 `[T + 1, N]` buffer (row T takes the rows of other
groups and past sum(group_sizes), then is cut off). Atomics make the k > 1
duplicates of one token across programs and visits safe. One caveat of the
*interpreter* only: it discharges an atomic add of a tile as a gather plus a
scatter, so two rows of one visit naming the same token (a token routed twice
to one expert, which top-k routing never does) keep one of the two there.

So far these kernels ran in interpret mode and were lowered to Triton, never
compiled on a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moe.kernels.common import Array, Tiling, pad_axis, round_up
from moe.kernels.pallas_gpu import compiler_params, tile_visit_starts

_WHOLE = pl.BlockSpec(memory_space=pl.ANY)


def _dims(transpose_rhs: bool):
    return (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))


def _padded_tokens(row_token: Array, rows_p: int) -> Array:
    return jnp.pad(row_token.astype(jnp.int32), (0, rows_p - row_token.shape[0]))


def _visit_tile(lhs_at, rhs_ref, group, col0, tiles_k: int, tiling: Tiling,
                transpose_rhs: bool) -> Array:
    """`[tm, tn]` float32: the tile's rows (`lhs_at(k0)` loads `[tm, tk]`) times `rhs[group]`."""
    tm, tk, tn = tiling

    def k_step(kk, acc):
        k0 = pl.multiple_of(kk * tk, tk)
        if transpose_rhs:
            w = rhs_ref[group, pl.ds(col0, tn), pl.ds(k0, tk)]
        else:
            w = rhs_ref[group, pl.ds(k0, tk), pl.ds(col0, tn)]
        return acc + jax.lax.dot_general(lhs_at(k0), w, _dims(transpose_rhs),
                                         preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, tiles_k, k_step, jnp.zeros((tm, tn), jnp.float32))


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype",
                                             "interpret"))
def gather_gmm(x: Array, rhs: Array, group_sizes: Array, row_token: Array, tiling: Tiling, *,
               transpose_rhs: bool = False, out_dtype=None, interpret: bool = False) -> Array:
    """`out[r] = x[row_token[r]] @ rhs[g(r)]`: `[T, K], [E, K, N] -> [R, N]`; rows past
    sum(group_sizes) are zero."""
    tm, tk, tn = tiling
    num_rows = row_token.shape[0]
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    n = rhs.shape[n_axis]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    x_p = pad_axis(x, 1, tk)
    rhs_p = pad_axis(pad_axis(rhs, k_axis, tk), n_axis, tn)
    tiles_k, tiles_n = x_p.shape[1] // tk, rhs_p.shape[n_axis] // tn
    rows_p = round_up(num_rows, tm)
    offsets, visit_group, starts = tile_visit_starts(group_sizes.astype(jnp.int32), rows_p, tm)

    def kernel(offsets_ref, visit_group_ref, starts_ref, tokens_ref, x_ref, rhs_ref, out_ref):
        t, j = pl.program_id(0), pl.program_id(1)
        row0, col0 = pl.multiple_of(t * tm, tm), pl.multiple_of(j * tn, tn)
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        tokens = tokens_ref[pl.ds(row0, tm)]

        def visit(v, out):
            group = visit_group_ref[v]
            acc = _visit_tile(lambda k0: x_ref[tokens, pl.ds(k0, tk)], rhs_ref, group, col0,
                              tiles_k, tiling, transpose_rhs)
            mine = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
            return jnp.where(mine, acc, out)

        out = jax.lax.fori_loop(starts_ref[t], starts_ref[t + 1], visit,
                                jnp.zeros((tm, tn), jnp.float32))
        out_ref[...] = out.astype(out_ref.dtype)

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows_p, tiles_n * tn), out_dtype),
        grid=(rows_p // tm, tiles_n),
        in_specs=[_WHOLE] * 6,
        out_specs=pl.BlockSpec((tm, tn), lambda t, j: (t, j)),
        compiler_params=compiler_params(tm, tn),
        interpret=interpret,
        name="moe_gather_gmm_triton",
    )
    out = call(offsets, visit_group, starts, _padded_tokens(row_token, rows_p), x_p, rhs_p)
    return out[:num_rows, :n]


@functools.partial(jax.jit, static_argnames=("num_tokens", "tiling", "transpose_rhs",
                                             "interpret"))
def gmm_scatter(lhs: Array, rhs: Array, group_sizes: Array, row_token: Array, num_tokens: int,
                tiling: Tiling, *, transpose_rhs: bool = False,
                interpret: bool = False) -> Array:
    """`y[t] = sum_{r: row_token[r] = t} lhs[r] @ rhs[g(r)]`: `[R, K] -> [T, N]` float32;
    rows past sum(group_sizes) are not added anywhere."""
    tm, tk, tn = tiling
    n = rhs.shape[2 - transpose_rhs]
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    lhs_p = pad_axis(pad_axis(lhs, 0, tm), 1, tk)
    rhs_p = pad_axis(pad_axis(rhs, k_axis, tk), n_axis, tn)
    rows_p, tiles_k, tiles_n = lhs_p.shape[0], lhs_p.shape[1] // tk, rhs_p.shape[n_axis] // tn
    offsets, visit_group, starts = tile_visit_starts(group_sizes.astype(jnp.int32), rows_p, tm)
    zeros = jnp.zeros((num_tokens + 1, tiles_n * tn), jnp.float32)

    def kernel(offsets_ref, visit_group_ref, starts_ref, tokens_ref, lhs_ref, rhs_ref, _,
               y_ref):
        t, j = pl.program_id(0), pl.program_id(1)
        row0, col0 = pl.multiple_of(t * tm, tm), pl.multiple_of(j * tn, tn)
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 1)
        tokens = jnp.broadcast_to(tokens_ref[pl.ds(row0, tm)][:, None], (tm, tn))

        def visit(v, carry):
            group = visit_group_ref[v]
            acc = _visit_tile(lambda k0: lhs_ref[pl.ds(row0, tm), pl.ds(k0, tk)], rhs_ref,
                              group, col0, tiles_k, tiling, transpose_rhs)
            mine = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
            # Rows of other groups go to the spare row T, with zeros.
            target = jnp.where(mine, tokens, num_tokens)
            pltriton.atomic_add(y_ref, (target, cols), jnp.where(mine, acc, 0.0))
            return carry

        jax.lax.fori_loop(starts_ref[t], starts_ref[t + 1], visit, 0)

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(zeros.shape, jnp.float32),
        grid=(rows_p // tm, tiles_n),
        in_specs=[_WHOLE] * 7,
        out_specs=_WHOLE,
        input_output_aliases={6: 0},
        compiler_params=compiler_params(tm, tn),
        interpret=interpret,
        name="moe_gmm_scatter_triton",
    )
    y = call(offsets, visit_group, starts, _padded_tokens(row_token, rows_p), lhs_p, rhs_p,
             zeros)
    return y[:num_tokens, :n]


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def gather_tgmm(x: Array, grad: Array, group_sizes: Array, row_token: Array, tiling: Tiling, *,
                out_dtype=None, interpret: bool = False) -> Array:
    """`out[g] = sum_{r in g} x[row_token[r]]^T grad[r]`: `[T, K], [R, N] -> [E, K, N]`;
    empty groups give zeros, rows past sum(group_sizes) are ignored."""
    tm, tk, tn = tiling
    k, n = x.shape[1], grad.shape[1]
    num_groups = group_sizes.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    x_p = pad_axis(x, 1, tk)
    grad_p = pad_axis(pad_axis(grad, 0, tm), 1, tn)
    rows_p, tiles_k, tiles_n = grad_p.shape[0], x_p.shape[1] // tk, grad_p.shape[1] // tn
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])

    def kernel(offsets_ref, tokens_ref, x_ref, grad_ref, out_ref):
        group, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        k0, col0 = pl.multiple_of(i * tk, tk), pl.multiple_of(j * tn, tn)
        start, end = offsets_ref[group], offsets_ref[group + 1]
        first = start // tm
        stop = jnp.where(end > start, (end + tm - 1) // tm, first)

        def row_step(t, acc):
            row0 = pl.multiple_of(t * tm, tm)
            xs = x_ref[tokens_ref[pl.ds(row0, tm)], pl.ds(k0, tk)]
            g = grad_ref[pl.ds(row0, tm), pl.ds(col0, tn)]
            x_rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
            g_rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            xs = jnp.where((x_rows >= start) & (x_rows < end), xs, jnp.zeros_like(xs))
            g = jnp.where((g_rows >= start) & (g_rows < end), g, jnp.zeros_like(g))
            return acc + jax.lax.dot_general(xs, g, (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(first, stop, row_step, jnp.zeros((tk, tn), jnp.float32))
        out_ref[...] = acc.astype(out_ref.dtype)

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, tiles_k * tk, tiles_n * tn), out_dtype),
        grid=(num_groups, tiles_k, tiles_n),
        in_specs=[_WHOLE] * 4,
        out_specs=pl.BlockSpec((pl.squeezed, tk, tn), lambda g, i, j: (g, i, j)),
        compiler_params=compiler_params(tk, tn),
        interpret=interpret,
        name="moe_gather_tgmm_triton",
    )
    out = call(offsets, _padded_tokens(row_token, rows_p), x_p, grad_p)
    return out[:, :k, :n]
