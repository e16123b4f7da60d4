"""MoLA: routed LoRA experts, a number per layer, on a frozen dense model (layers/mola.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.moe_layer import MoeLayer
from layers.mola import FrozenParam, add_lora_experts, freeze
from layers.routers import NullExpertRouter, TopKRouter
from layers.transformer import TransformerLM

BASE = functools.partial(TransformerLM, d_model=8, num_layers=3, num_heads=2, d_ff=16,
                         moe_every=0, dtype="float32")
INPUTS = jax.random.randint(jax.random.key(0), (2, 6), 1, 32)


def _build_mola(counts=(1, 2, 3), k=1, base=BASE, router=TopKRouter):
    model = base(vocab_size=32, rngs=nnx.Rngs(0))
    freeze(model)
    add_lora_experts(model, counts, k=k, rank=2, alpha=4.0, router=router, rngs=nnx.Rngs(1))
    return model


def _mola(**kwargs):
    """Built under one jit (eagerly every initializer compiles on its own)."""
    return nnx.jit(lambda: _build_mola(**kwargs))()


@pytest.fixture(scope="module")
def built():
    """One MoLA model of layers with 1, 2, 3 experts, k = 1 (tests take clones)."""
    return _mola()


@nnx.jit
def _logits(model):
    return model(INPUTS)[0]


def _paths(model, kind):
    return ["/".join(str(p) for p in path)
            for path, _ in nnx.to_flat_state(nnx.state(model, kind))]


def test_zero_b_is_the_base_model_and_a_nonzero_b_is_not(built):
    """B starts at 0: the logits are the base model's, bit for bit (every LoRA delta is
    an exact 0 added). One B of the top layer set to 1 changes them."""
    base = nnx.jit(lambda: BASE(vocab_size=32, rngs=nnx.Rngs(0)))()
    mola = nnx.clone(built)
    np.testing.assert_array_equal(_logits(mola), _logits(base))
    experts = mola.layer_2.ffn.experts
    experts.down_b[...] = jnp.ones_like(experts.down_b[...])
    assert not np.allclose(_logits(mola), _logits(base))


def test_only_lora_and_router_weights_are_parameters(built):
    """Layers of 1, 2, 3 experts, d=8, d_ff=16, r=2: an expert has up A 8x2 + up B 2x16 +
    down A 16x2 + down B 2x8 = 96 weights, a layer's router 8 x E; the base's weights are
    all `FrozenParam`s (out of gradients, optimizer and checkpoints)."""
    mola = built
    assert mola.param_count() == 6 * 96 + 8 * 6
    assert all(("/experts/" in p or "/router/" in p) for p in _paths(mola, nnx.Param))
    base_paths = _paths(nnx.eval_shape(lambda: BASE(vocab_size=32, rngs=nnx.Rngs(0))),
                        nnx.Param)
    assert sorted(p.replace("/ffn/", "/ffn/base/") if "/ffn/" in p else p
                  for p in base_paths) == sorted(_paths(mola, FrozenParam))
    assert mola.experts_per_layer == {"layer_0": 1, "layer_1": 2, "layer_2": 3}
    assert mola.moe_layer_names == ("layer_0", "layer_1", "layer_2")


def test_a_token_uses_only_its_top_k_experts(built):
    """k = 1 of 3 experts: changing expert e's B changes the outputs of the tokens
    routed to e and of no other token."""
    ffn = nnx.clone(built).layer_2.ffn
    for name in ("up_b", "down_b"):
        value = getattr(ffn.experts, name)
        value[...] = jax.random.normal(jax.random.key(1), value[...].shape)
    x = jax.random.normal(jax.random.key(2), (1, 12, 8))
    call = nnx.jit(lambda f: f(x))
    y, aux = call(ffn)
    chosen = np.asarray(aux.token_experts)[:, 0]
    e = int(np.bincount(chosen, minlength=3).argmax())
    assert 0 < np.sum(chosen == e) < 12  # some tokens go elsewhere
    ffn.experts.down_b[...] = ffn.experts.down_b[...].at[e].add(1.0)
    changed = np.any(np.asarray(call(ffn)[0] != y)[0], axis=-1)
    np.testing.assert_array_equal(changed, chosen == e)
    np.testing.assert_array_equal(np.asarray(aux.counts), np.bincount(chosen, minlength=3))
    # The routing analysis' statistics: the same counts; an expert's output norm is what
    # it adds to the FFN (B of expert e nonzero only: zero for every other expert).
    for name in ("up_b", "down_b"):
        value = getattr(ffn.experts, name)
        value[...] = jnp.zeros_like(value[...]).at[e].set(1.0)
    stats = nnx.jit(lambda f: f.routing_stats(x))(ffn)
    np.testing.assert_array_equal(np.asarray(stats.counts), np.bincount(chosen, minlength=3))
    norms = np.asarray(stats.output_norm_sum)
    assert norms[e] > 0 and np.all(np.delete(norms, e) == 0)


@pytest.mark.parametrize("counts, k, rank, alpha, match", [
    ((2, 4), 1, 2, 4.0, r"experts_per_layer has 2 entries \[2, 4\], but the base model has "
                        r"num_layers=3"),
    ((2, 4, 6), 3, 2, 4.0, r"mola_lm.k must be an int in \[1, min\(experts_per_layer\)=2\] "
                           r"\(layer 0 has 2 experts\), got 3"),
    ((2, 0, 6), 1, 2, 4.0, r"mola_lm.experts_per_layer\[1\] must be an int >= 1, got 0"),
    ("2-4-6", 1, 2, 4.0, r"mola_lm.experts_per_layer must be a list of ints"),
    ((2, 4, 6), 1, 0, 4.0, r"mola_lm.rank must be an int >= 1, got 0"),
    ((2, 4, 6), 1, 2, 0.0, r"mola_lm.alpha must be a number > 0, got 0.0"),
])
def test_bad_options_are_refused_by_name(counts, k, rank, alpha, match):
    model = nnx.eval_shape(lambda: BASE(vocab_size=32, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=match):
        add_lora_experts(model, counts, k=k, rank=rank, alpha=alpha, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("base, match", [
    (functools.partial(BASE, moe_every=1, moe_block=functools.partial(
        MoeLayer, num_experts=2, k=1, d_ff=8)), "adds LoRA experts to a dense model: layer_0"),
    (functools.partial(BASE, scan_layers=True), r"needs unscanned layers"),
])
def test_a_base_that_is_not_an_unscanned_dense_model_is_refused(base, match):
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(lambda: _build_mola(counts=(2, 2, 2), base=base))


def test_a_router_that_computes_experts_itself_is_refused():
    """Copy experts (`NullExpertRouter`) would be computed by the router, outside the LoRA
    mixture: refused when the layer is called, naming the option."""
    router = functools.partial(NullExpertRouter, null_experts=("copy",))
    model = nnx.eval_shape(lambda: _build_mola(counts=(2, 2, 2), router=router))
    with pytest.raises(ValueError, match=r"mola_lm.router must be a token-choice router over "
                                         r"the LoRA experts only, got NullExpertRouter"):
        nnx.eval_shape(lambda m: m(INPUTS), model)
