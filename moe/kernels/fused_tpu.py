"""Fused dispatch kernels for TPU: grouped matmuls that gather or scatter-add token rows.

The dispatch permutation (tokens -> rows sorted by expert -> tokens) lives in
`row_token [R] int32`: sorted row r holds token `row_token[r]`. These kernels
never materialise the permuted copy of the activations:

  gather_gmm   out[r] = x[row_token[r]] @ rhs[g(r)]              `[R, N]`
  gmm_scatter  y[t]   = sum over rows r of token t of lhs[r] @ rhs[g(r)]   `[T, N]` f32
  gather_tgmm  out[g] = sum over rows r of group g of x[row_token[r]]^T grad[r]   `[E, K, N]`

They follow `pallas_tpu.py` (megablox visits, scalar-prefetched metadata).
The gathered operand stays in HBM (`pl.ANY`); each grid step DMAs its `tm`
rows (`tk` columns) into a VMEM buffer, one DMA per row, started together and
then awaited. `row_token` is scalar-prefetched into SMEM with the metadata
(R int32: 64 KiB at R = 16384).

gmm_scatter keeps the whole `[T, tn]` float32 output block resident in VMEM
for one column tile `j` (the grid walks every visit and k step of `j` before
the next `j`), and its epilogue adds each row of the visit's group into its
token's row: a serial read-add-write per row, so a token met twice (k > 1)
accumulates correctly. The `[T, tn]` block bounds T: `scatter_tile_n` shrinks
tn so that the double-buffered block stays within 16 MiB.

Rows past sum(group_sizes) (masked assignments) are zero in gather_gmm and
are neither scattered nor contracted. Hardware tiles as in `pallas_tpu.py`:
tm a multiple of 8 (16 for 16-bit), tk and tn multiples of 128. So far these
kernels ran in interpret mode and were lowered to Mosaic, never compiled on a
TPU (docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moe.kernels.common import Array, Tiling, pad_axis, round_up
from moe.kernels.metadata import group_metadata, metadata_with_tail
from moe.kernels.pallas_tpu import _row_mask, _vmem_limit

_SCATTER_BLOCK_BYTES = 8 << 20  # one [T, tn] f32 output block of gmm_scatter


def scatter_tile_n(num_tokens: int, tn: int) -> int:
    """The largest tn' <= tn (a multiple of 128, at least 128) whose `[T, tn']` f32 block
    fits `_SCATTER_BLOCK_BYTES`."""
    fit = _SCATTER_BLOCK_BYTES // (4 * max(num_tokens, 1))
    return max(128, min(tn, fit // 128 * 128))


def _gather_rows(x_hbm, row_token, base, k0, buf, sem, tm: int, tk: int) -> None:
    """DMA rows `x[row_token[base + r], k0:k0 + tk]`, r < tm, into `buf [tm, tk]`."""

    def copy(r, token):
        return pltpu.make_async_copy(x_hbm.at[pl.ds(token, 1), pl.ds(k0, tk)],
                                     buf.at[pl.ds(r, 1)], sem)

    def start(r, carry):
        copy(r, row_token[base + r]).start()
        return carry

    def wait(r, carry):
        copy(r, 0).wait()  # a wait needs only the shape of the copy
        return carry

    jax.lax.fori_loop(0, tm, start, 0)
    jax.lax.fori_loop(0, tm, wait, 0)


def _padded_tokens(row_token: Array, rows_p: int) -> Array:
    return jnp.pad(row_token.astype(jnp.int32), (0, rows_p - row_token.shape[0]))


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype",
                                             "interpret"))
def gather_gmm(x: Array, rhs: Array, group_sizes: Array, row_token: Array, tiling: Tiling, *,
               transpose_rhs: bool = False, out_dtype=None, interpret=False) -> Array:
    """`out[r] = x[row_token[r]] @ rhs[g(r)]`: `[T, K], [E, K, N] -> [R, N]`.

    rhs is `[E, N, K]` with `transpose_rhs`. group_sizes `[E] int32` sums to at
    most R; rows past the sum come out zero.
    """
    tm, tk, tn = tiling
    num_rows, num_groups = row_token.shape[0], rhs.shape[0]
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    n = rhs.shape[n_axis]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    x_p = pad_axis(x, 1, tk)
    rhs_p = pad_axis(pad_axis(rhs, k_axis, tk), n_axis, tn)
    tiles_k, tiles_n = x_p.shape[1] // tk, rhs_p.shape[n_axis] // tn
    rows_p = round_up(num_rows, tm)
    meta = metadata_with_tail(group_sizes, rows_p, tm)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(offsets, visit_group, visit_tile, tokens, x_hbm, rhs_ref, out_ref, acc_ref,
               buf, sem):
        v, kk = pl.program_id(1), pl.program_id(2)
        group = visit_group[v]

        @pl.when(kk == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(group < num_groups)
        def _accumulate():
            _gather_rows(x_hbm, tokens, visit_tile[v] * tm, pl.multiple_of(kk * tk, tk),
                         buf, sem, tm, tk)
            acc_ref[...] += jax.lax.dot_general(buf[...], rhs_ref[...], dims,
                                                preferred_element_type=jnp.float32)

        @pl.when(kk == tiles_k - 1)
        def _store():
            mine = _row_mask(offsets, group, visit_tile[v], (tm, tn))
            out_ref[...] = jnp.where(mine, acc_ref[...],
                                     out_ref[...].astype(jnp.float32)).astype(out_dtype)

    def rhs_map(j, v, kk, offsets, visit_group, visit_tile, tokens):
        group = visit_group[v]
        kk = jnp.where(group < num_groups, kk, 0)
        group = jnp.minimum(group, num_groups - 1)
        return (group, j, kk) if transpose_rhs else (group, kk, j)

    def out_map(j, v, kk, offsets, visit_group, visit_tile, tokens):
        return visit_tile[v], j

    rhs_block = (pl.squeezed, tn, tk) if transpose_rhs else (pl.squeezed, tk, tn)
    itemsize = x.dtype.itemsize
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows_p, tiles_n * tn), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_n, meta.num_visits, tiles_k),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32), pltpu.VMEM((tm, tk), x.dtype),
                            pltpu.SemaphoreType.DMA(())],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=_vmem_limit((tm * tk + tk * tn) * itemsize,
                                         tm * tn * out_dtype.itemsize, tm * tn * 4)),
        interpret=interpret,
        name="moe_gather_gmm_tpu",
    )
    out = call(meta.offsets, meta.visit_group, meta.visit_tile, _padded_tokens(row_token, rows_p),
               x_p, rhs_p)
    return out[:num_rows, :n]


@functools.partial(jax.jit, static_argnames=("num_tokens", "tiling", "transpose_rhs",
                                             "interpret"))
def gmm_scatter(lhs: Array, rhs: Array, group_sizes: Array, row_token: Array, num_tokens: int,
                tiling: Tiling, *, transpose_rhs: bool = False, interpret=False) -> Array:
    """`y[t] = sum_{r: row_token[r] = t} lhs[r] @ rhs[g(r)]`: `[R, K] -> [T, N]` float32.

    Rows past sum(group_sizes) are not added anywhere.
    """
    tm, tk, tn = tiling
    num_groups = rhs.shape[0]
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    n = rhs.shape[n_axis]
    tokens_p = round_up(max(num_tokens, 1), 8)
    lhs_p = pad_axis(pad_axis(lhs, 0, tm), 1, tk)
    rhs_p = pad_axis(pad_axis(rhs, k_axis, tk), n_axis, tn)
    rows_p, tiles_k, tiles_n = lhs_p.shape[0], lhs_p.shape[1] // tk, rhs_p.shape[n_axis] // tn
    meta = metadata_with_tail(group_sizes, rows_p, tm)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(offsets, visit_group, visit_tile, tokens, lhs_ref, rhs_ref, y_ref, acc_ref):
        v, kk = pl.program_id(1), pl.program_id(2)
        group = visit_group[v]

        @pl.when((v == 0) & (kk == 0))
        def _zero_output():
            y_ref[...] = jnp.zeros_like(y_ref)

        @pl.when(kk == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(group < num_groups)
        def _accumulate():
            acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                                                preferred_element_type=jnp.float32)

        @pl.when((kk == tiles_k - 1) & (group < num_groups))
        def _scatter():
            base = visit_tile[v] * tm
            lo = jnp.clip(offsets[group] - base, 0, tm)
            hi = jnp.clip(offsets[group + 1] - base, 0, tm)

            def add_row(r, carry):
                token = tokens[base + r]
                y_ref[pl.ds(token, 1), :] += acc_ref[pl.ds(r, 1), :]
                return carry

            jax.lax.fori_loop(lo, hi, add_row, 0)

    def lhs_map(j, v, kk, offsets, visit_group, visit_tile, tokens):
        return visit_tile[v], jnp.where(visit_group[v] < num_groups, kk, 0)

    def rhs_map(j, v, kk, offsets, visit_group, visit_tile, tokens):
        group = visit_group[v]
        kk = jnp.where(group < num_groups, kk, 0)
        group = jnp.minimum(group, num_groups - 1)
        return (group, j, kk) if transpose_rhs else (group, kk, j)

    def y_map(j, v, kk, offsets, visit_group, visit_tile, tokens):
        return 0, j

    rhs_block = (pl.squeezed, tn, tk) if transpose_rhs else (pl.squeezed, tk, tn)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tokens_p, tiles_n * tn), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_n, meta.num_visits, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tokens_p, tn), y_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=_vmem_limit((tm * tk + tk * tn) * lhs.dtype.itemsize,
                                         tokens_p * tn * 4, tm * tn * 4)),
        interpret=interpret,
        name="moe_gmm_scatter_tpu",
    )
    y = call(meta.offsets, meta.visit_group, meta.visit_tile, _padded_tokens(row_token, rows_p),
             lhs_p, rhs_p)
    return y[:num_tokens, :n]


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def gather_tgmm(x: Array, grad: Array, group_sizes: Array, row_token: Array, tiling: Tiling, *,
                out_dtype=None, interpret=False) -> Array:
    """`out[g] = sum_{r in g} x[row_token[r]]^T grad[r]`: `[T, K], [R, N] -> [E, K, N]`.

    Empty groups give zeros; rows past sum(group_sizes) are ignored.
    """
    tm, tk, tn = tiling
    k, n = x.shape[1], grad.shape[1]
    num_groups = group_sizes.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    x_p = pad_axis(x, 1, tk)
    grad_p = pad_axis(pad_axis(grad, 0, tm), 1, tn)
    rows_p, tiles_k, tiles_n = grad_p.shape[0], x_p.shape[1] // tk, grad_p.shape[1] // tn
    meta = group_metadata(group_sizes.astype(jnp.int32), rows_p, tm, visit_empty_groups=True)

    def kernel(offsets, visit_group, visit_tile, tokens, x_hbm, grad_ref, out_ref, acc_ref,
               buf, sem):
        kk, v, last = pl.program_id(0), pl.program_id(2), pl.num_programs(2) - 1
        group = visit_group[v]
        group_starts = (v == 0) | (visit_group[jnp.maximum(v - 1, 0)] != group)
        group_ends = (v == last) | (visit_group[jnp.minimum(v + 1, last)] != group)

        @pl.when(group_starts)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(offsets[group + 1] > offsets[group])
        def _accumulate():
            tile = visit_tile[v]
            _gather_rows(x_hbm, tokens, tile * tm, pl.multiple_of(kk * tk, tk), buf, sem,
                         tm, tk)
            # Mask both operands in float32, as pallas_tpu.tgmm does.
            xs = buf[...].astype(jnp.float32)
            xs = jnp.where(_row_mask(offsets, group, tile, (tm, tk)), xs, 0.0).T
            g = grad_ref[...].astype(jnp.float32)
            g = jnp.where(_row_mask(offsets, group, tile, (tm, tn)), g, 0.0)
            acc_ref[...] += jnp.dot(xs.astype(x.dtype), g.astype(grad_ref.dtype),
                                    preferred_element_type=jnp.float32)

        @pl.when(group_ends)
        def _store():
            out_ref[...] = acc_ref[...].astype(out_dtype)

    def grad_map(kk, j, v, offsets, visit_group, visit_tile, tokens):
        return visit_tile[v], j

    def out_map(kk, j, v, offsets, visit_group, visit_tile, tokens):
        return visit_group[v], kk, j

    itemsize = x.dtype.itemsize
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, tiles_k * tk, tiles_n * tn), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(tiles_k, tiles_n, meta.num_visits),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((pl.squeezed, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32), pltpu.VMEM((tm, tk), x.dtype),
                            pltpu.SemaphoreType.DMA(())],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=_vmem_limit((tm * tk + tm * tn) * itemsize,
                                         tk * tn * out_dtype.itemsize, tk * tn * 4)),
        interpret=interpret,
        name="moe_gather_tgmm_tpu",
    )
    out = call(meta.offsets, meta.visit_group, meta.visit_tile, _padded_tokens(row_token, rows_p),
               x_p, grad_p)
    return out[:, :k, :n]
