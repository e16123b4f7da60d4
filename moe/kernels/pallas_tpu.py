"""Grouped matmul for TPU: Pallas Mosaic kernels over scalar-prefetched tile visits.

The megablox scheme (`metadata.py`): the group metadata (offsets, and the
group and row tile of every visit) is scalar-prefetched into SMEM, the grid
walks the visits, and the BlockSpec index maps read the visit's row tile and
group from SMEM, so each grid step DMAs one lhs row tile and the weight block
of the group that tile belongs to.

gmm, grid `(tiles_n, visits, tiles_k)`: a float32 VMEM accumulator sums over
k; at the last k step the visit stores only its group's rows. Visits of one
row tile are consecutive, so the output block stays resident in VMEM between
them and the stores compose into the full tile. The rows past
sum(group_sizes) form an extra "tail" group whose visits skip the matmul and
store zeros, so every output row is written by the kernel itself.

tgmm, grid `(tiles_k, tiles_n, visits)`: visits of one group are consecutive;
the accumulator is zeroed when the group starts and stored when it ends. Empty
groups get one visit each (`visit_empty_groups`) that stores zeros.

Shapes are zero-padded to whole tiles here and the result sliced back. On
hardware the tiles must respect the Mosaic layout: tm a multiple of 8 (16 for
16-bit dtypes), tk and tn multiples of 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moe.kernels.common import Array, Tiling, pad_axis, pad_gmm_operands
from moe.kernels.metadata import group_metadata, metadata_with_tail

_MIB = 1 << 20


def _vmem_limit(in_block_bytes: int, out_block_bytes: int, acc_bytes: int) -> int:
    # Inputs and outputs are double-buffered; leave headroom for Mosaic's own
    # scratch, and stay within the 64 MiB of the smallest TPU VMEM.
    needed = 2 * (in_block_bytes + out_block_bytes) + acc_bytes
    return int(min(max(2 * needed, 32 * _MIB), 64 * _MIB))


def _row_mask(offsets: Array, group: Array, tile: Array, shape: tuple[int, int]) -> Array:
    """`[tm, cols] bool`: rows of row tile `tile` that belong to `group`."""
    rows = tile * shape[0] + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= offsets[group]) & (rows < offsets[group + 1])


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
    num_rows, num_groups = lhs.shape[0], rhs.shape[0]
    n = rhs.shape[1 if transpose_rhs else 2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    lhs_p, rhs_p, tiles_k, tiles_n = pad_gmm_operands(lhs, rhs, tiling,
                                                      transpose_rhs=transpose_rhs)
    rows_p = lhs_p.shape[0]
    meta = metadata_with_tail(group_sizes, rows_p, tm)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def kernel(offsets, visit_group, visit_tile, lhs_ref, rhs_ref, out_ref, acc_ref):
        v, kk = pl.program_id(1), pl.program_id(2)
        group = visit_group[v]

        @pl.when(kk == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(group < num_groups)  # the tail group only stores zeros
        def _accumulate():
            acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                                                preferred_element_type=jnp.float32)

        @pl.when(kk == tiles_k - 1)
        def _store():
            mine = _row_mask(offsets, group, visit_tile[v], (tm, tn))
            out_ref[...] = jnp.where(mine, acc_ref[...],
                                     out_ref[...].astype(jnp.float32)).astype(out_dtype)

    # Tail visits keep their block indices fixed over k, so only their first
    # step fetches anything.
    def lhs_map(j, v, kk, offsets, visit_group, visit_tile):
        return visit_tile[v], jnp.where(visit_group[v] < num_groups, kk, 0)

    def rhs_map(j, v, kk, offsets, visit_group, visit_tile):
        group = visit_group[v]
        kk = jnp.where(group < num_groups, kk, 0)
        group = jnp.minimum(group, num_groups - 1)
        return (group, j, kk) if transpose_rhs else (group, kk, j)

    def out_map(j, v, kk, offsets, visit_group, visit_tile):
        return visit_tile[v], j

    rhs_block = (pl.squeezed, tn, tk) if transpose_rhs else (pl.squeezed, tk, tn)
    itemsize = lhs.dtype.itemsize
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows_p, tiles_n * tn), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_n, meta.num_visits, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=_vmem_limit((tm * tk + tk * tn) * itemsize,
                                         tm * tn * out_dtype.itemsize, tm * tn * 4)),
        cost_estimate=pl.CostEstimate(
            flops=2 * num_rows * lhs.shape[1] * n, transcendentals=0,
            bytes_accessed=(lhs.size * tiles_n + rhs.size) * itemsize
            + num_rows * n * out_dtype.itemsize),
        interpret=interpret,
        name="moe_gmm_tpu",
    )
    out = call(meta.offsets, meta.visit_group, meta.visit_tile, lhs_p, rhs_p)
    return out[:num_rows, :n]


@functools.partial(jax.jit, static_argnames=("tiling", "out_dtype", "interpret"))
def tgmm(lhs: Array, grad: Array, group_sizes: Array, tiling: Tiling, *,
         out_dtype=None, interpret: bool = False) -> Array:
    """Per-group `lhs_g^T @ grad_g`: `[M, K], [M, N] -> [E, K, N]`; empty groups are zero.

    Rows past sum(group_sizes) belong to no group and are ignored.
    """
    tm, tk, tn = tiling
    num_rows, k = lhs.shape
    n = grad.shape[1]
    num_groups = group_sizes.shape[0]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    lhs_p = pad_axis(pad_axis(lhs, 0, tm), 1, tk)
    grad_p = pad_axis(pad_axis(grad, 0, tm), 1, tn)
    rows_p, tiles_k, tiles_n = lhs_p.shape[0], lhs_p.shape[1] // tk, grad_p.shape[1] // tn
    meta = group_metadata(group_sizes.astype(jnp.int32), rows_p, tm, visit_empty_groups=True)

    def kernel(offsets, visit_group, visit_tile, lhs_ref, grad_ref, out_ref, acc_ref):
        v, last = pl.program_id(2), pl.num_programs(2) - 1
        group = visit_group[v]
        group_starts = (v == 0) | (visit_group[jnp.maximum(v - 1, 0)] != group)
        group_ends = (v == last) | (visit_group[jnp.minimum(v + 1, last)] != group)

        @pl.when(group_starts)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(offsets[group + 1] > offsets[group])
        def _accumulate():
            # Rows of other groups must not enter the contraction; mask both
            # operands so stray non-finite values there cannot leak in as NaN.
            # Select and transpose in float32 (as megablox does): 16-bit
            # vector selects and transposes are not native on every TPU.
            tile = visit_tile[v]
            x = lhs_ref[...].astype(jnp.float32)
            x = jnp.where(_row_mask(offsets, group, tile, (tm, tk)), x, 0.0).T
            g = grad_ref[...].astype(jnp.float32)
            g = jnp.where(_row_mask(offsets, group, tile, (tm, tn)), g, 0.0)
            acc_ref[...] += jnp.dot(x.astype(lhs_ref.dtype), g.astype(grad_ref.dtype),
                                    preferred_element_type=jnp.float32)

        @pl.when(group_ends)
        def _store():
            out_ref[...] = acc_ref[...].astype(out_dtype)

    def lhs_map(kk, j, v, offsets, visit_group, visit_tile):
        return visit_tile[v], kk

    def grad_map(kk, j, v, offsets, visit_group, visit_tile):
        return visit_tile[v], j

    def out_map(kk, j, v, offsets, visit_group, visit_tile):
        return visit_group[v], kk, j

    itemsize = lhs.dtype.itemsize
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, tiles_k * tk, tiles_n * tn), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_k, tiles_n, meta.num_visits),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((pl.squeezed, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=_vmem_limit((tm * tk + tm * tn) * itemsize,
                                         tk * tn * out_dtype.itemsize, tk * tn * 4)),
        cost_estimate=pl.CostEstimate(
            flops=2 * num_rows * k * n, transcendentals=0,
            bytes_accessed=(lhs.size * tiles_n + grad.size * tiles_k) * itemsize
            + num_groups * k * n * out_dtype.itemsize),
        interpret=interpret,
        name="moe_tgmm_tpu",
    )
    out = call(meta.offsets, meta.visit_group, meta.visit_tile, lhs_p, grad_p)
    return out[:, :k, :n]
