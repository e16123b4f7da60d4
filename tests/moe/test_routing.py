"""Routing invariants on small hand-written gate matrices (conventions: moe/routing.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import routing

LN = np.log


def _logits_from_probs(probs):
    return jnp.log(jnp.asarray(probs, jnp.float32))


# Three tokens, four experts. Token 0 prefers experts 2 then 0; token 1 is
# nearly uniform with a slight preference for 3 then 1; token 2 is confident
# about expert 1, then 2.
PROBS = np.array([
    [0.30, 0.10, 0.50, 0.10],
    [0.24, 0.25, 0.24, 0.27],
    [0.05, 0.80, 0.10, 0.05],
], np.float32)


def test_variant_a_raw_softmax_weights_sum_below_one():
    out = routing.top_k_gating(_logits_from_probs(PROBS), 2, normalize=False)
    np.testing.assert_array_equal(out.expert_index, [[2, 0], [3, 1], [1, 2]])
    np.testing.assert_allclose(out.weights, [[0.5, 0.3], [0.27, 0.25], [0.8, 0.1]], atol=1e-6)
    assert np.all(np.sum(out.weights, -1) < 1.0)
    np.testing.assert_allclose(out.probs, PROBS, atol=1e-6)


def test_variant_b_normalized_weights_sum_to_one_and_equal_topk_then_softmax():
    logits = _logits_from_probs(PROBS)
    out = routing.top_k_gating(logits, 2, normalize=True)
    np.testing.assert_allclose(np.sum(out.weights, -1), 1.0, atol=1e-6)
    # top-k of the logits, then softmax over just those k.
    top_logits, _ = jax.lax.top_k(logits, 2)
    np.testing.assert_allclose(out.weights, jax.nn.softmax(top_logits, -1), atol=1e-6)
    np.testing.assert_allclose(out.weights[0], [0.5 / 0.8, 0.3 / 0.8], atol=1e-6)


def test_variant_c_sigmoid_normalized_scaled():
    logits = jnp.array([[2.0, -1.0, 0.0, 1.0]], jnp.float32)
    out = routing.top_k_gating(logits, 2, normalize=True, score="sigmoid", route_scale=2.5)
    s = jax.nn.sigmoid(logits[0])
    np.testing.assert_array_equal(out.expert_index, [[0, 3]])
    np.testing.assert_allclose(out.weights[0], 2.5 * s[jnp.array([0, 3])] / (s[0] + s[3]),
                               atol=1e-6)
    np.testing.assert_allclose(np.sum(out.weights), 2.5, atol=1e-6)
    np.testing.assert_allclose(out.probs, jax.nn.sigmoid(logits), atol=1e-6)


def test_selection_bias_changes_selection_never_weights():
    # A bias of +1 on expert 3 pulls it into every token's top-1; the weight
    # is still the unbiased probability of expert 3.
    logits = _logits_from_probs(PROBS)
    bias = jnp.array([0.0, 0.0, 0.0, 1.0])
    out = routing.top_k_gating(logits, 1, selection_bias=bias)
    np.testing.assert_array_equal(out.expert_index[:, 0], [3, 3, 3])
    np.testing.assert_allclose(out.weights[:, 0], PROBS[:, 3], atol=1e-6)
    np.testing.assert_allclose(out.probs, PROBS, atol=1e-6)
    # For the same selected set, weights are identical with and without bias.
    plain = routing.top_k_gating(logits, 4)
    biased = routing.top_k_gating(logits, 4, selection_bias=jnp.array([0.3, 0.0, -0.2, 0.1]))
    np.testing.assert_allclose(np.sort(plain.weights, -1), np.sort(biased.weights, -1))


def test_selection_bias_gets_no_gradient():
    logits = _logits_from_probs(PROBS)

    def loss(bias):
        return jnp.sum(routing.top_k_gating(logits, 2, selection_bias=bias).weights)

    np.testing.assert_array_equal(jax.grad(loss)(jnp.zeros(4)), np.zeros(4))


def test_selected_experts_distinct_and_ties_break_low():
    out = routing.top_k_gating(jnp.zeros((5, 6)), 3)
    np.testing.assert_array_equal(out.expert_index, np.tile([0, 1, 2], (5, 1)))
    for row in np.asarray(routing.top_k_gating(jax.random.normal(jax.random.key(0), (50, 8)),
                                               4).expert_index):
        assert len(set(row)) == 4


def test_additive_noise_changes_selection_only():
    logits = jnp.zeros((64, 8))
    noisy = routing.top_k_gating(logits, 1, noise_std=1.0, rng=jax.random.key(0))
    assert len(np.unique(noisy.expert_index)) > 1  # noise breaks the all-zero tie
    np.testing.assert_allclose(noisy.weights, 1 / 8, atol=1e-6)  # weights are noise-free
    with pytest.raises(ValueError, match="rng"):
        routing.top_k_gating(logits, 1, noise_std=1.0)


def test_group_limited_routing():
    # Two groups of two experts: group {0,1} scores 0.9+0.8, group {2,3} 0.7+0.1.
    # With top_groups=1 the token must pick from {0,1} even though expert 2 beats 1.
    scores = jnp.array([[0.9, 0.6, 0.7, 0.1]])
    out = routing.top_k_gating(jnp.log(scores), 2, num_groups=2, top_groups=1)
    np.testing.assert_array_equal(out.expert_index, [[0, 1]])
    unlimited = routing.top_k_gating(jnp.log(scores), 2)
    np.testing.assert_array_equal(unlimited.expert_index, [[0, 2]])
    with pytest.raises(ValueError, match="num_groups"):
        routing.top_k_gating(jnp.log(scores), 2, num_groups=3, top_groups=1)


@pytest.mark.parametrize("k", [0, 5])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match="k must be in"):
        routing.top_k_gating(jnp.zeros((2, 4)), k)


def test_unknown_score():
    with pytest.raises(ValueError, match="score must be one of"):
        routing.top_k_gating(jnp.zeros((2, 4)), 1, score="tanh")


def test_expert_choice_each_expert_takes_its_top_tokens():
    # Expert 0's column: token 0 (0.30) and token 1 (0.24) are its best two.
    out = routing.expert_choice_gating(_logits_from_probs(PROBS), 2)
    np.testing.assert_array_equal(out.token_index, [[0, 1], [2, 1], [0, 1], [1, 0]])
    np.testing.assert_allclose(out.weights[0], [0.30, 0.24], atol=1e-6)
    np.testing.assert_allclose(out.weights, np.take_along_axis(PROBS.T, out.token_index, 1),
                               atol=1e-6)
    assert out.token_index.shape == (4, 2)


def test_expert_choice_capacity_and_average_experts_per_token():
    num_tokens, num_experts, cf = 32, 4, 2.0
    capacity = routing.expert_choice_capacity(num_tokens, num_experts, cf)
    assert capacity == 16
    out = routing.expert_choice_gating(jax.random.normal(jax.random.key(0), (32, 4)), capacity)
    per_token = np.bincount(np.asarray(out.token_index).reshape(-1), minlength=num_tokens)
    assert per_token.mean() == cf
    with pytest.raises(ValueError, match="capacity"):
        routing.expert_choice_gating(jnp.zeros((4, 2)), 5)


def _leakage(route_fn):
    """Does perturbing the last token change how token 0 is routed?"""
    x = jax.random.normal(jax.random.key(1), (8, 4))
    base = route_fn(x)
    perturbed = route_fn(x.at[-1].set(x[-1] + jnp.array([5.0, -5.0, 5.0, -5.0])))
    return not np.array_equal(base, perturbed)


def test_leakage_expert_choice_yes_token_choice_never():
    def token_choice_of_token0(x):
        return np.asarray(routing.top_k_gating(x, 2).expert_index[0])

    def experts_choosing_token0(x):
        token_index = np.asarray(routing.expert_choice_gating(x, 2).token_index)
        return np.any(token_index == 0, axis=1)

    # Token 0 is expert 0's second-best token; the perturbation makes the last
    # token beat it, so expert 0 drops token 0: the future leaked into the past.
    x = jnp.array([[2.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0],
                   [0, 0, 0, 1.0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0]])
    ec_before = experts_choosing_token0(x)
    ec_after = experts_choosing_token0(x.at[-1, 0].set(10.0))
    assert ec_before[0] and not ec_after[0]
    assert not _leakage(token_choice_of_token0)
    np.testing.assert_array_equal(token_choice_of_token0(x),
                                  token_choice_of_token0(x.at[-1, 0].set(10.0)))
