"""ToMoE's pure pieces (moe/tomoe.py) on hand-made inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import tomoe as tm
from moe.experts import ExpertFFN


def _dense(x, ffn, activation):
    up = x @ ffn["wi"]
    if "wi_gate" in ffn:
        return (jax.nn.silu(x @ ffn["wi_gate"]) * up) @ ffn["wo"]
    return jax.nn.relu(up) @ ffn["wo"]


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_all_groups_active_with_weight_one_is_the_dense_mlp(activation):
    """d=3, f=6 split into E=3 groups {4,0}, {1,5}, {2,3}: the MoE with every expert at
    weight 1 is the dense MLP; with a mask it is the MLP with the other units removed."""
    rng = np.random.default_rng(0)
    ffn = {"wi": rng.normal(size=(3, 6)), "wo": rng.normal(size=(6, 3))}
    if activation == "swiglu":
        ffn["wi_gate"] = rng.normal(size=(3, 6))
    groups = tm.check_groups([[4, 0], [1, 5], [2, 3]], 6, 3)
    experts = tm.partition_ffn(ffn, groups)
    assert experts["wi"].shape == (3, 3, 2) and experts["wo"].shape == (3, 2, 3)
    np.testing.assert_array_equal(experts["wi"][0], ffn["wi"][:, [4, 0]])
    x = jnp.asarray(rng.normal(size=(5, 3)))
    e = ExpertFFN(wi=jnp.asarray(experts["wi"]), wo=jnp.asarray(experts["wo"]),
                  wi_gate=None if activation == "relu" else jnp.asarray(experts["wi_gate"]),
                  activation=activation)
    np.testing.assert_allclose(tm.masked_output(x, e, jnp.ones((5, 3))),
                               _dense(x, ffn, activation), rtol=1e-5, atol=1e-6)
    # Expert 1 off: the dense MLP with units 1 and 5 zeroed in W_o.
    cut = dict(ffn, wo=ffn["wo"] * np.asarray([1, 0, 1, 1, 1, 0.0])[:, None])
    np.testing.assert_allclose(tm.masked_output(x, e, jnp.asarray([[1.0, 0, 1]] * 5)),
                               _dense(x, cut, activation), rtol=1e-5, atol=1e-6)


def test_coactivation_groups_put_co_firing_units_together_and_permute():
    """Units 0, 2, 5 fire on the first half of the tokens, units 1, 3, 4 on the second:
    two groups of three, and every unit exactly once."""
    h = np.zeros((40, 6))
    h[:20, [0, 2, 5]] = np.random.default_rng(1).uniform(0.5, 1.0, (20, 3))
    h[20:, [1, 3, 4]] = np.random.default_rng(2).uniform(0.5, 1.0, (20, 3))
    groups = tm.coactivation_groups(h, 2, seed=3)
    assert groups.tolist() == [[0, 2, 5], [1, 3, 4]]
    big = tm.coactivation_groups(np.random.default_rng(0).normal(size=(50, 24)), 4)
    assert sorted(big.reshape(-1).tolist()) == list(range(24)) and big.shape == (4, 6)


def test_bad_groups_and_sizes_are_refused():
    with pytest.raises(ValueError, match="must divide the dense d_ff=6"):
        tm.check_groups([[0, 1, 2, 3]], 6, 4)
    with pytest.raises(ValueError, match="must partition the 4 hidden units"):
        tm.check_groups([[0, 1], [1, 2]], 4, 2)
    with pytest.raises(ValueError, match="must divide the dense d_ff=6"):
        tm.coactivation_groups(np.ones((3, 6)), 4)


def test_straight_through_mask_is_hard_forward_and_soft_backward():
    """Forward: exactly the top-2 indicator; backward: the sigmoid's gradient, so the
    unselected expert's logit gets a gradient too. The penalty is the squared gap
    between the soft active fraction and the target."""
    logits = jnp.asarray([[2.0, -1.0, 0.5]])
    mask, soft = tm.straight_through_mask(logits, 2, tau=0.5)
    np.testing.assert_array_equal(mask, [[1.0, 0.0, 1.0]])
    grad = jax.grad(lambda z: jnp.sum(tm.straight_through_mask(z, 2, 0.5)[0]
                                      * jnp.asarray([1.0, 1.0, 1.0])))(logits)
    s = jax.nn.sigmoid(logits / 0.5)
    np.testing.assert_allclose(grad, s * (1 - s) / 0.5, rtol=1e-6)
    np.testing.assert_allclose(tm.active_penalty(soft, jnp.ones(1), 0.5),
                               (jnp.mean(s) - 0.5) ** 2, rtol=1e-6)


def test_magnitude_keep_ranks_units_by_weight_norm_products():
    """Unit scores ‖W_i[:, u]‖·‖W_o[u]‖ = 1·3, 2·1, 4·4, 1·1: keeping 2 keeps units 0 and 2."""
    ffn = {"wi": np.asarray([[1.0, 2.0, 4.0, 1.0]]), "wo": np.asarray([[3.0], [1.0], [4.0], [1.0]])}
    assert tm.magnitude_keep(ffn, 2).tolist() == [0, 2]


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_static_pruning_keeping_every_unit_is_the_identity_and_cuts_the_others(activation):
    """d=3, f=5: keeping all 5 units by magnitude returns the weights unchanged (the
    units in order); keeping 3 gives the MLP whose output is the sum over those units."""
    rng = np.random.default_rng(1)
    ffn = {"wi": rng.normal(size=(3, 5)), "wo": rng.normal(size=(5, 3))}
    if activation == "swiglu":
        ffn["wi_gate"] = rng.normal(size=(3, 5))
    same = tm.prune_units(ffn, tm.magnitude_keep(ffn, 5))
    assert all(np.array_equal(same[w], ffn[w]) for w in ffn)
    units = tm.magnitude_keep(ffn, 3)
    cut = tm.prune_units(ffn, units)
    x = rng.normal(size=(4, 3))
    mask = np.zeros(5)
    mask[units] = 1.0  # the dense MLP with the other units' outputs zeroed
    masked = {**ffn, "wo": ffn["wo"] * mask[:, None]}
    np.testing.assert_allclose(_dense(x, cut, activation), _dense(x, masked, activation),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"does not know the dense FFN parameters \['bi'\]"):
        tm.prune_units({**ffn, "bi": np.zeros(5)}, units)
