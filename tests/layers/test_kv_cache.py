"""KV-cache decoding (`TransformerLM.decode`) against the training forward.

Scenario: a tiny model (every optional parameter perturbed away from its
initial 0 / 1, so biases and norms matter) scores a sequence with one full
forward pass; the cached path prefills a prefix, then feeds the rest one token
at a time. The logits at every position must agree (float32: 1e-5). A
left-padded ragged batch must give each row what the row alone gives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import kv_cache
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM
from moe.router_state import SELECTION_BIAS, RouterState

V, T, PREFIX = 23, 9, 4  # vocab, sequence length, prefilled tokens


def _model(dtype: str = "float32", **kwargs) -> TransformerLM:
    """A 2-layer model (layer_1 MoE, top-2 of 4) with all parameters randomly perturbed."""
    options = dict(d_model=16, num_layers=2, num_heads=4, d_ff=24, moe_every=2,
                   moe_block=functools.partial(MoeLayer, d_ff=8, num_experts=4, k=2),
                   dtype=dtype, param_dtype="float32")
    model = TransformerLM(vocab_size=V, **{**options, **kwargs}, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [p + 0.2 * jax.random.normal(key, p.shape, p.dtype) for p, key in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def _biases(model: TransformerLM, scale: float = 1.0) -> RouterState:
    """Selection biases large enough to change which experts are picked."""
    return RouterState(layers={
        name: {SELECTION_BIAS: scale * jnp.arange(model.moe_layer(name).num_experts,
                                                  dtype=jnp.float32)}
        for name in model.moe_layer_names})


@functools.partial(nnx.jit, static_argnames="prefill")
def _decode(model, tokens, positions, cache, cache_index, kv_valid, router_state, prefill=False):
    logits, cache, _ = model.decode(tokens, positions=positions, cache=cache,
                                    cache_index=cache_index, kv_valid=kv_valid,
                                    router_state=router_state, prefill=prefill)
    return logits, cache


def _cached_logits(model: TransformerLM, tokens: np.ndarray, pads: np.ndarray, *,
                   prefix: int, max_len: int, router_state=None,
                   prefill: bool = True) -> np.ndarray:
    """Logits `[B, T, V]` of the cached path: tokens `[B, T]` (row b left-padded with
    pads[b] tokens) prefilled up to `prefix` (`prefill`: attending over the prefix's
    own keys; else over all cache slots), then one token per decode call."""
    batch, total = tokens.shape
    slots = np.arange(max_len)
    cache = model.init_cache(batch, max_len)
    positions = np.maximum(np.arange(total)[None] - pads[:, None], 0).astype(np.int32)

    def call(start: int, stop: int, cache, first: bool = False):
        kv_valid = (slots[None] >= pads[:, None]) & (slots[None] < stop)
        logits, cache = _decode(model, jnp.asarray(tokens[:, start:stop]),
                                jnp.asarray(positions[:, start:stop]), cache, jnp.int32(start),
                                jnp.asarray(kv_valid), router_state, prefill=first)
        return np.asarray(logits), cache

    out, cache = call(0, prefix, cache, first=prefill)
    outs = [out]
    for i in range(prefix, total):
        out, cache = call(i, i + 1, cache)
        outs.append(out)
    return np.concatenate(outs, axis=1)


def _tokens(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (batch, T)).astype(np.int32)


CASES = {
    "dense": dict(moe_every=0),
    "moe_top2": dict(),
    "gqa_bias_tied": dict(num_kv_heads=2, attention_bias=True, attention_out_bias=True,
                          tie_embeddings=True),
    "sliding_window_3": dict(sliding_window=3, num_kv_heads=1),
    "qk_norm_head": dict(qk_norm="head", head_dim=6),
    "qk_norm_projection_llama3": dict(qk_norm="projection", rope_max_wavelength=500.0,
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                    "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_then_decode_equals_the_full_forward(case):
    model = _model(**CASES[case])
    tokens = _tokens()
    router_state = _biases(model) if model.moe_layer_names else None
    full, _ = model(jnp.asarray(tokens), router_state=router_state)
    cached = _cached_logits(model, tokens, np.zeros(2, np.int32), prefix=PREFIX, max_len=T + 3,
                            router_state=router_state)
    np.testing.assert_allclose(cached, np.asarray(full), atol=1e-5, rtol=1e-5)


def test_last_only_gives_the_last_positions_logits():
    model = _model()
    tokens = jnp.asarray(_tokens())
    cache = model.init_cache(2, T)
    args = dict(positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T)),
                cache_index=jnp.int32(0), kv_valid=jnp.ones((2, T), bool))
    all_logits, _, _ = model.decode(tokens, cache=cache, **args)
    last, _, _ = model.decode(tokens, cache=cache, last_only=True, **args)
    assert last.shape == (2, 1, V)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(all_logits)[:, -1:])


def test_selection_biases_reach_the_cached_path():
    """With biases that change the routing, the cached logits follow the biased forward."""
    model = _model()
    tokens = _tokens()
    biased, _ = model(jnp.asarray(tokens), router_state=_biases(model))
    plain, _ = model(jnp.asarray(tokens))
    assert np.abs(np.asarray(biased) - np.asarray(plain)).max() > 1e-3
    cached = _cached_logits(model, tokens, np.zeros(2, np.int32), prefix=PREFIX, max_len=T,
                            router_state=_biases(model))
    np.testing.assert_allclose(cached, np.asarray(biased), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("case", ["moe_top2", "sliding_window_3"])
def test_left_padded_rows_equal_each_row_alone(case, prefill):
    """Row 0 is padded with 3 garbage tokens, row 1 not at all; each row's logits at
    its real tokens equal its own unpadded forward (positions count real tokens)."""
    model = _model(**CASES[case])
    real = _tokens(seed=3)[:, : T - 3]
    pads = np.array([3, 0], np.int32)
    tokens = np.stack([np.concatenate([[7, 7, 7], real[0]]),
                       np.concatenate([real[1], _tokens(seed=4)[1, :3]])]).astype(np.int32)
    cached = _cached_logits(model, tokens, pads, prefix=5, max_len=T + 1, prefill=prefill)
    for row, start in ((0, 3), (1, 0)):
        alone, _ = model(jnp.asarray(real[row : row + 1]))
        np.testing.assert_allclose(cached[row, start : start + T - 3], np.asarray(alone)[0],
                                   atol=1e-5, rtol=1e-5, err_msg=f"row {row}")


def test_bfloat16_cache_adds_no_error_beyond_bfloat16s_own():
    """bf16 compute (f32 params, MoE with selection biases; the cache holds bf16 keys
    and values). Reference: the same parameters computed in float32. bf16's own
    error (full bf16 forward vs float32) measured on CPU: max 0.049 on logits up to
    ~4; the cached bf16 path: 0.056 (it differs from the full bf16 forward by up
    to 0.043: XLA fuses and rounds the two programs differently). Checked: the
    cached path's error is at most twice the full forward's."""
    tokens = _tokens()
    bf16, f32 = _model(dtype="bfloat16"), _model()
    reference = np.asarray(f32(jnp.asarray(tokens), router_state=_biases(f32))[0])
    full = np.asarray(bf16(jnp.asarray(tokens), router_state=_biases(bf16))[0])
    cached = _cached_logits(bf16, tokens, np.zeros(2, np.int32), prefix=PREFIX, max_len=T,
                            router_state=_biases(bf16))
    assert bf16.init_cache(1, 4)["layer_0"]["key"].dtype == jnp.bfloat16
    own_error = np.abs(full - reference).max()
    assert 1e-3 < own_error < 0.2  # bf16 rounding shows, and is small
    assert np.abs(cached - reference).max() <= 2 * own_error


def test_pad_queries_see_only_themselves_and_the_window_counts_slots():
    kv_valid = jnp.asarray([[False, False, True, True, True, False]])
    mask = np.asarray(kv_cache.cached_attention_mask(kv_valid, jnp.int32(0), 5, window=2))[0, 0]
    want = np.array([[1, 0, 0, 0, 0, 0],   # pad query: itself only
                     [0, 1, 0, 0, 0, 0],   # pad query
                     [0, 0, 1, 0, 0, 0],   # first real token
                     [0, 0, 1, 1, 0, 0],
                     [0, 0, 0, 1, 1, 0]],  # window 2: slots 3, 4
                    bool)
    np.testing.assert_array_equal(mask, want)


def test_decode_refuses_an_encoder():
    model = _model(moe_every=0, causal=False)
    with pytest.raises(ValueError, match="causal"):
        model.decode(jnp.zeros((1, 2), jnp.int32), positions=jnp.zeros((1, 2), jnp.int32),
                     cache=model.init_cache(1, 4), cache_index=jnp.int32(0),
                     kv_valid=jnp.ones((1, 4), bool))
