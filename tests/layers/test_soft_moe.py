"""Soft MoE on hand-built inputs: the dispatch/combine formulas, convex slots,
permutation equivariance, padding, refusal in a causal model, FLOP rows, and a few
masked-LM steps of an encoder."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.train.flops import flop_counter
from layers.soft_moe import SoftMoeLayer, soft_weights
from layers.transformer import TransformerLM, mask_tokens

D = 4


def _layer(n=2, p=1, seed=0):
    return SoftMoeLayer(D, d_ff=8, num_experts=n, slots_per_expert=p, causal=False,
                        rngs=nnx.Rngs(seed))


def test_formulas_on_a_hand_written_case():
    # One sequence of 3 tokens in d = 4, n = 2 experts with p = 1 slot. mu columns are
    # e_0 and e_1 (already unit), scale 2, so L[t, i] = 2 * x^_t[i] (x^ = x / |x|).
    layer = _layer()
    mu = np.zeros((D, 2, 1), np.float32)
    mu[0, 0, 0] = mu[1, 1, 0] = 1.0
    layer.router.mu[...] = jnp.asarray(mu)
    layer.router.scale[...] = jnp.float32(2.0)
    x = np.array([[3.0, 0.0, 4.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    y, aux = layer(jnp.asarray(x)[None])
    unit = x / np.sqrt((x ** 2).sum(-1, keepdims=True) + 1e-6)
    logits = 2.0 * unit[:, :2]  # [3 tokens, 2 slots]
    dispatch = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)  # over tokens
    combine = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # over slots
    slots = dispatch.T @ x  # [2, d]
    ffn = layer.experts.ffn(jnp.float32)
    outputs = np.stack([np.asarray(ffn.single(i, jnp.asarray(slots[i:i + 1])))[0]
                        for i in range(2)])
    np.testing.assert_allclose(y[0], combine @ outputs, rtol=1e-5, atol=1e-6)
    # Statistics: each expert processes B * p = 1 row; P_i = mean combine weight.
    np.testing.assert_array_equal(aux.counts, [1.0, 1.0])
    np.testing.assert_allclose(aux.mean_probs, combine.mean(0), rtol=1e-5)
    assert float(aux.dropped_fraction) == 0.0


def test_slots_are_convex_combinations_and_padding_takes_no_part():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 6))
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], jnp.float32)
    dispatch, combine = soft_weights(logits, mask)
    np.testing.assert_allclose(dispatch[0].sum(0), np.ones(6), rtol=1e-6)  # over tokens
    np.testing.assert_allclose(combine[0, :3].sum(-1), np.ones(3), rtol=1e-6)  # over slots
    np.testing.assert_array_equal(dispatch[0, 3:], 0.0)  # padding: no share of any slot
    np.testing.assert_array_equal(combine[0, 3:], 0.0)
    np.testing.assert_array_equal(dispatch[1], 0.0)  # all padding: zeros, no NaN
    assert np.all(np.isfinite(combine))
    # The layer: padding values do not reach real tokens, padding outputs are 0.
    layer = _layer(n=3, p=2)
    x = jax.random.normal(jax.random.key(1), (1, 5, D))
    mask = jnp.array([[1, 1, 1, 0, 0]])
    y1, _ = layer(x, mask=mask)
    y2, _ = layer(x.at[0, 3:].set(100.0), mask=mask)
    np.testing.assert_allclose(y1[0, :3], y2[0, :3], rtol=1e-6)
    np.testing.assert_array_equal(y1[0, 3:], 0.0)


def test_permuting_tokens_permutes_outputs():
    layer = _layer(n=3, p=2)
    x = jax.random.normal(jax.random.key(2), (2, 6, D))
    perm = np.array([3, 0, 5, 1, 4, 2])
    y, _ = layer(x)
    y_perm, _ = layer(x[:, perm])
    np.testing.assert_allclose(y_perm, y[:, perm], rtol=1e-5, atol=1e-6)


def test_later_tokens_change_earlier_outputs_and_scale_does_not_change_weights():
    # Why it is refused in decoders: changing only the last token moves the first output.
    layer = _layer()
    x = jax.random.normal(jax.random.key(3), (1, 6, D))
    y, _ = layer(x)
    y_changed, _ = layer(x.at[0, -1].add(1.0))
    assert float(jnp.abs(y_changed[0, 0] - y[0, 0]).max()) > 1e-4
    # The L2 normalisation: scaling x leaves the logits (so D and C) unchanged.
    np.testing.assert_allclose(layer.router.logits(3.0 * x), layer.router.logits(x), rtol=1e-5)


def test_refused_in_a_causal_model_with_the_reason():
    with pytest.raises(ValueError, match="encoder .*later tokens"):
        TransformerLM(16, D, 2, 2, 8, moe_block=functools.partial(SoftMoeLayer, d_ff=8),
                      causal=True, rngs=nnx.Rngs(0))
    for kwargs, match in ((dict(d_ff=None), "d_ff"), (dict(d_ff=8, num_experts=0), "num_experts"),
                          (dict(d_ff=8, slots_per_expert=0), "slots_per_expert")):
        with pytest.raises(ValueError, match=f"SoftMoeLayer.{match}"):
            SoftMoeLayer(D, causal=False, rngs=nnx.Rngs(0), **kwargs)


def _encoder(n=2, p=2):
    block = functools.partial(SoftMoeLayer, d_ff=16, num_experts=n, slots_per_expert=p)
    return TransformerLM(32, 16, 2, 2, 32, moe_every=2, moe_block=block, causal=False,
                         dtype="float32", rngs=nnx.Rngs(0))


def test_flop_counter_counts_slot_rows_and_the_mixing_matmuls():
    model = _encoder(n=2, p=3)
    counter = flop_counter(model, batch_size=4, seq_len=8)
    assert counter.static_rows == {"layer_1": 4 * 2 * 3}  # B x n x p
    plain = flop_counter(TransformerLM(32, 16, 2, 2, 32, moe_every=0, causal=False,
                                       rngs=nnx.Rngs(0)), batch_size=4, seq_len=8)
    moe = model.layer_1.ffn
    # Outside the experts, the Soft MoE layer adds its mu (2 d n p, the logits) and
    # the dispatch + combine matmuls (4 d n p) per position, and drops the dense FFN.
    dense_ffn = 2 * (16 * 32 + 32 * 16)
    assert counter.dense_per_position == pytest.approx(
        plain.dense_per_position - dense_ffn + 2 * moe.router.mu.size + 4 * 16 * 2 * 3)


def test_active_params_count_the_slot_rows_per_token():
    """n = 2 experts of 2 * 16 * 16 weights each, p = 3 slots: a sequence of 12 tokens
    sends n p = 6 slot rows through one expert each, 0.5 expert per token = p / 12 of
    the expert weights; without a sequence length every expert counts (all mix)."""
    model = _encoder(n=2, p=3)
    experts = 2 * (2 * 16 * 16)
    assert model.active_param_count() == model.param_count()
    assert model.active_param_count(seq_len=12) == model.param_count() - experts + experts // 4
    assert model.active_param_count(seq_len=2) == model.param_count()  # p >= seq_len: all


def test_masked_lm_steps_in_an_encoder_lower_the_loss():
    model = _encoder()
    inputs = jax.random.randint(jax.random.key(4), (4, 8), 1, 31)
    segment_ids = jnp.ones((4, 8), jnp.int32).at[3, 6:].set(0)  # row 3 ends in padding
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, rng):
        masked, targets, weights = mask_tokens(rng, inputs, segment_ids, mask_rate=0.3,
                                               mask_id=31, vocab_size=32)

        def loss_fn(model):
            logits, aux = model(masked, segment_ids=segment_ids)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0), aux

        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, aux

    losses = [float(step(model, opt, jax.random.key(i % 2))[0]) for i in range(30)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
