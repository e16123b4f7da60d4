"""Auxiliary-loss-free load balancing: per-expert selection biases and their updates.

Wang et al. 2024 (arXiv 2408.15664) and DeepSeek-V3 add a bias b_i to the
router scores for expert *selection only* (`moe.routing.top_k_gating(...,
selection_bias=b)`); combine weights and auxiliary losses keep the unbiased
scores. After every optimizer step, b moves against the step's load: counts
`c [E]` summed over every micro-batch and every data-parallel device.

Update rules (`UPDATE_RULES`), with c_bar = mean_i c_i:

  sign              b_i += u * sign(c_bar - c_i)         (DeepSeek, Megatron)
  proportional      b_i += u * (c_bar - c_i) / c_bar     (relative load error)
  dual_subgradient  b_i += u_n * (c_bar - c_i) / N        (N = real tokens: the
                    subgradient of the dual of the balanced-assignment LP with
                    per-token constraints, Han & Zhong 2025; b = -lambda; use it
                    with a decaying step, `schedule='inverse'`)

and optionally re-centring, b <- b - mean(b), so that sum_i b_i stays 0
(torchtitan re-centres the update). Rate schedules (`SCHEDULES`) give u_n for
update n; `freeze_fraction` sets the rate to 0 from that fraction of the run
on (DeepSeek-V3 froze the bias for its last 500B tokens).

The bias is not a parameter: no gradient (top_k_gating stop-gradients it), no
weight decay, no optimizer state, always float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe.validation import check_one_of

Array = jax.Array


def _sign_rule(counts: Array, num_tokens: Array) -> Array:
    del num_tokens
    return jnp.sign(jnp.mean(counts) - counts)


def _proportional_rule(counts: Array, num_tokens: Array) -> Array:
    del num_tokens
    mean = jnp.mean(counts)
    return (mean - counts) / jnp.maximum(mean, 1e-9)


def _dual_subgradient_rule(counts: Array, num_tokens: Array) -> Array:
    return (jnp.mean(counts) - counts) / jnp.maximum(num_tokens, 1.0)


# name -> direction(counts [E], real tokens N) -> [E]; the update is rate * direction.
UPDATE_RULES: dict[str, Callable[[Array, Array], Array]] = {
    "sign": _sign_rule,
    "proportional": _proportional_rule,
    "dual_subgradient": _dual_subgradient_rule,
}


def _constant(n: Array, decay_steps: float) -> Array:
    del decay_steps
    return jnp.ones_like(n, jnp.float32)


def _inverse(n: Array, decay_steps: float) -> Array:
    return 1.0 / (1.0 + n.astype(jnp.float32) / decay_steps)


def _inverse_sqrt(n: Array, decay_steps: float) -> Array:
    return jax.lax.rsqrt(1.0 + n.astype(jnp.float32) / decay_steps)


# name -> factor(update index n, decay_steps) applied to the base rate u.
SCHEDULES: dict[str, Callable[[Array, float], Array]] = {
    "constant": _constant,
    "inverse": _inverse,            # u / (1 + n / decay_steps)
    "inverse_sqrt": _inverse_sqrt,  # u / sqrt(1 + n / decay_steps)
}


@dataclasses.dataclass(frozen=True)
class BiasUpdate:
    """One configuration of the bias update (validated at construction).

    Attributes:
      rule: a key of `UPDATE_RULES`.
      rate: u, the base update rate (> 0).
      schedule: a key of `SCHEDULES`.
      decay_steps: tau of the decaying schedules (> 0).
      freeze_fraction: the rate is 0 from update `freeze_fraction * num_steps`
        on; 1.0 never freezes.
      recenter: subtract the mean of b after every update.
    """

    rule: str = "sign"
    rate: float = 1e-3
    schedule: str = "constant"
    decay_steps: float = 100.0
    freeze_fraction: float = 1.0
    recenter: bool = False

    def __post_init__(self):
        check_one_of("bias update rule", self.rule, UPDATE_RULES)
        check_one_of("bias rate schedule", self.schedule, SCHEDULES)
        if not self.rate > 0:
            raise ValueError(f"bias update rate must be > 0, got {self.rate}")
        if not self.decay_steps > 0:
            raise ValueError(f"bias decay_steps must be > 0, got {self.decay_steps}")
        if not 0.0 <= self.freeze_fraction <= 1.0:
            raise ValueError(f"bias freeze_fraction must be in [0, 1], got {self.freeze_fraction}")

    def rate_at(self, update_index: Array, num_steps: int) -> Array:
        """u_n for update `update_index` (0-based) of a run of `num_steps` updates."""
        n = jnp.asarray(update_index)
        rate = self.rate * SCHEDULES[self.schedule](n, self.decay_steps)
        if self.freeze_fraction < 1.0:
            rate = jnp.where(n < self.freeze_fraction * num_steps, rate, 0.0)
        return rate.astype(jnp.float32)


def update_bias(bias: Array, counts: Array, rate: Array | float, *, rule: str = "sign",
                recenter: bool = False, num_tokens: Array | float | None = None) -> Array:
    """One bias update from one step's global load.

    Args:
      bias: `[E] float32` current selection bias.
      counts: `[E]` assignments per expert over the whole optimizer step (all
        micro-batches and devices), before dropping, padding excluded.
      rate: this update's rate u_n.
      rule: a key of `UPDATE_RULES`.
      recenter: subtract the mean of the new bias.
      num_tokens: real tokens of the step (for `dual_subgradient`); default
        sum(counts), i.e. assignments (k * tokens).

    Returns:
      `[E] float32` new bias.
    """
    check_one_of("rule", rule, UPDATE_RULES)
    if bias.shape != counts.shape or bias.ndim != 1:
        raise ValueError(f"bias and counts must both be [experts], got {bias.shape} and "
                         f"{counts.shape}")
    counts = jax.lax.stop_gradient(counts.astype(jnp.float32))
    tokens = jnp.sum(counts) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    new = bias.astype(jnp.float32) + jnp.asarray(rate, jnp.float32) * UPDATE_RULES[rule](
        counts, tokens)
    if recenter:
        new = new - jnp.mean(new)
    return jax.lax.stop_gradient(new)

