"""`moe.kernels.padded_fused`: the padded grouped matmuls with the permutation inside
their loops (what the `sort` dispatch runs on CPU), against row-by-row references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.dispatch.layout import padded_layout, sorted_layout
from moe.kernels import padded_fused

K, N = 3, 5


def _layout(expert_index, num_experts, tile):
    """(row_token [R], group sizes) of the padded layout for a hand-written routing."""
    expert_index = jnp.asarray(expert_index, jnp.int32)
    layout, sizes = sorted_layout(expert_index, num_experts)
    return padded_layout(layout, sizes, expert_index, tile).row_token, sizes


def _row_groups(row_token, sizes, tile):
    """Group of each row (-1 for padding rows), from the padded starts."""
    groups, row = [], 0
    for g, size in enumerate(np.asarray(sizes)):
        padded = -(-int(size) // tile) * tile
        groups += [g] * int(size) + [-1] * (padded - int(size))
        row += padded
    return groups + [-1] * (row_token.shape[0] - row)


# (expert_index [T, k], E, tile, chunk). Scenarios:
#  - k=2 with each token in two groups (duplicate tokens across groups), an empty
#    expert (1) between full ones, a remainder after whole chunks;
#  - every token to expert 2 (one group holding all rows; its remainder window must
#    move back from the buffer's end);
#  - chunk == tile (no remainder switch), with the sentinel E on some choices (no row).
CASES = [
    ([[0, 2], [2, 3], [0, 3], [3, 0], [2, 0], [0, 3], [3, 2]], 4, 2, 4),
    ([[2], [2], [2], [2], [2], [2], [2], [2], [2]], 3, 2, 4),
    ([[0, 3], [1, 2], [2, 0], [2, 3]], 3, 1, 1),
]


@pytest.mark.parametrize("expert_index,num_experts,tile,chunk", CASES)
def test_gather_gmm_and_gmm_scatter_match_row_by_row_products(expert_index, num_experts,
                                                              tile, chunk):
    row_token, sizes = _layout(expert_index, num_experts, tile)
    num_tokens = len(expert_index)
    groups = _row_groups(row_token, sizes, tile)
    keys = jax.random.split(jax.random.key(len(expert_index)), 6)
    x = jax.random.normal(keys[0], (num_tokens, K))
    rhs = jax.random.normal(keys[1], (num_experts, K, N))
    lhs = jax.random.normal(keys[2], (row_token.shape[0], K))
    target_rows = jax.random.normal(keys[3], (row_token.shape[0], N))
    target_tokens = jax.random.normal(keys[4], (num_tokens, N))
    row_weight = jax.random.uniform(keys[5], (row_token.shape[0],))

    def gather_ref(x, rhs):  # row r: x[token] @ rhs[group], zero on padding
        return jnp.stack([x[int(row_token[r])] @ rhs[g] if g >= 0 else jnp.zeros(N)
                          for r, g in enumerate(groups)])

    def scatter_ref(lhs, rhs, w):  # token t: weighted sum of its rows' silu(lhs) @ rhs
        y = jnp.zeros((num_tokens, N))
        for r, g in enumerate(groups):
            if g >= 0:
                y = y.at[int(row_token[r])].add(w[r] * (jax.nn.silu(lhs[r]) @ rhs[g]))
        return y

    def gather(x, rhs):
        return padded_fused.gather_gmm(x, rhs, sizes, row_token, tile, chunk)

    def scatter(lhs, rhs, w):
        return padded_fused.gmm_scatter(lhs, None, rhs, sizes, row_token, w, num_tokens,
                                        "silu", tile, chunk)

    for fn, ref, args, target in ((gather, gather_ref, (x, rhs), target_rows),
                                  (scatter, scatter_ref, (lhs, rhs, row_weight), target_tokens)):
        def loss(f, target=target):
            return lambda *a: jnp.sum(jnp.sin(f(*a)) * target)

        np.testing.assert_allclose(jax.jit(fn)(*args), ref(*args), atol=1e-5)
        argnums = tuple(range(len(args)))  # the scatter's routing weights too
        got = jax.jit(jax.grad(loss(fn), argnums=argnums))(*args)
        want = jax.grad(loss(ref), argnums=argnums)(*args)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5)
    if num_experts == 4:  # expert 1 got no rows: its weight gradients are zero
        grads = jax.grad(lambda r: jnp.sum(gather(x, r)) + jnp.sum(scatter(lhs, r, row_weight)))(
            rhs)
        np.testing.assert_array_equal(grads[1], 0.0)


def test_gmm_scatter_accumulates_in_float32_and_gather_gmm_keeps_bfloat16():
    """bfloat16 operands: the scatter's output is float32 (a token's k rows are summed
    there), the gather's is bfloat16, and both agree with float32 math to bf16 rounding."""
    expert_index, num_experts, tile, chunk = CASES[0]
    row_token, sizes = _layout(expert_index, num_experts, tile)
    x = jax.random.normal(jax.random.key(0), (len(expert_index), K))
    rhs = jax.random.normal(jax.random.key(1), (num_experts, K, N))
    lhs = jax.random.normal(jax.random.key(2), (row_token.shape[0], K))
    bf16 = jnp.bfloat16
    up = padded_fused.gather_gmm(x.astype(bf16), rhs.astype(bf16), sizes, row_token, tile,
                                 chunk)
    w = jnp.linspace(0.1, 1.0, row_token.shape[0])
    y = padded_fused.gmm_scatter(lhs.astype(bf16), None, rhs.astype(bf16), sizes, row_token,
                                 w, x.shape[0], "relu", tile, chunk)
    assert up.dtype == bf16 and y.dtype == jnp.float32
    np.testing.assert_allclose(up.astype(jnp.float32),
                               padded_fused.gather_gmm(x, rhs, sizes, row_token, tile, chunk),
                               atol=0.1, rtol=0.02)
    np.testing.assert_allclose(y, padded_fused.gmm_scatter(lhs, None, rhs, sizes, row_token,
                                                           w, x.shape[0], "relu", tile,
                                                           chunk),
                               atol=0.1, rtol=0.02)
