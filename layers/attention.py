"""Multi-head self-attention with RoPE and packed-segment masking."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.params import EMBED, HEADS, KV, fan_in_init, make_param


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


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float) -> jax.Array:
    """Rotary embedding (rotate-half layout), computed in float32.

    x `[B, S, N, H]`, positions `[B, S] int32` -> `[B, S, N, H]` in x's dtype.
    """
    half = x.shape[-1] // 2
    freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, S, H/2]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# Every argument is set by the parent module (sizes, dtypes, rngs), so none is bindable.
@gin.configurable(denylist=["d_model", "num_heads", "num_kv_heads", "head_dim", "rope_max_wavelength",
                             "dtype", "param_dtype", "rngs"])
class Attention(nnx.Module):
    """Self-attention x `[B, S, d_model]` -> `[B, S, d_model]` in `dtype`.

    Query weights `[d_model, num_heads, head_dim]` (EMBED, HEADS, KV); key and
    value `[d_model, num_kv_heads, head_dim]` (grouped-query attention when
    num_kv_heads < num_heads); output `[num_heads, head_dim, d_model]`
    (HEADS, KV, EMBED). No biases.

    Args:
      d_model: model width.
      num_heads: query heads.
      num_kv_heads: key/value heads (default num_heads); must divide num_heads.
      head_dim: per-head width (default d_model // num_heads, which must then
        divide evenly); must be even for RoPE.
      rope_max_wavelength: RoPE base.
      dtype, param_dtype: compute and parameter dtypes (the softmax runs in
        float32 inside `jax.nn.dot_product_attention`).
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_max_wavelength: float = 10_000.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
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
        if not rope_max_wavelength > 0:
            raise ValueError(f"rope_max_wavelength must be > 0, got {rope_max_wavelength}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_max_wavelength = rope_max_wavelength
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

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array | None = None,
                 causal: bool = True) -> jax.Array:
        """x `[B, S, d_model]`, positions `[B, S] int32`, mask `[B, 1, S, S] bool` or None.

        With `mask=None`, `causal` alone decides the pattern (no padding, one
        segment). A given mask must already contain the causal constraint.
        """
        x = x.astype(self.dtype)
        q = jnp.einsum("bsd,dnh->bsnh", x, self.query[...].astype(self.dtype))
        k = jnp.einsum("bsd,dnh->bsnh", x, self.key[...].astype(self.dtype))
        v = jnp.einsum("bsd,dnh->bsnh", x, self.value[...].astype(self.dtype))
        q = apply_rope(q, positions, self.rope_max_wavelength)
        k = apply_rope(k, positions, self.rope_max_wavelength)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                         is_causal=causal and mask is None)
        return jnp.einsum("bsnh,nhd->bsd", o, self.out[...].astype(self.dtype))
