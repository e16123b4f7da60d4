"""Routers as modules: each router alone on hand-written logits, a toy router
registered in this file and selected through gin with no edit to MoeLayer, and
the gin bindings of routers and the MoE layer (taken, refused, or renamed)."""

import functools
from collections.abc import Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import (
    BaseRouter,
    DenseToSparseRouter,
    ExpertChoiceRouter,
    MoeLayer,
    Routing,
    TopKRouter,
    TransformerLM,
    active_ffn,
    register_router,
)
from moe.layer_aux import MoeAux
from moe.router_state import DTS_HARD, DTS_TEMPERATURE, SELECTION_BIAS

E = 4



def _identity(router: BaseRouter) -> BaseRouter:
    """With d_model = E and an identity kernel the router's logits are its input."""
    router.kernel[...] = jnp.eye(router.kernel[...].shape[0], dtype=jnp.float32)
    return router


def _call(router, logits, *, mask=None, capacity=None, deterministic=True, rng=None, state=None):
    mask = jnp.ones((logits.shape[0],), jnp.float32) if mask is None else mask
    return router(jnp.asarray(logits, jnp.float32), mask=mask, capacity=capacity,
                  deterministic=deterministic, rng=rng, state=state or {})


# Two real tokens and one padding token; token 0 prefers experts 0 then 1, token 1 experts 2 then 3.
LOGITS = np.array([[3.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 1.0], [9.0, 0.0, 0.0, 0.0]])
MASK = jnp.array([1.0, 1.0, 0.0])


def test_top_k_router_picks_the_best_k_and_weights_by_probability():
    router = _identity(TopKRouter(E, E, 2, rngs=nnx.Rngs(0)))
    routing = _call(router, LOGITS, mask=MASK)
    np.testing.assert_array_equal(routing.expert_index[:2], [[0, 1], [2, 3]])
    probs = jax.nn.softmax(jnp.asarray(LOGITS), axis=-1)
    np.testing.assert_allclose(routing.weights[0], probs[0, :2], rtol=1e-6)
    np.testing.assert_array_equal(routing.weights[2], [0.0, 0.0])  # padding: no weight
    assert not routing.dropless and routing.priority is None
    # Its part of the aux: LBL over the two real tokens, and their per-token routing.
    assert routing.aux.lbl is not None and routing.aux.z_loss is not None
    np.testing.assert_array_equal(routing.aux.token_mask, MASK)
    assert routing.aux.counts is None  # counts are the layer's, after dispatch


def test_top_k_router_options_normalize_scale_and_selection_bias():
    router = _identity(TopKRouter(E, E, 2, normalize=True, route_scale=2.5, rngs=nnx.Rngs(0)))
    routing = _call(router, LOGITS[:2])
    np.testing.assert_allclose(jnp.sum(routing.weights, axis=-1), [2.5, 2.5], rtol=1e-6)
    # A large selection bias on expert 3 puts it in every token's top 2 (selection only).
    bias = jnp.array([0.0, 0.0, 0.0, 10.0])
    biased = _call(router, LOGITS[:2], state={SELECTION_BIAS: bias})
    np.testing.assert_array_equal(biased.expert_index, [[3, 0], [3, 2]])
    assert router.state_keys == (SELECTION_BIAS,)


def test_expert_choice_router_lets_each_expert_pick_its_tokens():
    # Two experts, four tokens, capacity 2: expert 0 takes the tokens where it scores highest.
    router = _identity(ExpertChoiceRouter(2, 2, 1, causal=False, rngs=nnx.Rngs(0)))
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 3.0]])
    routing = _call(router, logits, capacity=2)
    assert routing.expert_choice
    np.testing.assert_array_equal(routing.token_index, [[0, 2], [3, 1]])
    probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    np.testing.assert_allclose(routing.expert_weights[0], probs[jnp.array([0, 2]), 0], rtol=1e-6)
    assert float(routing.aux.lbl) == 0.0
    assert router.capacity(4, None) == 2  # ceil(T * k / E)


def test_dense_to_sparse_router_training_and_evaluation():
    router = _identity(DenseToSparseRouter(E, E, 1, rngs=nnx.Rngs(0)))
    logits = np.array([[60.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 60.0]])
    with pytest.raises(ValueError, match="dts_temperature"):
        _call(router, logits, deterministic=False, rng=jax.random.key(0))
    state = {DTS_TEMPERATURE: jnp.float32(1.0), DTS_HARD: jnp.bool_(False)}
    train = _call(router, logits, deterministic=False, rng=jax.random.key(0), state=state)
    # One dominant expert per token: the active set is that expert, the rest the sentinel E.
    np.testing.assert_array_equal(train.expert_index, [[0, E, E, E], [E, E, E, 3]])
    assert train.dropless and train.aux.dts_loss is not None and train.aux.lbl is None
    evaluation = _call(router, logits)  # deterministic top-1 on softmax, capacity applies
    np.testing.assert_array_equal(evaluation.expert_index, [[0], [3]])
    assert not evaluation.dropless and evaluation.aux.lbl is not None


# -- a router defined here, registered, and selected in gin ----------------------------------


@register_router("test_round_robin")
class RoundRobinRouter(BaseRouter):
    """Token t goes to expert (t + offset) mod E with weight 1 (a toy, for the registry test)."""

    def __init__(self, d_model, num_experts, k, *, causal=True, offset: int = 0,
                 param_dtype=jnp.float32, rngs):
        super().__init__(d_model, num_experts, k, causal=causal, param_dtype=param_dtype,
                         rngs=rngs)
        self.offset = offset

    def __call__(self, x, *, mask, capacity, deterministic, rng,
                 state: Mapping[str, jax.Array]) -> Routing:
        experts = (jnp.arange(x.shape[0]) + self.offset) % self.num_experts
        return Routing(aux=MoeAux(lbl=jnp.zeros((), jnp.float32)),
                       expert_index=experts[:, None].astype(jnp.int32),
                       weights=mask[:, None])


def test_a_new_router_is_one_class_and_one_registration(clean_gin):
    _parse("""
        MoeLayer.router = @RoundRobinRouter
        MoeLayer.d_ff = 8
        MoeLayer.num_experts = 4
        MoeLayer.k = 1
        RoundRobinRouter.offset = 1
    """)
    layer = MoeLayer(6, rngs=nnx.Rngs(0))
    assert isinstance(layer.router, RoundRobinRouter) and layer.router.offset == 1
    x = jax.random.normal(jax.random.key(0), (1, 8, 6))
    y, aux = layer(x)
    np.testing.assert_array_equal(aux.counts, [2.0, 2.0, 2.0, 2.0])
    ffn = layer.experts.ffn(jnp.float32)
    tokens = x.reshape(8, 6)
    expected = jnp.stack([ffn.batched(tokens[t][None, None].repeat(4, 0))[(t + 1) % 4, 0]
                          for t in range(8)])
    np.testing.assert_allclose(y.reshape(8, 6), expected, rtol=1e-5, atol=1e-5)


# -- gin bindings ------------------------------------------------------------------------------


def _parse(text: str) -> None:
    gin.parse_config("\n".join(line.strip() for line in text.splitlines()))


def _gin_model(bindings: str) -> TransformerLM:
    _parse("""
        TransformerLM.d_model = 64
        TransformerLM.num_layers = 2
        TransformerLM.num_heads = 2
        TransformerLM.d_ff = 32
        TransformerLM.moe_every = 2
        TransformerLM.dtype = 'float32'
        TransformerLM.moe_block = @MoeLayer
        MoeLayer.num_experts = 16
        MoeLayer.d_ff = 8
    """ + bindings)
    return TransformerLM(vocab_size=16, rngs=nnx.Rngs(params=0))


def test_router_init_std_binding_reaches_the_kernel(clean_gin):
    kernel = _gin_model("TopKRouter.init_std = 0.5").layer_1.ffn.router.kernel[...]
    assert kernel.shape == (64, 16)
    assert float(jnp.std(kernel)) == pytest.approx(0.5, rel=0.1)  # 1024 draws
    gin.clear_config()
    default = _gin_model("").layer_1.ffn.router.kernel[...]
    assert float(jnp.std(default)) == pytest.approx(0.02, rel=0.1)


def test_bindings_a_parent_sets_are_refused_by_gin(clean_gin):
    for binding in ("TopKRouter.num_experts = 3", "MoeLayer.d_model = 3",
                    "Experts.d_ff = 3", "DenseMLP.activation = 'gelu'",
                    "Attention.num_heads = 3", "RMSNorm.eps = 0.1"):
        with pytest.raises(ValueError, match="has denylisted kwarg"):
            gin.parse_config(binding)


def test_old_binding_names_warn_with_the_new_name_and_take_effect(clean_gin):
    with pytest.warns(DeprecationWarning, match="TopKRouter.init_std"):
        model = _gin_model("MoeLayer.router_init_std = 0.5")
    assert model.layer_1.ffn.router.init_std == 0.5
    gin.clear_config()
    with pytest.warns(DeprecationWarning, match="MoeLayer.k"):
        model = _gin_model("TransformerLM.k = 3")
    assert model.layer_1.ffn.k == 3
    gin.clear_config()
    with pytest.warns(DeprecationWarning, match="MoeLayer.router = @ExpertChoiceRouter"):
        model = _gin_model("TransformerLM.causal = False\n"
                           "TransformerLM.moe_kwargs = {'routing_type': 'expert_choice'}")
    assert isinstance(model.layer_1.ffn.router, ExpertChoiceRouter)


def test_bindings_on_the_removed_router_configurable_name_the_new_one(clean_gin):
    with pytest.raises(ValueError, match="Router.init_std -> TopKRouter.init_std"):
        _gin_model("Router.init_std = 0.5")


def test_dense_baseline_reads_the_active_size_from_the_moe_config(clean_gin):
    gin.parse_config("MoeLayer.num_shared_experts = 1\nMoeLayer.activation = 'swiglu'")
    block = functools.partial(MoeLayer, d_ff=8, k=2)
    assert active_ffn(block) == (2 * 8 + 8, "swiglu")
    assert active_ffn(block, k=1) == (8 + 8, "swiglu")
    model = TransformerLM(vocab_size=16, d_model=8, num_layers=2, num_heads=2, d_ff=32,
                          moe_block=block, dense_baseline=True, dense_baseline_k=1,
                          dtype="float32", rngs=nnx.Rngs(0))
    assert model.moe_layer_names == ()
    assert model.layer_1.ffn.wi.shape == (8, 16) and model.layer_1.ffn.activation == "swiglu"
    assert model.layer_0.ffn.wi.shape == (8, 32)
