"""Soft MoE (Puigcerver, Riquelme, Mustafa, Houlsby, ICLR 2024): experts on slots that
are softmax-weighted averages of the tokens (docs/conditional_compute.md).

For one sequence of m tokens X `[m, d]`, n experts with p slots each:

  X^ = X / sqrt(sum_d X^2 + 1e-6),  Phi^ = Phi / sqrt(sum_d Phi^2 + 1e-6)   (per token / slot)
  L[t, s] = scale * X^_t . Phi^_s                                      s = (i, j), n*p slots
  D = softmax of L over the tokens t (padding excluded)   -> slot s = sum_t D[t, s] X_t
  Y~_(i, j) = f_i(slot (i, j))                             (expert i on its p slots)
  C = softmax of L over the slots s, per token            -> y_t = sum_s C[t, s] Y~_s

Every slot mixes every token of its sequence, so a token's output depends on later
tokens: the layer is for encoders only and refuses `causal=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.experts import Experts
from layers.params import EMBED, EXPERT, make_param, normal_init
from moe import balance
from moe.layer_aux import MoeAux
from moe.soft_stats import SoftRoutingStats, soft_layer_stats

Array = jax.Array
MOE_BLOCK_DENYLIST = ("d_model", "causal", "dtype", "param_dtype", "rngs")
_EPS = 1e-6


def l2_normalize(x: Array, axis: int) -> Array:
    """x / sqrt(sum x^2 + 1e-6) along `axis` (float32)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + _EPS)


def soft_weights(logits: Array, mask: Array) -> tuple[Array, Array]:
    """Dispatch and combine weights of one batch of sequences.

    logits `[B, m, S] float32` (S = n * p slots), mask `[B, m]` (1 = real token)
    -> (dispatch `[B, m, S]`: softmax over the tokens m, padding at 0;
        combine `[B, m, S]`: softmax over the slots S, padding rows at 0).
    A sequence of padding only gets dispatch weights 0 (its slots are zero).
    """
    real = mask[:, :, None] > 0
    masked = jnp.where(real, logits, -jnp.inf)
    peak = jnp.max(masked, axis=1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    e = jnp.where(real, jnp.exp(masked - jax.lax.stop_gradient(peak)), 0.0)
    dispatch = e / jnp.maximum(jnp.sum(e, axis=1, keepdims=True), 1e-30)
    combine = jax.nn.softmax(logits, axis=-1) * real
    return dispatch, combine


class SoftRouter(nnx.Module):
    """The slot parameters of a Soft MoE layer: `mu [d, n, p]` (LeCun-normal, axes
    embed/expert/-) and the learned logit `scale` (init 1). Path `.../ffn/router/`."""

    state_keys: ClassVar[tuple[str, ...]] = ()
    expert_parallel_ok: ClassVar[bool] = False
    variable_assignments: ClassVar[bool] = False

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int, *,
                 param_dtype, rngs: nnx.Rngs):
        self.mu = make_param(rngs, normal_init(d_model ** -0.5),
                             (d_model, num_experts, slots_per_expert), (EMBED, EXPERT, None),
                             param_dtype)
        self.scale = nnx.Param(jnp.ones((), param_dtype), logical_axes=())

    def logits(self, x: Array) -> Array:
        """x `[B, m, d]` -> `[B, m, n * p] float32` = scale * X^ Phi^."""
        mu = l2_normalize(self.mu[...], axis=0)
        logits = jnp.einsum("bmd,dnp->bmnp", l2_normalize(x, axis=-1), mu)
        return (self.scale[...].astype(jnp.float32) * logits).reshape(*x.shape[:2], -1)


@gin.configurable(denylist=list(MOE_BLOCK_DENYLIST))
class SoftMoeLayer(nnx.Module):
    """Soft MoE FFN block for encoders: `TransformerLM.moe_block = @SoftMoeLayer`.

    Called like `MoeLayer` on x `[B, S, d_model]` (mask `[B, S]`, 1 = real token)
    -> `(y [B, S, d_model], MoeAux)`. The group is one sequence (examples stay
    independent); padding tokens take no part in any slot and get output 0.

    Args (gin: `SoftMoeLayer.<name>`):
      d_ff: hidden size of each expert.
      num_experts: n experts.
      slots_per_expert: p slots per expert (n * p slots per sequence; the paper
        picks n * p about the sequence length).
      experts: expert-weights factory, as `MoeLayer.experts`.
      activation: the experts' activation.
    Set by the parent (refused in gin): d_model, causal (must be False), dtype,
    param_dtype, rngs.
    """

    is_moe_block: ClassVar[bool] = True  # TransformerBlock: called like MoeLayer, returns aux
    dispatch: ClassVar[str] = "soft"
    capacity_factor: ClassVar[None] = None
    eval_capacity_factor: ClassVar[None] = None

    def __init__(self, d_model: int, d_ff: int | None = None, num_experts: int = 8,
                 slots_per_expert: int = 1, *, experts: Callable[..., Experts] = Experts,
                 activation: str = "relu", causal: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if causal:
            raise ValueError(
                "SoftMoeLayer needs an encoder (TransformerLM.causal = False): every slot is a "
                "softmax-weighted average of all tokens of the sequence, so a token's output "
                "would depend on later tokens, which a causal decoder must not see.")
        if d_ff is None or d_ff < 1:
            raise ValueError(f"SoftMoeLayer.d_ff (the hidden size of each expert) must be set "
                             f"and >= 1, got {d_ff}")
        if num_experts < 1:
            raise ValueError(f"SoftMoeLayer.num_experts must be >= 1, got {num_experts}")
        if slots_per_expert < 1:
            raise ValueError(f"SoftMoeLayer.slots_per_expert must be >= 1, got {slots_per_expert}")
        self.d_model, self.d_ff = d_model, d_ff
        self.num_experts, self.slots_per_expert = num_experts, slots_per_expert
        # Every token's output mixes every expert's slots: all experts are active.
        self.k = num_experts
        self.dtype = dtype
        self.router = SoftRouter(d_model, num_experts, slots_per_expert,
                                 param_dtype=param_dtype, rngs=rngs)
        self.experts = experts(num_experts, d_model, d_ff, activation=activation,
                               param_dtype=param_dtype, rngs=rngs)

    # -- the MoE-block interface the trainer, sharding and FLOP counter use ---------------
    def capacity(self, num_tokens: int, deterministic: bool) -> None:
        del num_tokens, deterministic
        return None

    def use_expert_parallel(self, options: Any, shards: int) -> bool:
        del options, shards
        return False

    def flop_rows(self, tokens: int, seq_len: int) -> int:
        """Expert rows per micro-batch of `tokens` positions: n * p per sequence."""
        return tokens // seq_len * self.num_experts * self.slots_per_expert

    def active_expert_fraction(self, seq_len: int | None = None) -> float:
        """Share of the expert parameters one token uses (`TransformerLM.active_param_count`):
        n * p slot rows per sequence of seq_len tokens, each through one expert, are
        (n p / seq_len) expert applications per token, i.e. p / seq_len of all expert
        weights (1 / n at the paper's n p = seq_len). Without seq_len: 1 (every
        token's output mixes every expert)."""
        if seq_len is None:
            return 1.0
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        return min(1.0, self.slots_per_expert / seq_len)

    def flops_per_position(self) -> float:
        """Dispatch and combine matmuls per token position: 2 x 2 x (n p d)
        (the logits' 2 n p d are counted with the parameter `mu`)."""
        return 4.0 * self.num_experts * self.slots_per_expert * self.d_model

    def __call__(self, x: Array, *, mask: Array | None = None, deterministic: bool = True,
                 rng: Array | None = None, router_state: Mapping[str, Array] | None = None,
                 ) -> tuple[Array, MoeAux]:
        del deterministic, rng, router_state  # no noise, no per-step router inputs
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, seq, d_model={self.d_model}], got {x.shape}")
        batch, seq, _ = x.shape
        if mask is not None and mask.shape != (batch, seq):
            raise ValueError(f"mask must be [batch, seq]=({batch}, {seq}), got {mask.shape}")
        mask = (jnp.ones((batch, seq), jnp.float32) if mask is None
                else mask.astype(jnp.float32))
        n, p = self.num_experts, self.slots_per_expert
        logits = self.router.logits(x)
        dispatch, combine = soft_weights(logits, mask)
        slots = jnp.einsum("bms,bmd->bsd", dispatch, x.astype(jnp.float32))  # [B, n*p, d]
        slots = slots.reshape(batch, n, p, self.d_model).transpose(1, 0, 2, 3)
        ffn = self.experts.ffn(self.dtype)
        out = ffn.batched(slots.reshape(n, batch * p, self.d_model).astype(self.dtype))
        out = out.reshape(n, batch, p, self.d_model).transpose(1, 0, 2, 3)
        y = jnp.einsum("bms,bsd->bmd", combine,
                       out.reshape(batch, n * p, self.d_model).astype(jnp.float32))
        return y.astype(x.dtype), self._aux(dispatch, combine, mask)

    def routing_stats(self, x: Array, *, mask: Array | None = None,
                      router_state: Mapping[str, Array] | None = None) -> SoftRoutingStats:
        """The soft routing statistics of one call (`experiments.inference.routing_stats`,
        `moe.soft_stats`): x `[B, S, d_model]`, mask `[B, S]` (1 = real token)."""
        del router_state
        mask = (jnp.ones(x.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32))
        dispatch, combine = soft_weights(self.router.logits(x), mask)
        return soft_layer_stats(dispatch, combine, mask, self.slots_per_expert)

    def _aux(self, dispatch: Array, combine: Array, mask: Array) -> MoeAux:
        """Statistics in MoeAux terms: every expert processes B * p rows (counts),
        nothing is dropped, P_i = mean combine weight of expert i over real tokens,
        router_entropy = mean entropy of the combine weights; no balance loss."""
        batch, seq, _ = combine.shape
        n, p = self.num_experts, self.slots_per_expert
        token_mask = mask.reshape(-1)
        per_expert = combine.reshape(batch * seq, n, p).sum(-1)  # [T, n]
        rows = jnp.full((n,), float(batch * p), jnp.float32)
        del dispatch
        return MoeAux(
            lbl=jnp.zeros((), jnp.float32),
            counts=rows, kept_counts=rows,
            num_tokens=jnp.sum(token_mask),
            mean_probs=balance.mean_probs(per_expert, mask=token_mask),
            dropped_fraction=jnp.zeros((), jnp.float32),
            max_violation=jnp.zeros((), jnp.float32),
            router_entropy=balance.router_entropy(
                combine.reshape(batch * seq, n * p), mask=token_mask),
            active_experts=jnp.asarray(float(n), jnp.float32),
        )
