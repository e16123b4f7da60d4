"""WideNet: attention and FFN shared across depth with per-layer norms (layers/widenet.py)."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.train.flops import flop_counter
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM
from layers.widenet import widenet_lm

L = 3
BASE = functools.partial(TransformerLM, d_model=8, num_layers=L, num_heads=2, d_ff=16,
                         moe_every=1, dtype="float32",
                         moe_block=functools.partial(MoeLayer, num_experts=4, k=2, d_ff=8))
INPUTS = jax.random.randint(jax.random.key(0), (2, 6), 1, 32)


def _params(model):
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def test_sharing_off_is_the_ordinary_model():
    plain = BASE(vocab_size=32, rngs=nnx.Rngs(0))
    off = widenet_lm(32, rngs=nnx.Rngs(0), base=BASE, share=False)
    np.testing.assert_array_equal(off(INPUTS)[0], plain(INPUTS)[0])


def test_shared_tree_holds_one_copy_and_computes_like_tied_layers():
    shared = widenet_lm(32, rngs=nnx.Rngs(0), base=BASE)
    plain = BASE(vocab_size=32, rngs=nnx.Rngs(0))
    # One copy: the unshared tree minus (L - 1) attentions and MoE FFNs (router included).
    per_layer = [(p, v) for p, v in _params(plain)
                 if str(p[0]) == "layer_1" and str(p[1]) in ("attention", "ffn")]
    assert len(_params(shared)) == len(_params(plain)) - (L - 1) * len(per_layer)
    layer_bytes = sum(v[...].nbytes for _, v in per_layer)
    assert (sum(v[...].nbytes for _, v in _params(shared))
            == sum(v[...].nbytes for _, v in _params(plain)) - (L - 1) * layer_bytes)
    assert shared.param_count() == plain.param_count() - (L - 1) * sum(v.size for _, v in per_layer)
    # The same function as the unshared model with shared layer 0 copied into every
    # layer (its norms too: they are 1 at init in every layer) and the same embeddings.
    for name in ("layer_0", "layer_1", "layer_2"):
        nnx.update(getattr(plain, name), nnx.state(shared.layer_0))
    nnx.update(plain, nnx.state(shared, nnx.Param).filter(
        lambda path, _: str(path[0]) in ("embedding", "lm_head", "final_norm")))
    np.testing.assert_allclose(shared(INPUTS)[0], plain(INPUTS)[0], rtol=1e-5, atol=1e-5)


def test_active_params_count_the_shared_experts_once():
    """L = 3 MoE layers share E = 4 experts (2 * 8 * 8 weights each), k = 2: one copy
    in `param_count`, and k / E of that copy active, not L times (E - k) / E removed."""
    shared = widenet_lm(32, rngs=nnx.Rngs(0), base=BASE)
    experts = 4 * 2 * 8 * 8
    assert shared.active_param_count() == shared.param_count() - experts // 2
    plain = BASE(vocab_size=32, rngs=nnx.Rngs(0))
    assert plain.active_param_count() == plain.param_count() - L * experts // 2


def test_per_layer_norms_differ_after_training_and_the_shared_copy_moves():
    model = widenet_lm(32, rngs=nnx.Rngs(0), base=BASE)
    assert model.layer_0.attention is model.layer_2.attention
    assert model.layer_0.ffn is model.layer_2.ffn
    assert model.layer_0.ffn_norm is not model.layer_1.ffn_norm
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = np.asarray(model.layer_0.ffn.experts.wi[...])

    @nnx.jit
    def step(model, opt):
        def loss_fn(model):
            logits, _ = model(INPUTS[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, INPUTS[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for _ in range(3):
        step(model, opt)
    norms = [np.asarray(getattr(model, f"layer_{i}").ffn_norm.scale[...]) for i in range(L)]
    assert not np.allclose(norms[0], norms[1]) and not np.allclose(norms[1], norms[2])
    assert not np.allclose(before, np.asarray(model.layer_2.ffn.experts.wi[...]))
    assert model.layer_0.ffn is model.layer_2.ffn  # still one module after updates


def test_own_routers_over_shared_experts():
    model = widenet_lm(32, rngs=nnx.Rngs(0), base=BASE, share_router=False)
    assert model.layer_0.ffn.experts is model.layer_2.ffn.experts
    assert model.layer_0.ffn.router is not model.layer_1.ffn.router
    assert len(_params(model)) == len(_params(widenet_lm(32, rngs=nnx.Rngs(0), base=BASE))) + 2


def test_flops_count_shared_weights_once_per_layer():
    shared = flop_counter(widenet_lm(32, rngs=nnx.Rngs(0), base=BASE), batch_size=2, seq_len=6)
    plain = flop_counter(BASE(vocab_size=32, rngs=nnx.Rngs(0)), batch_size=2, seq_len=6)
    assert shared == plain  # the same computation, whatever the parameter count


def test_scanned_layers_are_refused_by_name():
    """A scanned model has no per-layer blocks to share: refused naming the binding."""
    with pytest.raises(ValueError, match=r"widenet_lm needs unscanned layers "
                                         r"\(TransformerLM.scan_layers = False\)"):
        nnx.eval_shape(lambda: widenet_lm(32, rngs=nnx.Rngs(0),
                                          base=functools.partial(BASE, scan_layers=True)))
