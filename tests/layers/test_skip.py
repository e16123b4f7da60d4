"""Learning to Skip (layers/skip.py): forced decisions reproduce the model without the
router / without the skipped layer or module, routed-out inference equals masking,
the realised FLOPs match a hand count, bad options are named."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.train.flops import flop_counter
from layers.attention import attention_mask
from layers.moe_layer import MoeLayer
from layers.skip import SkipBlock
from layers.transformer import TransformerLM
from moe.dispatch import dispatchers

RUN, SKIP = 1e4, -1e4  # router biases that saturate sigmoid to exactly 1 / 0
# 2 layers, d = 16, 2 heads of 8: layer_0 dense (d_ff 32), layer_1 MoE (E = 4, k = 2,
# expert d_ff 16, dropless sort), untied 32-token vocabulary.
BASE = functools.partial(TransformerLM, vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                         d_ff=32, moe_every=2, dtype="float32", moe_block=functools.partial(
                             MoeLayer, num_experts=4, k=2, d_ff=16, capacity_factor=None,
                             eval_capacity_factor=None))
INPUTS = jax.random.randint(jax.random.key(0), (2, 4), 1, 32)
# Hand-built batch: 5 real tokens (segment id > 0) of 8 positions.
SEGMENTS = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.int32)
ROUTERS = ("layer_router", "attention_router", "ffn_router")


def _skip_model(unit: str, biases: dict[tuple[str, str], float], **options) -> TransformerLM:
    """BASE with SkipBlock(unit=...) layers; biases {(layer, router): value}."""
    model = BASE(rngs=nnx.Rngs(1), block=functools.partial(SkipBlock, unit=unit, **options))
    for (layer, router), value in biases.items():
        getattr(getattr(model, layer), router).bias[...] = jnp.float32(value)
    return model


def _graft(dst: TransformerLM, src: TransformerLM) -> None:
    """dst's parameters taken from src wherever src has them (routers left out)."""
    own = {path for path, _ in nnx.to_flat_state(nnx.state(dst, nnx.Param))}
    nnx.update(dst, nnx.state(src, nnx.Param).filter(
        lambda path, _: tuple(path) in own and not set(map(str, path)) & set(ROUTERS)))


def _grads(model, deterministic=False):
    """(logits, {path: gradient}) of sum(logits * a fixed random tensor)."""
    weights = jax.random.normal(jax.random.key(2), (2, 4, 32))

    def loss(m):
        logits, _ = m(INPUTS, deterministic=deterministic, rng=jax.random.key(3))
        return jnp.sum(logits * weights), logits

    (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("unit", ["layer", "modules"])
def test_every_token_executing_equals_the_model_without_routers(unit):
    """Skip rate forced to 0 (biases +1e4): same logits and gradients as TransformerLM,
    in training (straight-through) and in routed-out inference; routers get 0 gradient."""
    routers = ("layer_router",) if unit == "layer" else ("attention_router", "ffn_router")
    model = _skip_model(unit, {(layer, r): RUN for layer in ("layer_0", "layer_1")
                                      for r in routers})
    base = BASE(rngs=nnx.Rngs(0))
    _graft(model, base)
    logits, grads = _grads(model)
    base_logits, base_grads = _grads(base)
    np.testing.assert_array_equal(logits, base_logits)
    for path, g in base_grads.items():
        np.testing.assert_array_equal(grads[path], g, err_msg=str(path))
    assert all(not np.any(g) for p, g in grads.items() if set(p) & set(ROUTERS))
    np.testing.assert_allclose(model(INPUTS)[0], base(INPUTS)[0], rtol=1e-5, atol=1e-5)


def test_skipping_a_layer_for_every_token_equals_the_model_without_it():
    """unit='layer', layer_1 forced to skip: the 1-layer model (train and eval), and no
    gradient reaches layer_1's attention or FFN."""
    model = _skip_model("layer", {("layer_0", "layer_router"): RUN,
                                  ("layer_1", "layer_router"): SKIP})
    shallow = BASE(rngs=nnx.Rngs(0), num_layers=1, moe_every=0)
    _graft(shallow, model)
    logits, grads = _grads(model)
    np.testing.assert_allclose(logits, _grads(shallow)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model(INPUTS)[0], shallow(INPUTS)[0], rtol=1e-6, atol=1e-6)
    layer_1 = [g for p, g in grads.items() if p[0] == "layer_1" and p[1] in ("attention", "ffn")]
    assert layer_1 and not any(np.any(g) for g in layer_1)


def test_skipping_the_moe_block_for_every_token_equals_a_zero_moe_output():
    """unit='ffn', layer_1's MoE block forced to skip: the base model whose experts
    output 0 (wo = 0); in eval the routed-out MoE layer gets no token at all."""
    model = _skip_model("ffn", {("layer_0", "ffn_router"): RUN, ("layer_1", "ffn_router"): SKIP})
    base = BASE(rngs=nnx.Rngs(0))
    _graft(base, model)
    base.layer_1.ffn.experts.wo[...] = jnp.zeros_like(base.layer_1.ffn.experts.wo[...])
    train_logits, _ = model(INPUTS, deterministic=False, rng=jax.random.key(3))
    np.testing.assert_allclose(train_logits, base(INPUTS)[0], rtol=1e-6, atol=1e-6)
    logits, aux = model(INPUTS)
    np.testing.assert_allclose(logits, base(INPUTS)[0], rtol=1e-6, atol=1e-6)
    assert float(jnp.sum(aux["layer_1"].counts)) == 0  # no token was routed
    assert float(aux["layer_1"].ffn_skip_rate) == 1 and float(aux["layer_0"].ffn_skip_rate) == 0


def test_routed_out_inference_equals_masking_on_mixed_decisions():
    """Routers at bias 0 take mixed decisions; 'route_out' (executed attention queries
    and FFN rows only) gives the logits of 'mask' (every token computed, skipped ones
    zeroed), with padding in the batch."""
    out = {}
    for mode in ("route_out", "mask"):
        model = _skip_model("modules", {}, init_bias=0.0, inference=mode)
        for layer in ("layer_0", "layer_1"):  # decisions that differ per token
            for router in ("attention_router", "ffn_router"):
                getattr(getattr(model, layer), router).kernel[...] *= 100.0
        out[mode] = model(INPUTS, segment_ids=SEGMENTS)
    rates = [float(getattr(out["mask"][1][layer], f"{module}_skip_rate"))
             for layer in ("layer_0", "layer_1") for module in ("attention", "ffn")]
    assert all(0 < r < 1 for r in rates), rates
    np.testing.assert_allclose(out["route_out"][0], out["mask"][0], rtol=1e-5, atol=1e-5)


def test_routed_out_moe_block_costs_no_expert_rows(monkeypatch):
    """unit='ffn', inference on the padded hand-built batch (5 real tokens), layer_1's
    MoE router at bias 0 with a large kernel (mixed decisions): a skipped token leaves
    layer_1 as exactly its residual (input + attention), and the dropless dispatch's
    group sizes hold k rows per executed real token only (no row for skipped tokens
    nor padding)."""
    sizes, real_layout = [], dispatchers.sorted_layout

    def recording_layout(index, num_experts):
        layout, group_sizes = real_layout(index, num_experts)
        jax.debug.callback(lambda g: sizes.append(np.asarray(g)), group_sizes)
        return layout, group_sizes

    monkeypatch.setattr(dispatchers, "sorted_layout", recording_layout)
    model = _skip_model("ffn", {("layer_0", "ffn_router"): RUN}, init_bias=0.0)
    model.layer_1.ffn_router.kernel[...] *= 100.0
    x = jax.random.normal(jax.random.key(6), (2, 4, 16))
    real = SEGMENTS > 0

    @nnx.jit
    def run(block, x):
        positions = jnp.broadcast_to(jnp.arange(4), (2, 4))
        mask = attention_mask(SEGMENTS, causal=True)
        out, aux = block(x, positions=positions, mask=mask, token_mask=real,
                         deterministic=True, rng=None)
        residual = x + block.attention(block.attention_norm(x), positions=positions,
                                       mask=mask, causal=True)
        return out, aux.counts, residual, block.ffn_router(block.ffn_norm(residual)) > 0

    out, counts, residual, gate = map(np.asarray, run(model.layer_1, x))
    executed = gate & np.asarray(real)
    skipped = ~gate & np.asarray(real)
    assert executed.sum() and skipped.sum(), executed  # mixed decisions among real tokens
    np.testing.assert_array_equal(out[skipped], residual[skipped])
    assert not np.allclose(out[executed], residual[executed])
    assert [int(s.sum()) for s in sizes] == [2 * int(executed.sum())]
    assert counts.sum() == 2 * executed.sum()  # counts: executed tokens


def test_straight_through_gradients_reach_the_routers_and_the_budget():
    """At init (bias 2, p = 0.88) the straight-through gates pass a gradient to every
    router, and the budget loss (target 0.5: (0.88 - 0.5)^2 per router) is reported."""
    for estimator in ("ste", "gumbel"):
        model = _skip_model("modules", {}, estimator=estimator)
        _, grads = _grads(model)
        for layer in ("layer_0", "layer_1"):
            for router in ("attention_router", "ffn_router"):
                assert np.any(grads[(layer, router, "kernel")]), (estimator, layer, router)
        _, aux = model(INPUTS, deterministic=False, rng=jax.random.key(4))
        assert float(aux["layer_0"].skip_loss) == pytest.approx(2 * 0.38 ** 2, abs=0.02)


def test_realised_flops_match_a_hand_count():
    """Padding batch (5 real of 8 positions); layer_0 skips its attention, layer_1 its MoE
    block, for every token. Per position (forward, 2 FLOPs per multiply-add):
    attention 2*4*16*16 (q, k, v, o) + 4*S*H*hd = 2048 + 256; dense FFN 2*2*16*32 = 2048;
    MoE router 2*16*4 = 128; lm_head 2*16*32 = 1024; expert rows (dropless top-2, counted
    as positions x k = 16) 2*2*16*16 = 1024 each."""
    model = _skip_model("modules", {("layer_0", "attention_router"): SKIP,
                                    ("layer_0", "ffn_router"): RUN,
                                    ("layer_1", "attention_router"): RUN,
                                    ("layer_1", "ffn_router"): SKIP})
    _, aux = model(INPUTS, segment_ids=SEGMENTS, deterministic=False, rng=jax.random.key(5))
    stats = {layer: a.stats() for layer, a in aux.items()}
    counter = flop_counter(model, batch_size=2, seq_len=4)
    attention, dense_ffn, router, head, row = 2048 + 256, 2048, 128, 1024, 1024
    full = 8 * (head + 2 * attention + dense_ffn + router) + 16 * row
    saved = 5 * attention + 5 * (router + 16 * row / 5)  # the MoE layer's rows per real token
    assert counter.step_flops(stats, positions=8, num_microbatches=1) == 3 * full
    realised = counter.realised(stats, positions=8, num_microbatches=1)
    assert realised["realised_flops"] == pytest.approx(3 * (full - saved))
    assert realised["realised_compute/layer_0"] == pytest.approx(
        1 - 5 * attention / (8 * (attention + dense_ffn)))
    assert realised["realised_compute/layer_1"] == pytest.approx(
        1 - (5 * router + 16 * row) / (8 * (attention + router) + 16 * row))


@pytest.mark.parametrize("option, value", [("unit", "block"), ("estimator", "reinforce"),
                                           ("budget_loss", "l1"), ("inference", "gather"),
                                           ("target_skip_rate", 1.0), ("temperature", 0.0)])
def test_bad_options_are_named(option, value):
    with pytest.raises(ValueError, match=f"SkipBlock.{option}"):
        BASE(rngs=nnx.Rngs(1), block=functools.partial(SkipBlock, **{option: value}))
