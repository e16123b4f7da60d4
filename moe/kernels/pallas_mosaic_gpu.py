"""Grouped matmul forward for Hopper GPUs: a Pallas Mosaic GPU (wgmma + TMA) kernel.

Grid `(visits, tiles_n)` over the tile visits of `metadata.py`, one CUDA
block (one warpgroup) per visit and output column tile; blocks past the
dynamic visit count exit at once. A block pipelines the k loop through shared
memory with TMA copies into an asynchronous wgmma accumulator, then writes
only the rows of its group. Rows past sum(group_sizes) form an extra tail
group whose visits write zeros, so every output row is written by exactly one
block and no block's store overlaps another's.

TMA copies have static shapes, so the dynamic row range is stored as a
ladder of power-of-two row slices: one conditional copy per bit of the row
count.

Only the forward (and, with `transpose_rhs`, the input gradient) runs here;
`api.py` sends the weight gradient to the Triton `tgmm`. `transpose_rhs`
transposes the weights in XLA first: an in-kernel transposed wgmma operand
would save that copy, but Mosaic GPU interpret mode cannot run it, and no
path here goes untested. Inputs must be 16-bit (wgmma would run float32 as
tf32). Not yet run on hardware: it is checked in Mosaic GPU interpret mode and
by lowering only, which is why `api.py` does not pick it by default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from moe.kernels.common import Array, Tiling, pad_gmm_operands, round_up
from moe.kernels.metadata import metadata_with_tail

DEFAULT_TILING: Tiling = (128, 64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# wgmma works on 64-row warpgroup tiles; 64 16-bit elements fill a 128-byte
# swizzled shared-memory row.
_ALIGN = 64
_MAX_STAGES = 4


def check_dtype(dtype) -> None:
    if jnp.dtype(dtype) not in DTYPES:
        raise ValueError(f"backend 'mosaic_gpu' takes dtypes {tuple(d.name for d in DTYPES)}, "
                         f"got {jnp.dtype(dtype).name}")


def check_tiling(tiling: Tiling) -> None:
    tm, tk, tn = tiling
    if tm % _ALIGN or tk % _ALIGN or tn % _ALIGN or tn > 256:
        raise ValueError(f"tiling for backend 'mosaic_gpu' needs tm, tk, tn multiples of "
                         f"{_ALIGN} and tn <= 256, got {tiling}")


def fit_tiling(tiling: Tiling, dims: tuple[int, int, int]) -> Tiling:
    """Shrink tiles larger than the problem `dims = (M, K, N)` rounded up to 64."""
    return tuple(min(t, round_up(d, _ALIGN)) for t, d in zip(tiling, dims))


def _interpret_params():
    # Mosaic GPU kernels interpret only with GPU interpret parameters, which
    # jax does not export publicly yet.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def _store_rows(o_smem, out_gmem, first: Array, count: Array, row0: Array, col0: Array,
                tm: int, tn: int) -> None:
    """Copy rows `[first, first + count)` of `o_smem [tm, tn]` to `out_gmem`.

    The rows land at `(row0 + first, col0)`.
    """
    start = first
    size = 1 << (tm.bit_length() - 1)
    while size:
        bit = count & size

        @pl.when(bit != 0)
        def _copy(size=size, start=start):
            plgpu.copy_smem_to_gmem(
                o_smem.at[pl.ds(start, size)],
                out_gmem.at[pl.ds(row0 + start, size), pl.ds(col0, tn)])

        start = start + bit
        size //= 2


@functools.partial(jax.jit, static_argnames=("tiling", "transpose_rhs", "out_dtype",
                                             "interpret"))
def gmm(lhs: Array, rhs: Array, group_sizes: Array, tiling: Tiling, *,
        transpose_rhs: bool = False, out_dtype=None, interpret: bool = False) -> Array:
    """Grouped matmul `[M, K] x [E, K, N] -> [M, N]` (`out_dtype`, default lhs dtype).

    lhs: `[M, K]`, rows sorted by group. rhs: `[E, K, N]`, or `[E, N, K]` with
    `transpose_rhs`. group_sizes: `[E] int32`, sum <= M; rows past the sum
    come out zero. `interpret=True` uses Mosaic GPU interpret mode.
    """
    tm, tk, tn = tiling
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    num_rows, (num_groups, _, n) = lhs.shape[0], rhs.shape
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    lhs_p, rhs_p, tiles_k, tiles_n = pad_gmm_operands(lhs, rhs, tiling, transpose_rhs=False)
    rows_p = lhs_p.shape[0]
    meta = metadata_with_tail(group_sizes, rows_p, tm)
    num_visits = meta.num_visits.reshape(1)
    stages = max(1, min(_MAX_STAGES, tiles_k))

    def body(offsets, visit_group, visit_tile, visits, lhs_gmem, rhs_gmem, out_gmem):
        v, j = jax.lax.axis_index("v"), jax.lax.axis_index("n")

        @pl.when(v < visits[0])
        def _visit():
            group, tile = visit_group[v], visit_tile[v]
            row0 = tile * tm
            first = jnp.maximum(offsets[group], row0)
            count = jnp.minimum(offsets[group + 1], row0 + tm) - first
            weights = rhs_gmem.at[jnp.minimum(group, num_groups - 1)]

            def matmul(acc_ref):
                # delay_release: wgmma is asynchronous, so a stage's buffers are
                # refilled only after the following step has been issued.
                plgpu.emit_pipeline(
                    lambda _, lhs_smem, rhs_smem: plgpu.wgmma(acc_ref, lhs_smem, rhs_smem),
                    grid=(tiles_k,),
                    in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (tile, kk), delay_release=1),
                              plgpu.BlockSpec((tk, tn), lambda kk: (kk, j), delay_release=1)],
                    max_concurrent_steps=stages,
                )(lhs_gmem, weights)
                return acc_ref[...]

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((tm, tn), out_dtype))
            def _store(o_smem):
                @pl.when(group < num_groups)
                def _product():
                    acc = pl.run_scoped(matmul, plgpu.ACC((tm, tn)))
                    o_smem[...] = acc.astype(out_dtype)

                @pl.when(group == num_groups)  # tail rows
                def _zeros():
                    o_smem[...] = jnp.zeros((tm, tn), out_dtype)

                plgpu.commit_smem()
                _store_rows(o_smem, out_gmem, first - row0, count, row0, j * tn, tm, tn)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((rows_p, tiles_n * tn), out_dtype),
        grid=(meta.visit_group.shape[0], tiles_n),
        grid_names=("v", "n"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params() if interpret else None,
    )
    out = kernel(meta.offsets, meta.visit_group, meta.visit_tile, num_visits, lhs_p, rhs_p)
    return out[:num_rows, :n]
