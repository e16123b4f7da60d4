"""`moe.kernels.padded_gmm`: the grouped matmul over tile-aligned groups that the `sort`
dispatch runs on CPU, against per-group matmuls written out by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.dispatch.layout import padded_layout, sorted_layout
from moe.kernels import padded_gmm

K, N = 3, 5


def _padded_lhs(sizes, tile, key):
    """`[R, K]` rows of each group at its tile-aligned start, zeros elsewhere."""
    starts, _ = padded_gmm.padded_starts(jnp.asarray(sizes), tile)
    rows = padded_gmm.padded_rows(sum(sizes), len(sizes), tile)
    lhs = np.zeros((rows, K), np.float32)
    values = np.asarray(jax.random.normal(jax.random.key(key), (rows, K)))
    for g, size in enumerate(sizes):
        lhs[int(starts[g]):int(starts[g]) + size] = values[:size]
    return jnp.asarray(lhs), [int(s) for s in starts]


# (group sizes, tile_m, chunk_m). Scenarios: empty groups between full ones and a
# remainder after a whole chunk (5 = 4 + 1 tile); every row in one group, whose
# remainder window must move back from the buffer's end (13 rows: 3 chunks of 4, one
# tile of 2 left, and the buffer ends 2 rows later); chunk == tile (no switch).
CASES = [([5, 0, 9, 1], 2, 4), ([0, 0, 13, 0], 2, 4), ([3, 0, 2], 1, 1)]


@pytest.mark.parametrize("sizes,tile,chunk", CASES)
def test_values_and_gradients_match_per_group_matmuls(sizes, tile, chunk):
    lhs, starts = _padded_lhs(sizes, tile, key=len(sizes))
    rhs = jax.random.normal(jax.random.key(1), (len(sizes), K, N))
    target = jax.random.normal(jax.random.key(2), (lhs.shape[0], N))

    def reference(lhs, rhs):  # each group's rows, up to its last whole tile, times rhs[g]
        out = jnp.zeros((lhs.shape[0], N))
        for g, (start, size) in enumerate(zip(starts, sizes)):
            end = start + -(-size // tile) * tile
            out = out.at[start:end].set(lhs[start:end] @ rhs[g])
        return out

    def loss(fn):
        return lambda lhs, rhs: jnp.sum(jnp.sin(fn(lhs, rhs)) * target)

    def padded(lhs, rhs):
        return padded_gmm.gmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), tile, chunk)

    @jax.jit
    def both(lhs, rhs):
        return [(f(lhs, rhs), jax.grad(loss(f), argnums=(0, 1))(lhs, rhs))
                for f in (padded, reference)]

    (got, got_grads), (want, want_grads) = both(lhs, rhs)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)
    if sizes[1] == 0:  # an empty group's weight gradient is zero
        np.testing.assert_array_equal(got_grads[1][1], 0.0)


def test_padded_layout_places_each_group_at_a_tile_boundary():
    """4 tokens, k=2, 3 experts (plus the sentinel 3 on one choice: no row), tile 2.
    Sorted: expert 0 holds (t0,c0), (t2,c1); expert 1 (t1,c0); expert 2 (t1,c1),
    (t2,c0), (t3,c0). Padded starts 0, 2, 4; padding rows hold token 4 (the zero row)."""
    expert_index = jnp.array([[0, 3], [1, 2], [2, 0], [2, 3]], jnp.int32)
    layout, sizes = sorted_layout(expert_index, 3)
    padded = padded_layout(layout, sizes, expert_index, tile_m=2)
    assert padded.row_token.shape == (padded_gmm.padded_rows(8, 3, 2),)  # 12
    np.testing.assert_array_equal(padded.row_token[:8], [0, 2, 1, 4, 1, 2, 3, 4])
    np.testing.assert_array_equal(padded.row_choice[:7], [0, 1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(padded.row_token[8:], 4)
    np.testing.assert_array_equal(padded.token_rows, [[0, 12], [2, 4], [5, 1], [6, 12]])


def test_chunk_must_be_a_multiple_of_the_tile():
    with pytest.raises(ValueError, match="chunk_m must be a positive multiple of tile_m"):
        padded_gmm.gmm_forward(jnp.zeros((8, K)), jnp.zeros((2, K, N)),
                               jnp.array([1, 1], jnp.int32), 2, 3)


def test_row_dot_is_refused_with_a_scatter_output():
    # The row dots are per buffer row; a scatter adds rows into tokens, so there is no
    # row-shaped output to pair them with.
    with pytest.raises(ValueError, match="row_dot is only computed without out_token"):
        padded_gmm.gmm_forward(jnp.zeros((8, K)), jnp.zeros((2, K, N)),
                               jnp.array([1, 1], jnp.int32), 2, 4,
                               out_token=jnp.zeros((8,), jnp.int32), num_tokens=4,
                               row_dot=jnp.zeros((8, N)))


@pytest.mark.parametrize("rows,groups,chunk", [
    (64, 8, 32),         # 8 rows per group: one tile, no remainder switch at all
    (2048, 8, 256),      # 256 per group: one 256-row chunk
    (65536, 64, 256),    # 1024 per group (E=64, k=8): still 256
    (16384, 8, 512),     # 2048 per group (E=8, k=2, T=8192): the long-group chunk
    (20000, 8, 512),     # 2500 per group: capped at 512
    (2040, 8, 128),      # 255 per group: rounded down to a power of two
])
def test_chunk_grows_to_512_rows_only_for_long_groups(rows, groups, chunk):
    assert padded_gmm.chunk_for(rows, groups) == chunk
