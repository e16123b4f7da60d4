"""Grouped matmul entry points: `gmm`, `tgmm`, a custom VJP, and backend choice.

    gmm(lhs [M, K], rhs [E, K, N], group_sizes [E] int32) -> [M, N]
    tgmm(lhs [M, K], grad [M, N], group_sizes [E] int32) -> [E, K, N]

Rows of `lhs` are sorted by group: group g owns rows
`[sum(group_sizes[:g]), sum(group_sizes[:g + 1]))`. `sum(group_sizes)` may be
less than M; `gmm` returns zeros for the rows past it and `tgmm` ignores them.
Inputs are promoted to a common dtype (the Pallas kernels take float32,
bfloat16 and float16) and every backend accumulates in float32.

Backends (`backend=`, default chosen from the platform of the inputs, or
`jax.default_backend()` under tracing):

  "xla"         the plain-XLA tile loop of `xla_gmm.py`; the CPU default.
  "tpu"         Pallas Mosaic TPU kernels with scalar-prefetched group
                metadata (`pallas_tpu.py`); the TPU default.
  "triton"      Pallas Triton kernels (`pallas_gpu.py`); the GPU default.
  "mosaic_gpu"  Pallas Mosaic GPU (Hopper wgmma) for the forward and the input
                gradient, Triton for the weight gradient
                (`pallas_mosaic_gpu.py`); 16-bit dtypes only. Opt-in until it
                has run on a Hopper GPU (so far: interpret mode and lowering).

`interpret=True` runs a Pallas backend in Pallas interpret mode, which works
on CPU (for tests); with `backend=None` it picks the platform's Pallas
backend, or "tpu" on CPU. `interpret=None` means interpret exactly when the
platform is CPU, so an explicit Pallas backend also runs there.

`tiling=(tm, tk, tn)`: rows per tile, contraction per step, output columns
per tile, for the forward `gmm`; the input gradient runs with `(tm, tn, tk)`
and the weight gradient with `(tm, tk, tn)`. Defaults depend on backend and
dtype (`default_tiling`); tiles larger than the (aligned) problem are shrunk.
The "xla" backend uses only tm, by default the mean group size as a power of
two in [64, 256].
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moe.kernels import xla_gmm
from moe.kernels.common import PALLAS_DTYPES, Array, Tiling, check_tiling, round_up

BACKENDS = ("xla", "tpu", "triton", "mosaic_gpu")
# Imported on first use: importing every Pallas backend costs about half a
# second, and a jaxlib build may lack one of them.
_PALLAS_MODULES = {"tpu": "moe.kernels.pallas_tpu", "triton": "moe.kernels.pallas_gpu",
                   "mosaic_gpu": "moe.kernels.pallas_mosaic_gpu"}


def _kernels(backend: str):
    return importlib.import_module(_PALLAS_MODULES[backend])


class _Config(NamedTuple):
    """Static (hashable) settings of one call."""

    backend: str
    tiling: Tiling | None
    interpret: bool


# --------------------------------------------------------------------------- tiling

def default_tiling(backend: str, dtype) -> Tiling:
    """Per-backend default `(tm, tk, tn)` for inputs of `dtype` (not tuned on hardware)."""
    wide = jnp.dtype(dtype).itemsize >= 4
    if backend == "xla":  # only tm matters; gmm shrinks it to the mean group size
        return (xla_gmm.DEFAULT_TILE_M, 512, 512)
    if backend == "tpu":
        # Double-buffered blocks plus the f32 accumulator stay near 12 MiB of VMEM.
        return (512, 512, 1024) if wide else (512, 1024, 1024)
    if backend == "triton":
        return (64, 32, 64) if wide else (128, 64, 128)
    if backend == "mosaic_gpu":
        return _kernels(backend).DEFAULT_TILING
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _fit_tiling(backend: str, tiling: Tiling, dims: tuple[int, int, int], dtype) -> Tiling:
    """Shrink tiles that exceed the problem `dims = (M, K, N)`, keeping their alignment."""
    (tm, tk, tn), (m, k, n) = tiling, dims
    if backend == "xla":
        return (min(tm, m), tk, tn)
    if backend == "tpu":
        sublanes = 8 if jnp.dtype(dtype).itemsize >= 4 else 16
        return (min(tm, round_up(m, sublanes)), min(tk, round_up(k, 128)),
                min(tn, round_up(n, 128)))
    if backend == "triton":
        return (min(tm, _next_pow2(max(m, 16))), min(tk, _next_pow2(max(k, 16))),
                min(tn, _next_pow2(max(n, 16))))
    return _kernels("mosaic_gpu").fit_tiling(tiling, dims)


def _check_hardware_tiling(backend: str, tiling: Tiling, dtype) -> None:
    """Layout rules of the compiled kernels (interpret mode takes any tile)."""
    tm, tk, tn = tiling
    if backend == "tpu":
        sublanes = 8 if jnp.dtype(dtype).itemsize >= 4 else 16
        if tm % sublanes or tk % 128 or tn % 128:
            raise ValueError(f"tiling for backend 'tpu' with {jnp.dtype(dtype).name} needs tm a "
                             f"multiple of {sublanes} and tk, tn multiples of 128, got {tiling}")
    elif backend == "triton":
        if any(t < 16 or t & (t - 1) for t in tiling):
            raise ValueError(f"tiling for backend 'triton' needs powers of two >= 16, "
                             f"got {tiling}")
    elif backend == "mosaic_gpu":
        _kernels(backend).check_tiling(tiling)


def _xla_tile_m(num_rows: int, num_groups: int) -> int:
    # Each group boundary inside a tile costs up to a tile of wasted rows, so
    # keep tiles near the mean group size (a power of two in [64, 256]).
    mean = max(num_rows // num_groups, 1)
    return min(xla_gmm.DEFAULT_TILE_M, max(64, 1 << (mean.bit_length() - 1)))


def _tiling_for(config: _Config, dims: tuple[int, int, int], dtype,
                num_groups: int) -> Tiling:
    tiling = config.tiling or default_tiling(config.backend, dtype)
    if config.backend == "xla" and config.tiling is None:
        tiling = (_xla_tile_m(dims[0], num_groups),) + tiling[1:]
    tiling = _fit_tiling(config.backend, tiling, dims, dtype)
    if not config.interpret:
        _check_hardware_tiling(config.backend, tiling, dtype)
    return tiling


# --------------------------------------------------------------------------- backend choice

def _platform(*arrays) -> str:
    """Platform of the first concrete array, else jax's default backend."""
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            return next(iter(x.devices())).platform
    return jax.default_backend()


def _resolve(backend: str | None, interpret: bool | None, tiling, dtype, *arrays) -> _Config:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if interpret not in (None, True, False):
        raise ValueError(f"interpret must be True, False or None, got {interpret!r}")
    if tiling is not None:
        tiling = check_tiling(tiling)
    platform = _platform(*arrays)
    if backend is None:
        if platform == "tpu":
            backend = "tpu"
        elif platform in ("gpu", "cuda", "rocm"):
            backend = "triton"
        else:
            backend = "tpu" if interpret else "xla"
    if backend == "xla":
        if interpret:
            raise ValueError("interpret=True needs a Pallas backend "
                             f"{tuple(_PALLAS_MODULES)}; backend 'xla' is plain XLA")
        return _Config(backend, tiling, False)
    if jnp.dtype(dtype) not in PALLAS_DTYPES:
        raise ValueError(f"backend {backend!r} takes lhs/rhs dtypes "
                         f"{tuple(d.name for d in PALLAS_DTYPES)}, got {jnp.dtype(dtype).name}")
    if backend == "mosaic_gpu":
        _kernels(backend).check_dtype(dtype)
    return _Config(backend, tiling, platform == "cpu" if interpret is None else interpret)


# --------------------------------------------------------------------------- forward kernels

# Jitted so that eager calls reuse the compiled loop (the Pallas wrappers are
# jitted in their modules).
@functools.partial(jax.jit, static_argnums=(3, 4))
def _xla_gmm(lhs: Array, rhs: Array, group_sizes: Array, tile_m: int,
             transpose_rhs: bool) -> Array:
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    return xla_gmm.gmm_forward(lhs, rhs, group_sizes, tile_m)


@functools.partial(jax.jit, static_argnums=(3,))
def _xla_tgmm(lhs: Array, grad: Array, group_sizes: Array, tile_m: int) -> Array:
    return xla_gmm.tgmm_forward(lhs, grad, group_sizes, tile_m)


def _gmm_forward(config: _Config, lhs: Array, rhs: Array, group_sizes: Array,
                 transpose_rhs: bool) -> Array:
    """`[M, K] x [E, K, N]` (`[E, N, K]` with transpose_rhs) -> `[M, N]` in lhs dtype."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiling = _tiling_for(config, (m, k, n), lhs.dtype, group_sizes.shape[0])
    if config.backend == "xla":
        return _xla_gmm(lhs, rhs, group_sizes, tiling[0], transpose_rhs)
    return _kernels(config.backend).gmm(lhs, rhs, group_sizes, tiling,
                                        transpose_rhs=transpose_rhs,
                                        interpret=config.interpret)


def _tgmm_forward(config: _Config, lhs: Array, grad: Array, group_sizes: Array) -> Array:
    """`[M, K], [M, N] -> [E, K, N]` in lhs dtype."""
    dims = (lhs.shape[0], lhs.shape[1], grad.shape[1])
    if config.backend == "mosaic_gpu":  # its weight gradient runs on Triton
        config = config._replace(backend="triton", tiling=None)
    tiling = _tiling_for(config, dims, lhs.dtype, group_sizes.shape[0])
    if config.backend == "xla":
        return _xla_tgmm(lhs, grad, group_sizes, tiling[0])
    return _kernels(config.backend).tgmm(lhs, grad, group_sizes, tiling,
                                         interpret=config.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs: Array, rhs: Array, group_sizes: Array, config: _Config) -> Array:
    return _gmm_forward(config, lhs, rhs, group_sizes, transpose_rhs=False)


def _gmm_fwd(lhs, rhs, group_sizes, config):
    return _gmm(lhs, rhs, group_sizes, config), (lhs, rhs, group_sizes)


def _gmm_bwd(config, residuals, grad):
    lhs, rhs, group_sizes = residuals
    grad = grad.astype(lhs.dtype)
    # dlhs = grad @ rhs_g^T per group: the kernels read rhs transposed in place.
    if config.tiling is not None:
        tm, tk, tn = config.tiling
        config_t = config._replace(tiling=(tm, tn, tk))
    else:
        config_t = config
    grad_lhs = _gmm_forward(config_t, grad, rhs, group_sizes, transpose_rhs=True)
    grad_rhs = _tgmm_forward(config, lhs, grad, group_sizes)
    return grad_lhs, grad_rhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# --------------------------------------------------------------------------- public API

def _check_group_sizes(group_sizes, num_groups: int | None, num_rows: int) -> Array:
    """int32 `[E]` group sizes; `num_groups=None` accepts any E."""
    group_sizes = jnp.asarray(group_sizes)
    if group_sizes.ndim != 1 or num_groups not in (None, group_sizes.shape[0]):
        expected = "[E]" if num_groups is None else f"[E] = ({num_groups},)"
        raise ValueError(f"group_sizes must have shape {expected}, got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer array, got {group_sizes.dtype}")
    if not isinstance(group_sizes, jax.core.Tracer):
        sizes = np.asarray(group_sizes)
        if (sizes < 0).any() or sizes.sum() > num_rows:
            raise ValueError(f"group_sizes must be >= 0 and sum to at most M = {num_rows}, "
                             f"got {sizes.tolist()}")
    return group_sizes.astype(jnp.int32)


def _check_float(name: str, x: Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, tiling: Tiling | None = None,
        interpret: bool | None = None, backend: str | None = None) -> Array:
    """Grouped matmul: row block g of `lhs` times `rhs[g]`, differentiable.

    lhs: `[M, K]`, rows sorted by group. rhs: `[E, K, N]`. group_sizes: `[E]`
    integer, summing to at most M. Returns `[M, N]` in the promoted dtype of
    lhs and rhs; rows past sum(group_sizes) are zero. See the module docstring
    for `tiling`, `interpret` and `backend`.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if lhs.ndim != 2:
        raise ValueError(f"lhs must have rank 2 [M, K], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must have rank 3 [E, K, N], got shape {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs [M, K] and rhs [E, K, N] must agree on K, got {lhs.shape} "
                         f"and {rhs.shape}")
    _check_float("lhs", lhs)
    _check_float("rhs", rhs)
    group_sizes = _check_group_sizes(group_sizes, rhs.shape[0], lhs.shape[0])
    dtype = jnp.result_type(lhs, rhs)
    config = _resolve(backend, interpret, tiling, dtype, lhs, rhs)
    (m, k), (num_groups, _, n) = lhs.shape, rhs.shape
    if 0 in (m, k, n, num_groups):
        return jnp.zeros((m, n), dtype)
    return _gmm(lhs.astype(dtype), rhs.astype(dtype), group_sizes, config)


def tgmm(lhs: Array, grad: Array, group_sizes: Array, *, tiling: Tiling | None = None,
         interpret: bool | None = None, backend: str | None = None) -> Array:
    """Per-group `lhs_g^T @ grad_g`: the weight gradient of `gmm`.

    lhs: `[M, K]`, grad: `[M, N]`, rows sorted by group. group_sizes: `[E]`
    integer, summing to at most M. Returns `[E, K, N]` in the promoted dtype;
    empty groups give zeros and rows past sum(group_sizes) are ignored.
    `tiling=(tm, tk, tn)` tiles M, K and N. Not differentiable.
    """
    lhs, grad = jnp.asarray(lhs), jnp.asarray(grad)
    if lhs.ndim != 2:
        raise ValueError(f"lhs must have rank 2 [M, K], got shape {lhs.shape}")
    if grad.ndim != 2:
        raise ValueError(f"grad must have rank 2 [M, N], got shape {grad.shape}")
    if lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"lhs [M, K] and grad [M, N] must agree on M, got {lhs.shape} "
                         f"and {grad.shape}")
    _check_float("lhs", lhs)
    _check_float("grad", grad)
    group_sizes = _check_group_sizes(group_sizes, None, lhs.shape[0])
    dtype = jnp.result_type(lhs, grad)
    config = _resolve(backend, interpret, tiling, dtype, lhs, grad)
    (m, k), n, num_groups = lhs.shape, grad.shape[1], group_sizes.shape[0]
    if 0 in (m, k, n, num_groups):
        return jnp.zeros((num_groups, k, n), dtype)
    return _tgmm_forward(config, lhs.astype(dtype), grad.astype(dtype), group_sizes)


# --------------------------------------------------------------------------- dispatch hook

BACKEND_ENV = "MOE_PALLAS_BACKEND"
INTERPRET_ENV = "MOE_PALLAS_INTERPRET"


def dispatch_gmm(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """`gmm` for the registered "pallas" dispatch (`moe.dispatch.registry`).

    Reads two environment variables when traced: `MOE_PALLAS_BACKEND` (one of
    `BACKENDS`; unset or empty = automatic) and `MOE_PALLAS_INTERPRET` ("1"
    forces Pallas interpret mode, "0" forbids it; unset or empty = automatic).
    So `MOE_PALLAS_INTERPRET=1` runs the Pallas kernels of the "pallas"
    dispatch on CPU instead of the XLA path.
    """
    backend = os.environ.get(BACKEND_ENV) or None
    flag = os.environ.get(INTERPRET_ENV, "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"{INTERPRET_ENV} must be '1', '0' or unset, got {flag!r}")
    interpret = None if flag == "" else flag == "1"
    return gmm(lhs, rhs, group_sizes, interpret=interpret, backend=backend)
