"""Shape helpers shared by the grouped-matmul backends: tiles, padding, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# (tm, tk, tn): rows of lhs per tile, contraction per step, output columns per tile.
Tiling = tuple[int, int, int]

# Input dtypes the Pallas kernels take; they accumulate in float32.
PALLAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(x: int, multiple: int) -> int:
    return cdiv(x, multiple) * multiple


def check_tiling(tiling) -> Tiling:
    """`tiling` as a tuple of three positive ints, else ValueError."""
    if (not isinstance(tiling, (tuple, list)) or len(tiling) != 3
            or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0
                       for t in tiling)):
        raise ValueError(f"tiling must be a tuple (tm, tk, tn) of three positive ints, "
                         f"got {tiling!r}")
    return tuple(tiling)


def pad_axis(x: Array, axis: int, multiple: int) -> Array:
    """Zero-pad `axis` of `x` up to a multiple of `multiple` (no copy when aligned)."""
    pad = round_up(x.shape[axis], multiple) - x.shape[axis]
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def pad_gmm_operands(lhs: Array, rhs: Array, tiling: Tiling, *,
                     transpose_rhs: bool) -> tuple[Array, Array, int, int]:
    """The operands of a grouped matmul zero-padded to whole tiles.

    lhs `[M, K]` -> `[M_p, K_p]` (multiples of tm and tk); rhs `[E, K, N]` (or
    `[E, N, K]` with `transpose_rhs`) -> K padded to K_p and N to N_p, a
    multiple of tn. Returns `(lhs_p, rhs_p, tiles_k, tiles_n)`.
    """
    tm, tk, tn = tiling
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    lhs_p = pad_axis(pad_axis(lhs, 0, tm), 1, tk)
    rhs_p = pad_axis(pad_axis(rhs, k_axis, tk), n_axis, tn)
    return lhs_p, rhs_p, lhs_p.shape[1] // tk, rhs_p.shape[n_axis] // tn
