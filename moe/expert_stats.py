"""Routing statistics of one MoE layer over a data source, as sums that add up over batches.

`layer_stats` turns one call of a token-choice MoE layer (its input tokens,
router logits, unbiased router probabilities, selected experts and combine
weights, and the expert weights) into a `RoutingStats` of sums; `add` sums two
of them; the properties derive the means. Everything a surgery method
(`moe.expert_surgery`) or the routing analysis needs is here, so both read the
same numbers (docs/surgery.md, "Routing statistics").

Per layer, over the real (mask = 1) tokens, with E experts, T tokens, k choices:

  num_tokens        scalar    T_real
  counts            [E]       assignments per expert (the routing as trained:
                              selection biases applied, before any dropping)
  prob_sum          [E]       sum_t p_t,e  (unbiased router probabilities)
  gate_sum          [E]       sum of the combine weights g_t,e of the assignments
  coselect          [E, E]    tokens that selected both i and j (diagonal: counts)
  output_norm_sum   [E]       sum over assignments of ||E_e(x_t)||_2 (un-weighted output)
  gated_norm_sum    [E]       sum over assignments of g_t,e * ||E_e(x_t)||_2
  logit_sum         [E]       sum_t z_t,e (router logits)
  logit_gram        [E, E]    sum_t z_t z_t^T: cosines of the logit columns z_:,e
  routed_logit_sum  [E, E]    row e: sum of z_t over the tokens that selected e
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe.dispatch import get_dispatch
from moe.experts import ExpertFFN

Array = jax.Array

STAT_FIELDS = ("num_tokens", "counts", "prob_sum", "gate_sum", "coselect", "output_norm_sum",
               "gated_norm_sum", "logit_sum", "logit_gram", "routed_logit_sum")


class StatSums:
    """Host-side helpers of a frozen dataclass whose fields are all sums over a data
    source (`RoutingStats`, `moe.soft_stats.SoftRoutingStats`)."""

    def to_numpy(self):
        """float64 host copies (sums over many batches stay exact enough)."""
        return type(self)(**{f.name: np.asarray(jax.device_get(getattr(self, f.name)),
                                                np.float64)
                             for f in dataclasses.fields(self)})

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __add__(self, other):
        """Field-wise sum: the statistics of the two sources together."""
        return type(self)(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                             for f in dataclasses.fields(self)})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingStats(StatSums):
    """Sums over the real tokens of a data source (see the module docstring for shapes)."""

    num_tokens: Any
    counts: Any
    prob_sum: Any
    gate_sum: Any
    coselect: Any
    output_norm_sum: Any
    gated_norm_sum: Any
    logit_sum: Any
    logit_gram: Any
    routed_logit_sum: Any

    @property
    def num_experts(self) -> int:
        return int(np.shape(self.counts)[0])

    # -- derived quantities (host, numpy) ------------------------------------
    @property
    def load(self) -> np.ndarray:
        """`[E]` share of the assignments each expert got (sums to 1; zeros if none)."""
        c = np.asarray(self.counts, np.float64)
        return c / c.sum() if c.sum() > 0 else np.zeros_like(c)

    @property
    def mean_prob(self) -> np.ndarray:
        """`[E]` mean unbiased router probability P_e."""
        return np.asarray(self.prob_sum, np.float64) / max(float(self.num_tokens), 1.0)

    @property
    def mean_output_norm(self) -> np.ndarray:
        """`[E]` mean ||E_e(x)|| over the tokens routed to e (0 for an unused expert)."""
        c = np.asarray(self.counts, np.float64)
        return np.divide(np.asarray(self.output_norm_sum, np.float64), c,
                         out=np.zeros_like(c), where=c > 0)

    @property
    def reap(self) -> np.ndarray:
        """`[E]` mean over the tokens routed to e of g_t,e * ||E_e(x_t)|| (REAP score)."""
        c = np.asarray(self.counts, np.float64)
        return np.divide(np.asarray(self.gated_norm_sum, np.float64), c,
                         out=np.zeros_like(c), where=c > 0)

    @property
    def mean_routed_logits(self) -> np.ndarray:
        """`[E, E]` row e: the mean router-logit vector of the tokens that selected e."""
        c = np.asarray(self.counts, np.float64)[:, None]
        return np.divide(np.asarray(self.routed_logit_sum, np.float64), c,
                         out=np.zeros(np.shape(self.routed_logit_sum)), where=c > 0)

    @property
    def logit_cosine(self) -> np.ndarray:
        """`[E, E]` cos(z_:,i, z_:,j) of the router-logit columns over the tokens."""
        gram = np.asarray(self.logit_gram, np.float64)
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        denom = np.outer(norms, norms)
        return np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)


def zeros(num_experts: int) -> RoutingStats:
    e = num_experts
    return RoutingStats(num_tokens=np.zeros(()), counts=np.zeros(e), prob_sum=np.zeros(e),
                        gate_sum=np.zeros(e), coselect=np.zeros((e, e)),
                        output_norm_sum=np.zeros(e), gated_norm_sum=np.zeros(e),
                        logit_sum=np.zeros(e), logit_gram=np.zeros((e, e)),
                        routed_logit_sum=np.zeros((e, e)))


def add(a: RoutingStats, b: RoutingStats) -> RoutingStats:
    return a + b


def expert_output_norms(tokens: Array, expert_index: Array, ffn: ExpertFFN) -> Array:
    """`[T, k]` ||E_{expert_index[t, j]}(x_t)||_2 (float32), 0 for the sentinel E.

    tokens `[T, d]`, expert_index `[T, k] int32`. One dropless sorted dispatch
    per choice column with weight 1, so every selected pair is computed once.
    """
    dispatch = get_dispatch("sort")
    norms = []
    for j in range(expert_index.shape[1]):
        column = expert_index[:, j:j + 1]
        valid = (column < ffn.num_experts).astype(jnp.float32)
        y = dispatch(tokens, column, valid, ffn, capacity=None).y
        norms.append(jnp.linalg.norm(y.astype(jnp.float32), axis=-1) * valid[:, 0])
    return jnp.stack(norms, axis=1)


def layer_stats(tokens: Array, mask: Array, logits: Array, probs: Array, expert_index: Array,
                weights: Array, ffn: ExpertFFN | None, *,
                norms: Array | None = None) -> RoutingStats:
    """The sums of one routing group (see the module docstring).

    tokens `[T, d]` (the MoE layer's input), mask `[T]` (1 = real), logits and
    probs `[T, E] float32`, expert_index `[T, k] int32` (sentinel E = none),
    weights `[T, k] float32` combine weights, ffn: the layer's experts; or
    norms `[T, k]`: the selected experts' output norms, computed by a MoE block whose
    experts are not an `ExpertFFN` (e.g. `layers.mola.MolaFFN`), ffn then None.
    """
    num_experts = logits.shape[-1]
    m = mask.astype(jnp.float32)
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32) * m[:, None, None]
    selected = jnp.minimum(jnp.sum(onehot, axis=1), 1.0)  # [T, E]
    if norms is None:
        norms = expert_output_norms(tokens, expert_index, ffn)  # [T, k]
    z = logits.astype(jnp.float32) * m[:, None]
    return RoutingStats(
        num_tokens=jnp.sum(m),
        counts=jnp.sum(onehot, axis=(0, 1)),
        prob_sum=jnp.sum(probs.astype(jnp.float32) * m[:, None], axis=0),
        gate_sum=jnp.einsum("tke,tk->e", onehot, weights.astype(jnp.float32)),
        coselect=selected.T @ selected,
        output_norm_sum=jnp.einsum("tke,tk->e", onehot, norms),
        gated_norm_sum=jnp.einsum("tke,tk->e", onehot, norms * weights.astype(jnp.float32)),
        logit_sum=jnp.sum(z, axis=0),
        logit_gram=z.T @ z,
        routed_logit_sum=selected.T @ z,
    )
