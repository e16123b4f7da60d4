"""Grouped matmuls with the permutation fused in, over the padded layout, in plain XLA
(the CPU counterpart of the Pallas kernels of `moe.kernels.fused`).

    gather_gmm(x [T, K], rhs [E, K, N], group_sizes [E], row_token [R]) -> [R, N]
        out[r] = x[row_token[r]] @ rhs[g(r)]            (0 for a padding row)
    gmm_scatter(lhs [R, K], rhs [E, K, N], group_sizes [E], row_token [R], row_weight [R], T)
        -> [T, N] f32: y[t] = sum over rows r with row_token[r] = t of w_r lhs[r] @ rhs[g(r)]

Rows follow `moe.kernels.padded_gmm`'s layout (group g's rows start at its
tile-aligned offset; padding rows hold token T, which gathers a zero row and is
dropped by the scatter). Each loop step gathers its chunk's rows from token
order, or adds its products into token order, so neither the permuted `[R, d]`
copy of the tokens nor the `[R, d]` expert outputs are written, in either pass:

    gather_gmm:  d x   = gmm_scatter(d out, rhs^T)   d rhs[g] = sum_r x[row_token[r]]^T d out[r]
    gmm_scatter: d lhs = w * gather_gmm(d y, rhs^T)  d rhs[g] = sum_r w_r lhs[r]^T d y[row_token[r]]
                 d w_r = <gather_gmm(d y, rhs^T)[r], lhs[r]>

On CPU at d_model 512 the scatter form of the down projection takes 0.9-1.0x the
time of a dense matmul of equal FLOPs (E=8, k=2) where the `[R, d]` output and its
gather back take 1.1-1.25x; at E=64, k=8 it is 1.45x against 2.6x
(docs/benchmarks.md, "CPU targets").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe.kernels import padded_gmm

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def gather_gmm(x: Array, rhs: Array, group_sizes: Array, row_token: Array, tile_m: int,
               chunk_m: int) -> Array:
    """`[R, N]` in x's dtype: row r is `x[row_token[r]] @ rhs[g(r)]` (module docstring)."""
    return padded_gmm.gmm_forward(x, rhs, group_sizes, tile_m, chunk_m, lhs_token=row_token)


def _gather_gmm_fwd(x, rhs, group_sizes, row_token, tile_m, chunk_m):
    return (gather_gmm(x, rhs, group_sizes, row_token, tile_m, chunk_m),
            (x, rhs, group_sizes, row_token))


def _gather_gmm_bwd(tile_m, chunk_m, residuals, grad):
    x, rhs, group_sizes, row_token = residuals
    grad = grad.astype(x.dtype)
    grad_x = padded_gmm.gmm_forward(grad, rhs, group_sizes, tile_m, chunk_m, transpose_rhs=True,
                                    out_token=row_token, num_tokens=x.shape[0])
    grad_rhs = padded_gmm.tgmm_forward(x, grad, group_sizes, tile_m, chunk_m, rhs.dtype,
                                       lhs_token=row_token)
    return grad_x.astype(x.dtype), grad_rhs, None, None


gather_gmm.defvjp(_gather_gmm_fwd, _gather_gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def gmm_scatter(lhs: Array, rhs: Array, group_sizes: Array, row_token: Array,
                row_weight: Array, num_tokens: int, tile_m: int, chunk_m: int) -> Array:
    """`[T, N]` float32: `y[t] = sum_{r: row_token[r] = t} row_weight[r] * lhs[r] @ rhs[g(r)]`
    (f32 accumulation across a token's rows; the weight is applied to each product as it
    is added, so the weighted `[R, K]` activations are never stored)."""
    return padded_gmm.gmm_forward(lhs, rhs, group_sizes, tile_m, chunk_m, out_token=row_token,
                                  out_weight=row_weight, num_tokens=num_tokens)


def _gmm_scatter_fwd(lhs, rhs, group_sizes, row_token, row_weight, num_tokens, tile_m,
                     chunk_m):
    return (gmm_scatter(lhs, rhs, group_sizes, row_token, row_weight, num_tokens, tile_m,
                        chunk_m), (lhs, rhs, group_sizes, row_token, row_weight))


def _gmm_scatter_bwd(num_tokens, tile_m, chunk_m, residuals, grad):
    lhs, rhs, group_sizes, row_token, row_weight = residuals
    grad = grad.astype(lhs.dtype)  # [T, N]
    # g[r] = d y[row_token[r]] @ rhs[g]^T: d lhs[r] = w_r g[r], d w_r = <g[r], lhs[r]>.
    unweighted = padded_gmm.gmm_forward(grad, rhs, group_sizes, tile_m, chunk_m,
                                        transpose_rhs=True, out_dtype=jnp.float32,
                                        lhs_token=row_token)
    grad_lhs = (unweighted * row_weight[:, None].astype(jnp.float32)).astype(lhs.dtype)
    grad_weight = jnp.sum(unweighted * lhs.astype(jnp.float32), axis=1).astype(row_weight.dtype)
    grad_rhs = padded_gmm.tgmm_forward(lhs, grad, group_sizes, tile_m, chunk_m, rhs.dtype,
                                       grad_token=row_token, lhs_weight=row_weight)
    return grad_lhs, grad_rhs, None, None, grad_weight


gmm_scatter.defvjp(_gmm_scatter_fwd, _gmm_scatter_bwd)
