"""Zero-computation experts (AdaMoE null experts, MoE++ zero/copy/const experts) on
hand-built inputs: what each kind returns, the weight rules, the balance loss, the
realised experts per token and the FLOP rows; equivalence with plain top-k when the
null experts can never win."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.train.flops import flop_counter
from layers.moe_layer import MoeLayer
from layers.routers import NullExpertRouter, TopKRouter
from layers.routers.null_experts import null_weights
from layers.transformer import TransformerLM

D, E = 4, 2


def _layer(null_experts=("zero", "copy", "const"), *, k=1, dispatch="sort",
           capacity_factor=None, weight_rule="raw", **router_kwargs):
    router = functools.partial(NullExpertRouter, null_experts=null_experts,
                               weight_rule=weight_rule, **router_kwargs)
    return MoeLayer(D, d_ff=8, num_experts=E, k=k, router=router, dispatch=dispatch,
                    capacity_factor=capacity_factor, rngs=nnx.Rngs(0))


def _pin(layer, choice_of_token, big=10.0):
    """Token t = the basis vector e_t; its logit is `big` on column choice_of_token[t]
    (columns 0..E-1 FFN, then the null experts) and 0 elsewhere."""
    w = np.zeros((D, E + len(layer.router.null_experts)), np.float32)
    for t, column in enumerate(choice_of_token):
        w[t, column] = big
    layer.router.kernel[...] = jnp.asarray(w[:, :E])
    layer.router.null_kernel[...] = jnp.asarray(w[:, E:])


@pytest.mark.parametrize("dispatch,capacity_factor",
                         [("sort", None), ("einsum", None), ("sort", 2.0), ("einsum", 2.0)])
def test_each_kind_contributes_exactly_its_output(dispatch, capacity_factor):
    # Columns: 0, 1 FFN experts; 2 zero; 3 copy; 4 const. Token 0 -> zero, 1 -> copy,
    # 2 -> const, 3 -> FFN expert 0. k = 1 and raw weights: the weight is the
    # softmax score p = e^10 / (e^10 + 4) of the chosen column.
    layer = _layer(dispatch=dispatch, capacity_factor=capacity_factor)
    _pin(layer, [2, 3, 4, 0])
    layer.router.const_gate[...] = jnp.zeros((1, D, 2))  # a1 = a2 = 1/2
    v = jnp.array([1.0, 2.0, 3.0, 4.0])
    layer.router.const_value[...] = v[None]
    x = jnp.eye(D)[None]  # [1, 4, 4]
    y, aux = layer(x)
    p = np.exp(10.0) / (np.exp(10.0) + 4.0)
    ffn0 = layer.experts.ffn(jnp.float32).all_experts(x[0])[0]  # expert 0 on every token
    np.testing.assert_array_equal(y[0, 0], np.zeros(D))  # zero expert: exactly nothing
    np.testing.assert_allclose(y[0, 1], p * x[0, 1], rtol=1e-6)  # copy: p * x
    np.testing.assert_allclose(y[0, 2], p * (0.5 * x[0, 2] + 0.5 * v), rtol=1e-6)
    np.testing.assert_allclose(y[0, 3], p * ffn0[3], rtol=1e-5, atol=1e-7)
    # Only token 3 used an FFN expert: 1/4 real experts per token, 3/4 of choices null,
    # FFN counts [1, 0] (null experts are not in the load statistics).
    assert float(aux.active_experts) == pytest.approx(0.25)
    assert float(aux.null_fraction) == pytest.approx(0.75)
    np.testing.assert_array_equal(aux.counts, [1.0, 0.0])
    np.testing.assert_array_equal(aux.kept_counts, [1.0, 0.0])
    assert float(aux.dropped_fraction) == 0.0
    np.testing.assert_array_equal(aux.token_experts[:, 0], [2, 3, 4, 0])


def test_padding_gets_no_null_output_and_no_counts():
    layer = _layer()
    _pin(layer, [3, 3, 0, 0])  # tokens 0, 1 -> copy; 2, 3 -> FFN 0
    y, aux = layer(jnp.eye(D)[None], mask=jnp.array([[1, 0, 1, 0]]))
    np.testing.assert_array_equal(y[0, 1], np.zeros(D))
    np.testing.assert_array_equal(y[0, 3], np.zeros(D))
    assert np.abs(np.asarray(y[0, 0])).sum() > 0
    np.testing.assert_array_equal(aux.counts, [1.0, 0.0])
    assert float(aux.null_fraction) == pytest.approx(0.5)
    assert float(aux.active_experts) == pytest.approx(0.5)


def test_weight_rules_on_hand_written_choices():
    # Row 0: FFN .3, FFN .1, zero .2. Row 1: zero .5, zero .3, copy .2 (no FFN choice).
    # Row 2: FFN .3, zero .5, copy .2.
    w = jnp.array([[0.3, 0.1, 0.2], [0.5, 0.3, 0.2], [0.3, 0.5, 0.2]])
    is_ffn = jnp.array([[True, True, False], [False, False, False], [True, False, False]])
    is_zero = jnp.array([[False, False, True], [True, True, False], [False, True, False]])
    np.testing.assert_array_equal(null_weights(w, is_ffn, is_zero, "raw"), w)
    # AdaMoE: FFN weights renormalised among themselves, null weights left raw.
    np.testing.assert_allclose(null_weights(w, is_ffn, is_zero, "renorm_true_only"),
                               [[0.75, 0.25, 0.2], [0.5, 0.3, 0.2], [1.0, 0.5, 0.2]])
    # MoE++: zero experts get 0, the rest renormalised (copy included).
    np.testing.assert_allclose(null_weights(w, is_ffn, is_zero, "zero_then_renorm"),
                               [[0.75, 0.25, 0.0], [0.0, 0.0, 1.0], [0.6, 0.0, 0.4]])
    # All-zero-expert row: no division by zero, every weight 0.
    all_zero = null_weights(jnp.array([[0.6, 0.4]]), jnp.array([[False, False]]),
                            jnp.array([[True, True]]), "zero_then_renorm")
    np.testing.assert_array_equal(all_zero, [[0.0, 0.0]])


@pytest.mark.parametrize("tau", [1.0, 0.0, 0.5])
def test_balance_loss_counts_null_columns_with_weight_tau(tau):
    # E = 2 FFN + 1 zero expert, k = 1, two tokens. Token 0 (e_0) has logits
    # [2, 0, 0] -> FFN 0; token 1 (e_1) has [0, 0, 2] -> the zero expert.
    # f = [1/2, 0, 1/2]; P = mean softmax; LBL = 3 * (f_0 P_0 + tau f_2 P_2).
    layer = MoeLayer(D, d_ff=8, num_experts=E, k=1, router=functools.partial(
        NullExpertRouter, null_experts=("zero",), null_balance_weight=tau), rngs=nnx.Rngs(0))
    w = np.zeros((D, 3), np.float32)
    w[0, 0], w[1, 2] = 2.0, 2.0
    layer.router.kernel[...], layer.router.null_kernel[...] = w[:, :2], w[:, 2:]
    _, aux = layer(jnp.eye(D)[None, :2])
    s = np.exp(2.0) + 2.0
    p_ffn0 = (np.exp(2.0) / s + 1.0 / s) / 2
    p_zero = (1.0 / s + np.exp(2.0) / s) / 2
    assert float(aux.lbl) == pytest.approx(3 * (0.5 * p_ffn0 + tau * 0.5 * p_zero), rel=1e-6)
    np.testing.assert_allclose(aux.token_probs.sum(-1),
                               1 - (1 - tau) * np.array([1 / s, np.exp(2.0) / s]), rtol=1e-6)


@pytest.mark.parametrize("rule,normalize", [("raw", False), ("renorm_true_only", True)])
@pytest.mark.parametrize("dispatch", ["sort", "einsum"])
def test_null_experts_that_cannot_win_give_plain_top_k(rule, normalize, dispatch):
    # Null logits forced to -1e9 (bias): the softmax over E + m equals the softmax over
    # E, so the layer is plain top-k with the same kernel (AdaMoE's rule = normalised).
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    null = _layer(("zero", "copy"), k=2, dispatch=dispatch, weight_rule=rule, use_bias=True)
    null.router.null_bias[...] = jnp.full((2,), -1e9)
    plain = MoeLayer(D, d_ff=8, num_experts=E, k=2, dispatch=dispatch,
                     router=functools.partial(TopKRouter, normalize=normalize, use_bias=True),
                     rngs=nnx.Rngs(0))
    plain.router.kernel[...] = null.router.kernel[...]
    plain.experts.wi[...], plain.experts.wo[...] = null.experts.wi[...], null.experts.wo[...]
    (y_null, aux_null), (y_plain, aux_plain) = null(x), plain(x)
    np.testing.assert_allclose(y_null, y_plain, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(aux_null.counts, aux_plain.counts)
    assert float(aux_null.active_experts) == float(aux_plain.active_experts) == 2.0
    assert float(aux_null.null_fraction) == 0.0


def test_selection_bias_of_ffn_experts_is_padded_for_null_experts():
    layer = _layer(k=1)
    _pin(layer, [2, 2, 2, 2])  # every token prefers the zero expert by 10
    x = jnp.eye(D)[None]
    _, aux = layer(x, router_state={"selection_bias": jnp.array([0.0, 20.0])})
    np.testing.assert_array_equal(aux.counts, [0.0, 4.0])  # the bias moved them to FFN 1
    with pytest.raises(ValueError, match="selection_bias must be"):
        layer(x, router_state={"selection_bias": jnp.zeros(3)})


def _tiny_model(**layer_kwargs):
    moe_block = functools.partial(MoeLayer, num_experts=4, k=2, d_ff=8, router=functools.partial(
        NullExpertRouter, null_experts=("zero", "zero")), **layer_kwargs)
    return TransformerLM(32, 8, 2, 2, 16, moe_every=2, moe_block=moe_block, rngs=nnx.Rngs(0))


def test_flop_rows_are_the_realised_ffn_choices():
    # Dropless sort: the rows are the kept FFN choices (from kept_counts); with a
    # capacity the E x C buffers; the einsum reference every expert on every token.
    tokens = 2 * 4
    sort = flop_counter(_tiny_model(), batch_size=2, seq_len=4)
    assert sort.static_rows == {"layer_1": None}
    model = _tiny_model()
    _, aux = model(jnp.ones((2, 4), jnp.int32) * 3)
    realised = float(np.sum(aux["layer_1"].kept_counts))
    ffn_choices = int(np.sum(np.asarray(aux["layer_1"].token_experts) < 4))
    assert realised == ffn_choices
    with_rows = sort.step_flops({"layer_1": aux["layer_1"]}, positions=tokens, num_microbatches=1)
    without = sort.step_flops({"layer_1": aux["layer_1"].replace(kept_counts=np.zeros(4))},
                              positions=tokens, num_microbatches=1)
    assert with_rows - without == pytest.approx(3 * realised * sort.expert_per_row["layer_1"])
    capacity = flop_counter(_tiny_model(capacity_factor=1.0), batch_size=2, seq_len=4)
    assert capacity.static_rows == {"layer_1": 4 * 4}  # E x ceil(k T cf / E) = 4 x 4
    einsum = flop_counter(_tiny_model(dispatch="einsum"), batch_size=2, seq_len=4)
    assert einsum.static_rows == {"layer_1": tokens * 4}


@pytest.mark.parametrize("kwargs,match", [
    (dict(null_experts=()), "null_experts must name at least one"),
    (dict(null_experts=("zero", "skip")), "null_experts entry"),
    (dict(weight_rule="adamoe"), "weight_rule"),
    (dict(null_balance_weight=-1.0), "null_balance_weight must be >= 0"),
    (dict(score="relu"), "score"),
])
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NullExpertRouter(D, E, 1, rngs=nnx.Rngs(0), **kwargs)
