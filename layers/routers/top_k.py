"""Token-choice top-k routing (Switch, GShard, Mixtral, DeepSeek-V3)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from layers.routers.base import BaseRouter, Routing, register_router, router_losses, split_rng
from moe import balance, routing
from moe.layer_aux import MoeAux
from moe.router_state import SELECTION_BIAS
from moe.validation import check_one_of

Array = jax.Array


def balance_probs(probs: Array, score: str) -> Array:
    """Scores entering P of the balance losses: softmax as is, sigmoid normalised per token."""
    if score == "sigmoid":
        return probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-9)
    return probs


def token_choice_aux(logits: Array, gating: routing.TokenChoice, mask: Array, num_experts: int,
                     score: str = "softmax") -> MoeAux:
    """The router's part of the aux of a top-k routing: LBL (counts before
    dropping), z-loss, P_i, entropy and the per-token routing for balance scopes."""
    counts = balance.expert_counts(gating.expert_index, num_experts, mask=mask)
    return MoeAux(
        lbl=balance.load_balancing_loss(gating.probs, counts, mask=mask),
        **router_losses(logits, gating.probs, mask),
        token_probs=balance_probs(gating.probs, score),
        token_experts=gating.expert_index,
        token_mask=mask,
    )


@register_router("top_k")
class TopKRouter(BaseRouter):
    """Each token picks its k best experts (`moe.routing.top_k_gating`).

    Args (gin: `TopKRouter.<name>`):
      init_std: std of the projection's normal init.
      jitter_eps: training-only multiplicative input jitter.
      use_bias: a learned `[E]` logit bias.
      score: "softmax" or "sigmoid".
      normalize: renormalise the k selected scores to sum to 1.
      route_scale: multiplies the combine weights (DeepSeek-V3: 2.5).
      noise_std: training-only additive Gaussian noise on the selection logits.
      num_groups, top_groups: group-limited routing (DeepSeek-V2/V3).
      group_score: how a group scores for it: "top2_sum" (DeepSeek-V3, the
        default) or "max" (DeepSeek-V2's group_limited_greedy).
      batch_prioritized: capacity slots go to tokens with the highest top-1
        probability first (V-MoE BPR; encoders only, needs a capacity factor).
    Router state: `selection_bias` `[E]` added to the scores for selection only
    (loss-free balancing).
    """

    state_keys = (SELECTION_BIAS,)
    expert_parallel_ok = True

    def __init__(self, d_model: int, num_experts: int, k: int, *, causal: bool = True,
                 init_std: float = 0.02, jitter_eps: float = 0.0, use_bias: bool = False,
                 score: str = "softmax", normalize: bool = False, route_scale: float = 1.0,
                 noise_std: float = 0.0, num_groups: int | None = None,
                 top_groups: int | None = None, group_score: str = "top2_sum",
                 batch_prioritized: bool = False, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_one_of("TopKRouter.score", score, routing.SCORE_FUNCTIONS)
        check_one_of("TopKRouter.group_score", group_score, routing.GROUP_SCORES)
        if group_score != "top2_sum" and num_groups is None:
            raise ValueError(f"TopKRouter.group_score={group_score!r} needs "
                             "TopKRouter.num_groups (group-limited routing)")
        if noise_std < 0:
            raise ValueError(f"TopKRouter.noise_std must be >= 0, got {noise_std}")
        if route_scale <= 0:
            raise ValueError(f"TopKRouter.route_scale must be > 0, got {route_scale}")
        if causal and batch_prioritized:
            raise ValueError("batch_prioritized=True orders tokens by router probability across "
                             "the sequence; it is not allowed in a causal layer (causal=True).")
        _check_groups(num_experts, k, num_groups, top_groups)
        super().__init__(d_model, num_experts, k, causal=causal, init_std=init_std,
                         jitter_eps=jitter_eps, use_bias=use_bias, param_dtype=param_dtype,
                         rngs=rngs)
        self.score, self.normalize, self.route_scale = score, normalize, route_scale
        self.noise_std = noise_std
        self.num_groups, self.top_groups, self.group_score = num_groups, top_groups, group_score
        self.batch_prioritized = batch_prioritized

    def check_capacity_factor(self, capacity_factor: float | None) -> None:
        if self.batch_prioritized and capacity_factor is None:
            raise ValueError("batch_prioritized=True needs a capacity_factor (it orders capacity "
                             "slots); dropless routing drops nothing.")

    def __call__(self, x: Array, *, mask: Array, capacity: int | None, deterministic: bool,
                 rng: Array | None, state: Mapping[str, Array]) -> Routing:
        jitter_rng, noise_rng = split_rng(rng)
        logits = self.logits(x, deterministic=deterministic, rng=jitter_rng)
        noise_std = 0.0 if deterministic else self.noise_std
        if noise_std > 0 and noise_rng is None:
            raise ValueError("TopKRouter.noise_std > 0 in training needs an rng key")
        gating = routing.top_k_gating(
            logits, self.k, normalize=self.normalize, score=self.score,
            selection_bias=state.get(SELECTION_BIAS), route_scale=self.route_scale,
            noise_std=noise_std, rng=noise_rng, num_groups=self.num_groups,
            top_groups=self.top_groups, group_score=self.group_score)
        priority = jnp.max(gating.probs, axis=-1) if self.batch_prioritized else None
        return Routing(aux=token_choice_aux(logits, gating, mask, self.num_experts, self.score),
                       expert_index=gating.expert_index, weights=gating.weights * mask[:, None],
                       priority=priority)


def _check_groups(num_experts: int, k: int, num_groups: int | None,
                  top_groups: int | None) -> None:
    if num_groups is None:
        if top_groups is not None:
            raise ValueError("TopKRouter.top_groups needs TopKRouter.num_groups")
        return
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"TopKRouter.num_groups must divide num_experts={num_experts}, "
                         f"got {num_groups}")
    if top_groups is None or not 1 <= top_groups <= num_groups:
        raise ValueError(f"TopKRouter.top_groups must be in [1, num_groups={num_groups}], "
                         f"got {top_groups}")
    per_group = num_experts // num_groups
    if top_groups * per_group < k:
        raise ValueError(f"top_groups={top_groups} groups of {per_group} experts cannot hold "
                         f"k={k} choices")
