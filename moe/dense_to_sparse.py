"""EvoMoE dense-to-sparse (DTS) gating, its temperature schedules and its dispatch.

Nie et al., arXiv 2112.14397, as in the released fairseq code (docs/evomoe.md).
For router logits z `[T, E]` and a temperature tau:

  g = softmax((z + Gumbel) / tau)
  soft phase: active set A(t) = {i : g_ti > threshold}   (1..E experts per token)
  hard phase: A(t) = top-k of g_t (k = 1 in the paper)
  combine weights w_ti = 1[i in A(t)] * softmax(z)_ti   (or * g_ti with
    `gumbel_weights`), not renormalised
  aux loss = E * sum_i ce_i * me_i, ce_i = mean_t 1[i in A(t)], me_i = mean_t w_ti

Evaluation does not use this gate: it is deterministic top-k on softmax(z)
(`moe.routing.top_k_gating`) with a capacity, see `layers.routers.DenseToSparseRouter`.

Every active (token, expert) pair is one assignment of the dropless dispatch
(`dispatch_active_pairs`): inactive pairs point at a sentinel expert E that no
group holds, so the grouped matmuls never compute them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moe.experts import ExpertFFN
from moe.validation import check_one_of

Array = jax.Array

DEFAULT_THRESHOLD = 1e-3  # fairseq GUMBEL_THRESHOLD


class DenseToSparse(NamedTuple):
    """Result of DTS gating for one routing group.

    active: `[T, E] bool` the active set A(t) (padding tokens have none).
    weights: `[T, E] float32` combine weights, zero outside A(t).
    probs: `[T, E] float32` softmax(z), noise-free.
    gumbel_probs: `[T, E] float32` g = softmax((z + G) / tau).
    aux_loss: scalar E * sum_i ce_i * me_i.
    active_experts: scalar, mean |A(t)| over real tokens.
    counts: `[E] float32` active pairs per expert over real tokens (no gradient).
    """

    active: Array
    weights: Array
    probs: Array
    gumbel_probs: Array
    aux_loss: Array
    active_experts: Array
    counts: Array


class DtsState(NamedTuple):
    """The per-step inputs of the DTS gate, traced (changing them does not recompile).

    In the model they travel as the router-state keys `dts_temperature` and
    `dts_hard` (`moe.router_state`); `as_router_state` converts.

    temperature: scalar float32 tau of this optimizer step.
    hard: scalar bool, True in the hard (top-k) phase.
    """

    temperature: Array
    hard: Array

    def as_router_state(self) -> dict[str, Array]:
        """The shared router-state entries (`moe.router_state.RouterState.shared`)."""
        return {"dts_temperature": self.temperature, "dts_hard": self.hard}


def dense_to_sparse_gating(logits: Array, *, temperature: float | Array, threshold: float,
                           rng: Array, hard: bool | Array = False,
                           gumbel_weights: bool = False, k: int = 1,
                           mask: Array | None = None) -> DenseToSparse:
    """The DTS gate (EvoMoE), training path.

    Args:
      logits: `[T, E]` router logits; cast to float32.
      temperature: tau > 0 (Python number or traced scalar).
      threshold: theta of the soft phase, in [0, 1/E) so that every token keeps
        at least its best expert (max_i g_i >= 1/E).
      rng: PRNG key for the Gumbel noise.
      hard: hard phase (Python bool or traced scalar bool): the active set is
        the top-k of g instead of {g > theta}.
      gumbel_weights: combine weights mask * g instead of mask * softmax(z).
      k: experts per token in the hard phase (the paper uses 1).
      mask: optional `[T]`, 0 for padding tokens (no expert, excluded from
        every statistic).

    Returns:
      DenseToSparse (see its docstring).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [tokens, experts], got shape {logits.shape}")
    num_tokens, num_experts = logits.shape
    if not 0.0 <= threshold < 1.0 / num_experts:
        raise ValueError(f"threshold must be in [0, 1/num_experts={1.0 / num_experts:g}) so "
                         f"every token keeps an expert, got {threshold}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.astype(jnp.float32)
    real = (jnp.ones((num_tokens,), jnp.float32) if mask is None
            else mask.reshape(num_tokens).astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
    gumbel_probs = jax.nn.softmax((logits + noise) / jnp.asarray(temperature, jnp.float32),
                                  axis=-1)

    soft_active = gumbel_probs > threshold
    _, top = jax.lax.top_k(gumbel_probs, k)
    hard_active = jnp.any(jax.nn.one_hot(top, num_experts, dtype=jnp.bool_), axis=1)
    active = jnp.where(jnp.asarray(hard, jnp.bool_), hard_active, soft_active)
    active = jax.lax.stop_gradient(active & (real[:, None] > 0))

    weights = jnp.where(active, gumbel_probs if gumbel_weights else probs, 0.0)
    num_real = jnp.maximum(jnp.sum(real), 1.0)
    active_f = active.astype(jnp.float32)
    counts = jax.lax.stop_gradient(jnp.sum(active_f, axis=0))
    ce = counts / num_real
    me = jnp.sum(weights, axis=0) / num_real  # padding rows of weights are zero
    aux_loss = num_experts * jnp.sum(ce * me)
    return DenseToSparse(active=active, weights=weights, probs=probs,
                         gumbel_probs=gumbel_probs, aux_loss=aux_loss,
                         active_experts=jnp.sum(active_f) / num_real, counts=counts)


def active_pairs_as_assignments(active: Array, weights: Array) -> tuple[Array, Array]:
    """A variable number of experts per token in the `[T, k]` token-choice format.

    `active [T, E] bool`, `weights [T, E]` -> `expert_index [T, E] int32`
    (column e holds e if the pair is active, else the sentinel E, which no
    expert group holds) and `weights [T, E]` zeroed outside the active pairs.
    """
    num_experts = active.shape[-1]
    experts = jnp.arange(num_experts, dtype=jnp.int32)
    expert_index = jnp.where(active, experts[None, :], num_experts).astype(jnp.int32)
    return expert_index, jnp.where(active, weights, 0.0)


def dispatch_active_pairs(x: Array, active: Array, weights: Array, ffn: ExpertFFN,
                          dispatcher: Callable[..., Any]) -> Array:
    """y_t = sum over active e of weights[t, e] * Expert_e(x_t), dropless.

    Args:
      x: `[T, d]` tokens.
      active: `[T, E] bool` active pairs.
      weights: `[T, E]` combine weights.
      ffn: the stacked experts.
      dispatcher: a registered token-choice dispatcher (`moe.dispatch.get_dispatch`),
        called dropless (`capacity=None`). Sorting dispatchers put the sentinel
        rows after the last group, where the grouped matmuls do no work, so the
        expert FLOPs are those of the active pairs only.

    Returns:
      y `[T, d]`.
    """
    expert_index, pair_weights = active_pairs_as_assignments(active, weights)
    return dispatcher(x, expert_index, pair_weights, ffn, capacity=None).y


# ---------------------------------------------------------------------------------------------
# Temperature schedules: tau as a pure function of the optimizer step n (0-based).


def _check_schedule(max_temperature: float, min_temperature: float, decay_steps: int) -> None:
    if not 0 < min_temperature <= max_temperature:
        raise ValueError(f"temperatures must satisfy 0 < min_temperature <= max_temperature, "
                         f"got min_temperature={min_temperature}, "
                         f"max_temperature={max_temperature}")
    if decay_steps < 1:
        raise ValueError(f"decay_steps must be >= 1, got {decay_steps}")


def exponential_temperature(step: int | Array, *, max_temperature: float,
                            min_temperature: float, decay_steps: int) -> Array:
    """tau_n = max(tau_max * exp(ln(tau_min / tau_max) * n / D), tau_min); tau_min from n = D on."""
    _check_schedule(max_temperature, min_temperature, decay_steps)
    n = jnp.asarray(step, jnp.float32)
    tau = max_temperature * jnp.exp(math.log(min_temperature / max_temperature) * n / decay_steps)
    return jnp.where(n >= decay_steps, min_temperature, jnp.maximum(tau, min_temperature))


def linear_temperature(step: int | Array, *, max_temperature: float, min_temperature: float,
                       decay_steps: int) -> Array:
    """tau_n = max(tau_max - n (tau_max - tau_min) / D, tau_min)."""
    _check_schedule(max_temperature, min_temperature, decay_steps)
    n = jnp.asarray(step, jnp.float32)
    tau = max_temperature - n * (max_temperature - min_temperature) / decay_steps
    return jnp.where(n >= decay_steps, min_temperature, jnp.maximum(tau, min_temperature))


TEMPERATURE_SCHEDULES: dict[str, Callable[..., Array]] = {
    "exponential": exponential_temperature,
    "linear": linear_temperature,
}


def temperature_schedule(name: str, *, max_temperature: float, min_temperature: float,
                         decay_steps: int) -> Callable[[int | Array], Array]:
    """`step -> tau` for the schedule `name` in `TEMPERATURE_SCHEDULES` (validated now)."""
    check_one_of("temperature schedule", name, TEMPERATURE_SCHEDULES)
    _check_schedule(max_temperature, min_temperature, decay_steps)
    fn = TEMPERATURE_SCHEDULES[name]

    def schedule(step: int | Array) -> Array:
        return fn(step, max_temperature=max_temperature, min_temperature=min_temperature,
                  decay_steps=decay_steps)

    return schedule
