"""The NNX MoeLayer: equivalence of dispatches, aux outputs, dtypes, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import ExpertChoiceRouter, MoeLayer, TopKRouter, logical_axes_of
from moe.dispatch import dispatchers

D_MODEL, D_FF, E, K = 16, 24, 4, 2


def _layer(router_options=None, **kwargs):
    """A MoeLayer; `router_options` are TopKRouter arguments (`router` may replace it)."""
    kwargs.setdefault("rngs", nnx.Rngs(0))
    if router_options:
        kwargs["router"] = functools.partial(TopKRouter, **router_options)
    return MoeLayer(D_MODEL, D_FF, E, K, **kwargs)


def _x(key=1, shape=(2, 6, D_MODEL)):
    return jax.random.normal(jax.random.key(key), shape)


def _loss_and_grads(layer, x):
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params)(x)
        return jnp.sum(jnp.sin(y)) + aux.lbl + aux.z_loss

    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_dropless_dispatches_agree_forward_and_gradients(activation):
    x = _x()
    reference = _loss_and_grads(_layer(dispatch="einsum", activation=activation,
                                       router_options=dict(normalize=True)), x)
    for name in ("sort", "ragged_dot", "pallas"):
        value, grads = _loss_and_grads(_layer(dispatch=name, activation=activation,
                                              router_options=dict(normalize=True)), x)
        np.testing.assert_allclose(value, reference[0], rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1])):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_capacity_dispatches_agree_with_drops():
    x = _x(2)
    outs = {}
    for name in ("einsum", "sort"):
        y, aux = _layer(dispatch=name, capacity_factor=0.5)(x)
        outs[name] = (y, aux)
        assert float(aux.dropped_fraction) > 0
    np.testing.assert_allclose(outs["sort"][0], outs["einsum"][0], atol=1e-5)
    np.testing.assert_allclose(outs["sort"][1].kept_counts, outs["einsum"][1].kept_counts)


def test_aux_counts_are_before_dropping_and_lbl_uses_them():
    layer = _layer(capacity_factor=0.25)
    _y, aux = layer(_x(3))
    num_tokens = 12
    assert float(jnp.sum(aux.counts)) == K * num_tokens
    assert float(jnp.sum(aux.kept_counts)) < K * num_tokens
    capacity = layer.capacity(num_tokens, deterministic=True)
    assert float(jnp.max(aux.kept_counts)) <= capacity
    np.testing.assert_allclose(aux.dropped_fraction,
                               1 - jnp.sum(aux.kept_counts) / (K * num_tokens), atol=1e-6)
    expected_lbl = E * jnp.sum(aux.counts / jnp.sum(aux.counts) * aux.mean_probs)
    np.testing.assert_allclose(aux.lbl, expected_lbl, rtol=1e-6)
    for key in ("z_loss", "max_violation", "router_entropy", "active_experts", "num_tokens"):
        assert getattr(aux, key).shape == ()


def test_padding_is_excluded_from_statistics_and_output():
    x = _x(4)
    mask = jnp.ones((2, 6)).at[1, 3:].set(0)
    y, aux = _layer(capacity_factor=1.0)(x, mask=mask)
    assert float(aux.num_tokens) == 9
    assert float(jnp.sum(aux.counts)) == K * 9
    np.testing.assert_array_equal(y[1, 3:], 0.0)


@pytest.mark.parametrize("dispatch", ["sort", "ragged_dot", "einsum"])
def test_dropless_padding_costs_no_rows_and_leaves_real_tokens_alone(dispatch, monkeypatch):
    """Dropless: padded tokens go to the sentinel group (no expert rows, output 0). The
    real tokens' outputs, counts, losses and parameter gradients equal those of the
    same tokens in an unpadded batch (row 1 of the padded batch: 2 real tokens, then
    2 of padding; the unpadded batch holds the 6 real tokens as one row)."""
    sizes, real_layout = [], dispatchers.sorted_layout

    def recording_layout(index, num_experts):
        layout, group_sizes = real_layout(index, num_experts)
        jax.debug.callback(lambda g: sizes.append(np.asarray(g)), group_sizes)
        return layout, group_sizes

    monkeypatch.setattr(dispatchers, "sorted_layout", recording_layout)
    x = _x(7, (2, 4, D_MODEL))
    mask = jnp.ones((2, 4)).at[1, 2:].set(0)
    real_x = jnp.concatenate([x[0], x[1, :2]])[None]  # [1, 6, d]
    layer = _layer(dispatch=dispatch, router_options=dict(normalize=True))
    graphdef, params = nnx.split(layer, nnx.Param)

    def loss(params, x, mask):
        y, aux = nnx.merge(graphdef, params)(x, mask=mask)
        weights = jnp.ones(x.shape[:2]) if mask is None else mask
        return jnp.sum(jnp.sin(y) * weights[..., None]) + aux.lbl + aux.z_loss, (y, aux)

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (padded, (y, aux)), grads = value_and_grad(params, x, mask)
    (plain, (y_real, aux_real)), grads_real = value_and_grad(params, real_x, None)
    np.testing.assert_array_equal(y[1, 2:], 0.0)
    np.testing.assert_allclose(jnp.concatenate([y[0], y[1, :2]]), y_real[0], atol=1e-6)
    np.testing.assert_allclose(padded, plain, rtol=1e-6)
    for name in ("counts", "kept_counts", "lbl", "z_loss", "mean_probs", "active_experts",
                 "dropped_fraction", "max_violation", "num_tokens"):
        np.testing.assert_allclose(getattr(aux, name), getattr(aux_real, name), rtol=1e-6,
                                   err_msg=name)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_real)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    if dispatch != "einsum":  # the realised rows: k per real token, none for padding
        assert sizes and all(int(s.sum()) == K * 6 for s in sizes), sizes


def test_router_is_float32_with_bf16_params_and_activations():
    layer = _layer(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert layer.router.kernel[...].dtype == jnp.bfloat16
    x = _x(5).astype(jnp.bfloat16)
    logits = layer.router.logits(x.reshape(-1, D_MODEL))
    assert logits.dtype == jnp.float32
    y, aux = layer(x)
    assert y.dtype == jnp.bfloat16
    assert aux.mean_probs.dtype == jnp.float32 and aux.lbl.dtype == jnp.float32


def test_jitter_only_in_training():
    router = TopKRouter(D_MODEL, E, K, jitter_eps=0.1, rngs=nnx.Rngs(0)).logits
    x = _x(6).reshape(-1, D_MODEL)
    np.testing.assert_array_equal(router(x, deterministic=True), router(x, deterministic=True))
    trained = router(x, deterministic=False, rng=jax.random.key(0))
    assert not np.allclose(trained, router(x))
    # The multiplier stays within [1 - eps, 1 + eps]: logits move by at most eps * |x W| terms.
    bound = 0.1 * jnp.abs(x) @ jnp.abs(router.__self__.kernel[...])
    assert bool(jnp.all(jnp.abs(trained - router(x)) <= bound + 1e-6))


def test_expert_choice_in_encoder_is_balanced():
    layer = _layer(router=ExpertChoiceRouter, causal=False)
    _y, aux = layer(_x(7))
    capacity = layer.capacity(12, deterministic=True)  # ceil(12 * k / E) = 6
    assert capacity == 6
    np.testing.assert_array_equal(aux.counts, np.full(E, capacity))
    assert float(aux.lbl) == 0.0 and float(aux.max_violation) == 0.0


def test_batch_prioritized_routing_is_permutation_equivariant():
    # With drops, position-based routing depends on token order; BPR orders
    # tokens by router confidence, so permuting tokens permutes the outputs.
    layer = _layer(capacity_factor=0.5, router_options=dict(batch_prioritized=True),
                   causal=False)
    x = _x(8, (1, 12, D_MODEL))
    perm = jax.random.permutation(jax.random.key(0), 12)
    y, aux = layer(x)
    y_perm, _ = layer(x[:, perm])
    assert float(aux.dropped_fraction) > 0
    np.testing.assert_allclose(y_perm, y[:, perm], atol=1e-5)


def test_shared_experts_add_a_dense_path():
    layer = _layer(num_shared_experts=1)
    x = _x(9)
    y, _ = layer(x)
    routed_only = y - layer.shared(x)
    layer.shared = None
    np.testing.assert_allclose(layer(x)[0], routed_only, atol=1e-5)


def test_parameters_carry_logical_axes():
    axes = logical_axes_of(_layer(activation="swiglu", num_shared_experts=1))
    assert axes[("router", "kernel")] == ("embed", "expert")
    assert axes[("experts", "wi")] == ("expert", "embed", "mlp")
    assert axes[("experts", "wi_gate")] == ("expert", "embed", "mlp")
    assert axes[("experts", "wo")] == ("expert", "mlp", "embed")
    assert axes[("shared", "wi")] == ("embed", "mlp")


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k must be in"),
    (dict(k=E + 1), "k must be in"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
    (dict(capacity_factor=-1.0), "capacity_factor must be > 0"),
    (dict(activation="tanh"), "activation must be one of"),
    (dict(router=functools.partial(TopKRouter, score="tanh")), "score must be one of"),
    (dict(dispatch="magic"), "dispatch must be one of"),
    (dict(router="magic"), "router must be one of"),
    (dict(router=ExpertChoiceRouter), "a causal decoder .* cannot use it"),
    (dict(router=functools.partial(TopKRouter, batch_prioritized=True), capacity_factor=1.0),
     "not allowed in a causal layer"),
])
def test_bad_configuration_is_refused(kwargs, message):
    kwargs = dict(kwargs)
    k = kwargs.pop("k", K)
    with pytest.raises(ValueError, match=message):
        MoeLayer(D_MODEL, D_FF, E, k, rngs=nnx.Rngs(0), **kwargs)


def test_mismatched_shapes_are_refused():
    layer = _layer()
    with pytest.raises(ValueError, match="d_model"):
        layer(jnp.zeros((2, 6, D_MODEL + 1)))
    with pytest.raises(ValueError, match="mask must be"):
        layer(jnp.zeros((2, 6, D_MODEL)), mask=jnp.ones((2, 5)))
