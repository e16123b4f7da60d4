"""Tests for the transformer LM / encoder (layers/transformer.py, attention.py, norms.py)."""

import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import attention_mask, segment_positions
from layers.mlp import DenseMLP
from layers.moe_layer import MoeLayer
from layers.params import logical_axes_of
from layers.routers import ExpertChoiceRouter, TopKRouter
from layers.transformer import TransformerLM, mask_tokens
from moe.router_state import RouterState

VOCAB, D, E = 32, 16, 4
AUX_KEYS = {"lbl", "z_loss", "counts", "mean_probs", "kept_counts", "num_tokens",
            "dropped_fraction", "max_violation", "router_entropy", "active_experts"}
# Per-token routing, for balance scopes that regroup tokens after the forward pass.
TOKEN_KEYS = {"token_probs", "token_experts", "token_mask"}


def _statistics(layer_aux):
    return {key: value for key, value in layer_aux.items() if key not in TOKEN_KEYS}


def tiny(moe=None, router=None, router_cls=TopKRouter, **kw) -> TransformerLM:
    """A 2-layer model; `moe`: MoeLayer arguments, `router`: `router_cls` arguments."""
    moe = dict(dict(d_ff=32, num_experts=E, k=2), **(moe or {}))
    moe["router"] = functools.partial(router_cls, **(router or {}))
    args = dict(vocab_size=VOCAB, d_model=D, num_layers=2, num_heads=2, d_ff=32,
                moe_every=1, moe_block=functools.partial(MoeLayer, **moe), dtype="float32",
                rngs=nnx.Rngs(0))
    args.update(kw)
    return TransformerLM(**args)


# Compiled once per model structure; eager calls cost seconds each on CPU.
@nnx.jit(static_argnames=("deterministic",))
def forward(model, inputs, segment_ids=None, positions=None, deterministic=True, rng=None,
            router_state=None):
    return model(inputs, segment_ids=segment_ids, positions=positions,
                 deterministic=deterministic, rng=rng, router_state=router_state)


def logits_of(model, inputs, segment_ids=None, **kw):
    return forward(model, inputs, segment_ids, **kw)[0]


def tokens(seed: int, shape=(2, 8)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


def test_shapes_float32_logits_and_aux():
    model = tiny(num_layers=4, moe_every=2, num_kv_heads=1)
    logits, aux = forward(model, tokens(0), jnp.ones((2, 8), jnp.int32))
    assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert model.moe_layer_names == ("layer_1", "layer_3")
    assert model.experts_per_layer == {"layer_1": E, "layer_3": E}
    assert set(aux) == {"layer_1", "layer_3"}
    for layer_aux in aux.values():
        assert {name for name, _ in layer_aux.items()} == AUX_KEYS | TOKEN_KEYS
        assert all(v.dtype == jnp.float32 for v in _statistics(layer_aux).values())
        assert layer_aux.token_probs.dtype == jnp.float32
        assert layer_aux.token_experts.dtype == jnp.int32
        assert layer_aux.counts.shape == (E,)
        assert float(layer_aux.num_tokens) == 16.0
        # Dropless top-2: 32 assignments.
        assert float(jnp.sum(layer_aux.counts)) == 32.0


@pytest.mark.parametrize("moe_every,num_layers,expected", [
    (0, 4, ()), (1, 3, (0, 1, 2)), (2, 4, (1, 3)), (3, 4, (2,)), (4, 4, (3,)), (2, 1, None)])
def test_moe_every_patterns(moe_every, num_layers, expected):
    if expected is None:
        with pytest.raises(ValueError, match="moe_every"):
            tiny(moe_every=moe_every, num_layers=num_layers)
        return
    model = tiny(moe_every=moe_every, num_layers=num_layers)
    assert model.moe_layer_names == tuple(f"layer_{i}" for i in expected)
    for i in range(num_layers):
        ffn = getattr(model, f"layer_{i}").ffn
        assert isinstance(ffn, MoeLayer if i in expected else DenseMLP)


@pytest.mark.parametrize("packed", [False, True])
def test_causal_model_is_causal(packed):
    model = tiny()
    x = tokens(2, (1, 8))
    seg = jnp.ones_like(x) if packed else None
    base = logits_of(model, x, seg)
    for t in range(7):
        changed = x.at[0, t + 1].set((x[0, t + 1] + 1) % VOCAB)
        out = logits_of(model, changed, seg)
        np.testing.assert_allclose(out[0, :t + 1], base[0, :t + 1], atol=1e-5)
        assert not np.allclose(out[0, t + 1], base[0, t + 1], atol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_segments_do_not_attend_across(causal):
    model = tiny(causal=causal)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]], jnp.int32)
    x = tokens(3, (1, 8))
    base = logits_of(model, x, seg)
    assert bool(jnp.all(jnp.isfinite(base)))
    # Changing segment 1 leaves segment 2 alone, and vice versa.
    other = x.at[0, :3].set((x[0, :3] + 5) % VOCAB)
    np.testing.assert_allclose(logits_of(model, other, seg)[0, 3:6], base[0, 3:6], atol=1e-5)
    other = x.at[0, 3:6].set((x[0, 3:6] + 5) % VOCAB)
    np.testing.assert_allclose(logits_of(model, other, seg)[0, :3], base[0, :3], atol=1e-5)
    # Padding never leaks into real tokens.
    other = x.at[0, 6:].set((x[0, 6:] + 5) % VOCAB)
    np.testing.assert_allclose(logits_of(model, other, seg)[0, :6], base[0, :6], atol=1e-5)


def test_positions_restart_per_segment():
    model = tiny()
    x = tokens(4, (1, 8))
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]], jnp.int32)
    packed = logits_of(model, x, seg)
    # Segment 2 alone at the start of a row gives the same logits.
    alone = jnp.zeros_like(x).at[0, :3].set(x[0, 3:6])
    alone_seg = jnp.array([[1, 1, 1, 0, 0, 0, 0, 0]], jnp.int32)
    np.testing.assert_allclose(logits_of(model, alone, alone_seg)[0, :3], packed[0, 3:6],
                               atol=1e-5)
    # Explicit positions are used. (RoPE is shift-invariant, so only a change in
    # spacing shows: segment 2 at 0, 2, 4 instead of 0, 1, 2.)
    explicit = logits_of(model, x, seg, positions=segment_positions(seg))
    np.testing.assert_allclose(explicit, packed, atol=1e-6)
    spread = logits_of(model, x, seg, positions=jnp.array([[0, 1, 2, 0, 2, 4, 0, 1]], jnp.int32))
    np.testing.assert_allclose(spread[0, :3], packed[0, :3], atol=1e-5)
    assert not np.allclose(spread[0, 3:6], packed[0, 3:6], atol=1e-4)


def test_segment_positions_and_mask_by_hand():
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 0, 1, 2, 0, 1]])
    seg = jnp.array([[1, 1, 2, 0]], jnp.int32)
    causal = np.array([[1, 0, 0, 0],
                       [1, 1, 0, 0],
                       [0, 0, 1, 0],
                       [0, 0, 0, 1]], bool)
    bidir = np.array([[1, 1, 0, 0],
                      [1, 1, 0, 0],
                      [0, 0, 1, 0],
                      [0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(attention_mask(seg, causal=True), causal[None, None])
    np.testing.assert_array_equal(attention_mask(seg, causal=False), bidir[None, None])


@pytest.mark.parametrize("moe_kwargs", [
    dict(router_cls=ExpertChoiceRouter),
    dict(moe={"capacity_factor": 2.0}, router={"batch_prioritized": True}),
])
def test_encoder_with_encoder_only_routing(moe_kwargs):
    model = tiny(causal=False, **moe_kwargs)
    assert all(not getattr(model, n).ffn.router.causal for n in model.moe_layer_names)
    x = tokens(5, (1, 8))
    seg = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    base, aux = forward(model, x, seg)
    assert bool(jnp.all(jnp.isfinite(base)))
    assert set(aux) == {"layer_0", "layer_1"}
    # Bidirectional: a later token changes the first position's logits.
    changed = logits_of(model, x.at[0, 5].set((x[0, 5] + 1) % VOCAB), seg)
    assert not np.allclose(changed[0, 0], base[0, 0], atol=1e-4)


@pytest.mark.parametrize("moe_kwargs,match", [
    (dict(router_cls=ExpertChoiceRouter), "ExpertChoiceRouter"),
    (dict(moe={"capacity_factor": 2.0}, router={"batch_prioritized": True}),
     "batch_prioritized"),
])
def test_causal_model_refuses_lookahead_routing(moe_kwargs, match):
    # (A dense baseline builds no router, so there is nothing to refuse there.)
    with pytest.raises(ValueError, match=match):
        tiny(**moe_kwargs)


def test_dense_baseline_matches_active_params():
    # Baseline hidden = k * expert_d_ff + shared = 2 * 8 + 2 * 8 = 32 = d_ff.
    kw = dict(moe_every=2, moe=dict(d_ff=8, k=2, num_shared_experts=2))
    moe, dense = tiny(**kw), tiny(dense_baseline=True, **kw)
    # By hand: embedding 512 + lm_head 512 + final norm 16; per layer attention 1024
    # + norms 32; layer 0 dense 2*16*32; layer 1 router 16*4, experts 4*2*16*8,
    # shared experts 2*16*16.
    assert moe.param_count() == 1040 + 2 * 1056 + 1024 + 64 + 1024 + 512
    assert moe.active_param_count() == moe.param_count() - 1024 + 2 * 256
    assert dense.moe_layer_names == ()
    assert isinstance(dense.layer_1.ffn, DenseMLP)
    assert dense.layer_1.ffn.wi.shape == (D, 32)
    # Equal active parameters per token, the MoE router aside.
    router = sum(D * E for _ in moe.moe_layer_names)
    assert dense.active_param_count() == dense.param_count()
    assert dense.active_param_count() == moe.active_param_count() - router
    logits, aux = forward(dense, tokens(6))
    assert aux == {} and logits.shape == (2, 8, VOCAB)


def test_tied_embeddings_share_the_table():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.lm_head is None
    assert not any("lm_head" in str(p) for p in logical_axes_of(tied))
    assert untied.param_count() - tied.param_count() == VOCAB * D
    x = jnp.array([[1, 2, 3, 4]], jnp.int32)
    base = logits_of(tied, x)
    # Row 7 is not an input: changing it moves only the logits of token 7.
    tied.embedding[...] = tied.embedding[...].at[7].add(1.0)
    out = logits_of(tied, x)
    changed = ~np.isclose(out, base, atol=1e-6).all(axis=(0, 1))
    np.testing.assert_array_equal(np.nonzero(changed)[0], [7])


def test_bf16_compute_keeps_logits_and_router_float32():
    model = tiny(dtype="bfloat16", moe=dict(num_shared_experts=1))
    block = model.layer_0
    assert block.ffn.router.kernel[...].dtype == jnp.float32
    assert model.embedding[...].dtype == jnp.float32
    h = jnp.ones((3, D), jnp.bfloat16)
    assert block.ffn.router.logits(h).dtype == jnp.float32
    logits, aux = forward(model, tokens(7), jnp.ones((2, 8), jnp.int32))
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert all(v.dtype == jnp.float32 for a in aux.values() for _, v in a.stats().items())
    assert all(a.token_probs.dtype == jnp.float32 for a in aux.values())
    # The residual stream really is bf16 (shape-only trace, nothing compiled).
    y, _ = jax.eval_shape(
        lambda h: block(h, positions=jnp.zeros((2, 8), jnp.int32), mask=None, token_mask=None,
                        deterministic=True, rng=None, router_state=None),
        jnp.zeros((2, 8, D), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16


def test_grad_of_cross_entropy_is_finite():
    model = tiny(moe=dict(activation="swiglu", num_shared_experts=1),
                 router=dict(jitter_eps=0.01, noise_std=0.1))
    x = tokens(8)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)

    def loss_fn(m):
        logits, aux = m(x[:, :-1], segment_ids=seg[:, :-1], deterministic=False,
                        rng=jax.random.key(0))
        weights = (seg[:, 1:] > 0) & (seg[:, 1:] == seg[:, :-1])
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1)[..., 0]
        lbl = sum(a.lbl for a in aux.values())
        return jnp.sum(ce * weights) / jnp.sum(weights) + 0.01 * lbl

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    flat = dict(nnx.to_flat_state(grads))
    assert all(bool(jnp.all(jnp.isfinite(g[...]))) for g in flat.values())
    assert float(jnp.abs(flat[("layer_0", "ffn", "router", "kernel")][...]).sum()) > 0
    assert float(jnp.abs(flat[("embedding",)][...]).sum()) > 0


def test_training_noise_needs_rng_and_uses_it():
    model = tiny(router=dict(noise_std=1.0))
    x = tokens(9)
    with pytest.raises(ValueError, match="rng"):
        forward(model, x, deterministic=False)
    a = logits_of(model, x, deterministic=False, rng=jax.random.key(1))
    b = logits_of(model, x, deterministic=False, rng=jax.random.key(2))
    assert not np.allclose(a, b)


def test_selection_biases_reach_their_layer():
    model = tiny(moe=dict(k=1))
    bias = jnp.array([100.0, 0.0, 0.0, 0.0], jnp.float32)
    state = RouterState(layers={"layer_1": {"selection_bias": bias}})
    _, aux = forward(model, tokens(10), router_state=state)
    np.testing.assert_array_equal(aux["layer_1"].counts, [16.0, 0.0, 0.0, 0.0])
    assert float(aux["layer_0"].counts[0]) < 16.0
    with pytest.raises(ValueError, match="router state"):
        tiny(moe_every=2)(tokens(10),
                          router_state=RouterState(layers={"layer_0": {"selection_bias": bias}}))


def test_every_param_has_logical_axes_of_its_rank():
    model = tiny(num_layers=2, moe_every=2, activation="swiglu",
                 moe=dict(num_shared_experts=1))
    axes = logical_axes_of(model)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert set(axes) == set(params)
    for path, names in axes.items():
        assert names is not None and len(names) == params[path][...].ndim, path
    assert axes[("embedding",)] == ("vocab", "embed")
    assert axes[("lm_head",)] == ("embed", "vocab")
    assert axes[("layer_0", "attention", "query")] == ("embed", "heads", "kv")
    assert axes[("layer_0", "attention", "value")] == ("embed", "heads", "kv")
    assert axes[("layer_0", "attention", "out")] == ("heads", "kv", "embed")
    assert axes[("layer_0", "attention_norm", "scale")] == ("norm",)
    assert axes[("layer_0", "ffn", "wi_gate")] == ("embed", "mlp")
    assert axes[("layer_1", "ffn", "experts", "wi")] == ("expert", "embed", "mlp")


@pytest.mark.parametrize("kw,match", [
    (dict(num_heads=3), "num_heads"),
    (dict(num_kv_heads=3, num_heads=4), "num_kv_heads"),
    (dict(head_dim=5), "head_dim"),
    (dict(moe_every=-1), "moe_every"),
    (dict(d_ff=0), "d_ff"),
    (dict(moe=dict(k=5)), "k must be"),
    (dict(activation="tanh"), "activation"),
    (dict(moe_kwargs={"num_experts": 8}), "num_experts"),
    (dict(moe_kwargs={"capacity": 2}), "capacity"),
    (dict(moe_kwargs={"dispatch": "magic"}), "dispatch"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_bad_call_raises():
    model = tiny()
    with pytest.raises(ValueError, match="inputs"):
        model(jnp.zeros((8,), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        model(tokens(0), segment_ids=jnp.ones((2, 7), jnp.int32))


def test_mask_tokens():
    inputs = jax.random.randint(jax.random.key(0), (4, 2000), 5, VOCAB, jnp.int32)
    seg = jnp.ones_like(inputs).at[:, 1500:].set(0)
    masked, targets, weights = mask_tokens(jax.random.key(1), inputs, seg, mask_rate=0.5,
                                           mask_id=0, vocab_size=VOCAB)
    np.testing.assert_array_equal(targets, inputs)
    assert weights.dtype == jnp.float32 and masked.dtype == jnp.int32
    assert float(weights[:, 1500:].sum()) == 0.0
    unselected = weights == 0
    np.testing.assert_array_equal(masked[unselected], inputs[unselected])
    assert 0.45 < float(weights[:, :1500].mean()) < 0.55
    sel = weights > 0
    # Inputs are >= 5, so mask_id 0 only appears where BERT put [MASK] or a random token.
    is_mask = np.asarray(masked[sel] == 0)
    assert 0.77 < is_mask.mean() < 0.83
    kept = np.asarray(masked[sel] == inputs[sel])
    assert 0.08 < kept.mean() < 0.13  # 10% kept + random tokens that hit the original
    all_selected = mask_tokens(jax.random.key(2), inputs, None, mask_rate=1.0, mask_id=0,
                               vocab_size=VOCAB)[2]
    assert float(all_selected.min()) == 1.0
    with pytest.raises(ValueError, match="mask_rate"):
        mask_tokens(jax.random.key(0), inputs, seg, mask_rate=0.0, mask_id=0, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="mask_id"):
        mask_tokens(jax.random.key(0), inputs, seg, mask_id=VOCAB, vocab_size=VOCAB)


def test_gin_configures_the_model():
    gin.parse_config("\n".join([
        "TransformerLM.moe_every = 2",
        'TransformerLM.dtype = "float32"',
        "TransformerLM.moe_block = @MoeLayer",
        f"MoeLayer.num_experts = {E}",
        "MoeLayer.k = 2",
        "MoeLayer.d_ff = 32",
        'MoeLayer.dispatch = "einsum"',
        "MoeLayer.num_shared_experts = 1",
        "MoeLayer.capacity_factor = 1.25",
        'TopKRouter.score = "sigmoid"',
    ]))
    try:
        model = TransformerLM(VOCAB, D, 2, 2, 32, rngs=nnx.Rngs(0))
    finally:
        gin.clear_config()
    moe = model.layer_1.ffn
    assert model.moe_layer_names == ("layer_1",) and model.dtype == jnp.float32
    assert (moe.dispatch, moe.capacity_factor, moe.router.score) == ("einsum", 1.25, "sigmoid")
    assert moe.shared is not None
