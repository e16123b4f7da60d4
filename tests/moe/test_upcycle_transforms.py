"""moe.upcycle: expert spawning strategies, virtual groups, scaling, router init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import routing
from moe import upcycle as up
from moe.experts import ExpertFFN, is_glu

D, F = 6, 12


def _dense(activation="relu", seed=0, biases=False):
    rng = np.random.default_rng(seed)
    dense = {"wi": rng.normal(size=(D, F)).astype(np.float32),
             "wo": rng.normal(size=(F, D)).astype(np.float32)}
    if is_glu(activation):
        dense["wi_gate"] = rng.normal(size=(D, F)).astype(np.float32)
    if biases:
        dense["bi"] = rng.normal(size=(F,)).astype(np.float32)
        dense["bo"] = rng.normal(size=(D,)).astype(np.float32)
    return {k: jnp.asarray(v) for k, v in dense.items()}


KEY = jax.random.PRNGKey(0)


# --- diversification strategies ---------------------------------------------


def test_copy_gives_identical_experts_for_any_names():
    dense = {"w_in": jnp.arange(6.0).reshape(2, 3), "anything": jnp.ones((4,))}
    experts = up.spawn_experts(dense, 3)
    assert experts["w_in"].shape == (3, 2, 3) and experts["anything"].shape == (3, 4)
    for e in range(3):
        np.testing.assert_array_equal(experts["w_in"][e], dense["w_in"])


def test_noise_is_relative_independent_and_centred():
    # One big matrix so the sample statistics are tight: noise std must be
    # 0.1 * std(w) whatever the scale of w.
    w = 50.0 * jax.random.normal(jax.random.PRNGKey(1), (64, 64))
    experts = up.spawn_experts({"wi": w}, 4, strategy="noise", rng=KEY, noise_std=0.1)["wi"]
    delta = np.asarray(experts - w[None])
    expected_std = 0.1 * float(jnp.std(w))
    assert abs(delta.mean()) < 0.05 * expected_std
    np.testing.assert_allclose(delta.std(), expected_std, rtol=0.05)
    assert not np.allclose(delta[0], delta[1])  # experts differ


def test_mask_keeps_entries_with_probability_ratio():
    w = jax.random.normal(jax.random.PRNGKey(2), (40, 50)) + 3.0  # no exact zeros
    experts = np.asarray(up.spawn_experts({"wi": w}, 4, strategy="mask", rng=KEY,
                                          ratio=0.7)["wi"])
    zero = experts == 0
    # Each expert is base * mask: every entry is either 0 or the base value.
    np.testing.assert_array_equal(np.where(zero, 0, experts), np.where(zero, 0, w[None]))
    assert zero.mean() == pytest.approx(0.3, abs=0.03)  # fraction of zeros ~ 1 - keep
    assert (zero[0] != zero[1]).any()  # independent masks per expert
    full = up.spawn_experts({"wi": w}, 2, strategy="mask", rng=KEY, ratio=1.0)["wi"]
    np.testing.assert_array_equal(full[1], w)


def test_drop_upcycling_reinitialises_the_same_units_in_every_matrix():
    dense = _dense("swiglu", biases=True)
    experts = up.spawn_experts(dense, 5, strategy="drop_upcycling", rng=KEY, ratio=0.25)
    for e in range(5):
        changed_in = np.asarray(experts["wi"][e] != dense["wi"]).any(axis=0)  # [F]
        changed_gate = np.asarray(experts["wi_gate"][e] != dense["wi_gate"]).any(axis=0)
        changed_out = np.asarray(experts["wo"][e] != dense["wo"]).any(axis=1)
        changed_bias = np.asarray(experts["bi"][e] != dense["bi"])
        assert changed_in.sum() == round(0.25 * F)  # exactly r*f hidden units
        np.testing.assert_array_equal(changed_in, changed_gate)
        np.testing.assert_array_equal(changed_in, changed_out)
        np.testing.assert_array_equal(changed_in, changed_bias)
        np.testing.assert_array_equal(experts["bo"][e], dense["bo"])  # output bias copied
    picks = [tuple(np.asarray(experts["wi"][e] != dense["wi"]).any(axis=0)) for e in range(5)]
    assert len(set(picks)) > 1  # experts drop different units


def test_drop_upcycling_draws_from_the_dense_statistics():
    w = 0.5 + 2.0 * jax.random.normal(jax.random.PRNGKey(3), (64, 400))
    wo = jax.random.normal(jax.random.PRNGKey(4), (400, 64))
    experts = up.spawn_experts({"wi": w, "wo": wo}, 2, strategy="drop_upcycling", rng=KEY,
                               ratio=0.5)["wi"]
    fresh = np.asarray(experts[0])[:, np.asarray(experts[0] != w).any(axis=0)]
    assert fresh.mean() == pytest.approx(0.5, abs=0.05)
    assert fresh.std() == pytest.approx(2.0, rel=0.03)
    same = up.spawn_experts({"wi": w, "wo": wo}, 2, strategy="drop_upcycling", rng=KEY,
                            ratio=0.0)["wi"]
    np.testing.assert_array_equal(same[1], w)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="shuffle"), r"strategy must be one of \('copy', 'noise', 'mask', "
                               r"'drop_upcycling'\), got 'shuffle'"),
    (dict(strategy="mask", rng=KEY, ratio=1.5), r"ratio must be in \[0, 1\], got 1.5"),
    (dict(strategy="mask", rng=KEY, ratio=0.0), "keep ratio in"),
    (dict(strategy="noise", rng=KEY, noise_std=-1.0), "noise_std must be >= 0"),
    (dict(strategy="noise"), "strategy 'noise' is random and needs an rng key"),
])
def test_spawn_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        up.spawn_experts(_dense(), 4, **kwargs)


def test_spawn_rejects_bad_expert_count_and_unknown_names_for_unit_strategies():
    with pytest.raises(ValueError, match="num_experts must be an int >= 1, got 0"):
        up.spawn_experts(_dense(), 0)
    with pytest.raises(ValueError, match="unknown FFN weight name 'kernel'"):
        up.spawn_experts({"kernel": jnp.ones((2, 3))}, 2, strategy="drop_upcycling", rng=KEY)
    # ... unless its role is given.
    out = up.spawn_experts({"kernel": jnp.ones((2, 3))}, 2, strategy="drop_upcycling",
                           rng=KEY, roles={"kernel": "in"})
    assert out["kernel"].shape == (2, 2, 3)


# --- virtual groups -----------------------------------------------------------


def test_check_virtual_groups_errors():
    up.check_virtual_groups(32, 8, 4, 512)
    with pytest.raises(ValueError, match="k=6 must be a multiple of granularity G=4"):
        up.check_virtual_groups(32, 6, 4, 512)
    with pytest.raises(ValueError, match="num_experts=30 must be a multiple of granularity"):
        up.check_virtual_groups(30, 8, 4, 512)
    with pytest.raises(ValueError, match="hidden size 510 must be a multiple"):
        up.check_virtual_groups(32, 8, 4, 510)
    with pytest.raises(ValueError, match="granularity G must be an int >= 1"):
        up.check_virtual_groups(32, 8, 0, 512)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_shards_concatenate_back_to_dense_after_undoing_the_scale(activation):
    dense = _dense(activation, biases=True)
    scales = up.upcycle_scales(8, 4, 4, activation, normalize=True)
    assert scales["a"] == 4.0
    kwargs = {k: scales[k] for k in ("scale_in", "scale_out", "out_bias_scale")}
    experts = up.upcycle_ffn(dense, 8, granularity=4, **kwargs)
    assert experts["wi"].shape == (8, D, F // 4) and experts["wo"].shape == (8, F // 4, D)
    for group in range(2):
        merged = up.merge_virtual_group(experts, group, 4, **kwargs)
        for name in dense:
            np.testing.assert_allclose(merged[name], dense[name], rtol=1e-6, err_msg=name)
    # Expert e = r*G + g holds shard g: experts 1 and 5 hold the same shard.
    np.testing.assert_array_equal(experts["wi"][1], experts["wi"][5])
    np.testing.assert_allclose(experts["wi"][1], dense["wi"][:, 3:6] * kwargs["scale_in"])


def test_router_inits():
    kernel = up.init_router(KEY, D, 8, method="virtual_group", granularity=4, std=0.5)
    assert kernel.shape == (D, 8)
    np.testing.assert_array_equal(kernel[:, 0], kernel[:, 3])
    np.testing.assert_array_equal(kernel[:, 4], kernel[:, 7])
    assert not np.allclose(kernel[:, 0], kernel[:, 4])
    assert float(jnp.abs(up.init_router(None, D, 8, method="zero")).max()) == 0.0
    normal = up.init_router(KEY, 64, 64, method="normal", std=0.02)
    assert float(jnp.std(normal)) == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="router init must be one of"):
        up.init_router(KEY, D, 8, method="orthogonal")
    np.testing.assert_array_equal(up.virtual_group_router(jnp.array([[1.0, 2.0]]), 3),
                                  [[1, 1, 1, 2, 2, 2]])


def test_scales():
    assert up.activation_scale(8, 2, 1, normalize=True) == 1.0
    assert up.activation_scale(32, 8, 4, normalize=True) == 4.0
    assert up.activation_scale(32, 8, 4, normalize=False) == 16.0  # E*G/k
    assert up.activation_scale(8, 2, 1, normalize=False, score="sigmoid") == 1.0  # 2G/k
    assert up.weight_scales(4.0, "relu") == (2.0, 2.0)
    assert up.weight_scales(8.0, "squared_relu") == pytest.approx((2.0, 2.0))
    assert up.weight_scales(8.0, "swiglu") == pytest.approx((2.0, 2.0))
    assert up.weight_scales(8.0, "gelu", "output") == (1.0, 8.0)
    with pytest.raises(ValueError, match="weight scaling must be one of"):
        up.weight_scales(2.0, "relu", "sqrt")


def _moe_vs_dense(activation, *, E, k, G, normalize, router, mode, score="softmax",
                  biases=False):
    """Max |MoE(x) - FFN(x)| for one upcycled layer on 16 random tokens,
    with exact (all-experts) combine and no dropping."""
    dense = _dense(activation, seed=1, biases=biases)
    s = up.upcycle_scales(E, k, G, activation, normalize=normalize, score=score, mode=mode)
    experts = up.upcycle_ffn(dense, E, granularity=G, scale_in=s["scale_in"],
                             scale_out=s["scale_out"], out_bias_scale=s["out_bias_scale"])
    x = jax.random.normal(jax.random.PRNGKey(5), (16, D))
    kernel = up.init_router(jax.random.PRNGKey(6), D, E, method=router, granularity=G, std=1.0)
    gating = routing.top_k_gating(x @ kernel, k, normalize=normalize, score=score)
    glu = is_glu(activation)

    def ffn(p):
        gate = None if not glu else x @ p["wi_gate"] + p.get("bi_gate", 0)
        fn = ExpertFFN(wi=p["wi"][None], wo=p["wo"][None],
                       wi_gate=None if gate is None else p["wi_gate"][None],
                       activation=activation)
        if not biases:
            return fn.all_experts(x)[0]
        return fn.hidden(x @ p["wi"] + p["bi"], gate) @ p["wo"] + p["bo"]

    per_expert = jnp.stack([ffn({n: w[e] for n, w in experts.items()}) for e in range(E)])
    combine = jnp.zeros((16, E)).at[jnp.arange(16)[:, None], gating.expert_index].set(
        gating.weights)
    moe_out = jnp.einsum("te,etd->td", combine, per_expert)
    return float(jnp.max(jnp.abs(moe_out - ffn(dense))))


@pytest.mark.parametrize("activation", ["relu", "squared_relu", "reglu"])
def test_virtual_groups_exact_for_homogeneous_activations_with_random_router(activation):
    err = _moe_vs_dense(activation, E=8, k=4, G=4, normalize=True, router="virtual_group",
                        mode="balanced", biases=activation == "relu")
    assert err < 1e-4


def test_virtual_groups_balanced_scaling_is_only_approximate_for_swiglu_but_output_is_exact():
    balanced = _moe_vs_dense("swiglu", E=8, k=4, G=4, normalize=True, router="virtual_group",
                             mode="balanced")
    output = _moe_vs_dense("swiglu", E=8, k=4, G=4, normalize=True, router="virtual_group",
                           mode="output")
    assert balanced > 1e-2 and output < 1e-4
    assert up.exactness_conditions(activation="swiglu", granularity=4, k=4, normalize=True,
                                   router_init="virtual_group", weight_scaling="balanced")
    assert not up.exactness_conditions(activation="swiglu", granularity=4, k=4, normalize=True,
                                       router_init="virtual_group", weight_scaling="output")


def test_softmax_then_topk_is_exact_only_with_a_zero_router():
    zero = _moe_vs_dense("relu", E=8, k=4, G=2, normalize=False, router="zero",
                         mode="balanced", biases=True)
    rand = _moe_vs_dense("relu", E=8, k=4, G=2, normalize=False, router="virtual_group",
                         mode="balanced")
    assert zero < 1e-4 and rand > 1e-2
    assert not up.exactness_conditions(activation="relu", granularity=2, k=4, normalize=False,
                                       router_init="zero", weight_scaling="balanced")
    reasons = up.exactness_conditions(activation="relu", granularity=2, k=4, normalize=False,
                                      router_init="virtual_group", weight_scaling="balanced")
    assert any("softmax-then-top-k" in r for r in reasons)


@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu", "geglu"])
def test_plain_copies_with_normalised_topk_are_exact_for_any_activation(activation):
    assert _moe_vs_dense(activation, E=4, k=2, G=1, normalize=True, router="normal",
                         mode="balanced") < 1e-4
