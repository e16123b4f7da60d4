"""Routing statistics of a Soft MoE layer (`layers.soft_moe`), as sums that add up over batches.

Soft MoE has no per-token expert choices: every slot is a softmax-weighted average
of the tokens of its sequence (dispatch D, softmax over the tokens per slot) and
every token's output a softmax-weighted average of the slot outputs (combine C,
softmax over the slots per token). Expert e owns the slots (e, 0..p-1). The
statistics that carry over from hard routing are *soft* (docs/conditional_compute.md,
"Routing statistics of Soft MoE"):

  num_tokens                scalar  T_real (mask = 1)
  combine_mass              [E]     sum_t sum_j C[t, (e, j)]: the soft load; each real
                                    token spreads a mass of 1 over the experts, so
                                    combine_mass / num_tokens sums to 1 (a hard top-1
                                    router's counts / T would be its hard analogue)
  combine_eff_slots_sum     scalar  sum_t exp(H(C[t, :])): effective number of slots a
                                    token reads from (1 = one slot, n p = uniform)
  num_slots                 [E]     (sequence, slot of e) pairs whose sequence has a
                                    real token (an all-padding sequence has empty slots)
  dispatch_eff_tokens_sum   [E]     sum over those of exp(H(D[:, s])): the effective
                                    number of tokens mixed into a slot (1 = one token,
                                    m = a uniform average of the m real tokens)
  dispatch_seq_tokens_sum   [E]     sum over those of m, the sequence's real tokens
  dispatch_max_sum          [E]     sum over those of max_t D[t, s] (the top token's share)

H is the natural-log entropy (`jax.scipy.special.entr`). Per domain (the other
domains' tokens as padding), `combine_mass` gives the soft domain x expert matrix
from which I(domain; expert) is computed as for hard counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr

from moe.expert_stats import StatSums

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftRoutingStats(StatSums):
    """Sums over the real tokens / non-empty slots of a data source (module docstring)."""

    num_tokens: Any
    combine_mass: Any
    combine_eff_slots_sum: Any
    num_slots: Any
    dispatch_eff_tokens_sum: Any
    dispatch_seq_tokens_sum: Any
    dispatch_max_sum: Any

    @property
    def num_experts(self) -> int:
        return int(np.shape(self.combine_mass)[0])

    # -- derived quantities (host, numpy) ------------------------------------
    def _per_slot(self, total: Any) -> np.ndarray:
        slots = np.asarray(self.num_slots, np.float64)
        return np.divide(np.asarray(total, np.float64), slots, out=np.zeros_like(slots),
                         where=slots > 0)

    @property
    def soft_load(self) -> np.ndarray:
        """`[E]` share of the combine-weight mass each expert's slots got (sums to 1)."""
        mass = np.asarray(self.combine_mass, np.float64)
        return mass / mass.sum() if mass.sum() > 0 else np.zeros_like(mass)

    @property
    def effective_tokens_per_slot(self) -> np.ndarray:
        """`[E]` mean exp(entropy) of the dispatch weights of e's slots."""
        return self._per_slot(self.dispatch_eff_tokens_sum)

    @property
    def effective_token_fraction(self) -> np.ndarray:
        """`[E]` effective tokens per slot over the real tokens of its sequence (pooled):
        1 = every slot averages its sequence uniformly, 1/m = one token per slot."""
        seq = np.asarray(self.dispatch_seq_tokens_sum, np.float64)
        return np.divide(np.asarray(self.dispatch_eff_tokens_sum, np.float64), seq,
                         out=np.zeros_like(seq), where=seq > 0)

    @property
    def top_dispatch_weight(self) -> np.ndarray:
        """`[E]` mean over e's slots of the largest dispatch weight."""
        return self._per_slot(self.dispatch_max_sum)

    @property
    def combine_effective_slots(self) -> float:
        """Mean over the real tokens of exp(entropy of the combine weights)."""
        return float(self.combine_eff_slots_sum) / max(float(self.num_tokens), 1.0)


def add(a: SoftRoutingStats, b: SoftRoutingStats) -> SoftRoutingStats:
    return a + b


def soft_layer_stats(dispatch: Array, combine: Array, mask: Array,
                     slots_per_expert: int) -> SoftRoutingStats:
    """The sums of one call: dispatch and combine `[B, m, n * p] float32` (as
    `layers.soft_moe.soft_weights` returns them, slot s = (e, j) at e * p + j),
    mask `[B, m]` (1 = real token)."""
    batch, _, num_slots = combine.shape
    p = slots_per_expert
    n = num_slots // p
    m = mask.astype(jnp.float32)
    per_expert = lambda v: v.reshape(*v.shape[:-1], n, p).sum(-1)  # [..., n*p] -> [..., n]
    combine_entropy = jnp.sum(entr(combine), axis=-1)  # [B, m]
    seq_tokens = jnp.sum(m, axis=1)  # [B]
    live = (seq_tokens > 0).astype(jnp.float32)[:, None] * jnp.ones((batch, num_slots))
    dispatch_entropy = jnp.sum(entr(dispatch), axis=1)  # [B, n*p]
    return SoftRoutingStats(
        num_tokens=jnp.sum(m),
        combine_mass=jnp.sum(per_expert(combine * m[:, :, None]), axis=(0, 1)),
        combine_eff_slots_sum=jnp.sum(jnp.exp(combine_entropy) * m),
        num_slots=jnp.sum(per_expert(live), axis=0),
        dispatch_eff_tokens_sum=jnp.sum(per_expert(jnp.exp(dispatch_entropy) * live), axis=0),
        dispatch_seq_tokens_sum=jnp.sum(per_expert(live * seq_tokens[:, None]), axis=0),
        dispatch_max_sum=jnp.sum(per_expert(jnp.max(dispatch, axis=1) * live), axis=0),
    )
