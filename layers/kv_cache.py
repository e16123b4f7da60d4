"""Key/value cache of one attention layer, for generation (prefill, then decode steps).

Layout: `{'key': [B, L, K, h], 'value': [B, L, K, h]}` in the attention's
compute dtype (B rows, L slots, K key/value heads, h head width). A row's
tokens sit in consecutive slots: a prompt is left-padded to the prompt
bucket, generated tokens follow it. Which slots hold real tokens is the
caller's `kv_valid [B, L] bool`; a slot that is not valid is never attended to
by a real token, so pad slots may hold anything (their keys are written too).
Because real tokens are contiguous per row, the distance between two slots is
the distance between the tokens' positions: the sliding window counts slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KVCache = dict[str, jax.Array]


def init(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
    """An empty (zero) cache `{'key', 'value': [batch, max_len, num_kv_heads, head_dim]}`."""
    shape = (batch, max_len, num_kv_heads, head_dim)
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}


def write(cache: KVCache, key: jax.Array, value: jax.Array, cache_index: jax.Array) -> KVCache:
    """The cache with key, value `[B, S, K, h]` written to slots cache_index .. cache_index+S-1.

    cache_index is a scalar int32 (traced is fine); the slots must fit (S +
    cache_index <= L: `lax.dynamic_update_slice` would otherwise clamp the start).
    """
    start = (0, jnp.asarray(cache_index, jnp.int32), 0, 0)
    return {"key": jax.lax.dynamic_update_slice(cache["key"], key.astype(cache["key"].dtype),
                                                start),
            "value": jax.lax.dynamic_update_slice(cache["value"],
                                                  value.astype(cache["value"].dtype), start)}


def cached_attention_mask(kv_valid: jax.Array, cache_index: jax.Array, num_queries: int, *,
                          window: int | None = None) -> jax.Array:
    """Boolean mask `[B, 1, S, L]` of S queries at slots cache_index .. +S-1 over L cached keys.

    A real query (its own slot valid in `kv_valid [B, L] bool`) sees the valid
    slots at or before its own (and, with a sliding `window` W, after its slot
    minus W: query slot i sees j with i - W < j <= i, as in training). A pad
    query sees only its own slot: every row keeps one live entry, so the
    softmax never sees an empty row, and pads never leak into real tokens.
    """
    batch, max_len = kv_valid.shape
    cache_index = jnp.asarray(cache_index, jnp.int32)
    q_slot = cache_index + jnp.arange(num_queries, dtype=jnp.int32)  # [S]
    k_slot = jnp.arange(max_len, dtype=jnp.int32)  # [L]
    visible = k_slot[None, :] <= q_slot[:, None]  # [S, L] causal
    if window is not None:
        visible = visible & (k_slot[None, :] > q_slot[:, None] - window)
    q_valid = jax.lax.dynamic_slice(kv_valid, (0, cache_index), (batch, num_queries))  # [B, S]
    live = kv_valid[:, None, :] & visible[None]  # [B, S, L]
    itself = (k_slot[None, :] == q_slot[:, None])[None]  # [1, S, L]
    return jnp.where(q_valid[:, :, None], live, itself)[:, None]
