"""Scanned layers and remat policies (layers/scan.py, layers/remat.py, TransformerLM.scan_layers).

The scanned model is built from the same blocks as the unscanned one (same
seed, stacked), so the two must agree to float32 rounding: losses, gradients
(unscanned back to `layer_{i}` with `unscan_tree`), per-layer aux, and decode.
"""

import contextlib
import functools
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from layers import scan as scan_lib
from layers.moe_layer import MoeLayer
from layers.remat import REMAT_POLICIES
from layers.routers import DenseToSparseRouter, TopKRouter
from layers.scan import LayerPlan, plan_layers
from layers.transformer import TransformerLM
from moe.router_state import RouterState

VOCAB, D, E = 13, 8, 4


def build(scan: bool, *, num_layers=4, moe=None, router=None, router_cls=TopKRouter,
          **kw) -> TransformerLM:
    """A tiny float32 model, initialised inside one jit (eager init compiles every op)."""
    moe = dict(dict(d_ff=8, num_experts=E, k=2), **(moe or {}))
    moe["router"] = functools.partial(router_cls, **(router or {}))
    args = dict(vocab_size=VOCAB, d_model=D, num_layers=num_layers, num_heads=2, d_ff=16,
                moe_block=functools.partial(MoeLayer, **moe), dtype="float32",
                scan_layers=scan)
    args.update(kw)
    return nnx.jit(lambda: TransformerLM(**args, rngs=nnx.Rngs(params=0)))()


TOKENS = jnp.array([[1, 5, 2, 7, 3, 0], [4, 4, 9, 1, 12, 6]], jnp.int32)
SEGMENTS = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)


def loss_and_grads(model: TransformerLM, router_state=None):
    """(loss, grads as a pure dict, aux): next-token CE + every layer's LBL (if any), with router
    noise (so each layer's PRNG key matters) and packed segments."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, router_state):
        logits, aux = nnx.merge(graphdef, params, rest)(
            TOKENS, segment_ids=SEGMENTS, deterministic=False, rng=jax.random.key(3),
            router_state=router_state)
        logp = jax.nn.log_softmax(logits[:, :-1])
        ce = -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1))
        return ce + sum(a.lbl for a in aux.values() if a.lbl is not None), aux

    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, router_state)
    return loss, nnx.to_pure_dict(grads), aux


def assert_trees_close(a, b, tol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def test_plan_finds_the_repeating_unit():
    D_, M = "dense", "moe"
    assert plan_layers([D_, M] * 3, True) == LayerPlan(6, 0, 2, 3)
    assert plan_layers([M] * 4, True) == LayerPlan(4, 0, 1, 4)
    # DeepSeek: a dense prefix stays unscanned.
    assert plan_layers([D_, M, M, M], True) == LayerPlan(4, 1, 1, 3)
    # moe_every=2 with an odd depth: the last dense layer is an unscanned suffix.
    plan = plan_layers([D_, M, D_, M, D_], True)
    assert plan == LayerPlan(5, 0, 2, 2) and plan.unscanned() == (4,)
    assert plan.location(3) == (1, 1) and plan.unit_layers(1) == (1, 3)
    # Nothing repeats, or scanning is off: nothing scanned.
    assert plan_layers([M], True).repeats == 0
    assert plan_layers([M] * 4, False) == LayerPlan(4)


CASES = {
    "dense": dict(moe_every=0),
    "all_moe": dict(moe_every=1, router=dict(noise_std=0.5)),
    "mixed_with_suffix": dict(num_layers=5, moe_every=2, router=dict(noise_std=0.5)),
    "dense_prefix_shared_experts": dict(
        moe_layers=(1, 2, 3), moe=dict(num_shared_experts=1, shared_gate=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scanned_matches_unscanned(case):
    """Same loss, gradients and per-layer aux, whatever the pattern."""
    plain, scanned = build(False, **CASES[case]), build(True, **CASES[case])
    assert scanned.scanned is not None and scanned.plan.repeats >= 2
    loss_a, grads_a, aux_a = loss_and_grads(plain)
    loss_b, grads_b, aux_b = loss_and_grads(scanned)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert "scanned" in grads_b and "layer_1" not in grads_b
    assert_trees_close(grads_a, scan_lib.unscan_tree(grads_b))
    assert list(aux_a) == list(aux_b) == list(plain.moe_layer_names)
    assert_trees_close(dict(aux_a), dict(aux_b), tol=1e-6)
    # The stacked parameters carry the `layers` logical axis first.
    axes = {"/".join(map(str, k)): v for k, v in
            nnx.to_flat_state(nnx.state(scanned, nnx.Param))
            if k[0] == "scanned" for v in [v.get_metadata()["logical_axes"]]}
    assert axes and all(a[0] == "layers" for a in axes.values())
    assert scanned.param_count() == plain.param_count()
    assert scanned.active_param_count() == plain.active_param_count()


def test_loss_free_biases_reach_their_scanned_layer():
    """A selection bias on one layer changes that layer's routing only, scanned or not:
    the per-layer router state is stacked per unit position, not shared."""
    plain, scanned = build(False, moe_every=1), build(True, moe_every=1)
    state = RouterState(layers={"layer_2": {"selection_bias": jnp.array([5.0, 0, 0, -5.0])}})
    loss_a, grads_a, aux_a = loss_and_grads(plain, state)
    loss_b, grads_b, aux_b = loss_and_grads(scanned, state)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert_trees_close(grads_a, scan_lib.unscan_tree(grads_b))
    assert_trees_close(dict(aux_a), dict(aux_b), tol=1e-6)
    # Expert 0 takes every real token of layer 2 (bias +5), expert 3 none; layer 1 is unbiased.
    counts = np.asarray(aux_b["layer_2"].counts)
    assert counts[0] == 11 and counts[3] == 0
    assert not np.allclose(np.asarray(aux_b["layer_1"].counts), counts)


def test_dense_to_sparse_router_state_through_the_scan():
    """EvoMoE's gate reads a shared temperature and a hard flag: broadcast to every repeat."""
    state = RouterState(shared={"dts_temperature": jnp.float32(0.7), "dts_hard": jnp.bool_(False)})
    kw = dict(moe_every=1, router_cls=DenseToSparseRouter)
    loss_a, grads_a, _ = loss_and_grads(build(False, **kw), state)
    loss_b, grads_b, _ = loss_and_grads(build(True, **kw), state)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert_trees_close(grads_a, scan_lib.unscan_tree(grads_b))


REMAT_KW = dict(num_layers=5, moe_every=2, moe=dict(num_shared_experts=1))


@functools.cache
def _no_remat(scan: bool):
    return loss_and_grads(build(scan, **REMAT_KW))


@pytest.mark.parametrize("scan, policy", [(True, p) for p in REMAT_POLICIES if p != "none"]
                         + [(False, "full"), (False, "save_moe")])
def test_every_remat_policy_gives_the_same_loss_and_grads(scan, policy):
    """5 layers [dense, moe] * 2 + dense: the scanned unit and the unscanned suffix are wrapped."""
    if policy == "offload_dots" and jax.default_backend() == "cpu":
        pytest.skip("host offload is refused on CPU (test_bad_values_are_refused...)")
    loss, grads, _ = _no_remat(scan)
    loss_p, grads_p, _ = loss_and_grads(build(scan, remat_policy=policy, **REMAT_KW))
    np.testing.assert_allclose(loss, loss_p, rtol=1e-6)
    assert_trees_close(grads, grads_p)


def _kept_floats(model: TransformerLM) -> int:
    """Array elements the backward pass keeps (`jax.ad_checkpoint.print_saved_residuals`)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda p: nnx.merge(graphdef, p, rest)(TOKENS)[0].sum(), params)
    shapes = re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), re.M)
    return sum(math.prod(int(d) for d in s.split(",") if d) for s in shapes)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_keep_less(scan):
    """`full` keeps less for the backward pass than `save_moe`, which keeps less than `none`."""
    kept = {p: _kept_floats(build(scan, num_layers=4, moe_every=2, remat_policy=p))
            for p in ("none", "save_moe", "full")}
    assert kept["full"] < kept["save_moe"] < kept["none"], kept


def test_bad_values_are_refused_naming_the_binding():
    with pytest.raises(ValueError, match="TransformerLM.remat_policy must be one of"):
        build(False, remat_policy="sometimes")
    with pytest.raises(ValueError, match="TransformerLM.scan_layers must be True or False"):
        build("yes")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="remat_policy='offload_dots' needs host-memory"):
            build(True, remat_policy="offload_dots")


def test_tree_conversion_round_trip_and_optimizer_moments():
    plain = build(False, num_layers=5, moe_every=2)
    scanned = build(True, num_layers=5, moe_every=2)
    tree = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
    want = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    converted = scan_lib.match_layer_layout(tree, want)
    assert_trees_close(converted, want, tol=0)
    assert_trees_close(scan_lib.match_layer_layout(converted, tree), tree, tol=0)
    # Optimizer moments (dicts inside named tuples) convert with the parameters.
    import optax
    opt = optax.adam(1e-3).init(tree)
    opt_scanned = scan_lib.to_layer_plan(opt, scanned.plan)
    assert jax.tree.structure(opt_scanned) == jax.tree.structure(optax.adam(1e-3).init(want))
    # Abstract leaves stack to abstract leaves.
    abstract = scan_lib.to_layer_plan(jax.eval_shape(lambda: tree), scanned.plan)
    assert abstract["scanned"]["unit_1"]["ffn"]["experts"]["wi"].shape == (2, E, D, 8)


def test_decode_with_a_scanned_model_equals_unscanned():
    """Prefill then one decode step through the KV cache: same logits and cache."""
    logits, caches = [], []
    for scan in (False, True):
        model = build(scan, num_layers=5, moe_every=2, moe=dict(eval_capacity_factor=None))

        @nnx.jit
        def run(model):
            cache = model.init_cache(2, 8)
            valid = jnp.arange(8)[None, :] < jnp.array([[6], [7]])
            out, cache, _ = model.decode(TOKENS, positions=jnp.tile(jnp.arange(6), (2, 1)),
                                         cache=cache, cache_index=jnp.int32(0), kv_valid=valid)
            nxt, cache, _ = model.decode(jnp.argmax(out[:, -1:], -1),
                                         positions=jnp.full((2, 1), 6), cache=cache,
                                         cache_index=jnp.int32(6), kv_valid=valid)
            return jnp.concatenate([out, nxt], 1), cache

        out, cache = run(model)
        logits.append(out)
        caches.append(cache)
    assert set(caches[1]) == {f"layer_{i}" for i in range(5)}
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert_trees_close(caches[0], caches[1])
