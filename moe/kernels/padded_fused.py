"""Grouped matmuls with the permutation fused in, over the padded layout, in plain XLA
(the CPU counterpart of the Pallas kernels of `moe.kernels.fused`).

    gather_gmm(x [T, K], rhs [E, K, N], group_sizes [E], row_token [R]) -> [R, N]
        out[r] = x[row_token[r]] @ rhs[g(r)]            (0 for a padding row)
    gmm_scatter(up [R, K], gate [R, K] | None, rhs [E, K, N], group_sizes [E], row_token [R],
                row_weight [R], T, activation) -> [T, N] f32:
        y[t] = sum over rows r with row_token[r] = t of w_r h[r] @ rhs[g(r)],
        h = act(up), or act(gate) * up for a GLU (the expert's hidden activations)

Rows follow `moe.kernels.padded_gmm`'s layout (group g's rows start at its
tile-aligned offset; padding rows hold token T, which gathers a zero row and is
dropped by the scatter). Each loop step gathers its chunk's rows from token
order, or adds its products into token order, so neither the permuted `[R, d]`
copy of the tokens nor the `[R, d]` expert outputs are written, in either pass:

    gather_gmm:  d x   = gmm_scatter(d out, rhs^T)   d rhs[g] = sum_r x[row_token[r]]^T d out[r]
    gmm_scatter: d h   = w * gather_gmm(d y, rhs^T)  d rhs[g] = sum_r w_r h[r]^T d y[row_token[r]]
                 d w_r = <gather_gmm(d y, rhs^T)[r], h[r]>   (h recomputed per chunk)

On CPU at d_model 512 the scatter form of the down projection takes 0.9-1.0x the
time of a dense matmul of equal FLOPs (E=8, k=2) where the `[R, d]` output and its
gather back take 1.1-1.25x; at E=64, k=8 it is 1.45x against 2.6x
(docs/cpu_targets.md).
"""

from __future__ import annotations

import functools

import jax

from moe.experts import hidden_activations
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def gmm_scatter(up: Array, gate: Array | None, rhs: Array, group_sizes: Array,
                row_token: Array, row_weight: Array, num_tokens: int, activation: str,
                tile_m: int, chunk_m: int) -> Array:
    """`[T, N]` float32: `y[t] = sum_{r: row_token[r] = t} row_weight[r] * h[r] @ rhs[g(r)]`,
    `h = hidden_activations(activation, up, gate)` (module docstring).

    `h` is computed chunk by chunk inside the loops, in both passes, and the weight is
    applied to each product as it is added (f32 accumulation across a token's rows):
    neither the hidden activations nor their weighted copy is ever stored whole.
    """
    hidden = _hidden_rows(up, gate, activation)
    return padded_gmm.gmm_forward(hidden, rhs, group_sizes, tile_m, chunk_m,
                                  out_token=row_token, out_weight=row_weight,
                                  num_tokens=num_tokens)


def _hidden_rows(up: Array, gate: Array | None, activation: str) -> padded_gmm.Rows:
    arrays = (up,) if gate is None else (up, gate)
    return padded_gmm.Rows(arrays, fn=functools.partial(hidden_activations, activation))


def _gmm_scatter_fwd(up, gate, rhs, group_sizes, row_token, row_weight, num_tokens,
                     activation, tile_m, chunk_m):
    out = gmm_scatter(up, gate, rhs, group_sizes, row_token, row_weight, num_tokens,
                      activation, tile_m, chunk_m)
    return out, (up, gate, rhs, group_sizes, row_token, row_weight)


def _gmm_scatter_bwd(num_tokens, activation, tile_m, chunk_m, residuals, grad):
    up, gate, rhs, group_sizes, row_token, row_weight = residuals
    hidden = _hidden_rows(up, gate, activation)
    grad = grad.astype(up.dtype)  # [T, N]
    # g[r] = d y[row_token[r]] @ rhs[g]^T: d h[r] = w_r g[r], d w_r = <g[r], h[r]>, both
    # taken per chunk inside the loop (an unweighted [R, K] g would be one more buffer).
    grad_hidden, grad_weight = padded_gmm.gmm_forward(
        grad, rhs, group_sizes, tile_m, chunk_m, transpose_rhs=True, out_dtype=up.dtype,
        lhs_token=row_token, out_weight=row_weight, row_dot=hidden)
    grad_rhs = padded_gmm.tgmm_forward(hidden, grad, group_sizes, tile_m, chunk_m, rhs.dtype,
                                       grad_token=row_token, lhs_weight=row_weight)
    # The activation's own backward is elementwise over [R, K]: left to XLA.
    _, hidden_vjp = jax.vjp(functools.partial(hidden_activations, activation), up, gate)
    grad_up, grad_gate = hidden_vjp(grad_hidden)
    return (grad_up, grad_gate, grad_rhs, None, None,
            grad_weight.astype(row_weight.dtype))


gmm_scatter.defvjp(_gmm_scatter_fwd, _gmm_scatter_bwd)
