"""The mixture-of-experts layer: router, dispatch, experts, combine."""

from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.experts import Experts
from layers.mlp import DenseMLP
from layers.router import Router
from moe import balance, dense_to_sparse, routing
from moe.dispatch import (
    available_dispatches,
    expert_capacity,
    expert_choice_dispatch,
    expert_parallel,
    get_dispatch,
)
from moe.validation import check_one_of

ROUTING_TYPES = ("token_choice", "expert_choice")
GATINGS = ("top_k", "dense_to_sparse")


@gin.configurable
class MoeLayer(nnx.Module):
    """Sparse MoE feed-forward block.

    Called on x `[B, S, d_model]` (optionally with `mask [B, S]`, 1 = real
    token), returns `(y [B, S, d_model], aux)`. The routing group is the whole
    call: all B*S tokens, flattened batch-major. `aux` is a dict of functional
    outputs (never mutable state), all float32:

      lbl: load-balancing loss E * sum f_i P_i over this call (1.0 at balance;
        0 for expert choice, which is balanced by construction).
      z_loss: router z-loss.
      counts `[E]`: assignments per expert before dropping, padding excluded.
      mean_probs `[E]`: P_i, the mean unbiased router probability (differentiable;
        global-batch balancing recombines it with global counts).
      num_tokens: real tokens routed.
      kept_counts `[E]`: assignments per expert after dropping.
      token_probs `[T, E]`, token_experts `[T, k] int32`, token_mask `[T]`
        (token choice only): per-token unbiased scores (sigmoid scores
        normalised to sum 1), selected experts and padding mask, from which
        the training step builds balance losses over other token groups.
      dropped_fraction, max_violation, router_entropy, active_experts
        (mean experts per token after dropping).

    Args:
      d_model, d_ff: model and expert hidden sizes.
      num_experts: E routed experts.
      k: experts per token (token choice); for expert choice the average
        experts per token when `capacity_factor` is None.
      dispatch: one of `moe.dispatch.available_dispatches()`.
      capacity_factor: None = dropless (token choice). Otherwise C =
        ceil(k * T * cf / E). For expert choice, C = ceil(T * cf / E) with
        cf defaulting to k.
      eval_capacity_factor: capacity factor when `deterministic=True`
        (defaults to `capacity_factor`).
      routing_type: "token_choice" or "expert_choice".
      normalize: renormalise the top-k weights (variant B/C).
      score: "softmax" or "sigmoid".
      route_scale: multiplies the combine weights.
      activation: expert activation (see `moe.experts.ACTIVATIONS`).
      num_shared_experts, shared_d_ff: dense experts every token goes through;
        hidden size shared_d_ff (default d_ff) per shared expert.
      causal: the layer sits in a causal decoder; refuses expert choice and
        batch-prioritized routing, which look at future tokens.
      batch_prioritized: capacity slots go to tokens with the highest top-1
        probability first (V-MoE BPR; encoders only).
      router_jitter, router_noise_std: training-only router noise
        (multiplicative input jitter; additive Gaussian on the logits).
      num_groups, top_groups: DeepSeek-V3 group-limited routing.
      gating: "top_k", or "dense_to_sparse" (EvoMoE DTS gate, training only:
        Gumbel-softmax active set, dropless, `dts_state` required; evaluation
        stays deterministic top-k on softmax(z) with `eval_capacity_factor`).
        In the DTS hard phase k is the number of experts per token.
      dts_threshold, dts_gumbel_weights: DTS threshold theta and weights
        mask * g instead of mask * softmax(z) (see `moe.dense_to_sparse`).
      min_capacity, capacity_multiple_of: capacity rounding.
      dtype: compute dtype of the experts; the router is always float32.
      param_dtype: parameter dtype.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, k: int, *,
                 dispatch: str = "sort", capacity_factor: float | None = None,
                 eval_capacity_factor: float | None = None,
                 routing_type: str = "token_choice", normalize: bool = False,
                 score: str = "softmax", route_scale: float = 1.0, activation: str = "relu",
                 num_shared_experts: int = 0, shared_d_ff: int | None = None,
                 causal: bool = True, batch_prioritized: bool = False,
                 router_jitter: float = 0.0, router_noise_std: float = 0.0,
                 router_init_std: float = 0.02, num_groups: int | None = None,
                 top_groups: int | None = None, min_capacity: int = 1,
                 capacity_multiple_of: int = 1, gating: str = "top_k",
                 dts_threshold: float = dense_to_sparse.DEFAULT_THRESHOLD,
                 dts_gumbel_weights: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        _validate(num_experts=num_experts, k=k, dispatch=dispatch,
                  capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                  routing_type=routing_type, score=score, causal=causal,
                  batch_prioritized=batch_prioritized, num_shared_experts=num_shared_experts,
                  router_noise_std=router_noise_std, route_scale=route_scale)
        self.d_model, self.d_ff = d_model, d_ff
        self.num_experts, self.k = num_experts, k
        self.dispatch = dispatch
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = (capacity_factor if eval_capacity_factor is None
                                     else eval_capacity_factor)
        self.routing_type = routing_type
        self.normalize, self.score, self.route_scale = normalize, score, route_scale
        self.causal, self.batch_prioritized = causal, batch_prioritized
        self.router_noise_std = router_noise_std
        self.num_groups, self.top_groups = num_groups, top_groups
        self.min_capacity, self.capacity_multiple_of = min_capacity, capacity_multiple_of
        _validate_gating(gating, routing_type, num_experts, dts_threshold)
        self.gating, self.dts_threshold = gating, dts_threshold
        self.dts_gumbel_weights = dts_gumbel_weights
        self.dtype = dtype
        self.router = Router(d_model, num_experts, init_std=router_init_std,
                             jitter_eps=router_jitter, param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(num_experts, d_model, d_ff, activation=activation,
                               param_dtype=param_dtype, rngs=rngs)
        self.shared = (DenseMLP(d_model, (shared_d_ff or d_ff) * num_shared_experts,
                                activation=activation, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs) if num_shared_experts else None)

    def capacity(self, num_tokens: int, deterministic: bool) -> int | None:
        """Static per-expert capacity for a group of `num_tokens` (None = dropless)."""
        cf = self.eval_capacity_factor if deterministic else self.capacity_factor
        if self.routing_type == "expert_choice":
            return routing.expert_choice_capacity(num_tokens, self.num_experts,
                                                  self.k if cf is None else cf)
        if cf is None:
            return None
        return expert_capacity(num_tokens, self.num_experts, self.k, cf,
                               min_capacity=self.min_capacity,
                               multiple_of=self.capacity_multiple_of)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
                 deterministic: bool = True, rng: jax.Array | None = None,
                 selection_bias: jax.Array | None = None,
                 dts_state: dense_to_sparse.DtsState | None = None,
                 ) -> tuple[jax.Array, dict[str, Any]]:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, seq, d_model={self.d_model}], got {x.shape}")
        batch, seq, _ = x.shape
        if mask is not None and mask.shape != (batch, seq):
            raise ValueError(f"mask must be [batch, seq]=({batch}, {seq}), got {mask.shape}")
        num_tokens = batch * seq
        tokens = x.reshape(num_tokens, self.d_model)
        token_mask = (jnp.ones((num_tokens,), jnp.float32) if mask is None
                      else mask.reshape(num_tokens).astype(jnp.float32))
        jitter_rng, noise_rng = (None, None) if rng is None else jax.random.split(rng)

        logits = self.router(tokens, deterministic=deterministic, rng=jitter_rng)
        capacity = self.capacity(num_tokens, deterministic)
        ffn = self.experts.ffn(self.dtype)
        compute_tokens = tokens.astype(self.dtype)
        if self.gating == "dense_to_sparse" and not deterministic:
            y, aux = self._dense_to_sparse(compute_tokens, logits, token_mask, ffn, noise_rng,
                                           dts_state)
        elif self.routing_type == "expert_choice":
            y, aux = self._expert_choice(compute_tokens, logits, token_mask, ffn, capacity)
        else:
            y, aux = self._token_choice(compute_tokens, logits, token_mask, ffn, capacity,
                                        deterministic, noise_rng, selection_bias)
        aux["z_loss"] = balance.router_z_loss(logits, mask=token_mask)
        aux["num_tokens"] = jnp.sum(token_mask)
        y = y.reshape(batch, seq, self.d_model)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.astype(x.dtype), aux

    def _token_choice(self, tokens, logits, token_mask, ffn, capacity, deterministic,
                      noise_rng, selection_bias):
        noise_std = 0.0 if deterministic else self.router_noise_std
        if noise_std > 0 and noise_rng is None:
            raise ValueError("router_noise_std > 0 in training needs an rng key")
        gating = routing.top_k_gating(
            logits, self.k, normalize=self.normalize, score=self.score,
            selection_bias=selection_bias, route_scale=self.route_scale, noise_std=noise_std,
            rng=noise_rng, num_groups=self.num_groups, top_groups=self.top_groups)
        weights = gating.weights * token_mask[:, None]
        priority = jnp.max(gating.probs, axis=-1) if self.batch_prioritized else None
        # Under a mesh whose "expert" rule spans > 1 devices: all-to-all expert parallelism.
        dispatch = "expert_parallel" if expert_parallel.is_active() else self.dispatch
        out = get_dispatch(dispatch)(tokens, gating.expert_index, weights, ffn,
                                     capacity=capacity, priority=priority, mask=token_mask)
        counts = balance.expert_counts(gating.expert_index, self.num_experts, mask=token_mask)
        kept = out.keep & (token_mask[:, None] > 0)
        kept_counts = jax.lax.stop_gradient(jnp.einsum(
            "tke,tk->e", jax.nn.one_hot(gating.expert_index, self.num_experts), kept))
        aux = dict(
            lbl=balance.load_balancing_loss(gating.probs, counts, mask=token_mask),
            counts=counts,
            mean_probs=balance.mean_probs(gating.probs, mask=token_mask),
            kept_counts=kept_counts,
            dropped_fraction=balance.dropped_fraction(out.keep, mask=token_mask),
            max_violation=balance.max_violation(counts),
            router_entropy=balance.router_entropy(gating.probs, mask=token_mask),
            active_experts=jnp.sum(kept) / jnp.maximum(jnp.sum(token_mask), 1.0),
            # Per-token routing for balance scopes other than this call (experiments.train.balance_loss).
            token_probs=_balance_probs(gating.probs, self.score),
            token_experts=gating.expert_index,
            token_mask=token_mask,
        )
        return out.y, aux

    def _dense_to_sparse(self, tokens, logits, token_mask, ffn, noise_rng, dts_state):
        if dts_state is None or noise_rng is None:
            raise ValueError("gating='dense_to_sparse' in training needs dts_state "
                             "(temperature, hard) and an rng key")
        return dense_to_sparse.dense_to_sparse_moe(
            tokens, logits, ffn, get_dispatch(self.dispatch), state=dts_state,
            threshold=self.dts_threshold, rng=noise_rng, k=self.k,
            gumbel_weights=self.dts_gumbel_weights, mask=token_mask)

    def _expert_choice(self, tokens, logits, token_mask, ffn, capacity):
        # Padding tokens must not be chosen: push their logits far down.
        masked_logits = jnp.where(token_mask[:, None] > 0, logits, -1e9)
        gating = routing.expert_choice_gating(masked_logits, capacity)
        picked_real = token_mask[gating.token_index]  # [E, C]
        weights = gating.weights * picked_real
        y = expert_choice_dispatch(tokens, gating.token_index, weights, ffn)
        kept_counts = jax.lax.stop_gradient(jnp.sum(picked_real, axis=1))
        per_token = jnp.zeros(token_mask.shape).at[gating.token_index.reshape(-1)].add(
            picked_real.reshape(-1))
        probs = routing.score_probs(logits)
        aux = dict(
            lbl=jnp.zeros((), jnp.float32),
            counts=kept_counts,
            mean_probs=balance.mean_probs(probs, mask=token_mask),
            kept_counts=kept_counts,
            dropped_fraction=jnp.sum((per_token == 0) * token_mask)
            / jnp.maximum(jnp.sum(token_mask), 1.0),
            max_violation=balance.max_violation(kept_counts),
            router_entropy=balance.router_entropy(probs, mask=token_mask),
            active_experts=jnp.sum(per_token * token_mask) / jnp.maximum(jnp.sum(token_mask), 1.0),
        )
        return y, aux


def _balance_probs(probs: jax.Array, score: str) -> jax.Array:
    """Scores entering P of the balance losses: softmax as is, sigmoid normalised per token."""
    if score == "sigmoid":
        return probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-9)
    return probs


def _validate_gating(gating, routing_type, num_experts, dts_threshold) -> None:
    check_one_of("gating", gating, GATINGS)
    if gating == "dense_to_sparse" and routing_type != "token_choice":
        raise ValueError("gating='dense_to_sparse' needs routing_type='token_choice', "
                         f"got {routing_type!r}")
    if not 0.0 <= dts_threshold < 1.0 / num_experts:
        raise ValueError(f"dts_threshold must be in [0, 1/num_experts={1.0 / num_experts:g}), "
                         f"got {dts_threshold}")


def _validate(*, num_experts, k, dispatch, capacity_factor, eval_capacity_factor, routing_type,
              score, causal, batch_prioritized, num_shared_experts, router_noise_std,
              route_scale) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
    check_one_of("dispatch", dispatch, available_dispatches())
    for name, value in (("capacity_factor", capacity_factor),
                        ("eval_capacity_factor", eval_capacity_factor)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 or None (dropless), got {value}")
    check_one_of("routing_type", routing_type, ROUTING_TYPES)
    check_one_of("score", score, routing.SCORE_FUNCTIONS)
    if causal and routing_type == "expert_choice":
        raise ValueError("routing_type='expert_choice' looks at future tokens; it is not allowed "
                         "in a causal layer (causal=True). Use it in encoders (causal=False).")
    if causal and batch_prioritized:
        raise ValueError("batch_prioritized=True orders tokens by router probability across the "
                         "sequence; it is not allowed in a causal layer (causal=True).")
    if batch_prioritized and capacity_factor is None:
        raise ValueError("batch_prioritized=True needs a capacity_factor (it orders capacity "
                         "slots); dropless routing drops nothing.")
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts must be >= 0, got {num_shared_experts}")
    if router_noise_std < 0:
        raise ValueError(f"router_noise_std must be >= 0, got {router_noise_std}")
    if route_scale <= 0:
        raise ValueError(f"route_scale must be > 0, got {route_scale}")
