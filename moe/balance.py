"""Auxiliary losses and routing statistics.

All functions are pure, float32, and take an optional `mask [T]` (1 = real
token, 0 = padding) that removes padding from every statistic.

Load-balancing convention (Megatron/Switch): f_i is the fraction of the k*T
assignments that chose expert i, counted *before* capacity dropping, so
LBL = E * sum_i f_i * P_i equals 1.0 at perfect balance and about E under
total collapse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _token_mask(num_tokens: int, mask: Array | None) -> Array:
    if mask is None:
        return jnp.ones((num_tokens,), jnp.float32)
    if mask.shape != (num_tokens,):
        raise ValueError(f"mask must have shape [tokens]=({num_tokens},), got {mask.shape}")
    return mask.astype(jnp.float32)


def expert_counts(expert_index: Array, num_experts: int, *, mask: Array | None = None) -> Array:
    """Assignments per expert before dropping, padding excluded.

    Args:
      expert_index: `[T, k] int32`.
      num_experts: E.
      mask: optional `[T]`, 0 for padding tokens.

    Returns:
      `[E] float32` counts, summing to k * (number of real tokens). No gradient.
    """
    token_mask = _token_mask(expert_index.shape[0], mask)
    one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [T, k, E]
    counts = jnp.einsum("tke,t->e", one_hot, token_mask)
    return jax.lax.stop_gradient(counts)


def mean_probs(probs: Array, *, mask: Array | None = None) -> Array:
    """P_i: mean router probability per expert over real tokens. `[T, E]` -> `[E]`."""
    token_mask = _token_mask(probs.shape[0], mask)
    denom = jnp.maximum(jnp.sum(token_mask), 1.0)
    return jnp.einsum("te,t->e", probs.astype(jnp.float32), token_mask) / denom


def load_balancing_loss(probs: Array, counts: Array, *, mask: Array | None = None) -> Array:
    """Switch load-balancing loss E * sum_i f_i * P_i; 1.0 at perfect balance.

    Args:
      probs: `[T, E] float32` unbiased router probabilities (differentiable).
      counts: `[E]` assignment counts, e.g. from `expert_counts`, or global
        counts summed over micro-batches and devices. Treated as constants.
      mask: optional `[T]` padding mask for `probs`.

    Returns:
      scalar float32.
    """
    num_experts = probs.shape[-1]
    if counts.shape != (num_experts,):
        raise ValueError(f"counts must have shape [experts]=({num_experts},), got {counts.shape}")
    counts = jax.lax.stop_gradient(counts.astype(jnp.float32))
    fraction = counts / jnp.maximum(jnp.sum(counts), 1e-9)
    return num_experts * jnp.sum(fraction * mean_probs(probs, mask=mask))


def router_z_loss(logits: Array, *, mask: Array | None = None) -> Array:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2. `[T, E]` -> scalar."""
    token_mask = _token_mask(logits.shape[0], mask)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(token_mask * lse**2) / jnp.maximum(jnp.sum(token_mask), 1.0)


def max_violation(counts: Array) -> Array:
    """MaxVio = (max_i load_i - mean load) / mean load. `[E]` -> scalar; 0 when balanced."""
    counts = counts.astype(jnp.float32)
    mean = jnp.mean(counts)
    return (jnp.max(counts) - mean) / jnp.maximum(mean, 1e-9)


def router_entropy(probs: Array, *, mask: Array | None = None) -> Array:
    """Mean per-token entropy (nats) of the router distribution. `[T, E]` -> scalar.

    For sigmoid scores the per-token scores are first normalised to sum to 1.
    """
    token_mask = _token_mask(probs.shape[0], mask)
    p = probs.astype(jnp.float32)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-9)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=-1)
    return jnp.sum(entropy * token_mask) / jnp.maximum(jnp.sum(token_mask), 1.0)


def dropped_fraction(keep: Array, *, mask: Array | None = None,
                     valid: Array | None = None) -> Array:
    """Fraction of (token, choice) assignments dropped by capacity. `[T, k] bool` -> scalar.

    `valid [T, k] bool` marks the pairs that are assignments at all (routers
    with a variable number of experts per token fill the rest with a sentinel).
    """
    token_mask = _token_mask(keep.shape[0], mask)
    if valid is None:
        dropped = jnp.sum((1.0 - keep.astype(jnp.float32)) * token_mask[:, None])
        return dropped / jnp.maximum(jnp.sum(token_mask) * keep.shape[1], 1.0)
    pairs = valid.astype(jnp.float32) * token_mask[:, None]
    dropped = jnp.sum((1.0 - keep.astype(jnp.float32)) * pairs)
    return dropped / jnp.maximum(jnp.sum(pairs), 1.0)

