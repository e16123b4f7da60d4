"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with a latent KV cache.

Per token (x `[d_model]`, H heads; r = kv_lora_rank, dn = qk_nope_head_dim,
dr = qk_rope_head_dim, dv = v_head_dim):

  query:  q_h = W_q[:, h] x                       (q_lora_rank None)
          q_h = W_qu[:, h] RMSNorm(W_qd x)        (q_lora_rank set)
          q_h = [q_h^nope (dn) ; RoPE(q_h^rope) (dr)]
  latent: c   = RMSNorm(W_dkv x)                  [r]   (cached)
          k^r = RoPE(W_kr x)                      [dr]  (cached; one key shared by all heads)
  keys:   k_h = [W_uk[:, h]^T c ; k^r]            [dn + dr]
  values: v_h = W_uv[:, h]^T c                    [dv]
  out:    y   = sum_h W_o[h] softmax_s(scale * q_h . k_h,s) v_h,s
  scale = (dn + dr)^-1/2 * m^2, m = 0.1 * mscale_all_dim * ln(factor) + 1 under YaRN
  with `mscale_all_dim` set (else m = 1).

Training (`__call__`) and prefill materialise k_h and v_h ("naive"). Decode steps
use the absorbed form: q_h . k_h,s = (W_uk[:, h] q_h^nope) . c_s + q_h^rope . k^r_s
and o_h = W_uv[:, h]^T (sum_s p_h,s c_s), so a step reads only the cached c and k^r
(r + dr numbers per token per layer, against 2 H h for standard attention) and
never forms per-head keys or values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import apply_rope, check_rope_scaling, yarn_mscale
from layers.kv_cache import KVCache, cached_attention_mask
from layers.norms import RMSNorm
from layers.params import EMBED, HEADS, KV, fan_in_init, make_param

Array = jax.Array

# Set by TransformerLM (its own options), so refused in gin on this class.
MLA_DENYLIST = ["d_model", "num_heads", "num_kv_heads", "head_dim", "rope_max_wavelength",
                "rope_scaling", "qkv_bias", "out_bias", "qk_norm", "norm_eps",
                "sliding_window", "dtype", "param_dtype", "rngs"]


def _check_dim(name: str, value: Any, *, even: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (2 if even else 1) \
            or (even and value % 2):
        need = "an even int >= 2 (RoPE rotates pairs)" if even else "an int >= 1"
        raise ValueError(f"MLAttention.{name} must be {need}, got {value!r}")


def _refuse_standard_options(num_heads: int, options: Mapping[str, Any]) -> None:
    """TransformerLM attention options MLA cannot express, refused naming the option."""
    if options["num_kv_heads"] not in (None, num_heads):
        raise ValueError(f"TransformerLM.num_kv_heads={options['num_kv_heads']!r}: MLA has no "
                         "key/value heads (keys and values come from the shared latent); "
                         "leave it unset")
    if options["head_dim"] is not None:
        raise ValueError(f"TransformerLM.head_dim={options['head_dim']!r} is not used by "
                         "MLAttention: set MLAttention.qk_nope_head_dim, qk_rope_head_dim and "
                         "v_head_dim")
    for name in ("qkv_bias", "out_bias", "qk_norm", "sliding_window"):
        if options[name]:
            key = {"qkv_bias": "attention_bias", "out_bias": "attention_out_bias"}.get(name, name)
            raise ValueError(f"TransformerLM.{key}={options[name]!r} is not supported with "
                             "TransformerLM.attention = @MLAttention")


@gin.configurable(denylist=MLA_DENYLIST)
class MLAttention(nnx.Module):
    """Multi-head latent attention x `[B, S, d_model]` -> `[B, S, d_model]` (module doc).

    Parameters: `query [d_model, H, dn + dr]`, or with q_lora_rank `query_down
    [d_model, q_lora_rank]`, `query_norm`, `query_up [q_lora_rank, H, dn + dr]`;
    `kv_down [d_model, r]`, `kv_norm`, `key_rope [d_model, dr]`, `key_up [r, H, dn]`,
    `value_up [r, H, dv]`, `out [H, dv, d_model]`. A query's last dr dims are its
    RoPE part.

    Args (gin: `MLAttention.<name>`; select with `TransformerLM.attention = @MLAttention`):
      q_lora_rank: None (a plain query projection) or the query's low rank.
      kv_lora_rank: r, the rank of the cached latent c (>= 1).
      qk_nope_head_dim: dn, per-head query/key width without RoPE.
      qk_rope_head_dim: dr, width of the RoPE query part and of the shared RoPE key (even).
      v_head_dim: dv, per-head value width.
      absorb: decode steps use the absorbed form (default); False materialises
        per-head keys and values from the cache (the reference path).
    From TransformerLM: d_model, num_heads, rope_max_wavelength, rope_scaling
    (YaRN's mscale_all_dim enters the softmax scale), norm_eps (the latent norms),
    dtype, param_dtype. num_kv_heads, head_dim, attention biases, qk_norm and
    sliding_window are refused.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, rope_max_wavelength: float = 10_000.0,
                 rope_scaling: Mapping[str, Any] | None = None, qkv_bias: bool = False,
                 out_bias: bool = False, qk_norm: str | None = None, norm_eps: float = 1e-6,
                 sliding_window: int | None = None, q_lora_rank: int | None = None,
                 kv_lora_rank: int = 512, qk_nope_head_dim: int = 128,
                 qk_rope_head_dim: int = 64, v_head_dim: int = 128, absorb: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _refuse_standard_options(num_heads, dict(
            num_kv_heads=num_kv_heads, head_dim=head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
            qk_norm=qk_norm, sliding_window=sliding_window))
        if d_model < 1 or num_heads < 1:
            raise ValueError(f"d_model and num_heads must be >= 1, got {d_model}, {num_heads}")
        if q_lora_rank is not None:
            _check_dim("q_lora_rank", q_lora_rank)
        _check_dim("kv_lora_rank", kv_lora_rank)
        _check_dim("qk_nope_head_dim", qk_nope_head_dim)
        _check_dim("qk_rope_head_dim", qk_rope_head_dim, even=True)
        _check_dim("v_head_dim", v_head_dim)
        if not rope_max_wavelength > 0:
            raise ValueError(f"rope_max_wavelength must be > 0, got {rope_max_wavelength}")
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = num_heads, q_lora_rank, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling = check_rope_scaling(rope_scaling)
        self.absorb, self.dtype = absorb, dtype
        self.scale = softmax_scale(qk_nope_head_dim + qk_rope_head_dim, self.rope_scaling)
        qk_dim, init = qk_nope_head_dim + qk_rope_head_dim, fan_in_init([0])
        if q_lora_rank is None:
            self.query = make_param(rngs, init, (d_model, num_heads, qk_dim), (EMBED, HEADS, KV),
                                    param_dtype)
            self.query_down = self.query_norm = self.query_up = None
        else:
            self.query = None
            self.query_down = make_param(rngs, init, (d_model, q_lora_rank), (EMBED, KV),
                                         param_dtype)
            self.query_norm = RMSNorm(q_lora_rank, eps=norm_eps, dtype=dtype,
                                      param_dtype=param_dtype, rngs=None)
            self.query_up = make_param(rngs, init, (q_lora_rank, num_heads, qk_dim),
                                       (KV, HEADS, KV), param_dtype)
        self.kv_down = make_param(rngs, init, (d_model, kv_lora_rank), (EMBED, KV), param_dtype)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=norm_eps, dtype=dtype, param_dtype=param_dtype,
                               rngs=None)
        self.key_rope = make_param(rngs, init, (d_model, qk_rope_head_dim), (EMBED, KV),
                                   param_dtype)
        self.key_up = make_param(rngs, init, (kv_lora_rank, num_heads, qk_nope_head_dim),
                                 (KV, HEADS, KV), param_dtype)
        self.value_up = make_param(rngs, init, (kv_lora_rank, num_heads, v_head_dim),
                                   (KV, HEADS, KV), param_dtype)
        self.out = make_param(rngs, fan_in_init([0, 1]), (num_heads, v_head_dim, d_model),
                              (HEADS, KV, EMBED), param_dtype)

    # -- projections -------------------------------------------------------------------------
    def _w(self, param: nnx.Param) -> Array:
        return param[...].astype(self.dtype)

    def queries(self, x: Array, positions: Array) -> tuple[Array, Array]:
        """x `[B, S, d_model]` -> (q_nope `[B, S, H, dn]`, q_rope `[B, S, H, dr]` rotated)."""
        x = x.astype(self.dtype)
        if self.query is not None:
            q = jnp.einsum("bsd,dnh->bsnh", x, self._w(self.query))
        else:
            low = self.query_norm(jnp.einsum("bsd,dr->bsr", x, self._w(self.query_down)))
            q = jnp.einsum("bsr,rnh->bsnh", low, self._w(self.query_up))
        q_nope, q_rope = q[..., :self.nope_dim], q[..., self.nope_dim:]
        return q_nope, apply_rope(q_rope, positions, self.rope_max_wavelength, self.rope_scaling)

    def latent(self, x: Array, positions: Array) -> tuple[Array, Array]:
        """x `[B, S, d_model]` -> what the cache holds: (c_kv `[B, S, r]` normed, k_rope
        `[B, S, dr]` rotated), in `dtype`."""
        x = x.astype(self.dtype)
        c_kv = self.kv_norm(jnp.einsum("bsd,dr->bsr", x, self._w(self.kv_down)))
        k_rope = jnp.einsum("bsd,dr->bsr", x, self._w(self.key_rope))[:, :, None, :]
        k_rope = apply_rope(k_rope, positions, self.rope_max_wavelength, self.rope_scaling)
        return c_kv, k_rope[:, :, 0, :]

    def output(self, o: Array) -> Array:
        """o `[B, S, H, dv]` -> `[B, S, d_model]`."""
        return jnp.einsum("bsnv,nvd->bsd", o.astype(self.dtype), self._w(self.out))

    # -- the two ways to attend --------------------------------------------------------------
    def _softmax(self, logits: Array, mask: Array | None) -> Array:
        """logits `[B, H, S, L] float32` (unscaled), mask `[B, 1, S, L] bool` -> probabilities."""
        logits = logits * self.scale
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(logits, axis=-1)

    def attend_naive(self, q_nope: Array, q_rope: Array, c_kv: Array, k_rope: Array,
                     mask: Array | None) -> Array:
        """Per-head keys and values materialised from the latent: `[B, S, H, dv]`.

        q_* `[B, S, H, d*]`, c_kv `[B, L, r]`, k_rope `[B, L, dr]`, mask `[B, 1, S, L]`."""
        k_nope = jnp.einsum("blr,rnh->blnh", c_kv, self._w(self.key_up))  # [B, L, H, dn]
        v = jnp.einsum("blr,rnv->blnv", c_kv, self._w(self.value_up))  # [B, L, H, dv]
        logits = (jnp.einsum("bsnh,blnh->bnsl", q_nope, k_nope,
                             preferred_element_type=jnp.float32)
                  + jnp.einsum("bsnh,blh->bnsl", q_rope, k_rope,
                               preferred_element_type=jnp.float32))
        probs = self._softmax(logits, mask).astype(self.dtype)
        return jnp.einsum("bnsl,blnv->bsnv", probs, v)

    def attend_absorbed(self, q_nope: Array, q_rope: Array, c_kv: Array, k_rope: Array,
                        mask: Array | None) -> Array:
        """The same attention with W_uk folded into the query and W_uv applied after the
        weighted sum of latents: reads only c_kv and k_rope, `[B, S, H, dv]`."""
        q_latent = jnp.einsum("bsnh,rnh->bsnr", q_nope, self._w(self.key_up))  # [B, S, H, r]
        logits = (jnp.einsum("bsnr,blr->bnsl", q_latent, c_kv,
                             preferred_element_type=jnp.float32)
                  + jnp.einsum("bsnh,blh->bnsl", q_rope, k_rope,
                               preferred_element_type=jnp.float32))
        probs = self._softmax(logits, mask).astype(self.dtype)
        o_latent = jnp.einsum("bnsl,blr->bsnr", probs, c_kv)  # [B, S, H, r]
        return jnp.einsum("bsnr,rnv->bsnv", o_latent, self._w(self.value_up))

    # -- the attention interface (as layers.attention.Attention) -----------------------------
    def __call__(self, x: Array, *, positions: Array, mask: Array | None = None,
                 causal: bool = True) -> Array:
        """x `[B, S, d_model]`, positions `[B, S] int32`, mask `[B, 1, S, S] bool` or None
        (then `causal` alone decides; a given mask already holds the causal constraint)."""
        q_nope, q_rope = self.queries(x, positions)
        c_kv, k_rope = self.latent(x, positions)
        if mask is None and causal:
            seq = x.shape[1]
            mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
        return self.output(self.attend_naive(q_nope, q_rope, c_kv, k_rope, mask))

    def init_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        """The latent cache `{'c_kv': [batch, max_len, r], 'k_rope': [batch, max_len, dr]}`."""
        return {"c_kv": jnp.zeros((batch, max_len, self.kv_lora_rank), dtype),
                "k_rope": jnp.zeros((batch, max_len, self.rope_dim), dtype)}

    def decode(self, x: Array, *, positions: Array, cache: KVCache, cache_index: Array,
               kv_valid: Array, prefill: bool = False) -> tuple[Array, KVCache]:
        """S new tokens over the latent cache (`layers.attention.Attention.decode`'s contract):
        their c_kv and k_rope are written to slots cache_index .. +S-1; a prefill attends
        over its own S tokens (naive form), other calls over all L slots (absorbed form
        unless `absorb=False`). -> (`[B, S, d_model]`, the updated cache)."""
        q_nope, q_rope = self.queries(x, positions)
        c_kv, k_rope = self.latent(x, positions)
        start = (0, jnp.asarray(cache_index, jnp.int32), 0)
        cache = {name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype),
                                                    start)
                 for name, new in (("c_kv", c_kv), ("k_rope", k_rope))}
        num_new = x.shape[1]
        if prefill:
            mask = cached_attention_mask(kv_valid[:, :num_new], jnp.int32(0), num_new)
            o = self.attend_naive(q_nope, q_rope, c_kv, k_rope, mask)
        else:
            mask = cached_attention_mask(kv_valid, cache_index, num_new)
            attend = self.attend_absorbed if self.absorb else self.attend_naive
            o = attend(q_nope, q_rope, cache["c_kv"], cache["k_rope"], mask)
        return self.output(o), cache

    def attention_flops(self, seq_len: int) -> float:
        """Forward FLOPs per position of the scores and the weighted values (training form):
        2 S H (dn + dr) + 2 S H dv."""
        return 2.0 * seq_len * self.num_heads * (self.nope_dim + self.rope_dim + self.v_dim)


def softmax_scale(qk_head_dim: int, rope_scaling: Any) -> float:
    """qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN when
    `mscale_all_dim` is set (DeepSeek-V2/V3's `softmax_scale`)."""
    scale = qk_head_dim ** -0.5
    config = dict(rope_scaling or ())
    if config.get("rope_type") == "yarn" and config.get("mscale_all_dim"):
        m = yarn_mscale(config["factor"], config["mscale_all_dim"])
        scale *= m * m
    return scale
