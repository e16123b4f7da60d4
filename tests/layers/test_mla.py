"""Multi-head latent attention (`layers.mla.MLAttention`) and YaRN RoPE scaling.

Scenarios:
- the absorbed decode (W_uk folded into the query, W_uv after the latent sum)
  equals the naive path (per-head keys/values materialised) for a prompt and for
  decode steps, and the cached path equals the training forward (float32, 1e-5);
- with identity-like projections and kv_lora_rank = heads * head_dim, MLA is
  standard attention: per-head latent keys at position 0 (RoPE identity), and
  the shared RoPE key with real positions (= multi-query attention);
- causal and packed-segment masks behave as in standard attention;
- an MLA model generates with the unchanged engine: greedy = full-forward argmax;
- bad options are refused naming the option; YaRN frequencies and the softmax
  scale follow their formulas.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.inference import generate as generate_lib
from experiments.inference import restore as restore_lib
from layers import MLAttention, TransformerLM
from layers.attention import Attention, rope_attention_factor, rope_inv_freq
from layers.mla import softmax_scale
from tests.layers.test_kv_cache import V, _cached_logits, _model, _tokens

OPTIONS = dict(kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
        "beta_fast": 4.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}


def _mla_model(q_lora_rank=None, rope_scaling=None, absorb=True, **kwargs) -> TransformerLM:
    """The perturbed 2-layer MoE of test_kv_cache with MLA in both layers."""
    return _model(attention=functools.partial(MLAttention, q_lora_rank=q_lora_rank,
                                              absorb=absorb, **OPTIONS),
                  rope_scaling=rope_scaling, **kwargs)


def _layer(**kwargs) -> MLAttention:
    """A random MLA layer (d_model 16, 4 heads) with its norms perturbed too."""
    mla = MLAttention(16, 4, **{**OPTIONS, **kwargs}, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(mla)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    leaves = [p + 0.2 * jax.random.normal(key, p.shape, p.dtype) for p, key in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("q_lora_rank, rope_scaling", [(None, None), (5, YARN)])
def test_absorbed_attention_equals_the_naive_path(q_lora_rank, rope_scaling):
    mla = _layer(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling)
    batch, length, max_len = 2, 7, 12
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, 16))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    kv_valid = jnp.ones((batch, max_len), bool).at[0, :2].set(False)  # row 0: two pad slots
    cache = mla.init_cache(batch, max_len, jnp.float32)
    outs = {}
    for absorb in (True, False):
        mla.absorb = absorb
        # The prompt (5 tokens over the cache), then two decode steps.
        prompt, c = mla.decode(x[:, :5], positions=positions[:, :5], cache=cache,
                               cache_index=jnp.int32(0), kv_valid=kv_valid)
        steps = []
        for i in (5, 6):
            y, c = mla.decode(x[:, i:i + 1], positions=positions[:, i:i + 1], cache=c,
                              cache_index=jnp.int32(i), kv_valid=kv_valid)
            steps.append(y)
        outs[absorb] = np.asarray(jnp.concatenate([prompt, *steps], axis=1))
    np.testing.assert_allclose(outs[True], outs[False], atol=1e-5, rtol=1e-5)
    assert np.abs(outs[True]).max() > 0.1  # not trivially zero


@pytest.mark.parametrize("case", ["plain", "q_lora_yarn", "naive_decode"])
def test_cached_path_equals_the_full_forward(case):
    model = {"plain": lambda: _mla_model(),
             "q_lora_yarn": lambda: _mla_model(q_lora_rank=5, rope_scaling=YARN),
             "naive_decode": lambda: _mla_model(absorb=False)}[case]()
    tokens = _tokens()
    full, _ = model(jnp.asarray(tokens))
    for prefill in (True, False):
        cached = _cached_logits(model, tokens, np.zeros(2, np.int32), prefix=4, max_len=12,
                                prefill=prefill)
        np.testing.assert_allclose(cached, np.asarray(full), atol=1e-5, rtol=1e-5)
    cache = model.init_cache(2, 12)["layer_0"]
    assert {k: v.shape for k, v in cache.items()} == {"c_kv": (2, 12, 6), "k_rope": (2, 12, 4)}


def _normed(shape, seed=0):
    """Random rows with RMS 1 (what the block's pre-norm hands the attention)."""
    x = jax.random.normal(jax.random.PRNGKey(seed), shape)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True))


def test_reduces_to_standard_attention_with_per_head_latent_keys():
    """kv_down = I (r = d_model = H h), key_up/value_up = the standard W_k/W_v, query =
    [W_q, 0] rescaled for the wider softmax scale, no RoPE key: at position 0 (RoPE
    is the identity there) MLA computes standard multi-head attention."""
    heads, hd, rope = 2, 4, 2
    d = heads * hd
    std = Attention(d, heads, rngs=nnx.Rngs(0))
    mla = MLAttention(d, heads, kv_lora_rank=d, qk_nope_head_dim=hd, qk_rope_head_dim=rope,
                      v_head_dim=hd, norm_eps=1e-12, rngs=nnx.Rngs(1))
    fix = math.sqrt((hd + rope) / hd)  # MLA divides by sqrt(hd + rope), standard by sqrt(hd)
    mla.query[...] = jnp.concatenate([std.query[...] * fix, jnp.zeros((d, heads, rope))], -1)
    mla.kv_down[...] = jnp.eye(d)
    mla.key_rope[...] = jnp.zeros((d, rope))
    mla.key_up[...], mla.value_up[...], mla.out[...] = std.key[...], std.value[...], std.out[...]
    x = _normed((2, 5, d))
    positions = jnp.zeros((2, 5), jnp.int32)
    np.testing.assert_allclose(mla(x, positions=positions), std(x, positions=positions),
                               atol=1e-5, rtol=1e-5)


def test_reduces_to_multi_query_attention_through_the_shared_rope_key():
    """Query nope part 0, query RoPE part = W_q, RoPE key = the single key head's W_k,
    value_up = W_v on kv_down = I: MLA is multi-query attention (num_kv_heads = 1)
    with RoPE at real positions, under the causal mask."""
    heads, hd, nope = 2, 4, 2
    d = 8
    std = Attention(d, heads, num_kv_heads=1, head_dim=hd, rngs=nnx.Rngs(0))
    mla = MLAttention(d, heads, kv_lora_rank=d, qk_nope_head_dim=nope, qk_rope_head_dim=hd,
                      v_head_dim=hd, norm_eps=1e-12, rngs=nnx.Rngs(1))
    fix = math.sqrt((nope + hd) / hd)
    mla.query[...] = jnp.concatenate([jnp.zeros((d, heads, nope)), std.query[...] * fix], -1)
    mla.kv_down[...] = jnp.eye(d)
    mla.key_rope[...] = std.key[...][:, 0]
    mla.value_up[...] = jnp.broadcast_to(std.value[...], (d, heads, hd))
    mla.out[...] = std.out[...]
    x = _normed((2, 6, d), seed=1)
    positions = jnp.broadcast_to(jnp.arange(3, 9), (2, 6))
    np.testing.assert_allclose(mla(x, positions=positions), std(x, positions=positions),
                               atol=1e-5, rtol=1e-5)


def test_causal_and_packed_segment_masks():
    model = _mla_model()
    tokens = _tokens(batch=1)
    full, _ = model(jnp.asarray(tokens))
    # Causal: changing the last tokens leaves the earlier logits unchanged.
    changed = tokens.copy()
    changed[0, 6:] = (changed[0, 6:] + 1) % V
    other, _ = model(jnp.asarray(changed))
    np.testing.assert_allclose(other[0, :6], full[0, :6], atol=1e-6)
    assert not np.allclose(other[0, 6:], full[0, 6:])
    # Packed: segments [0:4] and [4:8] plus one pad give each segment's own logits.
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 0]])
    packed, _ = model(jnp.asarray(tokens), segment_ids=segment_ids)
    first, _ = model(jnp.asarray(tokens[:, :4]))
    second, _ = model(jnp.asarray(tokens[:, 4:8]))
    np.testing.assert_allclose(packed[0, :4], first[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[0, 4:8], second[0], atol=1e-5, rtol=1e-5)


def test_generation_with_an_mla_model_is_the_full_forwards_greedy_argmax():
    from tests.inference.test_generate import _greedy_by_full_forward
    model = _mla_model(q_lora_rank=5)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    generator = generate_lib.Generator(restore_lib.RestoredModel(
        workdir=Path("."), step=0, vocab_size=V, graphdef=graphdef,
        params=params.to_pure_dict(), rest=rest, router_state=None))
    prompts = [[3], [5, 6, 7, 8], [9, 1, 2, 4, 11, 12, 13]]
    got = generator.generate(prompts, max_new_tokens=5)
    forward = nnx.jit(lambda m, ids: m(ids)[0])
    for prompt, tokens in zip(prompts, got):
        assert tokens == _greedy_by_full_forward(lambda ids: forward(model, ids), prompt, 5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_lora_rank=0), r"MLAttention.kv_lora_rank must be an int >= 1, got 0"),
    (dict(kv_lora_rank=-3), r"MLAttention.kv_lora_rank"),
    (dict(qk_rope_head_dim=3), r"MLAttention.qk_rope_head_dim must be an even int >= 2"),
    (dict(q_lora_rank=0), r"MLAttention.q_lora_rank"),
    (dict(num_kv_heads=2), r"TransformerLM.num_kv_heads=2: MLA has no key/value heads"),
    (dict(head_dim=8), r"TransformerLM.head_dim=8 is not used by MLAttention"),
    (dict(qk_norm="head"), r"TransformerLM.qk_norm='head' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 64}),
     r"rope_scaling for rope_type 'yarn' lacks factor"),
])
def test_bad_options_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MLAttention(16, 4, **{**OPTIONS, **kwargs}, rngs=nnx.Rngs(0))


def test_gin_selects_mla_and_refuses_a_bad_rank():
    gin.clear_config()
    try:
        gin.parse_config("TransformerLM.attention = @MLAttention\n"
                         "MLAttention.kv_lora_rank = 0")
        with pytest.raises(ValueError, match="MLAttention.kv_lora_rank"):
            TransformerLM(vocab_size=8, d_model=16, num_layers=1, num_heads=2, d_ff=8,
                          moe_every=0, rngs=nnx.Rngs(0))
    finally:
        gin.clear_config()


def test_yarn_frequencies_attention_factor_and_softmax_scale():
    base, dim = 10_000.0, 64
    plain = np.asarray(rope_inv_freq(dim, base))
    yarn = np.asarray(rope_inv_freq(dim, base, {"rope_type": "yarn", "factor": 40.0,
                                                "original_max_position_embeddings": 4096}))
    # Correction range for beta_fast 32 / beta_slow 1 over 4096 positions: dims [10, 23).
    low = math.floor(dim * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(base)))
    high = math.ceil(dim * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(base)))
    assert (low, high) == (10, 23)
    np.testing.assert_allclose(yarn[:low + 1], plain[:low + 1], rtol=1e-6)  # fast: kept
    np.testing.assert_allclose(yarn[high:], plain[high:] / 40.0, rtol=1e-6)  # slow: / factor
    ramp = (16 - low) / (high - low)
    np.testing.assert_allclose(yarn[16], plain[16] * (1 - ramp) + plain[16] / 40 * ramp,
                               rtol=1e-6)
    # Attention factor: mscale(40) = 0.1 ln 40 + 1 without mscale keys; 1 when they are equal.
    assert rope_attention_factor({"rope_type": "yarn", "factor": 40.0,
                                  "original_max_position_embeddings": 4096}) == pytest.approx(
        0.1 * math.log(40) + 1)
    v3 = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
          "mscale": 1.0, "mscale_all_dim": 1.0}
    assert rope_attention_factor(v3) == 1.0
    # DeepSeek-V3's softmax scale: 192^-1/2 * (0.1 ln 40 + 1)^2.
    assert softmax_scale(192, tuple(v3.items())) == pytest.approx(
        192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert softmax_scale(192, None) == pytest.approx(192 ** -0.5)


def test_flop_counter_counts_mla_scores_and_values_and_export_refuses_dense_mla():
    from experiments.convert.hf.family import UnsupportedModelError, spec_of
    from experiments.train.flops import flop_counter
    model = _mla_model(moe_every=0)
    counter = flop_counter(model, batch_size=1, seq_len=10)
    matmuls = sum(2.0 * v.size for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                  if v.ndim >= 2 and path[0] != "embedding")
    heads, qk, dv = 4, 4 + 4, 6  # num_heads of _model; OPTIONS' widths
    assert counter.dense_per_position == pytest.approx(matmuls + 2 * 2.0 * 10 * heads * (qk + dv))
    # MLA exports as a DeepSeek family, which holds MoE models only.
    with pytest.raises(UnsupportedModelError, match="MLA model without MoE layers"):
        spec_of(model)
