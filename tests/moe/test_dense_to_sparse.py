"""EvoMoE dense-to-sparse gate: temperature schedules, gating invariants, dispatch of a
variable number of experts per token, the MoeLayer integration and the FLOP counter."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.train.flops import TRAIN_FACTOR, flop_counter
from layers.moe_layer import MoeLayer
from layers.routers import DenseToSparseRouter
from layers.transformer import TransformerLM
from moe.dense_to_sparse import (
    DtsState,
    active_pairs_as_assignments,
    dense_to_sparse_gating,
    dispatch_active_pairs,
    exponential_temperature,
    linear_temperature,
    temperature_schedule,
)
from moe.dispatch import get_dispatch
from moe.experts import ExpertFFN
from moe.layer_aux import MoeAux

KEY = jax.random.PRNGKey(0)


# --- temperature schedules ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["exponential", "linear"])
def test_schedule_starts_at_max_never_increases_and_holds_min_from_d(name):
    schedule = temperature_schedule(name, max_temperature=2.0, min_temperature=0.3,
                                    decay_steps=10)
    taus = np.array([float(schedule(n)) for n in range(25)])
    assert taus[0] == pytest.approx(2.0)
    assert np.all(np.diff(taus) <= 0)
    assert np.all(taus[10:] == np.float32(0.3))
    assert np.all(taus[:10] > 0.3)


def test_schedule_formulas_midway():
    # Exponential: tau_max * (tau_min / tau_max)^(n / D); linear: straight line.
    assert float(exponential_temperature(5, max_temperature=2.0, min_temperature=0.5,
                                         decay_steps=10)) == pytest.approx(1.0, rel=1e-6)
    assert float(linear_temperature(5, max_temperature=2.0, min_temperature=0.5,
                                    decay_steps=10)) == pytest.approx(1.25, rel=1e-6)


def test_schedule_is_traceable():
    schedule = temperature_schedule("exponential", max_temperature=1.0, min_temperature=0.5,
                                    decay_steps=4)
    taus = jax.jit(jax.vmap(schedule))(jnp.arange(6))
    np.testing.assert_allclose(np.asarray(taus)[[0, 4, 5]], [1.0, 0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="cosine"), "temperature schedule must be one of"),
    (dict(min_temperature=3.0), "min_temperature <= max_temperature"),
    (dict(min_temperature=0.0), "0 < min_temperature"),
    (dict(decay_steps=0), "decay_steps must be >= 1"),
])
def test_schedule_validation(kwargs, match):
    args = dict(name="linear", max_temperature=2.0, min_temperature=0.5, decay_steps=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        temperature_schedule(args.pop("name"), **args)


# --- the gate ----------------------------------------------------------------------------

LOGITS = jax.random.normal(KEY, (64, 8)) * 2.0


def _gate(temperature, **kwargs):
    return dense_to_sparse_gating(LOGITS, temperature=temperature, threshold=1e-3,
                                          rng=jax.random.PRNGKey(1), **kwargs)


def test_active_count_tends_to_all_experts_for_huge_temperature_and_one_for_tiny():
    # tau -> inf: g -> 1/E = 0.125 > theta for every expert. tau -> 0: g is one-hot.
    assert float(_gate(1e6).active_experts) == 8.0
    assert np.all(np.asarray(_gate(1e-4).active.sum(1)) == 1)
    mid = float(_gate(1.0).active_experts)
    assert 1.0 < mid < 8.0


def test_active_count_falls_as_temperature_falls():
    counts = [float(_gate(t).active_experts) for t in (8.0, 2.0, 0.5, 0.1)]
    assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("k", [1, 2])
def test_hard_phase_gives_exactly_k_experts_per_token(k):
    gate = _gate(5.0, hard=True, k=k)  # a high tau would make the soft set dense
    assert np.all(np.asarray(gate.active.sum(1)) == k)
    # The hard set is the top-k of the Gumbel-perturbed g.
    top = np.argsort(-np.asarray(gate.gumbel_probs), axis=1)[:, :k]
    expected = np.zeros((64, 8), bool)
    np.put_along_axis(expected, top, True, axis=1)
    np.testing.assert_array_equal(gate.active, expected)


def test_hard_flag_may_be_traced():
    fn = jax.jit(lambda hard: _gate(1e6, hard=hard).active_experts)
    assert float(fn(jnp.bool_(False))) == 8.0
    assert float(fn(jnp.bool_(True))) == 1.0


def test_weights_vanish_outside_active_set_and_are_not_renormalised():
    gate = _gate(1.0)
    active = np.asarray(gate.active)
    weights = np.asarray(gate.weights)
    assert np.all(weights[~active] == 0)
    np.testing.assert_allclose(weights[active], np.asarray(gate.probs)[active], rtol=1e-6)
    assert np.any(np.abs(weights.sum(1) - 1) > 1e-3)  # not renormalised
    gumbel = _gate(1.0, gumbel_weights=True)
    np.testing.assert_allclose(np.asarray(gumbel.weights)[active],
                               np.asarray(gumbel.gumbel_probs)[active], rtol=1e-6)


def test_aux_loss_on_hand_made_case_with_padding():
    # Hard phase, logit gaps of 40 so the Gumbel noise cannot change the argmax:
    # tokens 0, 1 -> expert 0, token 2 -> expert 2, token 3 is padding (would pick 1).
    # ce = me = [2/3, 0, 1/3] (probs ~ 1 at the argmax), aux = 3 * (4/9 + 1/9) = 5/3.
    logits = jnp.array([[40.0, 0, 0], [40.0, 0, 0], [0, 0, 40.0], [0, 40.0, 0]])
    mask = jnp.array([1, 1, 1, 0])
    gate = dense_to_sparse_gating(logits, temperature=0.5, threshold=1e-3,
                                          rng=KEY, hard=True, mask=mask)
    np.testing.assert_array_equal(gate.active, [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_allclose(gate.counts, [2, 0, 1])
    assert float(gate.aux_loss) == pytest.approx(5 / 3, rel=1e-6)
    assert float(gate.active_experts) == 1.0


def test_aux_loss_formula_in_soft_phase():
    # Recompute g from the same key: aux = E * sum_i mean_t(active) * mean_t(w).
    gate = _gate(1.5)
    g = jax.nn.softmax((LOGITS + jax.random.gumbel(jax.random.PRNGKey(1), LOGITS.shape)) / 1.5)
    active = np.asarray(g) > 1e-3
    np.testing.assert_array_equal(gate.active, active)
    weights = active * np.asarray(jax.nn.softmax(LOGITS))
    expected = 8 * np.sum(active.mean(0) * weights.mean(0))
    assert float(gate.aux_loss) == pytest.approx(expected, rel=1e-5)


def test_gate_gradient_flows_to_logits_through_weights():
    def loss(z):
        return jnp.sum(dense_to_sparse_gating(
            z, temperature=1.0, threshold=1e-3, rng=KEY).weights[:, 0])
    grad = jax.grad(loss)(LOGITS)
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=0.2), "threshold must be in"),  # 0.2 >= 1/8
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(k=9), "k must be in"),
])
def test_gate_validation(kwargs, match):
    args = dict(temperature=1.0, threshold=1e-3, rng=KEY)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dense_to_sparse_gating(LOGITS, **args)


# --- dispatch of a variable number of experts per token ----------------------------------

def _ffn(num_experts=4, d=6, f=10):
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    return ExpertFFN(wi=jax.random.normal(k1, (num_experts, d, f)) * 0.3,
                     wo=jax.random.normal(k2, (num_experts, f, d)) * 0.3, activation="relu")


def test_active_pairs_use_a_sentinel_expert():
    active = jnp.array([[True, False, True], [False, False, True]])
    index, weights = active_pairs_as_assignments(active, jnp.full((2, 3), 0.5))
    np.testing.assert_array_equal(index, [[0, 3, 2], [3, 3, 2]])
    np.testing.assert_array_equal(weights, [[0.5, 0, 0.5], [0, 0, 0.5]])


@pytest.mark.parametrize("dispatch", ["sort", "einsum"])
def test_dispatch_active_pairs_matches_per_pair_loop(dispatch):
    # 1..4 experts per token, including a token with all four and one with one.
    ffn = _ffn()
    x = jax.random.normal(KEY, (5, 6))
    active = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [1, 0, 1, 1]],
                       bool)
    weights = jax.random.uniform(jax.random.PRNGKey(4), (5, 4))
    y = jax.jit(lambda x, w: dispatch_active_pairs(x, active, w, ffn, get_dispatch(dispatch)))(
        x, weights)
    xs, ws, wi, wo = (np.asarray(a, np.float64) for a in (x, weights, ffn.wi, ffn.wo))
    expected = np.zeros((5, 6))
    for t in range(5):
        for e in range(4):
            if active[t, e]:
                expected[t] += ws[t, e] * (np.maximum(xs[t] @ wi[e], 0) @ wo[e])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dispatch_active_pairs_gradient_matches_einsum():
    ffn = _ffn()
    x = jax.random.normal(KEY, (5, 6))
    active = jax.random.bernoulli(jax.random.PRNGKey(5), 0.5, (5, 4)).at[:, 0].set(True)
    weights = jax.random.uniform(jax.random.PRNGKey(4), (5, 4))

    def loss(ffn, weights, name):
        return jnp.sum(dispatch_active_pairs(x, active, weights, ffn, get_dispatch(name)) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    g_sort, g_ref = grad(ffn, weights, "sort"), grad(ffn, weights, "einsum")
    for a, b in zip(jax.tree.leaves(g_sort), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# --- MoeLayer ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dts_layer():
    return nnx.jit(lambda: MoeLayer(8, 16, 4, 1, router=DenseToSparseRouter,
                                    capacity_factor=None, eval_capacity_factor=0.5,
                                    rngs=nnx.Rngs(0)))()


X = jax.random.normal(KEY, (2, 6, 8))
MASK = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])


@nnx.jit
def _train_call(layer, state):
    return layer(X, mask=MASK, deterministic=False, rng=KEY, router_state=state.as_router_state())


@nnx.jit
def _eval_call(layer):
    return layer(X, deterministic=True)


def test_layer_soft_phase_routes_to_many_experts_and_skips_padding(dts_layer):
    y, aux = _train_call(dts_layer, DtsState(jnp.float32(1e6), jnp.bool_(False)))
    assert y.shape == X.shape
    assert float(aux.active_experts) == 4.0
    np.testing.assert_allclose(aux.counts, [9, 9, 9, 9])  # 9 real tokens, all experts
    np.testing.assert_allclose(aux.kept_counts, aux.counts)
    assert float(aux.dropped_fraction) == 0.0
    assert float(aux.dts_loss) == pytest.approx(4.0, rel=1e-5)  # all active: E * sum me = E


def test_layer_hard_phase_is_top1(dts_layer):
    _, aux = _train_call(dts_layer, DtsState(jnp.float32(1e6), jnp.bool_(True)))
    assert float(aux.active_experts) == 1.0
    assert float(np.sum(aux.counts)) == 9.0


def test_layer_evaluation_is_deterministic_top1_with_capacity(dts_layer):
    # No dts_state needed; capacity ceil(1 * 12 * 0.5 / 4) = 2 per expert.
    y1, aux = _eval_call(dts_layer)
    y2, _ = _eval_call(dts_layer)
    np.testing.assert_array_equal(y1, y2)
    assert float(np.sum(aux.counts)) == 12.0
    assert float(np.sum(aux.kept_counts)) <= 8.0
    probs = X.reshape(12, 8) @ dts_layer.router.kernel[...]
    np.testing.assert_allclose(aux.counts, np.bincount(np.argmax(probs, 1), minlength=4))


def test_layer_training_without_dts_state_is_refused(dts_layer):
    with pytest.raises(ValueError, match="needs the router state keys"):
        dts_layer(X, deterministic=False, rng=KEY)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gating="soft"), "gating must be one of"),
    (dict(gating="dense_to_sparse", routing_type="expert_choice", causal=False),
     "needs routing_type='token_choice'"),
    (dict(router=functools.partial(DenseToSparseRouter, threshold=0.3)), "threshold must be in"),
])
def test_layer_gating_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoeLayer(8, 16, 4, 1, rngs=nnx.Rngs(0), **kwargs)


# --- FLOP counter ------------------------------------------------------------------------

def _lm(moe=None, **kwargs):
    moe_block = functools.partial(MoeLayer, num_experts=4, k=1, d_ff=12, **(moe or {}))
    args = dict(vocab_size=20, d_model=8, num_layers=2, num_heads=2, d_ff=16, moe_every=2,
                moe_block=moe_block, dtype="float32")
    args.update(kwargs)
    return nnx.eval_shape(lambda: TransformerLM(**args, rngs=nnx.Rngs(0)))  # shapes suffice


def test_flops_of_dense_model_by_hand():
    # Per position: attention 4 * d^2 * 2 + scores 4 * S * d per layer, FFN 2 * 2 * d * f,
    # lm head 2 * d * V (the untied embedding is a lookup).
    model = _lm(moe_every=0)
    counter = flop_counter(model, batch_size=2, seq_len=5)
    d, f, v, s = 8, 16, 20, 5
    per_layer = 2 * 4 * d * d + 4 * s * d + 2 * 2 * d * f
    assert counter.dense_per_position == 2 * per_layer + 2 * d * v
    assert counter.step_flops({}, positions=10, num_microbatches=1) == \
        TRAIN_FACTOR * 10 * counter.dense_per_position


def test_flops_of_moe_layers_follow_rows_processed():
    # Capacity: E * C rows whatever the routing; DTS: the active pairs (kept_counts).
    capacity = flop_counter(_lm(moe={"capacity_factor": 1.0}), batch_size=4, seq_len=5,
                            num_microbatches=2)
    per_row = 2 * 2 * 8 * 12
    assert capacity.expert_per_row == {"layer_1": per_row}
    assert capacity.static_rows == {"layer_1": 4 * math.ceil(10 / 4)}
    dts = flop_counter(_lm(moe={"router": DenseToSparseRouter}), batch_size=4, seq_len=5)
    assert dts.static_rows == {"layer_1": None}
    few = dts.step_flops({"layer_1": MoeAux(kept_counts=np.array([5, 5, 5, 5]))}, positions=20,
                         num_microbatches=1)
    many = dts.step_flops({"layer_1": MoeAux(kept_counts=np.array([20, 20, 20, 20]))},
                          positions=20, num_microbatches=1)
    assert many - few == pytest.approx(TRAIN_FACTOR * 60 * per_row)
