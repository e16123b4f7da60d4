"""Model features the Hugging Face families need (issue 15), against numpy references.

Attention q/k/v and output biases (Qwen2, Llama attention_bias), q/k RMSNorm per
head (Qwen3) or over the whole projection (OLMoE), sliding-window attention
(Mistral), Llama 3.1 RoPE frequency rescaling, Qwen2-MoE's sigmoid-gated shared
expert; and that the defaults leave today's models unchanged.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import Attention, attention_mask, check_rope_scaling, rope_inv_freq
from layers.moe_layer import MoeLayer
from layers.params import logical_axes_of
from layers.transformer import TransformerLM

D, H, K, HD = 16, 4, 2, 6  # d_model, query heads, kv heads, head_dim (explicit, != D // H)
B, S = 2, 7
EPS = 1e-5


# --- numpy references ---------------------------------------------------------


def np_rms(x: np.ndarray, scale: np.ndarray, eps: float = EPS) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_llama3_inv_freq(head_dim, base, factor, low, high, old_len) -> np.ndarray:
    """Llama 3.1's rescaling written per frequency, as in Meta's reference
    `apply_scaling` (float64): long wavelengths / factor, short kept, smooth between."""
    out = []
    for i in range(head_dim // 2):
        freq = base ** (-2.0 * i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(freq)
        elif wavelen > old_len / low:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def np_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE; x `[B, S, N, h]`, positions `[B, S]`."""
    half = x.shape[-1] // 2
    angle = positions[..., None, None] * inv_freq  # [B, S, 1, h/2]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                           x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def np_attention(x, p, *, positions, allowed, qk_norm=None, inv_freq=None) -> np.ndarray:
    """x `[B, S, D]`, p: numpy params by name, allowed `[B, S, S]` bool (query row, key col)."""
    def project(w, b, norm):
        y = np.einsum("bsd,dnh->bsnh", x, w) + (0 if b is None else b)
        if norm is None:  # values are never normalised
            return y
        if qk_norm == "head":
            y = np_rms(y, norm)
        elif qk_norm == "projection":
            y = np_rms(y.reshape(*y.shape[:2], -1), norm).reshape(y.shape)
        return y

    q = project(p["query"], p.get("query_bias"), p.get("query_norm"))
    k = project(p["key"], p.get("key_bias"), p.get("key_norm"))
    v = project(p["value"], p.get("value_bias"), None)
    inv_freq = 10_000.0 ** (-np.arange(HD // 2) / (HD // 2)) if inv_freq is None else inv_freq
    q, k = np_rope(q, positions, inv_freq), np_rope(k, positions, inv_freq)
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # query head n -> kv n // G
    scores = np.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(HD)
    scores = np.where(allowed[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bknh,nhd->bqd", probs, v, p["out"])
    return out + p.get("out_bias", 0)


def window_allowed(seq: int, window: int | None) -> np.ndarray:
    """`[S, S]`: key j visible from query i iff j <= i and (no window or i - window < j),
    transformers' `sliding_window_causal_mask_function` (kv_idx > q_idx - window, kv <= q)."""
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    allowed = j <= i
    return allowed if window is None else allowed & (j > i - window)


# --- helpers ------------------------------------------------------------------


def attention(**kw) -> Attention:
    return Attention(D, H, num_kv_heads=K, head_dim=HD, norm_eps=EPS, rngs=nnx.Rngs(0), **kw)


def randomize(module: nnx.Module, seed: int = 1) -> dict[str, np.ndarray]:
    """Gives every parameter (biases and norm scales included) random values; returns them
    by their path joined with '/' (`query_norm/scale` -> key 'query_norm')."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = rng.normal(0.0, 0.5, var[...].shape).astype(np.float32)
        if path[-1] == "scale":
            value = 1.0 + value
        var[...] = jnp.asarray(value)
        values["/".join(map(str, path)).removesuffix("/scale")] = value.astype(np.float64)
    return values


def run(module: Attention, x, positions=None, mask=None) -> np.ndarray:
    positions = (jnp.broadcast_to(jnp.arange(S), (B, S)) if positions is None else positions)
    return np.asarray(module(jnp.asarray(x, jnp.float32), positions=positions, mask=mask))


def inputs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(B, S, D)).astype(np.float32)


# --- attention options ----------------------------------------------------------


@pytest.mark.parametrize("options", [
    {}, {"qkv_bias": True}, {"qkv_bias": True, "out_bias": True},
    {"qk_norm": "head"}, {"qk_norm": "projection", "qkv_bias": True}])
def test_attention_matches_numpy_reference(options):
    module = attention(**options)
    params = randomize(module)
    x = inputs()
    positions = np.broadcast_to(np.arange(S), (B, S))
    want = np_attention(x.astype(np.float64), params, positions=positions,
                        allowed=np.broadcast_to(window_allowed(S, None), (B, S, S)),
                        qk_norm=options.get("qk_norm"))
    np.testing.assert_allclose(run(module, x), want, rtol=2e-4, atol=2e-5)


def test_attention_option_parameters_names_shapes_axes_and_init():
    module = attention(qkv_bias=True, out_bias=True, qk_norm="head")
    axes = {"/".join(map(str, p)): a for p, a in logical_axes_of(module).items()}
    shapes = {"/".join(map(str, p)): v[...].shape
              for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    assert shapes == {"query": (D, H, HD), "key": (D, K, HD), "value": (D, K, HD),
                      "out": (H, HD, D), "query_bias": (H, HD), "key_bias": (K, HD),
                      "value_bias": (K, HD), "out_bias": (D,), "query_norm/scale": (HD,),
                      "key_norm/scale": (HD,)}
    assert axes["query_bias"] == ("heads", "kv") and axes["out_bias"] == ("embed",)
    assert axes["key_norm/scale"] == ("norm",)
    np.testing.assert_array_equal(module.query_bias[...], 0.0)
    np.testing.assert_array_equal(module.out_bias[...], 0.0)
    np.testing.assert_array_equal(module.key_norm.scale[...], 1.0)
    projection = attention(qk_norm="projection")
    assert projection.query_norm.scale[...].shape == (H * HD,)
    assert projection.key_norm.scale[...].shape == (K * HD,)


def test_options_draw_no_prng_keys():
    """Biases and q/k norm scales are constants: the weights equal the plain module's."""
    plain = nnx.state(attention(), nnx.Param)
    rich = attention(qkv_bias=True, out_bias=True, qk_norm="projection")
    for name in ("query", "key", "value", "out"):
        np.testing.assert_array_equal(getattr(rich, name)[...], plain[name][...])


def test_qk_norm_kinds_differ_and_bad_names_are_refused():
    x = inputs(3)
    head, projection = attention(qk_norm="head"), attention(qk_norm="projection")
    for module in (head, projection):
        randomize(module, seed=5)
    # Same weights, unit scales: per-head and per-projection normalisation disagree.
    for module in (head, projection):
        module.query_norm.scale[...] = jnp.ones_like(module.query_norm.scale[...])
        module.key_norm.scale[...] = jnp.ones_like(module.key_norm.scale[...])
    assert np.abs(run(head, x) - run(projection, x)).max() > 1e-3
    with pytest.raises(ValueError, match="qk_norm must be None or one of head, projection"):
        attention(qk_norm="layer")


# --- sliding window -------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 3, S, S + 4])
def test_sliding_window_matches_numpy_reference(window):
    module = attention(sliding_window=window, qkv_bias=True)
    params = randomize(module)
    x = inputs(1)
    want = np_attention(x.astype(np.float64), params,
                        positions=np.broadcast_to(np.arange(S), (B, S)),
                        allowed=np.broadcast_to(window_allowed(S, window), (B, S, S)))
    np.testing.assert_allclose(run(module, x), want, rtol=2e-4, atol=2e-5)


def test_sliding_window_mask_offsets():
    """Window 3: query 4 sees keys 2, 3, 4 (4 - 3 < j <= 4), as transformers' Mistral."""
    allowed = window_allowed(6, 3)
    assert np.flatnonzero(allowed[4]).tolist() == [2, 3, 4]
    assert np.flatnonzero(allowed[1]).tolist() == [0, 1]
    # Behaviour, not just the reference: a key just outside the window changes nothing.
    module = attention(sliding_window=3)
    randomize(module)
    x = inputs(2)
    y = x.copy()
    y[:, 1] += 5.0  # token 1 is outside the windows of queries 4, 5, 6
    a, b = run(module, x), run(module, y)
    np.testing.assert_allclose(a[:, 4:], b[:, 4:], rtol=1e-5, atol=1e-6)
    assert np.abs(a[:, 1:4] - b[:, 1:4]).max() > 1e-3


def test_sliding_window_with_packed_segments():
    """A given (segment) mask and the window combine: both must allow a key."""
    module = attention(sliding_window=2)
    params = randomize(module)
    x = inputs(4)
    segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]])
    positions = np.array([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]])
    mask = attention_mask(jnp.asarray(segment_ids), causal=True)
    want = np_attention(x.astype(np.float64), params, positions=positions,
                        allowed=np.asarray(mask[:, 0]) & window_allowed(S, 2)[None])
    got = run(module, x, positions=jnp.asarray(positions), mask=mask)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_sliding_window_refusals():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="sliding_window must be None or an int >= 1"):
            attention(sliding_window=bad)
    with pytest.raises(ValueError, match="sliding_window=4 needs a causal model"):
        TransformerLM(32, D, 1, H, 32, sliding_window=4, causal=False, moe_every=0,
                      rngs=nnx.Rngs(0))


# --- RoPE scaling -----------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_llama3_inv_freq_matches_the_formula():
    head_dim, base = 32, 500_000.0
    want = np_llama3_inv_freq(head_dim, base, 8.0, 1.0, 4.0, 64)
    plain = base ** (-np.arange(head_dim // 2) * 2.0 / head_dim)
    # The case must exercise all three branches: kept, divided, smoothed.
    wavelen = 2 * np.pi / plain
    assert (wavelen < 16).any() and (wavelen > 64).any() and ((wavelen >= 16) & (wavelen <= 64)).any()
    got = np.asarray(rope_inv_freq(head_dim, base, LLAMA3))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(head_dim, base)), plain, rtol=1e-5)
    np.testing.assert_array_equal(rope_inv_freq(head_dim, base, {"rope_type": "default"}),
                                  rope_inv_freq(head_dim, base))


def test_attention_with_llama3_rope_matches_numpy_reference():
    scaling = dict(LLAMA3, original_max_position_embeddings=8)  # wavelengths 6.3 .. 2154 at HD=6
    module = attention(rope_scaling=scaling, rope_max_wavelength=5_000.0)
    params = randomize(module)
    x = inputs(6)
    positions = np.array([[0, 1, 2, 3, 4, 5, 6], [3, 9, 20, 40, 41, 42, 90]])
    inv_freq = np_llama3_inv_freq(HD, 5_000.0, 8.0, 1.0, 4.0, 8)
    want = np_attention(x.astype(np.float64), params, positions=positions, inv_freq=inv_freq,
                        allowed=np.broadcast_to(window_allowed(S, None), (B, S, S)))
    np.testing.assert_allclose(run(module, x, positions=jnp.asarray(positions)), want,
                               rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "longrope", "factor": 4.0},
     "rope_scaling\\['rope_type'\\] = 'longrope' is not supported"),
    ({"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' lacks original_max_position_embeddings"),
    ({"factor": 4.0}, "rope_scaling\\['rope_type'\\] = None is not supported"),
    ({**LLAMA3, "rope_theta": 1e4}, "rope_scaling\\['rope_theta'\\] = 10000.0 is not supported"),
    ({"rope_type": "default", "factor": 2.0}, "rope_scaling\\['factor'\\] = 2.0"),
    ({k: v for k, v in LLAMA3.items() if k != "factor"}, "lacks factor"),
    ({**LLAMA3, "factor": 0}, "rope_scaling\\['factor'\\] must be a number > 0"),
    ({**LLAMA3, "high_freq_factor": 1.0}, "must exceed low_freq_factor"),
    ("llama3", "rope_scaling must be a dict or None"),
])
def test_rope_scaling_refusals_name_key_and_value(scaling, message):
    with pytest.raises(ValueError, match=message):
        check_rope_scaling(scaling)
    with pytest.raises(ValueError, match=message):
        TransformerLM(32, D, 1, H, 32, rope_scaling=scaling, moe_every=0, rngs=nnx.Rngs(0))


# --- Qwen2-MoE shared expert gate ---------------------------------------------------


def moe_layer(**kw) -> MoeLayer:
    args = dict(d_ff=8, num_experts=4, k=2, activation="swiglu", num_shared_experts=1,
                shared_d_ff=12, shared_gate=True, rngs=nnx.Rngs(0))
    return MoeLayer(D, **{**args, **kw})


def np_swiglu(x, p, prefix):
    gate, up = x @ p[prefix + "wi_gate"], x @ p[prefix + "wi"]
    return (gate / (1 + np.exp(-gate)) * up) @ p[prefix + "wo"]


def test_shared_gate_matches_reference():
    """y = routed + sigmoid(x . shared_gate) * shared(x); the shared expert is SwiGLU
    (MoeLayer.activation) of width shared_d_ff."""
    layer = moe_layer()
    params = randomize(layer, seed=3)
    assert layer.shared.activation == "swiglu" and layer.shared.wi_gate[...].shape == (D, 12)
    x = inputs(7)
    y = np.asarray(layer(jnp.asarray(x))[0])
    gate = 1 / (1 + np.exp(-(x.astype(np.float64) @ params["shared_gate"])))
    shared = np_swiglu(x.astype(np.float64), params, "shared/")
    layer.shared.wo[...] = jnp.zeros_like(layer.shared.wo[...])  # routed experts only
    routed = np.asarray(layer(jnp.asarray(x))[0])
    np.testing.assert_allclose(y, routed + gate[..., None] * shared, rtol=1e-4, atol=1e-5)
    assert np.abs(gate - 0.5).max() > 0.1  # the gate is not trivially constant


def test_shared_gate_parameter_and_refusal():
    layer = moe_layer()
    axes = {"/".join(map(str, p)): a for p, a in logical_axes_of(layer).items()}
    assert axes["shared_gate"] == ("embed",)
    assert layer.shared_gate[...].shape == (D,)
    plain = moe_layer(shared_gate=False)
    assert plain.shared_gate is None and ("shared_gate",) not in logical_axes_of(plain)
    # Created after everything else: the other parameters are the ungated layer's.
    gated = dict(nnx.to_flat_state(nnx.state(layer, nnx.Param)))
    ungated = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    assert set(gated) - set(ungated) == {("shared_gate",)}
    for path, var in ungated.items():
        np.testing.assert_array_equal(gated[path][...], var[...], err_msg=str(path))
    with pytest.raises(ValueError, match="shared_gate needs shared experts"):
        moe_layer(num_shared_experts=0)


# --- decoder-sparse layouts (Qwen2-MoE decoder_sparse_step / mlp_only_layers) ----------


def test_dense_and_moe_layers_have_their_own_hidden_sizes():
    """intermediate_size -> TransformerLM.d_ff (dense layers), moe_intermediate_size ->
    MoeLayer.d_ff; decoder_sparse_step=1 with mlp_only_layers=[0, 2] -> moe_layers=(1, 3)."""
    moe = functools.partial(MoeLayer, d_ff=8, num_experts=4, k=2, activation="swiglu")
    model = TransformerLM(32, D, 4, H, 40, moe_layers=(1, 3), moe_block=moe, activation="swiglu",
                          rngs=nnx.Rngs(0))
    assert model.moe_layer_names == ("layer_1", "layer_3")
    assert model.layer_0.ffn.wi[...].shape == (D, 40)
    assert model.layer_1.ffn.experts.wi[...].shape == (4, D, 8)
    all_dense = TransformerLM(32, D, 2, H, 40, moe_layers=(), moe_block=moe, rngs=nnx.Rngs(0))
    assert all_dense.moe_layer_names == ()


# --- defaults unchanged ----------------------------------------------------------------


def _baseline_model(**kw) -> TransformerLM:
    moe = functools.partial(MoeLayer, d_ff=32, num_experts=4, k=2, num_shared_experts=1,
                            activation="swiglu")
    return TransformerLM(64, 32, 3, 4, 48, num_kv_heads=2, moe_every=2, moe_block=moe,
                         activation="swiglu", dtype="float32", rngs=nnx.Rngs(params=7), **kw)


# sum |param| of the model above, computed with the code BEFORE these options existed
# (commit b1aa7bf, throwaway script; the whole param tree and the logits were also
# compared bit for bit, old code vs new). A change here means the default init changed.
_BEFORE = {"embedding": 1611.734218271682, "layer_0/attention/query": 143.06901653260866,
           "layer_1/ffn/router/kernel": 1.8847646390349837,
           "layer_1/ffn/shared/wo": 148.21716155842296, "layer_2/attention/out": 143.66008287944715,
           "layer_2/ffn/wo": 182.90055186052632, "lm_head": 301.9588552528221}
_BEFORE_LOGITS_0_0 = [1.8203848600387573, 1.4313980340957642, 0.10108981281518936,
                      -1.4056980609893799]


def test_defaults_keep_the_old_parameters_and_logits():
    model = _baseline_model()
    params = {"/".join(map(str, p)): v[...]
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    attention_names = {"query", "key", "value", "out"}
    for i in range(3):
        assert {n.split("/")[2] for n in params if n.startswith(f"layer_{i}/attention/")} == \
            attention_names
    assert not any(n.endswith("shared_gate") for n in params)
    assert len(params) == 34
    for name, total in _BEFORE.items():
        np.testing.assert_allclose(float(np.abs(np.asarray(params[name], np.float64)).sum()),
                                   total, rtol=1e-6, err_msg=name)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    np.testing.assert_allclose(np.asarray(model(ids)[0][0, 0, :4]), _BEFORE_LOGITS_0_0,
                               rtol=1e-4, atol=1e-5)


def test_new_options_leave_the_other_parameters_unchanged():
    """Biases and q/k norms draw no PRNG keys: every old parameter keeps its value."""
    old = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(_baseline_model(), nnx.Param))}
    new = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(_baseline_model(
        attention_bias=True, attention_out_bias=True, qk_norm="head", sliding_window=4,
        rope_scaling=LLAMA3), nnx.Param))}
    assert set(new) - set(old) == {(f"layer_{i}", "attention", name) + tail for i in range(3)
                                   for name, tail in (("query_bias", ()), ("key_bias", ()),
                                                      ("value_bias", ()), ("out_bias", ()),
                                                      ("query_norm", ("scale",)),
                                                      ("key_norm", ("scale",)))}
    for path, value in old.items():
        np.testing.assert_array_equal(new[path], value, err_msg=str(path))
