"""Grouped matmul over a tile-aligned ("padded") row layout, in plain XLA, for CPU.

Layout: group g owns the `sizes[g]` rows starting at the tile-aligned offset

    start[g] = sum_{h < g} round_up(sizes[h], tile_m)

of an `[R, K]` buffer; the rows between a group's end and the next offset (and
past the last group) are padding and **must be zero** (the dispatch gathers a
zero row there). A group's rows up to its last whole tile are multiplied by its
weights (so its zero padding rows give zero outputs, and their gradient there is
`grad @ rhs[g]^T`, which the dispatch never reads); rows past the last group's
tiles give zeros. A buffer of `padded_rows(M, E, tile_m)` rows holds any split
of M rows into E groups. Because no tile straddles two groups, nothing is
visited twice and nothing is masked.

The loop runs over the groups (a static E iterations): each group's weight
slice is taken once, and its rows go through the matmul in chunks of
`chunk_m` rows, then one remainder chunk of a whole number of tiles (a
`lax.switch` over the `chunk_m // tile_m` static sizes). On CPU each `dot`
call pays for packing its weight operand, so few large calls per group beat
one call per tile (`xla_gmm.py`), which visits a group's tiles one by one.

    gmm(lhs [R, K], rhs [E, K, N], group_sizes [E]) -> [R, N]   (padding rows 0)
    tgmm(lhs [R, K], grad [R, N], group_sizes [E]) -> [E, K, N] (empty groups 0)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe.kernels.common import round_up
from moe.kernels.xla_gmm import accumulator_dtype

Array = jax.Array

# Measured on CPU (f32, d_model 512, MoE layer forward+backward ÷ dense, CPU time): tiles
# of 32 / 64 / 128 rows gave 1.51 / 1.63 / 1.86x at 256 rows per expert (T=1024, E=8,
# k=2) and 1.44 / 1.45 / 1.49x at 1024 (T=8192, E=64, k=8): smaller tiles pad less.
DEFAULT_TILE_M = 32
DEFAULT_CHUNK_M = 256
# Experts averaging at least LONG_GROUP_ROWS rows take chunks of LONG_CHUNK_M. Measured on
# CPU (f32, E=8, k=2, T=8192, d 512, d_ff 1024: 2048 rows per expert; the layer's
# forward+backward, interleaved, 9 rounds, twice): 512-row chunks took 0.98x and 0.95x the
# time of 256-row ones (the layer 1.10-1.13x dense -> 1.06-1.07x), at +1.4 s compile
# (the remainder switch doubles to 16 branches). At 1024 rows per expert (E=64, k=8) the
# gain was 0-5% and within the noise, and at 256 (the small preset's step) 0-5% at +0.7 s
# compile per layer: not worth it there (docs/cpu_targets.md).
LONG_GROUP_ROWS = 2048
LONG_CHUNK_M = 512


def chunk_for(num_rows: int, num_groups: int, tile_m: int = DEFAULT_TILE_M) -> int:
    """Rows per matmul for `num_rows` rows in `num_groups` groups: the mean group size
    rounded down to a power of two, within [tile_m, DEFAULT_CHUNK_M] (LONG_CHUNK_M for a
    mean of at least LONG_GROUP_ROWS), a multiple of tile_m. Small groups get small
    chunks, and so fewer remainder sizes (each a branch of the switch, compiled
    separately): tiny test shapes compile no switch at all."""
    mean = max(num_rows // max(num_groups, 1), 1)
    cap = LONG_CHUNK_M if mean >= LONG_GROUP_ROWS else DEFAULT_CHUNK_M
    chunk = min(cap, 1 << (mean.bit_length() - 1))
    return max(tile_m, chunk // tile_m * tile_m)


def padded_rows(num_rows: int, num_groups: int, tile_m: int) -> int:
    """Static buffer rows holding `num_rows` rows in `num_groups` tile-aligned groups."""
    return round_up(num_rows + num_groups * (tile_m - 1), tile_m)


def padded_starts(group_sizes: Array, tile_m: int) -> tuple[Array, Array]:
    """(start `[E] int32`, padded size `[E] int32`) of each group in the padded layout."""
    sizes = group_sizes.astype(jnp.int32)
    padded = (sizes + tile_m - 1) // tile_m * tile_m
    return jnp.cumsum(padded) - padded, padded


def _check(tile_m: int, chunk_m: int) -> None:
    if tile_m < 1 or chunk_m < tile_m or chunk_m % tile_m:
        raise ValueError(f"chunk_m must be a positive multiple of tile_m, got tile_m={tile_m}, "
                         f"chunk_m={chunk_m}")


def _fit_chunk(num_rows: int, tile_m: int, chunk_m: int) -> int:
    """`chunk_m` shrunk to whole tiles of a buffer of `num_rows >= tile_m` rows."""
    return max(tile_m, min(chunk_m, num_rows // tile_m * tile_m))


def _chunks(start: Array, size: Array, chunk_m: int, visit: Callable[[Array, object], object],
            carry):
    """`carry = visit(row, carry)` for the whole `chunk_m`-row chunks of `[start, start+size)`."""
    return jax.lax.fori_loop(0, size // chunk_m, lambda i, c: visit(start + i * chunk_m, c),
                             carry)


def _remainder(size: Array, tile_m: int, chunk_m: int,
               visit: Callable[[int, object], object], carry):
    """`carry = visit(rows, carry)` for the `rows = size % chunk_m` left after the whole
    chunks (a multiple of `tile_m`), `rows` static in each branch of a `lax.switch`;
    nothing when it is 0. The switch copies its operands: keep `carry` small."""
    if chunk_m == tile_m:
        return carry
    branches = [lambda c: c] + [functools.partial(visit, j * tile_m)
                                for j in range(1, chunk_m // tile_m)]
    return jax.lax.switch(size % chunk_m // tile_m, branches, carry)


def _rows(array: Array, row_token: Array | None, row, rows: int) -> Array:
    """`rows` rows of the padded layout from `row`: a slice of `array [R, K]`, or with
    `row_token [R]` the token rows of `array [T, K]` they hold (zero for a token
    out of range, e.g. the padding's T)."""
    if row_token is None:
        return jax.lax.dynamic_slice_in_dim(array, row, rows)
    tokens = jax.lax.dynamic_slice_in_dim(row_token, row, rows)
    return array.at[tokens].get(mode="fill", fill_value=0)


@dataclasses.dataclass(frozen=True)
class Rows:
    """An operand computed chunk by chunk inside the loops: row r is
    `fn(a_1[r], a_2[r], ...)` of `arrays` (each `[R, K]`, or token-major `[T, K]` read
    through `token [R]` as `_rows` does). With `fn`, e.g. an activation, the `[R, K]`
    result is never stored whole."""

    arrays: tuple[Array, ...]
    token: Array | None = None
    fn: Callable[..., Array] | None = None

    @property
    def dtype(self):
        return self.arrays[0].dtype

    @property
    def width(self) -> int:
        return self.arrays[0].shape[1]

    @property
    def num_rows(self) -> int:
        """R, the padded layout's rows."""
        return (self.arrays[0] if self.token is None else self.token).shape[0]

    def take(self, row, rows: int) -> Array:
        chunks = [_rows(a, self.token, row, rows) for a in self.arrays]
        return chunks[0] if self.fn is None else self.fn(*chunks)


def _as_rows(operand: Array | Rows | None, token: Array | None) -> Rows | None:
    if operand is None or isinstance(operand, Rows):
        return operand
    return Rows((operand,), token)


def gmm_forward(lhs: Array | Rows, rhs: Array, group_sizes: Array, tile_m: int, chunk_m: int,
                transpose_rhs: bool = False, out_dtype=None, *,
                lhs_token: Array | None = None, out_token: Array | None = None,
                out_weight: Array | None = None, num_tokens: int | None = None,
                row_dot: Array | Rows | None = None):
    """`[R, K] x [E, K, N]` (`[E, N, K]` with transpose_rhs) -> `[R, N]`, no VJP.

    Fused permutation (`moe.kernels.padded_fused`): with `lhs_token [R]`, row r's
    left operand is `lhs[lhs_token[r]]` of a token-major `lhs [T, K]`; with
    `out_token [R]`, row r's product is added into row `out_token[r]` of a
    `[num_tokens, N]` accumulator-dtype output instead (tokens out of range, the
    padding's, are dropped). `out_weight [R]`: row r's product is multiplied by it
    first. `row_dot [R, N]` (not with `out_token`): also returns `dots [R]` float32,
    `dots[r] = <product[r], row_dot[r]>` of the product before the weight, as
    `(out, dots)`. `lhs` and `row_dot` may be `Rows`, computed chunk by chunk.
    """
    _check(tile_m, chunk_m)
    scatter = out_token is not None
    if scatter and row_dot is not None:
        raise ValueError("row_dot is only computed without out_token")
    lhs, row_dot = _as_rows(lhs, lhs_token), _as_rows(row_dot, None)
    num_rows = lhs.num_rows
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    acc_dtype = accumulator_dtype(lhs.dtype, rhs.dtype)
    final_dtype = acc_dtype if scatter else (out_dtype or lhs.dtype)
    out_rows = num_tokens if scatter else num_rows

    def result(out, dots):
        out = out.astype(final_dtype)
        return out if row_dot is None else (out, dots)

    if num_rows < tile_m:  # no room for a non-empty group
        return result(jnp.zeros((out_rows, n)), jnp.zeros((num_rows,), jnp.float32))
    # The loop writes the accumulator dtype and the result is cast once afterwards: a
    # bfloat16 cast inside the loop, before each write, made the loop twice as slow on CPU.
    chunk_m = _fit_chunk(num_rows, tile_m, chunk_m)
    starts, sizes = padded_starts(group_sizes, tile_m)
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

    def scaled(values, row):
        if out_weight is None:
            return values
        w = jax.lax.dynamic_slice_in_dim(out_weight, row, values.shape[0])
        return values * w[:, None].astype(values.dtype)

    def dotted(values, row):  # [rows] float32 row dots, or None
        if row_dot is None:
            return None
        other = row_dot.take(row, values.shape[0])
        return jnp.sum(values.astype(jnp.float32) * other.astype(jnp.float32), axis=1)

    def place(carry, values, row, at):
        """Write row `row`'s chunk product at offset `at` of the (out, dots) arrays."""
        out, dots = carry
        out = jax.lax.dynamic_update_slice_in_dim(out, scaled(values, row), at, 0)
        if dots is not None:
            dots = jax.lax.dynamic_update_slice_in_dim(dots, dotted(values, row), at, 0)
        return out, dots

    def group_body(g, carry):
        weights = jax.lax.dynamic_index_in_dim(rhs, g, keepdims=False)
        start, size = starts[g], sizes[g]

        def product(row, rows):
            return jax.lax.dot_general(lhs.take(row, rows), weights,
                                       (contract, ((), ())), preferred_element_type=acc_dtype)

        def store(carry, row, values):
            if not scatter:
                return place(carry, values, row, row)
            out, dots = carry
            tokens = jax.lax.dynamic_slice_in_dim(out_token, row, values.shape[0])
            return out.at[tokens].add(scaled(values, row), mode="drop"), dots

        carry = _chunks(start, size, chunk_m,
                        lambda row, c: store(c, row, product(row, chunk_m)), carry)
        # The remainder is patched into a [chunk_m, N] window (read, patched in the
        # switch, written back), so the switch never copies all of `out`; near the end of
        # the buffer the window starts before the remainder.
        rest_row = start + size // chunk_m * chunk_m
        window_row = jnp.minimum(rest_row, num_rows - chunk_m)

        def patch(rows, window):
            return place(window, product(rest_row, rows), rest_row, rest_row - window_row)

        out, dots = carry
        if not scatter:
            window = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, window_row, chunk_m),
                                  carry)
            window = _remainder(size, tile_m, chunk_m, patch, window)
            return jax.tree.map(
                lambda a, w: jax.lax.dynamic_update_slice_in_dim(a, w, window_row, 0),
                carry, window)
        # Scatter: the window's products (zero outside the remainder, already weighted)
        # are added with the tokens of the rows outside the remainder moved out of range.
        window, _ = _remainder(size, tile_m, chunk_m, patch,
                               (jnp.zeros((chunk_m, n), acc_dtype), None))
        local = jnp.arange(chunk_m) + window_row
        tokens = jax.lax.dynamic_slice_in_dim(out_token, window_row, chunk_m)
        inside = (local >= rest_row) & (local < start + size)
        return out.at[jnp.where(inside, tokens, out_rows)].add(window, mode="drop"), dots

    carry = (jnp.zeros((out_rows, n), acc_dtype),
             None if row_dot is None else jnp.zeros((num_rows,), jnp.float32))
    return result(*jax.lax.fori_loop(0, group_sizes.shape[0], group_body, carry))


def tgmm_forward(lhs: Array | Rows, grad: Array, group_sizes: Array, tile_m: int, chunk_m: int,
                 out_dtype=None, *, lhs_token: Array | None = None,
                 grad_token: Array | None = None, lhs_weight: Array | None = None) -> Array:
    """Per-group `lhs_g^T @ grad_g`: `[R, K], [R, N] -> [E, K, N]`; empty groups are zero.
    `lhs_token` / `grad_token [R]`: that operand is token-major `[T, .]`, its rows
    gathered through the index (as `gmm_forward`'s `lhs_token`); `lhs_weight [R]`:
    lhs row r is scaled by it first. `lhs` may be `Rows`, computed chunk by chunk."""
    _check(tile_m, chunk_m)
    lhs = _as_rows(lhs, lhs_token)
    out_dtype = out_dtype or lhs.dtype
    num_rows = lhs.num_rows
    num_groups, k, n = group_sizes.shape[0], lhs.width, grad.shape[1]
    if num_rows < tile_m:
        return jnp.zeros((num_groups, k, n), out_dtype)
    chunk_m = _fit_chunk(num_rows, tile_m, chunk_m)
    acc_dtype = accumulator_dtype(lhs.dtype, grad.dtype)
    starts, sizes = padded_starts(group_sizes, tile_m)

    def group_body(g, out):
        start, size = starts[g], sizes[g]

        def add(row, rows, acc):
            a = lhs.take(row, rows)
            if lhs_weight is not None:
                a = a * jax.lax.dynamic_slice_in_dim(lhs_weight, row, rows)[:, None].astype(a.dtype)
            b = _rows(grad, grad_token, row, rows)
            return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                             preferred_element_type=acc_dtype)

        # The remainder comes first and starts the accumulator: a switch that took the
        # accumulator as an operand would copy it.
        head = size % chunk_m
        zeros = jnp.zeros((k, n), acc_dtype)
        acc = _remainder(size, tile_m, chunk_m, lambda rows, acc: add(start, rows, acc), zeros)
        acc = _chunks(start + head, size - head, chunk_m,
                      lambda row, acc: add(row, chunk_m, acc), acc)
        return jax.lax.dynamic_update_index_in_dim(out, acc.astype(out_dtype), g, 0)

    out = jnp.zeros((num_groups, k, n), out_dtype)
    return jax.lax.fori_loop(0, num_groups, group_body, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gmm(lhs: Array, rhs: Array, group_sizes: Array, tile_m: int = DEFAULT_TILE_M,
        chunk_m: int = DEFAULT_CHUNK_M) -> Array:
    """Differentiable grouped matmul over the padded layout (module docstring)."""
    return gmm_forward(lhs, rhs, group_sizes, tile_m, chunk_m)


def _gmm_fwd(lhs, rhs, group_sizes, tile_m, chunk_m):
    return gmm_forward(lhs, rhs, group_sizes, tile_m, chunk_m), (lhs, rhs, group_sizes)


def _gmm_bwd(tile_m, chunk_m, residuals, grad):
    lhs, rhs, group_sizes = residuals
    grad = grad.astype(lhs.dtype)
    grad_lhs = gmm_forward(grad, rhs, group_sizes, tile_m, chunk_m, transpose_rhs=True)
    grad_rhs = tgmm_forward(lhs, grad, group_sizes, tile_m, chunk_m, rhs.dtype)
    return grad_lhs, grad_rhs, None


gmm.defvjp(_gmm_fwd, _gmm_bwd)
