"""Fused dispatch kernels: grouped matmuls that gather their rows from, or scatter-add
their rows into, token order (the `pallas_fused` dispatch, `moe/dispatch/fused.py`).

    gather_gmm(x [T, K], rhs [E, K, N], group_sizes [E], row_token [R]) -> [R, N]
        out[r] = x[row_token[r]] @ rhs[g(r)]
    gmm_scatter(lhs [R, K], rhs [E, K, N], group_sizes [E], row_token [R], T) -> [T, N] f32
        y[t] = sum over rows r with row_token[r] = t of lhs[r] @ rhs[g(r)]

Row r belongs to group g(r) as in `moe.kernels.gmm` (groups are consecutive
row ranges); rows past sum(group_sizes) are zero in gather_gmm and ignored by
gmm_scatter (masked assignments cost nothing). Both are differentiable, and
each one's transpose is the other (custom VJPs):

    gather_gmm:  d x   = gmm_scatter(d out, rhs^T)   d rhs = gather_tgmm(x, d out)
    gmm_scatter: d lhs = gather_gmm(d y, rhs^T)      d rhs = gather_tgmm(d y, lhs)^T

so no permuted `[R, d]` copy of the activations or of their gradient is
written in either pass. `gather_tgmm(x, grad)[g] = sum_{r in g} x[row_token[r]]^T
grad[r]` is the weight gradient.

Backends: "tpu" (Mosaic, `fused_tpu.py`) and "triton" (`fused_gpu.py`); there
is no XLA or Mosaic GPU variant. `backend=None` picks the platform's (TPU:
"tpu", GPU: "triton"; CPU: "tpu" in interpret mode). `interpret=None`
interprets exactly when the platform is CPU. `tiling` as for `moe.kernels.gmm`.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from moe.kernels import api
from moe.kernels.common import Array, Tiling

FUSED_BACKENDS = ("tpu", "triton")
_MODULES = {"tpu": "moe.kernels.fused_tpu", "triton": "moe.kernels.fused_gpu"}


def _kernels(backend: str):
    return importlib.import_module(_MODULES[backend])


def resolve(backend: str | None, interpret: bool | None, tiling: Tiling | None, dtype,
            *arrays) -> api._Config:
    """The static config of a fused call; refuses a backend without fused kernels,
    naming the alternatives."""
    if backend is not None and backend not in FUSED_BACKENDS:
        raise ValueError(
            f"the fused dispatch kernels have no backend {backend!r}; they run on "
            f"{FUSED_BACKENDS} (on CPU in interpret mode). For 'xla' or 'mosaic_gpu' use the "
            f"unfused dispatch 'pallas' (or 'sort')")
    if backend is None:
        platform = api._platform(*arrays)
        backend = "triton" if platform in ("gpu", "cuda", "rocm") else "tpu"
    return api._resolve(backend, interpret, tiling, dtype, *arrays)


def _tiling(config: api._Config, dims: tuple[int, int, int], dtype, num_groups: int,
            transposed: bool = False) -> Tiling:
    if transposed and config.tiling is not None:  # (tm, tk, tn) -> (tm, tn, tk)
        tm, tk, tn = config.tiling
        config = config._replace(tiling=(tm, tn, tk))
    return api._tiling_for(config, dims, dtype, num_groups)


def _gather_gmm_call(config, x, rhs, group_sizes, row_token, transpose_rhs: bool,
                     out_dtype=None) -> Array:
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    dims = (row_token.shape[0], x.shape[1], n)
    tiling = _tiling(config, dims, x.dtype, rhs.shape[0], transposed=transpose_rhs)
    return _kernels(config.backend).gather_gmm(
        x, rhs, group_sizes, row_token, tiling, transpose_rhs=transpose_rhs,
        out_dtype=out_dtype, interpret=config.interpret)


def _scatter_call(config, lhs, rhs, group_sizes, row_token, num_tokens: int,
                  transpose_rhs: bool) -> Array:
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    dims = (lhs.shape[0], lhs.shape[1], n)
    tm, tk, tn = _tiling(config, dims, lhs.dtype, rhs.shape[0], transposed=transpose_rhs)
    if config.backend == "tpu" and not config.interpret:
        tn = _kernels("tpu").scatter_tile_n(num_tokens, tn)
    return _kernels(config.backend).gmm_scatter(
        lhs, rhs, group_sizes, row_token, num_tokens, (tm, tk, tn),
        transpose_rhs=transpose_rhs, interpret=config.interpret)


def _gather_tgmm_call(config, x, grad, group_sizes, row_token) -> Array:
    dims = (row_token.shape[0], x.shape[1], grad.shape[1])
    tiling = _tiling(config, dims, x.dtype, group_sizes.shape[0])
    return _kernels(config.backend).gather_tgmm(x, grad, group_sizes, row_token, tiling,
                                                interpret=config.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gather_gmm(x, rhs, group_sizes, row_token, config):
    return _gather_gmm_call(config, x, rhs, group_sizes, row_token, False)


def _gather_gmm_fwd(x, rhs, group_sizes, row_token, config):
    return _gather_gmm(x, rhs, group_sizes, row_token, config), (x, rhs, group_sizes, row_token)


def _gather_gmm_bwd(config, residuals, grad):
    x, rhs, group_sizes, row_token = residuals
    grad = grad.astype(x.dtype)
    grad_x = _scatter_call(config, grad, rhs, group_sizes, row_token, x.shape[0], True)
    grad_rhs = _gather_tgmm_call(config, x, grad, group_sizes, row_token)
    return grad_x.astype(x.dtype), grad_rhs.astype(rhs.dtype), None, None


_gather_gmm.defvjp(_gather_gmm_fwd, _gather_gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _gmm_scatter(lhs, rhs, group_sizes, row_token, num_tokens, config):
    return _scatter_call(config, lhs, rhs, group_sizes, row_token, num_tokens, False)


def _gmm_scatter_fwd(lhs, rhs, group_sizes, row_token, num_tokens, config):
    out = _gmm_scatter(lhs, rhs, group_sizes, row_token, num_tokens, config)
    return out, (lhs, rhs, group_sizes, row_token)


def _gmm_scatter_bwd(num_tokens, config, residuals, grad):
    lhs, rhs, group_sizes, row_token = residuals
    grad = grad.astype(lhs.dtype)  # [T, N]
    grad_lhs = _gather_gmm_call(config, grad, rhs, group_sizes, row_token, True)
    # d rhs[g] = sum_{r in g} lhs[r]^T grad[row_token[r]]: the transpose of the gathered tgmm.
    grad_rhs_t = _gather_tgmm_call(config, grad, lhs, group_sizes, row_token)  # [E, N, K]
    return grad_lhs, jnp.swapaxes(grad_rhs_t, 1, 2).astype(rhs.dtype), None, None


_gmm_scatter.defvjp(_gmm_scatter_fwd, _gmm_scatter_bwd)


def _check(name: str, lhs: Array, rhs: Array, group_sizes: Array, row_token: Array,
           num_rows: int) -> Array:
    if rhs.ndim != 3 or lhs.ndim != 2 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"{name}: lhs [.., K] and rhs [E, K, N] must agree on K, got "
                         f"{lhs.shape} and {rhs.shape}")
    if row_token.ndim != 1 or row_token.shape[0] != num_rows:
        raise ValueError(f"{name}: row_token must have shape [R] = ({num_rows},), got "
                         f"{row_token.shape}")
    if not jnp.issubdtype(row_token.dtype, jnp.integer):
        raise ValueError(f"{name}: row_token must be an integer array, got {row_token.dtype}")
    return api._check_group_sizes(group_sizes, rhs.shape[0], num_rows)


def gather_gmm(x: Array, rhs: Array, group_sizes: Array, row_token: Array, *,
               tiling: Tiling | None = None, interpret: bool | None = None,
               backend: str | None = None) -> Array:
    """`[R, N]`: row r is `x[row_token[r]] @ rhs[g(r)]`, zero past sum(group_sizes).

    x `[T, K]` in token order; rhs `[E, K, N]`; group_sizes `[E]` int; row_token
    `[R]` int in [0, T). Differentiable in x and rhs.
    """
    x, rhs, row_token = jnp.asarray(x), jnp.asarray(rhs), jnp.asarray(row_token)
    group_sizes = _check("gather_gmm", x, rhs, group_sizes, row_token, row_token.shape[0])
    dtype = jnp.result_type(x, rhs)
    config = resolve(backend, interpret, tiling, dtype, x, rhs)
    if 0 in (*x.shape, *rhs.shape, row_token.shape[0]):
        return jnp.zeros((row_token.shape[0], rhs.shape[2]), dtype)
    return _gather_gmm(x.astype(dtype), rhs.astype(dtype), group_sizes,
                       row_token.astype(jnp.int32), config)


def gmm_scatter(lhs: Array, rhs: Array, group_sizes: Array, row_token: Array,
                num_tokens: int, *, tiling: Tiling | None = None,
                interpret: bool | None = None, backend: str | None = None) -> Array:
    """`[T, N]` float32: `y[t] = sum_{r: row_token[r] = t} lhs[r] @ rhs[g(r)]`.

    lhs `[R, K]` rows sorted by group; rows past sum(group_sizes) are not added.
    Differentiable in lhs and rhs.
    """
    lhs, rhs, row_token = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(row_token)
    group_sizes = _check("gmm_scatter", lhs, rhs, group_sizes, row_token, lhs.shape[0])
    dtype = jnp.result_type(lhs, rhs)
    config = resolve(backend, interpret, tiling, dtype, lhs, rhs)
    if 0 in (*lhs.shape, *rhs.shape, num_tokens):
        return jnp.zeros((num_tokens, rhs.shape[2]), jnp.float32)
    return _gmm_scatter(lhs.astype(dtype), rhs.astype(dtype), group_sizes,
                        row_token.astype(jnp.int32), int(num_tokens), config)
