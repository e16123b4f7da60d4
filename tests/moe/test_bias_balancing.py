"""Auxiliary-loss-free balancing (moe/bias_balancing.py): update rules, schedules, convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import balance, routing
from moe import bias_balancing as bb


def test_sign_update_moves_each_entry_by_exactly_u_or_not_at_all():
    # Loads 6, 2, 4, 4 around the mean 4: expert 0 is overloaded, expert 1 under,
    # experts 2 and 3 sit at the mean and must stay put.
    bias = jnp.array([0.5, -0.25, 0.125, 0.0], jnp.float32)
    counts = jnp.array([6.0, 2.0, 4.0, 4.0])
    new = bb.update_bias(bias, counts, 0.0625, rule="sign")
    np.testing.assert_array_equal(new - bias, [-0.0625, 0.0625, 0.0, 0.0])
    assert new.dtype == jnp.float32


def test_proportional_and_dual_subgradient_directions():
    counts = jnp.array([6.0, 2.0, 4.0, 4.0])  # mean 4, 8 real tokens for k=2
    zero = jnp.zeros(4)
    np.testing.assert_allclose(bb.update_bias(zero, counts, 0.1, rule="proportional"),
                               0.1 * np.array([-0.5, 0.5, 0.0, 0.0]))
    np.testing.assert_allclose(
        bb.update_bias(zero, counts, 0.1, rule="dual_subgradient", num_tokens=8.0),
        0.1 * np.array([-2 / 8, 2 / 8, 0.0, 0.0]))


def test_recentering_keeps_the_sum_at_zero():
    bias = jnp.zeros(5)
    counts = jnp.array([9.0, 1.0, 1.0, 1.0, 3.0])  # sign update alone has sum +3u - u = 2u
    for _ in range(7):
        bias = bb.update_bias(bias, counts, 0.01, rule="sign", recenter=True)
        assert abs(float(jnp.sum(bias))) < 1e-6
    assert float(bias[0]) < 0 < float(bias[1])


def test_bias_gets_no_gradient_through_routing():
    # The bias changes which experts are selected but never the loss's gradient path.
    logits = jax.random.normal(jax.random.PRNGKey(0), (16, 4))

    def loss(bias):
        gating = routing.top_k_gating(logits, 2, score="sigmoid", selection_bias=bias)
        counts = balance.expert_counts(gating.expert_index, 4)
        return jnp.sum(gating.weights) + balance.load_balancing_loss(gating.probs, counts)

    grad = jax.grad(loss)(jnp.array([0.3, -0.1, 0.0, 0.2]))
    np.testing.assert_array_equal(grad, np.zeros(4))


def test_schedules_and_freezing():
    constant = bb.BiasUpdate(rate=0.1)
    inverse = bb.BiasUpdate(rate=0.1, schedule="inverse", decay_steps=10)
    inv_sqrt = bb.BiasUpdate(rate=0.1, schedule="inverse_sqrt", decay_steps=10)
    frozen = bb.BiasUpdate(rate=0.1, freeze_fraction=0.5)
    assert float(constant.rate_at(99, 100)) == pytest.approx(0.1)
    assert float(inverse.rate_at(10, 100)) == pytest.approx(0.05)
    assert float(inv_sqrt.rate_at(30, 100)) == pytest.approx(0.05)
    assert float(frozen.rate_at(49, 100)) == pytest.approx(0.1)
    assert float(frozen.rate_at(50, 100)) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"rule": "multiplicative"}, "rule must be one of"), ({"schedule": "cosine"}, "schedule"),
    ({"rate": 0.0}, "rate must be > 0"), ({"decay_steps": 0}, "decay_steps"),
    ({"freeze_fraction": 1.5}, "freeze_fraction")])
def test_bias_update_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bb.BiasUpdate(**kwargs)


def _skewed_scores(seed=0, num_tokens=2048, num_experts=8):
    """Static skewed sigmoid logits: expert i gets a prior of +0.4 * (E/2 - i)."""
    logits = jax.random.normal(jax.random.PRNGKey(seed), (num_tokens, num_experts))
    return logits + 0.4 * (num_experts / 2 - jnp.arange(num_experts))


@pytest.mark.parametrize("update", [
    bb.BiasUpdate(rule="sign", rate=1e-2),
    bb.BiasUpdate(rule="proportional", rate=5e-2),
    bb.BiasUpdate(rule="dual_subgradient", rate=0.5, schedule="inverse", decay_steps=50),
    bb.BiasUpdate(rule="sign", rate=1e-2, recenter=True)])
def test_max_violation_falls_on_a_static_skewed_distribution(update):
    # 150 updates against the same skewed sigmoid scores (E=8, k=2). MaxVio
    # starts large and the mean over the last 30 updates is far lower.
    logits = _skewed_scores()

    def one_update(bias, n):
        index = routing.top_k_gating(logits, 2, score="sigmoid", selection_bias=bias).expert_index
        counts = balance.expert_counts(index, 8)
        new = bb.update_bias(bias, counts, update.rate_at(n, 150), rule=update.rule,
                             recenter=update.recenter, num_tokens=logits.shape[0])
        return new, balance.max_violation(counts)

    _, violations = jax.lax.scan(one_update, jnp.zeros(8), jnp.arange(150))
    violations = np.asarray(violations)
    assert violations[0] > 1.0
    assert violations[-30:].mean() < 0.25 * violations[0], violations[::10]
