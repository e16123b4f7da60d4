"""Balance scopes: the set of tokens over which the load-balancing statistic f is measured.

The load-balancing loss (Switch convention, 1.0 at balance) of one balance
group g of n_g real tokens is

    LBL_g = E * sum_i f_{g,i} * P_{g,i},   f_g = counts_g / sum(counts_g)  (stop-gradient),
                                          P_g = mean of the router probabilities over g,

and the loss of a batch is the mean of LBL_g over the groups that hold real
tokens. Which tokens form a group is the *balance scope* (Qiu et al. 2025,
"Demons in the Detail"; docs/balancing.md):

  sequence        one group per row of the batch;
  sequences:N     groups of N consecutive rows;
  micro_batch     the rows one data-parallel shard sees in one gradient-
                  accumulation micro-batch (the usual implementation);
  global_batch    every token of the optimizer step, on every device;
  shuffled:N      groups of N tokens drawn at random from the global batch
                  (the paper's control: small but diverse groups).

The loss is linear in P, so it splits into per-token terms

    LBL = sum_t  E / (G' * n_{g(t)}) * sum_i f_{g(t),i} * p_{t,i}     (G' = non-empty groups),

and any subset of the tokens (one micro-batch, one device) contributes its
share with `scoped_lbl_share`, given the counts of the groups its tokens
belong to. Summing the shares over micro-batches gives exactly the loss on the
concatenated batch, whatever the scope. The counts of a group that spans
micro-batches are only known after all of them were routed: see
`needs_step_counts` and docs/balancing.md (exact two-pass vs causal buffer).

Everything here is pure JAX; group ids of row-based scopes are static numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moe import balance

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """How the rows of one optimizer step's global batch `[B, S]` are split.

    Micro-batch a holds rows `a * B/A ... (a+1) * B/A - 1` (as
    `experiments.train.train_step.split_microbatches` cuts them), and within a
    micro-batch, data-parallel shard d holds the d-th block of `B / (A * D)`
    consecutive rows (the batch dimension sharded over the data axes).

    Attributes:
      batch_size: B, rows of the global batch.
      seq_len: S, tokens per row.
      num_microbatches: A, gradient-accumulation micro-batches.
      data_parallel_size: D, devices the batch dimension is split over.
    """

    batch_size: int
    seq_len: int
    num_microbatches: int = 1
    data_parallel_size: int = 1

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "num_microbatches", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"BatchLayout.{name} must be >= 1, got {getattr(self, name)}")
        shards = self.num_microbatches * self.data_parallel_size
        if self.batch_size % shards:
            raise ValueError(
                f"batch_size={self.batch_size} must be divisible by num_microbatches * "
                f"data_parallel_size = {self.num_microbatches} * {self.data_parallel_size}")

    @property
    def rows_per_microbatch(self) -> int:
        return self.batch_size // self.num_microbatches

    @property
    def rows_per_shard(self) -> int:
        """Rows one device sees in one micro-batch."""
        return self.rows_per_microbatch // self.data_parallel_size


@dataclasses.dataclass(frozen=True)
class BalanceScope:
    """A parsed `lbl_scope`: `kind` (a key of `SCOPES`) and `size` (N, for the sized kinds)."""

    kind: str
    size: int | None = None

    def __str__(self) -> str:
        return self.kind if self.size is None else f"{self.kind}:{self.size}"


@dataclasses.dataclass(frozen=True)
class _ScopeKind:
    sized: bool  # takes ":N"
    groups: Callable[[BalanceScope, BatchLayout], tuple[np.ndarray, int]] | None  # row scopes
    description: str


def _row_groups(rows_per_group: Callable[[BalanceScope, BatchLayout], int]):
    def groups(scope: BalanceScope, layout: BatchLayout) -> tuple[np.ndarray, int]:
        n = rows_per_group(scope, layout)
        if layout.batch_size % n:
            raise ValueError(f"lbl_scope={str(scope)!r}: {n} rows per group do not divide the "
                             f"batch size {layout.batch_size}")
        row_group = np.arange(layout.batch_size, dtype=np.int32) // n
        return np.repeat(row_group[:, None], layout.seq_len, axis=1), layout.batch_size // n
    return groups


SCOPES: dict[str, _ScopeKind] = {
    "sequence": _ScopeKind(False, _row_groups(lambda scope, layout: 1), "one group per row"),
    "sequences": _ScopeKind(True, _row_groups(lambda scope, layout: scope.size),
                            "groups of N consecutive rows"),
    "micro_batch": _ScopeKind(False, _row_groups(lambda scope, layout: layout.rows_per_shard),
                              "the rows of one device in one micro-batch"),
    "global_batch": _ScopeKind(False, _row_groups(lambda scope, layout: layout.batch_size),
                               "all tokens of the optimizer step"),
    "shuffled": _ScopeKind(True, None, "groups of N tokens drawn at random from the step"),
}


def available_scopes() -> tuple[str, ...]:
    return tuple(f"{name}:N" if kind.sized else name for name, kind in SCOPES.items())


def parse_lbl_scope(spec: str | BalanceScope) -> BalanceScope:
    """Parses 'sequence', 'sequences:N', 'micro_batch', 'global_batch' or 'shuffled:N'."""
    if isinstance(spec, BalanceScope):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"lbl_scope must be a string, one of {available_scopes()}, got {spec!r}")
    name, sep, size_text = spec.partition(":")
    kind = SCOPES.get(name)
    if kind is None:
        raise ValueError(f"lbl_scope must be one of {available_scopes()}, got {spec!r}")
    if not kind.sized:
        if sep:
            raise ValueError(f"lbl_scope={spec!r}: {name!r} takes no size; "
                             f"allowed: {available_scopes()}")
        return BalanceScope(name)
    try:
        size = int(size_text)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"lbl_scope={spec!r}: {name!r} needs a positive integer size, "
                         f"e.g. '{name}:4'; allowed: {available_scopes()}")
    return BalanceScope(name, size)


def validate_scope(scope: BalanceScope, layout: BatchLayout) -> None:
    """Raises ValueError when the scope's groups do not tile the batch."""
    if scope.kind == "shuffled":
        num_tokens = layout.batch_size * layout.seq_len
        if num_tokens % scope.size:
            raise ValueError(f"lbl_scope={str(scope)!r}: groups of {scope.size} tokens do not "
                             f"divide the {num_tokens} tokens of the global batch")
        return
    SCOPES[scope.kind].groups(scope, layout)


def group_ids(scope: BalanceScope, layout: BatchLayout,
              rng: Array | None = None) -> tuple[Array, int]:
    """Balance group of every token of the global batch.

    Returns `(group [B, S] int32, num_groups)`. Row scopes are static; for
    `shuffled:N` the token positions are permuted with `rng` (one fresh draw
    per optimizer step) and cut into groups of N.
    """
    validate_scope(scope, layout)
    if scope.kind != "shuffled":
        group, num_groups = SCOPES[scope.kind].groups(scope, layout)
        return jnp.asarray(group), num_groups
    if rng is None:
        raise ValueError(f"lbl_scope={str(scope)!r} draws its groups at random: pass an rng key")
    num_tokens = layout.batch_size * layout.seq_len
    position = jax.random.permutation(rng, num_tokens)
    group = jnp.zeros((num_tokens,), jnp.int32).at[position].set(
        jnp.arange(num_tokens, dtype=jnp.int32) // scope.size)
    return group.reshape(layout.batch_size, layout.seq_len), num_tokens // scope.size


def needs_step_counts(scope: BalanceScope, layout: BatchLayout) -> bool:
    """Whether some group holds tokens of several micro-batches, so that its counts
    are complete only after the whole step was routed (exact: a first pass;
    approximate: the causal running buffer). Data-parallel shards need nothing
    extra: under `jit` the counts are sums over the global arrays."""
    if layout.num_microbatches == 1:
        return False
    if scope.kind == "shuffled":
        return True
    group, _ = SCOPES[scope.kind].groups(scope, layout)
    per_microbatch = group[:, 0].reshape(layout.num_microbatches, -1)
    return bool(np.any(per_microbatch[1:].min(axis=1) <= per_microbatch[:-1].max(axis=1)))


def group_tokens(token_mask: Array, group: Array, num_groups: int) -> Array:
    """Real tokens per group. mask `[...]`, group `[...]` -> `[G] float32`."""
    return jax.ops.segment_sum(token_mask.reshape(-1).astype(jnp.float32), group.reshape(-1),
                               num_segments=num_groups)


def group_counts(expert_index: Array, token_mask: Array, group: Array, num_groups: int,
                 num_experts: int) -> Array:
    """Assignments per group and expert, before dropping, padding excluded, no gradient.

    Args:
      expert_index: `[..., k] int32` selected experts.
      token_mask: `[...]` 1 = real token.
      group: `[...] int32` balance group of each token.
      num_groups, num_experts: G and E.

    Returns:
      `[G, E] float32`.
    """
    k = expert_index.shape[-1]
    one_hot = jax.nn.one_hot(expert_index.reshape(-1, k), num_experts, dtype=jnp.float32).sum(1)
    one_hot = one_hot * token_mask.reshape(-1, 1).astype(jnp.float32)
    counts = jax.ops.segment_sum(one_hot, group.reshape(-1), num_segments=num_groups)
    return jax.lax.stop_gradient(counts)


def scoped_lbl_share(probs: Array, token_mask: Array, group: Array, counts: Array,
                     tokens: Array) -> Array:
    """The share of some tokens in the scoped load-balancing loss.

    Args:
      probs: `[..., E] float32` unbiased router probabilities of these tokens
        (softmax, or sigmoid scores normalised to sum 1); differentiable.
      token_mask: `[...]` 1 = real token.
      group: `[...] int32` balance group of each token.
      counts: `[G, E]` assignments of every group over *all* its tokens (the
        whole step, all devices); treated as constants.
      tokens: `[G]` real tokens of every group over all its tokens.

    Returns:
      scalar float32; the shares of disjoint token sets add up to the loss of
      their union (1.0 at balance).
    """
    num_experts = probs.shape[-1]
    num_groups = counts.shape[0]
    if counts.shape != (num_groups, num_experts) or tokens.shape != (num_groups,):
        raise ValueError(f"counts must be [groups, experts] and tokens [groups], got "
                         f"{counts.shape} and {tokens.shape} for {num_experts} experts")
    counts = jax.lax.stop_gradient(counts.astype(jnp.float32))
    tokens = jax.lax.stop_gradient(tokens.astype(jnp.float32))
    fraction = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1e-9)  # f_g
    non_empty = jnp.maximum(jnp.sum(tokens > 0), 1.0)  # G'
    weight = num_experts * fraction / (non_empty * jnp.maximum(tokens, 1.0))[:, None]  # [G, E]
    flat_probs = probs.reshape(-1, num_experts).astype(jnp.float32)
    mask = token_mask.reshape(-1).astype(jnp.float32)
    return jnp.sum(mask[:, None] * flat_probs * weight[group.reshape(-1)])


def scoped_lbl(probs: Array, expert_index: Array, token_mask: Array, group: Array,
               num_groups: int) -> Array:
    """The scoped loss of a complete set of groups in one go (counts from the same tokens).

    probs `[..., E]`, expert_index `[..., k]`, token_mask `[...]`, group
    `[...]` -> scalar. With a single group it equals
    `moe.balance.load_balancing_loss`.
    """
    counts = group_counts(expert_index, token_mask, group, num_groups, probs.shape[-1])
    tokens = group_tokens(token_mask, group, num_groups)
    return scoped_lbl_share(probs, token_mask, group, counts, tokens)


def group_max_violation(counts: Array) -> Array:
    """Mean over non-empty groups of `moe.balance.max_violation`. `[G, E]` -> scalar."""
    counts = counts.astype(jnp.float32)
    violation = jax.vmap(balance.max_violation)(counts)  # [G]
    non_empty = jnp.sum(counts, axis=-1) > 0
    return jnp.sum(jnp.where(non_empty, violation, 0.0)) / jnp.maximum(jnp.sum(non_empty), 1.0)
