"""Scoped load-balancing losses inside the training step (see docs/balancing.md).

`StepBalance` turns `LossWeights.lbl_scope` into per-token balance groups for
one optimizer step and computes, per micro-batch and MoE layer, its share of
the scoped LBL (`moe.balance_scope.scoped_lbl_share`) and of the DeepSeek-V3
sequence-wise balance loss. The shares of all micro-batches add up to the
loss over the whole step, so the loss is 1.0 at balance whatever the number
of micro-batches or devices.

Where the counts of a group come from (`count_source`):
  local   every group lies inside one micro-batch: the micro-batch's own
          forward pass has all its counts;
  exact   a group spans micro-batches: a first forward-only pass over every
          micro-batch collects the counts of the whole step (the later layers'
          routers need the earlier layers, so this is a forward up to the last
          router, not a router-only pass), then the gradient pass uses them;
  causal  Megatron's running buffer: micro-batch m uses the counts of
          micro-batches 1..m (exact only for the last one); no extra pass.

MoE layers whose `MoeAux` has no per-token routing (`token_probs`; e.g. expert
choice, the EvoMoE dense-to-sparse gate) keep their own `lbl` (0 when the
router sets none), averaged over micro-batches; with any scope but
'micro_batch' a warning names them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from moe import balance_scope as bs
from moe.layer_aux import MoeAux, StackedLayerAux
from moe.validation import check_one_of

_log = logging.getLogger(__name__)

GLOBAL_MODES = ("exact", "causal")

Aux = Mapping[str, MoeAux]
# Per aux group (`StackedLayerAux.groups`): `[R, G, E]` counts, None without token routing.
GroupCounts = tuple[jax.Array | None, ...]


@dataclasses.dataclass(frozen=True)
class StepGroups:
    """Balance groups of one step: per-token ids (split into micro-batches with the
    batch) and per-group real-token totals over the whole step."""

    lbl_group: jax.Array    # [B, S] int32
    num_groups: int
    lbl_tokens: jax.Array   # [G]
    row_group: jax.Array    # [B, S] int32, the row index (sequence scope)
    row_tokens: jax.Array   # [B]
    count_source: str       # 'local' | 'exact' | 'causal'


@dataclasses.dataclass(frozen=True)
class StepBalance:
    """The balance configuration of a training step.

    Attributes:
      lbl_scope: a `moe.balance_scope` scope string.
      global_mode: 'exact' or 'causal', for scopes whose groups span micro-batches.
      num_microbatches: A.
      data_parallel_size: D, devices the batch is split over (for `micro_batch`).
    """

    lbl_scope: str = "micro_batch"
    global_mode: str = "exact"
    num_microbatches: int = 1
    data_parallel_size: int = 1

    def __post_init__(self):
        bs.parse_lbl_scope(self.lbl_scope)
        check_one_of("lbl_global_mode", self.global_mode, GLOBAL_MODES)
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")

    @property
    def scope(self) -> bs.BalanceScope:
        return bs.parse_lbl_scope(self.lbl_scope)

    def layout(self, batch_size: int, seq_len: int) -> bs.BatchLayout:
        return bs.BatchLayout(batch_size, seq_len, self.num_microbatches,
                              self.data_parallel_size)

    def groups(self, segment_ids: jax.Array, rng: jax.Array) -> StepGroups:
        """Groups of the global batch `segment_ids [B, S]`; `rng` draws shuffled groups."""
        batch_size, seq_len = segment_ids.shape
        layout = self.layout(batch_size, seq_len)
        group, num_groups = bs.group_ids(self.scope, layout, rng)
        mask = segment_ids > 0
        rows = jnp.broadcast_to(jnp.arange(batch_size, dtype=jnp.int32)[:, None],
                                (batch_size, seq_len))
        source = (self.global_mode if bs.needs_step_counts(self.scope, layout) else "local")
        return StepGroups(group, num_groups, bs.group_tokens(mask, group, num_groups), rows,
                          bs.group_tokens(mask, rows, batch_size), source)

    @staticmethod
    def layer_counts(aux: Aux, group: jax.Array, num_groups: int) -> GroupCounts:
        """Per aux group (`StackedLayerAux.of(aux).groups`): `[R, G, E]` assignments
        per balance group of one micro-batch's tokens for its R layers (None for a
        group without per-token routing)."""
        def counts(a: MoeAux) -> jax.Array | None:
            if not a.has_token_routing():
                return None
            return per_layer(lambda experts, mask: bs.group_counts(
                experts, mask, group, num_groups, a.token_probs.shape[-1]),
                a.token_experts, a.token_mask)
        return tuple(counts(a) for _, a in StackedLayerAux.of(aux).groups)

    def terms(self, aux: Aux, lbl_group: jax.Array, row_group: jax.Array, groups: StepGroups,
              prior: GroupCounts | None, add_own: bool,
              ) -> tuple[tuple[dict[str, jax.Array], ...], GroupCounts]:
        """One micro-batch's shares of the balance losses, per aux group
        (`StackedLayerAux.of(aux).groups`, R layers each), vectorised over the R
        stacked layers of a group.

        Args:
          aux: the model's per-layer aux of this micro-batch.
          lbl_group, row_group: `[b, S]` the micro-batch's slice of the group ids.
          groups: the step's groups.
          prior: per aux group `[R, G, E]` counts known before this micro-batch
            (the first pass's, or the causal buffer), or None.
          add_own: add this micro-batch's counts to `prior`.

        Returns:
          (per aux group `{"lbl": [R] shares, "seq_balance": [R] shares,
          "sequence_max_violation": [R] mean MaxVio of this micro-batch's rows}`,
          per aux group this micro-batch's `[R, G, E]` counts).
        """
        stacked = StackedLayerAux.of(aux)
        own = self.layer_counts(stacked, lbl_group, groups.num_groups)
        out = []
        for g, (names, a) in enumerate(stacked.groups):
            if not a.is_moe:  # layers that route no tokens (e.g. a dense SkipBlock)
                out.append({})
                continue
            if own[g] is None:
                for name in names:
                    self._warn_unscoped(name)
                repeats = len(names)
                lbl = jnp.zeros((repeats,), jnp.float32) if a.lbl is None else a.lbl
                out.append({"lbl": lbl / self.num_microbatches,
                            "seq_balance": jnp.zeros((repeats,), jnp.float32)})
                continue
            used = own[g] if prior is None else (prior[g] + own[g] if add_own else prior[g])
            out.append(per_layer(functools.partial(_layer_terms, lbl_group=lbl_group,
                                                   row_group=row_group, groups=groups),
                                 a.token_probs, a.token_experts, a.token_mask, used))
        return tuple(out), own

    def _warn_unscoped(self, layer: str) -> None:
        """Once per trace: the configured scope does not reach this layer."""
        if self.lbl_scope == "micro_batch":
            return
        message = (f"LossWeights.lbl_scope={self.lbl_scope!r} does not apply to MoE layer "
                   f"{layer!r}: its router reports no per-token routing (expert choice, "
                   f"dense-to-sparse), so it keeps its own per-micro-batch LBL")
        _log.warning(message)
        warnings.warn(message, UserWarning, stacklevel=2)


def per_layer(fn: Callable[..., Any], *stacked: jax.Array) -> Any:
    """`fn` over the leading (stacked layers) axis of `stacked`: `jax.vmap`, or for
    a group of one layer (an unscanned layer) `fn` itself on the squeezed arrays,
    so an unscanned model runs the very ops it ran before the aux was stacked."""
    if stacked[0].shape[0] == 1:
        return jax.tree.map(lambda v: v[None], fn(*(a[0] for a in stacked)))
    return jax.vmap(fn)(*stacked)


def _layer_terms(probs: jax.Array, experts: jax.Array, mask: jax.Array, used: jax.Array, *,
                 lbl_group: jax.Array, row_group: jax.Array,
                 groups: StepGroups) -> dict[str, jax.Array]:
    """One layer's shares (`StepBalance.terms`), from its `[T, E]` probs, `[T, k]`
    experts, `[T]` mask and the `[G, E]` counts its LBL uses."""
    # Rows never span micro-batches: this micro-batch's counts of its rows are complete.
    rows = bs.group_counts(experts, mask, row_group, groups.row_tokens.shape[0],
                           probs.shape[-1])
    return {"lbl": bs.scoped_lbl_share(probs, mask, lbl_group, used, groups.lbl_tokens),
            "seq_balance": bs.scoped_lbl_share(probs, mask, row_group, rows, groups.row_tokens),
            "sequence_max_violation": bs.group_max_violation(rows[_rows_of(row_group)])}


def _rows_of(row_group: jax.Array) -> jax.Array:
    """The global row indices a micro-batch's `row_group [b, S]` covers."""
    return row_group[:, 0]


def zeros_like_counts(counts_shape: GroupCounts) -> GroupCounts:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), counts_shape)
