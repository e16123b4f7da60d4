"""Multi-head self-attention with RoPE and packed-segment masking."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers import kv_cache
from layers.kv_cache import KVCache
from layers.norms import RMSNorm
from layers.params import EMBED, HEADS, KV, constant_param, fan_in_init, make_param


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its (contiguous) segment.

    segment_ids `[B, S] int32` -> positions `[B, S] int32`, restarting at 0
    wherever the segment id changes (padding runs count as segments too).
    """
    seq = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), segment_ids.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool),
         segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    starts = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=segment_ids.ndim - 1)
    return idx - starts


def attention_mask(segment_ids: jax.Array, *, causal: bool) -> jax.Array:
    """Boolean mask `[B, 1, S, S]`, True = query (row) may attend to key (column).

    Real tokens (segment id > 0) attend to their own segment (and only to the
    past when `causal`). Padding tokens (segment id 0) attend only to
    themselves: every row keeps one live entry, so the softmax never sees an
    all-masked row, and padding outputs don't depend on real tokens.
    """
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    mask = (q == k) & (q > 0)
    seq = segment_ids.shape[-1]
    if causal:
        mask = mask & jnp.tril(jnp.ones((seq, seq), bool))[None]
    mask = mask | ((q == 0) & jnp.eye(seq, dtype=bool)[None])
    return mask[:, None]


ROPE_TYPES = ("default", "llama3", "yarn")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# YaRN: required keys, then optional ones with transformers' defaults (None = derived).
_YARN_REQUIRED = ("factor", "original_max_position_embeddings")
_YARN_OPTIONAL = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None,
                  "attention_factor": None, "truncate": True}
QK_NORMS = ("head", "projection")

RopeScaling = tuple[tuple[str, Any], ...]


def check_rope_scaling(rope_scaling: Mapping[str, Any] | None) -> RopeScaling | None:
    """Validates a `rope_scaling` dict; returns it as sorted (key, value) pairs (hashable,
    so a module can keep it as a static attribute), or None for no scaling.

    Accepted: None, `{'rope_type': 'default'}`, `{'rope_type': 'llama3', 'factor': f,
    'low_freq_factor': l, 'high_freq_factor': h, 'original_max_position_embeddings': n}`
    (Llama 3.1), and `{'rope_type': 'yarn', 'factor': s, 'original_max_position_embeddings':
    n}` with optional `beta_fast` (32), `beta_slow` (1), `mscale`, `mscale_all_dim`,
    `attention_factor`, `truncate` (True) (YaRN, DeepSeek-V2/V3). Anything else is refused
    naming the key and its value.
    """
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, Mapping):
        raise ValueError(f"TransformerLM.rope_scaling must be a dict or None, got {rope_scaling!r}")
    rope_type = rope_scaling.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"TransformerLM.rope_scaling['rope_type'] = {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    required = {"default": (), "llama3": _LLAMA3_KEYS, "yarn": _YARN_REQUIRED}[rope_type]
    allowed = ("rope_type",) + required + (tuple(_YARN_OPTIONAL) if rope_type == "yarn" else ())
    for key, value in rope_scaling.items():
        if key not in allowed:
            raise ValueError(f"TransformerLM.rope_scaling[{key!r}] = {value!r} is not supported "
                             f"for rope_type {rope_type!r} (allowed keys: {', '.join(allowed)})")
    if rope_type == "default":
        return None
    missing = [key for key in required if key not in rope_scaling]
    if missing:
        raise ValueError(f"TransformerLM.rope_scaling for rope_type {rope_type!r} lacks "
                         f"{', '.join(missing)}")
    numbers = required + tuple(k for k, v in _YARN_OPTIONAL.items()
                               if k in rope_scaling and k != "truncate")
    for key in numbers:
        value = rope_scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"TransformerLM.rope_scaling[{key!r}] must be a number > 0, got {value!r}")
    if rope_type == "llama3" and not rope_scaling["high_freq_factor"] > rope_scaling["low_freq_factor"]:
        raise ValueError(f"TransformerLM.rope_scaling['high_freq_factor'] = "
                         f"{rope_scaling['high_freq_factor']!r} must exceed low_freq_factor = "
                         f"{rope_scaling['low_freq_factor']!r}")
    if rope_type == "yarn" and not isinstance(rope_scaling.get("truncate", True), bool):
        raise ValueError(f"TransformerLM.rope_scaling['truncate'] must be a bool, got "
                         f"{rope_scaling['truncate']!r}")
    return tuple(sorted(rope_scaling.items()))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(rope_scaling: RopeScaling | Mapping[str, Any] | None) -> float:
    """The factor YaRN multiplies cos and sin by (1 without YaRN): `attention_factor` if
    given, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set,
    else mscale(factor) (transformers' `_compute_yarn_parameters`)."""
    config = dict(check_rope_scaling(dict(rope_scaling)) or ()) if rope_scaling else {}
    if config.get("rope_type") != "yarn":
        return 1.0
    if config.get("attention_factor") is not None:
        return float(config["attention_factor"])
    factor, mscale, mscale_all = (config["factor"], config.get("mscale"),
                                  config.get("mscale_all_dim"))
    if mscale and mscale_all:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    return yarn_mscale(factor)


def _yarn_inv_freq(freq: jax.Array, dim: int, base: float, config: Mapping[str, Any]) -> jax.Array:
    """YaRN (Peng et al. 2023): dimensions rotating fewer than beta_slow times over the
    original context are interpolated (freq / factor), more than beta_fast times kept, a
    linear ramp between (transformers' `_compute_yarn_parameters`)."""
    old_len = config["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(config.get("beta_fast", _YARN_OPTIONAL["beta_fast"]))
    high = correction_dim(config.get("beta_slow", _YARN_OPTIONAL["beta_slow"]))
    if config.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 = keep the original frequency
    return freq / config["factor"] * (1 - extrapolation) + freq * extrapolation


def rope_inv_freq(head_dim: int, max_wavelength: float,
                  rope_scaling: RopeScaling | Mapping[str, Any] | None = None) -> jax.Array:
    """RoPE inverse frequencies `[head_dim // 2] float32`: base**(-2i/head_dim), then the
    Llama 3.1 rescaling when `rope_scaling` says 'llama3' (transformers'
    `_compute_llama3_parameters`): wavelengths above original_max_position_embeddings /
    low_freq_factor are divided by `factor`, below .../high_freq_factor kept, in between
    interpolated smoothly; or YaRN's ramp when it says 'yarn' (`_yarn_inv_freq`)."""
    half = head_dim // 2
    freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    scaling = check_rope_scaling(dict(rope_scaling) if rope_scaling is not None else None)
    if scaling is None:
        return freq
    config = dict(scaling)
    if config["rope_type"] == "yarn":
        return _yarn_inv_freq(freq, head_dim, max_wavelength, config)
    factor, low, high = config["factor"], config["low_freq_factor"], config["high_freq_factor"]
    old_len = config["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    scaled = jnp.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float,
               rope_scaling: RopeScaling | Mapping[str, Any] | None = None) -> jax.Array:
    """Rotary embedding (rotate-half layout), computed in float32.

    x `[B, S, N, H]`, positions `[B, S] int32` -> `[B, S, N, H]` in x's dtype.
    `rope_scaling`: see `rope_inv_freq`; YaRN also scales cos and sin by
    `rope_attention_factor`.
    """
    half = x.shape[-1] // 2
    freq = rope_inv_freq(x.shape[-1], max_wavelength, rope_scaling)  # [H/2]
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, S, H/2]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    factor = rope_attention_factor(rope_scaling)
    if factor != 1.0:
        sin, cos = sin * factor, cos * factor
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# Every argument is set by the parent module (sizes, dtypes, rngs, the options
# TransformerLM exposes), so none is bindable.
@gin.configurable(denylist=["d_model", "num_heads", "num_kv_heads", "head_dim", "rope_max_wavelength",
                             "rope_scaling", "qkv_bias", "out_bias", "qk_norm", "norm_eps",
                             "sliding_window", "dtype", "param_dtype", "rngs"])
class Attention(nnx.Module):
    """Self-attention x `[B, S, d_model]` -> `[B, S, d_model]` in `dtype`.

    Query weights `[d_model, num_heads, head_dim]` (EMBED, HEADS, KV); key and
    value `[d_model, num_kv_heads, head_dim]` (grouped-query attention when
    num_kv_heads < num_heads); output `[num_heads, head_dim, d_model]`
    (HEADS, KV, EMBED). Optional (all off by default, created after the weights
    without drawing PRNG keys): biases `query_bias [num_heads, head_dim]`,
    `key_bias`/`value_bias [num_kv_heads, head_dim]` (HEADS, KV), `out_bias
    [d_model]` (EMBED); q/k RMSNorms `query_norm`/`key_norm`.

    Args:
      d_model: model width.
      num_heads: query heads.
      num_kv_heads: key/value heads (default num_heads); must divide num_heads.
      head_dim: per-head width (default d_model // num_heads, which must then
        divide evenly); must be even for RoPE.
      rope_max_wavelength: RoPE base (HF `rope_theta`).
      rope_scaling: None, {'rope_type': 'default'}, Llama 3.1's
        {'rope_type': 'llama3', ...} or YaRN's {'rope_type': 'yarn', ...}
        (`check_rope_scaling`).
      qkv_bias: biases on the query, key and value projections (Qwen2).
      out_bias: bias on the output projection (Llama attention_bias=True).
      qk_norm: None; 'head' = RMSNorm over head_dim of each query and key head
        (scale `[head_dim]`, Qwen3); 'projection' = RMSNorm over the whole
        query `[num_heads * head_dim]` and key `[num_kv_heads * head_dim]`
        projections (OLMoE). Applied after the projection (and bias), before RoPE.
      norm_eps: epsilon of the q/k norms.
      sliding_window: None, or W >= 1: query i sees keys j with i - W < j <= i
        (Mistral; needs causal attention).
      dtype, param_dtype: compute and parameter dtypes (the softmax runs in
        float32 inside `jax.nn.dot_product_attention`).
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_max_wavelength: float = 10_000.0,
                 rope_scaling: Mapping[str, Any] | None = None, qkv_bias: bool = False,
                 out_bias: bool = False, qk_norm: str | None = None, norm_eps: float = 1e-6,
                 sliding_window: int | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        head_dim, num_kv_heads = _check_shapes(d_model, num_heads, num_kv_heads, head_dim)
        if not rope_max_wavelength > 0:
            raise ValueError(f"rope_max_wavelength must be > 0, got {rope_max_wavelength}")
        if qk_norm is not None and qk_norm not in QK_NORMS:
            raise ValueError(f"TransformerLM.qk_norm must be None or one of {', '.join(QK_NORMS)}, "
                             f"got {qk_norm!r}")
        if sliding_window is not None and (isinstance(sliding_window, bool)
                                           or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"TransformerLM.sliding_window must be None or an int >= 1, "
                             f"got {sliding_window!r}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling = check_rope_scaling(rope_scaling)
        self.qk_norm, self.sliding_window = qk_norm, sliding_window
        self.dtype = dtype
        in_axes = (EMBED, HEADS, KV)
        self.query = make_param(rngs, fan_in_init([0]), (d_model, num_heads, head_dim), in_axes,
                                param_dtype)
        self.key = make_param(rngs, fan_in_init([0]), (d_model, num_kv_heads, head_dim), in_axes,
                              param_dtype)
        self.value = make_param(rngs, fan_in_init([0]), (d_model, num_kv_heads, head_dim),
                                in_axes, param_dtype)
        self.out = make_param(rngs, fan_in_init([0, 1]), (num_heads, head_dim, d_model),
                              (HEADS, KV, EMBED), param_dtype)
        # Optional parts: constants, no PRNG keys drawn (the init of everything else is unchanged).
        for name, heads in (("query_bias", num_heads), ("key_bias", num_kv_heads),
                            ("value_bias", num_kv_heads)):
            setattr(self, name, constant_param(0.0, (heads, head_dim), (HEADS, KV), param_dtype)
                    if qkv_bias else None)
        self.out_bias = constant_param(0.0, (d_model,), (EMBED,), param_dtype) if out_bias else None
        if qk_norm is None:
            self.query_norm = self.key_norm = None
        else:
            q_dim, k_dim = ((head_dim, head_dim) if qk_norm == "head"
                            else (num_heads * head_dim, num_kv_heads * head_dim))
            self.query_norm = RMSNorm(q_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                                      rngs=None)
            self.key_norm = RMSNorm(k_dim, eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                                    rngs=None)

    def _project(self, x: jax.Array, weight: nnx.Param, bias: nnx.Param | None,
                 norm: RMSNorm | None) -> jax.Array:
        """x `[B, S, d_model]` -> `[B, S, N, head_dim]`: x W (+ b), then the q/k norm."""
        y = jnp.einsum("bsd,dnh->bsnh", x, weight[...].astype(self.dtype))
        if bias is not None:
            y = y + bias[...].astype(self.dtype)
        if norm is not None:
            if self.qk_norm == "head":
                y = norm(y)
            else:  # 'projection': over all heads at once
                y = norm(y.reshape(*y.shape[:2], -1)).reshape(y.shape)
        return y

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The projections every attention path shares (training and the KV cache).

        x `[B, S, d_model]`, positions `[B, S] int32` -> (q `[B, S, num_heads,
        head_dim]`, k, v `[B, S, num_kv_heads, head_dim]`) in `dtype`: projected,
        biased, q/k-normed, and q and k rotated by RoPE at `positions`.
        """
        x = x.astype(self.dtype)
        q = self._project(x, self.query, self.query_bias, self.query_norm)
        k = self._project(x, self.key, self.key_bias, self.key_norm)
        v = self._project(x, self.value, self.value_bias, None)
        q = apply_rope(q, positions, self.rope_max_wavelength, self.rope_scaling)
        k = apply_rope(k, positions, self.rope_max_wavelength, self.rope_scaling)
        return q, k, v

    def output(self, o: jax.Array) -> jax.Array:
        """Attention output o `[B, S, num_heads, head_dim]` -> `[B, S, d_model]`."""
        y = jnp.einsum("bsnh,nhd->bsd", o, self.out[...].astype(self.dtype))
        if self.out_bias is not None:
            y = y + self.out_bias[...].astype(self.dtype)
        return y

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array | None = None,
                 causal: bool = True) -> jax.Array:
        """x `[B, S, d_model]`, positions `[B, S] int32`, mask `[B, 1, S, S] bool` or None.

        With `mask=None`, `causal` alone decides the pattern (no padding, one
        segment). A given mask must already contain the causal constraint. The
        sliding window (if any) is applied on top, by sequence index.
        """
        if self.sliding_window is not None and not causal:
            raise ValueError("sliding_window needs causal attention (causal=True)")
        q, k, v = self.qkv(x, positions)
        window = None if self.sliding_window is None else (self.sliding_window - 1, 0)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                         is_causal=causal and mask is None,
                                         local_window_size=window)
        return self.output(o)

    def init_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        """This layer's empty cache `{'key', 'value': [batch, max_len, num_kv_heads,
        head_dim]}` (`layers.kv_cache.init`); every attention kind defines its own."""
        return kv_cache.init(batch, max_len, self.num_kv_heads, self.head_dim, dtype)

    def decode(self, x: jax.Array, *, positions: jax.Array, cache: KVCache,
               cache_index: jax.Array, kv_valid: jax.Array, prefill: bool = False,
               ) -> tuple[jax.Array, KVCache]:
        """Causal attention of S new tokens over a KV cache (`layers.kv_cache`).

        x `[B, S, d_model]`, positions `[B, S] int32` (RoPE positions of the
        new tokens), cache `{'key', 'value': [B, L, num_kv_heads, head_dim]}`,
        cache_index: scalar int32, the slot of the first new token (the S new
        keys and values are written to slots cache_index .. cache_index+S-1),
        kv_valid `[B, L] bool`: slots holding real tokens after this write.
        -> (`[B, S, d_model]`, the updated cache). The sliding window counts
        slots (`kv_cache.cached_attention_mask`).

        prefill: the S tokens are the first ones (cache_index 0, nothing cached
        before them): they attend over their own S keys only, the same result
        as over all L slots (the others are masked) for S x S work, not S x L.
        """
        q, k, v = self.qkv(x, positions)
        cache = kv_cache.write(cache, k, v, cache_index)
        num_new = q.shape[1]
        if prefill:
            mask = kv_cache.cached_attention_mask(kv_valid[:, :num_new], jnp.int32(0), num_new,
                                                  window=self.sliding_window)
            o = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:
            mask = kv_cache.cached_attention_mask(kv_valid, cache_index, num_new,
                                                  window=self.sliding_window)
            o = jax.nn.dot_product_attention(q, cache["key"], cache["value"], mask=mask)
        return self.output(o), cache


def _check_shapes(d_model: int, num_heads: int, num_kv_heads: int | None,
                  head_dim: int | None) -> tuple[int, int]:
    """Validated (head_dim, num_kv_heads), with their defaults filled in."""
    if d_model < 1:
        raise ValueError(f"d_model must be >= 1, got {d_model}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide d_model={d_model} "
                             "(or pass head_dim explicitly)")
        head_dim = d_model // num_heads
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2 for RoPE, got {head_dim}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must be >= 1 and divide num_heads={num_heads}, "
                         f"got {num_kv_heads}")
    return head_dim, num_kv_heads
