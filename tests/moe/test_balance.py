"""Auxiliary losses and metrics (docs/balancing.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import balance


def test_counts_before_dropping_and_mask():
    # Tokens 0-2 choose (0,1), (0,2), (0,1); token 3 is padding.
    expert_index = jnp.array([[0, 1], [0, 2], [0, 1], [3, 3]])
    counts = balance.expert_counts(expert_index, 4, mask=jnp.array([1, 1, 1, 0]))
    np.testing.assert_array_equal(counts, [3, 2, 1, 0])
    np.testing.assert_array_equal(balance.expert_counts(expert_index, 4), [3, 2, 1, 2])


def test_lbl_is_one_under_uniform_assignment_for_any_probs():
    # 4 tokens, 4 experts, each expert chosen exactly twice with k=2.
    expert_index = jnp.array([[0, 1], [2, 3], [1, 2], [3, 0]])
    counts = balance.expert_counts(expert_index, 4)
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (4, 4)))
    np.testing.assert_allclose(balance.load_balancing_loss(probs, counts), 1.0, atol=1e-6)


def test_lbl_is_one_under_uniform_probs_for_any_counts():
    probs = jnp.full((6, 8), 1 / 8)
    counts = jnp.array([10.0, 0, 0, 0, 0, 0, 0, 2])
    np.testing.assert_allclose(balance.load_balancing_loss(probs, counts), 1.0, atol=1e-6)


def test_lbl_is_about_e_under_collapse():
    # Every token sends everything to expert 0 with probability ~1.
    num_experts = 8
    logits = jnp.zeros((16, num_experts)).at[:, 0].set(30.0)
    probs = jax.nn.softmax(logits)
    counts = jnp.zeros(num_experts).at[0].set(16.0)
    np.testing.assert_allclose(balance.load_balancing_loss(probs, counts), num_experts, rtol=1e-6)


def test_lbl_gradient_flows_only_through_probs():
    logits = jax.random.normal(jax.random.key(1), (6, 4))
    counts = jnp.array([3.0, 1.0, 1.0, 1.0])

    def loss(logits, counts):
        return balance.load_balancing_loss(jax.nn.softmax(logits), counts)

    g_logits, g_counts = jax.grad(loss, argnums=(0, 1))(logits, counts)
    np.testing.assert_array_equal(g_counts, np.zeros(4))
    # d/dz of E * sum_i f_i P_i with P = mean softmax.
    f = counts / counts.sum()
    expected = jax.grad(lambda z: 4 * jnp.sum(f * jnp.mean(jax.nn.softmax(z), 0)))(logits)
    np.testing.assert_allclose(g_logits, expected, atol=1e-6)


def test_padding_has_no_effect_on_lbl_and_z_loss():
    logits = jax.random.normal(jax.random.key(2), (5, 4))
    garbage = logits.at[4].set(100.0)
    mask = jnp.array([1, 1, 1, 1, 0])
    probs, probs_garbage = jax.nn.softmax(logits), jax.nn.softmax(garbage)
    counts = jnp.array([2.0, 2.0, 2.0, 2.0])
    np.testing.assert_allclose(balance.load_balancing_loss(probs_garbage, counts, mask=mask),
                               balance.load_balancing_loss(probs[:4], counts), atol=1e-6)
    np.testing.assert_allclose(balance.router_z_loss(garbage, mask=mask),
                               balance.router_z_loss(logits[:4]), atol=1e-6)


def test_z_loss_of_zero_logits_is_log_e_squared():
    np.testing.assert_allclose(balance.router_z_loss(jnp.zeros((3, 8))), np.log(8) ** 2,
                               rtol=1e-6)
    # Not shift invariant: by design it pulls logits towards zero.
    assert balance.router_z_loss(jnp.full((3, 8), 1.0)) > balance.router_z_loss(jnp.zeros((3, 8)))


def test_max_violation():
    np.testing.assert_allclose(balance.max_violation(jnp.array([2.0, 2, 2, 2])), 0.0)
    # mean 2, max 5 -> (5 - 2) / 2
    np.testing.assert_allclose(balance.max_violation(jnp.array([5.0, 1, 1, 1])), 1.5)


def test_router_entropy():
    np.testing.assert_allclose(balance.router_entropy(jnp.full((2, 4), 0.25)), np.log(4),
                               rtol=1e-6)
    np.testing.assert_allclose(balance.router_entropy(jnp.eye(4)), 0.0, atol=1e-6)


def test_dropped_fraction():
    keep = jnp.array([[True, False], [True, True], [False, False]])
    np.testing.assert_allclose(balance.dropped_fraction(keep), 3 / 6)
    np.testing.assert_allclose(balance.dropped_fraction(keep, mask=jnp.array([1, 1, 0])),
                               1 / 4)


def test_dropped_fraction_counts_only_valid_assignments():
    # A variable number of experts per token: token 0 has one assignment (the second
    # column is the "no expert" sentinel), token 1 two; of these three, one is dropped.
    keep = jnp.array([[True, False], [False, True]])
    valid = jnp.array([[True, False], [True, True]])
    np.testing.assert_allclose(balance.dropped_fraction(keep, valid=valid), 1 / 3)
    np.testing.assert_allclose(
        balance.dropped_fraction(keep, mask=jnp.array([0, 1]), valid=valid), 1 / 2)


def test_shape_errors():
    with pytest.raises(ValueError, match="counts must have shape"):
        balance.load_balancing_loss(jnp.zeros((2, 4)), jnp.zeros(3))
    with pytest.raises(ValueError, match="mask must have shape"):
        balance.router_z_loss(jnp.zeros((2, 4)), mask=jnp.ones(3))
