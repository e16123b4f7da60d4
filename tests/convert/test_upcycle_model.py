"""Upcycling at model level (logits), in memory: exactness for every activation,
the violated conditions otherwise, parameter counts, optimizer-state mapping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from experiments.convert import upcycle_checkpoint as ex
from experiments.convert.verify import verify_models
from experiments.train.optim import make_optimizer
from layers.moe_layer import MoeLayer
from layers.routers import TopKRouter
from layers.transformer import TransformerLM
from moe.experts import ACTIVATIONS

VOCAB, D, F, LAYERS = 40, 16, 32, 2


_ROUTER_OPTIONS = ("normalize", "score", "route_scale")


def _model(activation, *, num_experts=8, k=2, expert_d_ff=None, moe_kwargs=None, **kwargs):
    """The test model; the experts take the dense activation unless `moe_kwargs` says
    otherwise, router options in `moe_kwargs` go to the `TopKRouter`."""
    moe_kwargs = dict(moe_kwargs or {})
    router = functools.partial(TopKRouter, **{key: moe_kwargs.pop(key) for key in _ROUTER_OPTIONS
                                              if key in moe_kwargs})
    moe_block = functools.partial(MoeLayer, num_experts=num_experts, k=k,
                                  d_ff=F if expert_d_ff is None else expert_d_ff,
                                  activation=moe_kwargs.pop("activation", activation),
                                  router=router, **moe_kwargs)
    return nnx.eval_shape(lambda: TransformerLM(
        vocab_size=VOCAB, d_model=D, num_layers=LAYERS, num_heads=2, d_ff=F,
        activation=activation, dtype="float32", moe_block=moe_block, rngs=nnx.Rngs(0), **kwargs))


def _dense_params(activation):
    # Random weights of the dense model's shapes (no init program to compile).
    abstract = nnx.split(_model(activation, moe_every=0), nnx.Param)[1].to_pure_dict()
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), abstract)


def _batch():
    # Two rows with padding at the end of the second: padded positions are excluded.
    rng = np.random.default_rng(0)
    segment_ids = np.ones((2, 12), np.int32)
    segment_ids[1, 9:] = 0
    return {"inputs": rng.integers(0, VOCAB, (2, 12)).astype(np.int32),
            "targets": rng.integers(0, VOCAB, (2, 12)).astype(np.int32),
            "segment_ids": segment_ids, "weights": segment_ids.astype(np.float32),
            "positions": np.tile(np.arange(12, dtype=np.int32), (2, 1)) * segment_ids}


_CACHE = {}


def _upcycle(activation, **kwargs):
    """`_upcycle_uncached`, shared between tests that convert the same case."""
    if "dense_params" in kwargs:
        return _upcycle_uncached(activation, **kwargs)
    key = repr((activation, sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE[key] = _upcycle_uncached(activation, **kwargs)
    return _CACHE[key]


def _upcycle_uncached(activation, *, E=4, k=2, expert_d_ff=F, moe_kwargs=None,
                      config=None, dense_params=None):
    """Upcycles a random dense model into layer 1 = MoE; returns (report, plans, params)."""
    config = config or ex.UpcycleConfig()
    dense = _model(activation, moe_every=0)
    target = _model(activation, moe_every=2, num_experts=E, k=k, expert_d_ff=expert_d_ff,
                    moe_kwargs=dict({"capacity_factor": None}, **(moe_kwargs or {})))
    dense_params = dense_params or _dense_params(activation)
    plans = ex.plan_layers(dense, target, config, config.router_init)
    target_graphdef, abstract = nnx.split(target, nnx.Param)[:2]
    params, _ = ex.upcycle_params(dense_params, abstract.to_pure_dict(), plans, config,
                                  config.router_init)
    violations = sorted({v for p in plans for v in p.violations})
    # Op by op: these tiny models run faster eagerly (primitives compiled once for
    # the whole module) than with two whole-model compilations per case.
    with jax.disable_jit():
        report = verify_models(nnx.split(dense, nnx.Param)[0], dense_params,
                                  target_graphdef, params, [_batch()], violated=violations)
    return report, plans, params, dense_params


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_plain_copies_with_normalised_topk_are_exact_for_every_activation(activation):
    # G = 1, normalised top-k, dropless, random router: every token's k expert
    # outputs are the dense FFN's, weighted by weights summing to 1.
    report, plans, _, _ = _upcycle(activation, moe_kwargs={"normalize": True})
    assert plans[0].granularity == 1 and not plans[0].violations
    assert report.expected_exact and report.ok, report.render()
    assert report.max_abs_logit_diff <= 1e-5
    assert abs(report.loss_diff) <= 1e-5


@pytest.mark.parametrize("activation", ["relu", "squared_relu", "reglu"])
def test_virtual_groups_are_exact_for_homogeneous_activations(activation):
    # E=8, G=4 (expert_d_ff = F/4), k=4 (one whole group), random virtual-group router.
    report, plans, _, _ = _upcycle(activation, E=8, k=4, expert_d_ff=F // 4,
                                   moe_kwargs={"normalize": True})
    assert plans[0].granularity == 4
    assert report.expected_exact and report.ok, report.render()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_virtual_groups_with_non_homogeneous_activation_are_reported_not_exact(activation):
    report, _, _, dense_params = _upcycle(activation, E=8, k=4, expert_d_ff=F // 4,
                                          moe_kwargs={"normalize": True})
    assert not report.expected_exact and report.max_abs_logit_diff > 1e-5
    assert any("not positively homogeneous" in v for v in report.violated), report.violated
    # Putting the whole scale on the output projection makes them exact.
    exact, _, _, _ = _upcycle(activation, E=8, k=4, expert_d_ff=F // 4,
                              moe_kwargs={"normalize": True}, dense_params=dense_params,
                              config=ex.UpcycleConfig(weight_scaling="output"))
    assert exact.expected_exact and exact.ok, exact.render()


def test_softmax_then_topk_with_random_router_is_reported_not_exact():
    report, _, _, _ = _upcycle("relu", moe_kwargs={"normalize": False},
                               config=ex.UpcycleConfig(router_init_std=1.0))
    assert not report.expected_exact and report.max_abs_logit_diff > 1e-5
    assert any("softmax-then-top-k" in v for v in report.violated)
    zero, _, _, _ = _upcycle("relu", moe_kwargs={"normalize": False},
                             config=ex.UpcycleConfig(router_init="zero"))
    assert zero.expected_exact and zero.ok, zero.render()  # a = E/k scaling, uniform router


def test_capacity_dropping_is_reported():
    report, _, _, _ = _upcycle("relu", moe_kwargs={"normalize": True, "capacity_factor": 0.5,
                                                   "eval_capacity_factor": 0.5})
    assert not report.expected_exact and report.max_dropped_fraction > 0
    assert any("capacity dropping" in v for v in report.violated)


def test_parameter_counts_and_untouched_non_mlp_parameters():
    _, plans, params, dense_params = _upcycle("swiglu", E=8, k=4, expert_d_ff=F // 4,
                                              moe_kwargs={"normalize": True})
    flat_moe = traverse_util.flatten_dict(params)
    flat_dense = traverse_util.flatten_dict(dense_params)
    for path, value in flat_dense.items():
        if path[:2] != ("layer_1", "ffn"):
            np.testing.assert_array_equal(flat_moe[path], value, err_msg="/".join(path))
    moe_layer = sum(v.size for p, v in flat_moe.items() if p[:2] == ("layer_1", "ffn"))
    shard = 3 * D * (F // 4)  # wi, wi_gate, wo of one expert
    assert moe_layer == 8 * shard + D * 8  # E * shard + router
    assert plans[0].name == "layer_1"


def test_optimizer_state_copy_and_reset():
    _, plans, params, dense_params = _upcycle("relu", E=4, k=2, expert_d_ff=F // 2,
                                              moe_kwargs={"normalize": True})
    tx = make_optimizer(optax.constant_schedule(0.0))
    # A dense state with non-trivial moments and counts (as after 7 steps).
    dense_state = tx.init(dense_params)
    dense_state = jax.tree.map(lambda x: x + 7 if x.dtype == jnp.int32 else x + 0.5,
                               dense_state)
    dense_state = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 3.0 if "wo" in jax.tree_util.keystr(p) else x, dense_state)
    template = tx.init(params)
    copied = ex.upcycle_opt_state(dense_state, template, params, plans, "copy")
    reset = ex.upcycle_opt_state(dense_state, template, params, plans, "reset")
    adam, sched = copied[1][0], copied[1][2]
    assert int(adam.count) == 7 and int(sched.count) == 7
    # Expert e = r*G + g holds moment shard g of the dense moment (G = 2).
    wo_mu = adam.mu["layer_1"]["ffn"]["experts"]["wo"]
    np.testing.assert_allclose(wo_mu[3], dense_state[1][0].mu["layer_1"]["ffn"]["wo"][F // 2:])
    assert float(jnp.abs(adam.mu["layer_1"]["ffn"]["router"]["kernel"]).max()) == 0.0
    np.testing.assert_array_equal(adam.nu["embedding"], dense_state[1][0].nu["embedding"])
    r_adam, r_sched = reset[1][0], reset[1][2]
    assert int(r_adam.count) == 0 and int(r_sched.count) == 7  # the LR schedule continues
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(r_adam.mu))
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        ex.upcycle_opt_state(dense_state, template, params, plans, "average")


def test_plan_errors():
    dense = _model("relu", moe_every=0)
    cfg = ex.UpcycleConfig()
    with pytest.raises(ValueError, match="k=3 must be a multiple of granularity G=2"):
        ex.plan_layers(dense, _model("relu", moe_every=2, num_experts=4, k=3, expert_d_ff=F // 2),
                       cfg, None)
    with pytest.raises(ValueError, match="expert activation 'swiglu' differs"):
        ex.plan_layers(dense, _model("relu", moe_every=2, num_experts=4, k=2,
                                     moe_kwargs={"activation": "swiglu"}), cfg, None)
    with pytest.raises(ValueError, match="expert_d_ff=12 must divide the dense d_ff=32"):
        ex.plan_layers(dense, _model("relu", moe_every=2, num_experts=4, k=2, expert_d_ff=12),
                       cfg, None)
    with pytest.raises(ValueError, match="num_shared_experts > 0 is not supported"):
        ex.plan_layers(dense, _model("relu", moe_every=2, num_experts=4, k=2,
                                     moe_kwargs={"num_shared_experts": 1}), cfg, None)
    with pytest.raises(ValueError, match="no MoE layers"):
        ex.plan_layers(dense, _model("relu", moe_every=0), cfg, None)
    with pytest.raises(ValueError, match=r"moe_layers \(2,\) out of range: the dense model has 2"):
        ex.target_bindings(ex.UpcycleConfig(moe_layers=(2,)), num_layers=2, dense_d_ff=F)
    with pytest.raises(ValueError, match="diversify must be one of"):
        ex.UpcycleConfig(diversify="clone")
    with pytest.raises(ValueError, match="moe_layers must be one of"):
        ex.UpcycleConfig(moe_layers="odd")


def test_transformer_moe_layers_selects_explicit_layers():
    model = _model("relu", moe_every=2, moe_layers=(0,), num_experts=4, k=2)
    assert model.moe_layer_names == ("layer_0",)  # overrides moe_every=2 (layer_1)
    with pytest.raises(ValueError, match=r"moe_layers must be distinct indices in \[0, "
                                         r"num_layers=2\), got \(2,\)"):
        _model("relu", moe_layers=(2,))
