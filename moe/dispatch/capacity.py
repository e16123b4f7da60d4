"""Expert capacity and buffer-slot assignment (who is kept, who is dropped)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.numeric import safe_ceil

Array = jax.Array


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, *,
                    min_capacity: int = 1, multiple_of: int = 1) -> int:
    """Slots per expert: ceil(k * T * cf / E), then at least `min_capacity`,
    then rounded up to a multiple of `multiple_of`. A Python int (static)."""
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if num_experts < 1 or k < 1 or num_tokens < 1:
        raise ValueError(
            f"num_tokens, num_experts and k must be >= 1, got {num_tokens}, {num_experts}, {k}")
    if min_capacity < 1 or multiple_of < 1:
        raise ValueError(
            f"min_capacity and multiple_of must be >= 1, got {min_capacity}, {multiple_of}")
    capacity = safe_ceil(k * num_tokens * capacity_factor / num_experts)
    capacity = max(capacity, min_capacity)
    return -(-capacity // multiple_of) * multiple_of


def rank_within_expert(flat_expert: Array, num_experts: int) -> Array:
    """Position of each assignment among those of its expert, in array order.

    `[A] int32` -> `[A] int32`: the i-th assignment to expert e gets rank i.
    A stable sort keeps the array order inside each expert.
    """
    order = jnp.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    counts = jnp.bincount(flat_expert, length=num_experts)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(flat_expert.shape[0], dtype=jnp.int32) - starts[sorted_expert]
    return jnp.zeros_like(flat_expert).at[order].set(rank_sorted.astype(flat_expert.dtype))


def assign_slots(expert_index: Array, num_experts: int, capacity: int, *,
                 priority: Array | None = None,
                 mask: Array | None = None) -> tuple[Array, Array]:
    """Buffer slot of every (token, choice) and whether it fits under the capacity.

    Order is choice-major: every token's first choice is placed before any
    second choice; within a choice rank, earlier tokens come first. With
    `priority [T]`, higher-priority tokens come first instead (batch-prioritized
    routing; it looks at every token of the group, so encoders only).

    Args:
      expert_index: `[T, k] int32`.
      num_experts: E.
      capacity: slots per expert C.
      priority: optional `[T] float`.
      mask: optional `[T]`; tokens with mask 0 (padding) take no slot and are
        never kept.

    Returns:
      slot `[T, k] int32` (position in its expert's buffer, may be >= C) and
      keep `[T, k] bool` (slot < C).
    """
    num_tokens, k = expert_index.shape
    expert_index = expert_index.astype(jnp.int32)
    if mask is not None:
        if mask.shape != (num_tokens,):
            raise ValueError(f"mask must have shape [tokens]=({num_tokens},), got {mask.shape}")
        # Padding goes to a sentinel expert E, so it never competes for slots.
        valid = mask.astype(bool)[:, None]
        slot, keep = assign_slots(jnp.where(valid, expert_index, num_experts), num_experts + 1,
                                  capacity, priority=priority)
        return slot, keep & valid
    if priority is not None:
        if priority.shape != (num_tokens,):
            raise ValueError(f"priority must have shape [tokens]=({num_tokens},), "
                             f"got {priority.shape}")
        token_order = jnp.argsort(-priority, stable=True)
        slot, keep = assign_slots(expert_index[token_order], num_experts, capacity)
        inverse = jnp.zeros_like(token_order).at[token_order].set(
            jnp.arange(num_tokens, dtype=token_order.dtype))
        return slot[inverse], keep[inverse]
    choice_major = expert_index.T.reshape(-1)  # [k * T]: all first choices, then seconds...
    slot = rank_within_expert(choice_major, num_experts).reshape(k, num_tokens).T
    return slot, slot < capacity
