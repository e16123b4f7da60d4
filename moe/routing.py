"""Routing: turn router logits into expert assignments and combine weights.

Pure functions over one routing group of T tokens and E experts. The router
itself (the projection x -> logits, jitter) lives in `layers.routers`; this
module starts from the logits. Every computation here runs in float32.

Conventions (see docs/architecture.md):
  * Token choice returns `expert_index [T, k]` and `weights [T, k]`, before any
    capacity dropping; dropping happens in `moe.dispatch`.
  * `probs [T, E]` are always the *unbiased* scores (softmax or sigmoid of the
    raw logits). The auxiliary losses use them; `selection_bias` never touches
    them nor the combine weights.
  * Ties break towards the lower expert index (`jax.lax.top_k`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe.numeric import ceil_div_float
from moe.validation import check_one_of

Array = jax.Array

SCORE_FUNCTIONS = ("softmax", "sigmoid")


class TokenChoice(NamedTuple):
    """Result of token-choice routing for one group.

    expert_index: `[T, k] int32` selected experts, distinct per token.
    weights: `[T, k] float32` combine weights (before dropping).
    probs: `[T, E] float32` unbiased scores, for the auxiliary losses.
    """

    expert_index: Array
    weights: Array
    probs: Array


class ExpertChoice(NamedTuple):
    """Result of expert-choice routing for one group.

    token_index: `[E, C] int32` tokens picked by each expert, best first.
    weights: `[E, C] float32` combine weights = probs at the picked pairs.
    probs: `[T, E] float32` softmax over experts.
    """

    token_index: Array
    weights: Array
    probs: Array


def _check_score(score: str) -> None:
    check_one_of("score", score, SCORE_FUNCTIONS)


def score_probs(logits: Array, score: str = "softmax") -> Array:
    """Unbiased router scores. `[T, E] float32` -> `[T, E] float32`."""
    _check_score(score)
    logits = logits.astype(jnp.float32)
    if score == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    return jax.nn.sigmoid(logits)


def top_k_gating(
    logits: Array,
    k: int,
    *,
    normalize: bool = False,
    score: str = "softmax",
    selection_bias: Array | None = None,
    route_scale: float = 1.0,
    noise_std: float = 0.0,
    rng: Array | None = None,
    num_groups: int | None = None,
    top_groups: int | None = None,
    group_score: str = "top2_sum",
) -> TokenChoice:
    """Token-choice top-k routing (Switch, GShard, Mixtral, DeepSeek-V3).

    Args:
      logits: `[T, E]` router logits; cast to float32.
      k: experts per token, 1 <= k <= E.
      normalize: renormalise the k selected scores to sum to 1 (variant B for
        softmax, variant C for sigmoid). False keeps raw probabilities
        (variant A: Switch, OLMoE).
      score: "softmax" or "sigmoid".
      selection_bias: optional `[E]` bias added to the scores for *selection
        only* (auxiliary-loss-free balancing); weights use unbiased scores.
      route_scale: multiplies the final weights (DeepSeek-V3 uses 2.5).
      noise_std: std of additive Gaussian noise on the logits used for
        selection (training only; needs `rng`). Weights stay noise-free.
      rng: PRNG key for the noise.
      num_groups, top_groups: group-limited routing: experts are split into
        `num_groups` equal groups and selection is restricted to the
        `top_groups` best groups, a group scoring (`group_score`) "top2_sum":
        the sum of its two best (biased) selection scores (DeepSeek-V3), or
        "max": its best one (DeepSeek-V2's group_limited_greedy).

    Returns:
      TokenChoice(expert_index `[T, k] int32`, weights `[T, k] float32`,
      probs `[T, E] float32`).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {logits.shape}")
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if noise_std > 0 and rng is None:
        raise ValueError("noise_std > 0 needs an rng key")
    logits = logits.astype(jnp.float32)
    probs = score_probs(logits, score)

    selection_logits = logits
    if noise_std > 0:
        selection_logits = logits + noise_std * jax.random.normal(rng, logits.shape, jnp.float32)
    selection = score_probs(selection_logits, score) if noise_std > 0 else probs
    if selection_bias is not None:
        if selection_bias.shape != (num_experts,):
            raise ValueError(
                f"selection_bias must have shape [num_experts]=({num_experts},), "
                f"got {selection_bias.shape}")
        selection = selection + jax.lax.stop_gradient(selection_bias.astype(jnp.float32))
    if num_groups is not None:
        selection = _limit_to_top_groups(selection, num_groups, top_groups, k, group_score)

    _, expert_index = jax.lax.top_k(selection, k)
    weights = jnp.take_along_axis(probs, expert_index, axis=-1)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights * route_scale
    return TokenChoice(expert_index.astype(jnp.int32), weights, probs)


GROUP_SCORES = ("top2_sum", "max")


def _limit_to_top_groups(selection: Array, num_groups: int, top_groups: int | None,
                         k: int, group_score: str = "top2_sum") -> Array:
    """Masks the selection scores of experts outside the best groups to -inf."""
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    num_tokens, num_experts = selection.shape
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(
            f"num_groups must divide num_experts={num_experts}, got {num_groups}")
    if top_groups is None or not 1 <= top_groups <= num_groups:
        raise ValueError(f"top_groups must be in [1, num_groups={num_groups}], got {top_groups}")
    per_group = num_experts // num_groups
    if top_groups * per_group < k:
        raise ValueError(
            f"top_groups={top_groups} groups of {per_group} experts cannot hold k={k} choices")
    grouped = selection.reshape(num_tokens, num_groups, per_group)
    if group_score == "max":
        scores = jnp.max(grouped, axis=-1)
    else:
        scores = jnp.sum(jax.lax.top_k(grouped, min(2, per_group))[0], axis=-1)
    _, keep_groups = jax.lax.top_k(scores, top_groups)
    group_mask = jnp.zeros((num_tokens, num_groups), bool).at[
        jnp.arange(num_tokens)[:, None], keep_groups].set(True)
    expert_mask = jnp.repeat(group_mask, per_group, axis=-1)
    return jnp.where(expert_mask, selection, -jnp.inf)


def expert_choice_gating(logits: Array, capacity: int) -> ExpertChoice:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    Uses every token of the group to decide, so it leaks future tokens in a
    causal decoder; `layers.routers.ExpertChoiceRouter` refuses it there.

    Args:
      logits: `[T, E]` router logits.
      capacity: tokens per expert C, 1 <= C <= T.

    Returns:
      ExpertChoice(token_index `[E, C] int32`, weights `[E, C] float32`,
      probs `[T, E] float32`).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {logits.shape}")
    num_tokens = logits.shape[0]
    if not 1 <= capacity <= num_tokens:
        raise ValueError(f"capacity must be in [1, num_tokens={num_tokens}], got {capacity}")
    probs = score_probs(logits, "softmax")
    weights, token_index = jax.lax.top_k(probs.T, capacity)
    return ExpertChoice(token_index.astype(jnp.int32), weights, probs)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Expert-choice capacity c = ceil(T * cf / E), clipped to [1, T]."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return int(min(num_tokens, max(1, ceil_div_float(num_tokens * capacity_factor, num_experts))))

