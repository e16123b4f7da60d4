"""Expert parallelism: tokens travel to their experts' devices and back with all-to-all.

With the `expert` logical axis mapped to mesh axes of total size ep > 1, each
device holds E/ep experts (experts `[r * E/ep, (r + 1) * E/ep)` on expert rank
r). Routing (router, top-k, counts, losses) stays in the auto-sharded program,
so its statistics are global; only the dispatch runs in `jax.shard_map`, over
the local tokens of each device (the batch is sharded over the mesh axes of
the "batch" rule, which must include the expert axes):

  capacity (a capacity is given): each token shard is a routing group for
    dropping, with ceil(C / shards) slots per expert (C = the layer's capacity
    for the whole call), filled choice-major; buffers `[ep, E/ep, C_shard, d]`
    go through one all_to_all, every device runs its experts on
    `[E/ep, ep * C_shard, d]`, and a second all_to_all brings results back.
  padded (dropless, default): the same buffers, sized by default to the worst
    case, `C_shard = T_shard` (every token of a shard sending its row to one
    expert; each token names an expert at most once, as top-k routing does),
    so nothing can overflow: exact, at E/k times the balanced load in memory
    and expert FLOPs. With `buffer_factor` set (an explicit opt-in),
    `C_shard = min(T_shard, ceil(buffer_factor * k * T_shard / E))`; when that
    is below T_shard, assignments beyond it overflow and come back with
    keep=False: the layer counts them in `kept_counts` and `dropped_fraction`,
    and `describe` says the buffer is bounded.
  ragged (dropless, GPU/TPU): rows sorted by expert travel with
    `lax.ragged_all_to_all` (exact sizes, nothing dropped), are regrouped by
    local expert and go through `lax.ragged_dot`. Not implemented on CPU, where
    it is refused with a ValueError.
  ragged_emulated: the ragged path's bookkeeping with the exchange emulated by
    all_gather (ep times the traffic); runs anywhere, for tests.

The MLP hidden dimension stays sharded over the "mlp" rule's non-batch mesh
axes (tensor parallelism; partial outputs are summed with psum); expert
weights' other dimensions are gathered at the shard_map boundary (ZeRO-3).
Gradients of replicated inputs are summed by shard_map's transpose.

Without a context mesh or active rules (`moe.sharding.use_rules`), the same
buffer algorithm runs with ep = 1 and no collectives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moe import sharding
from moe.dispatch.dispatchers import DispatchOutput
from moe.dispatch.layout import capacity_layout, combine_from_rows, gather_to_rows, sorted_layout
from moe.experts import ExpertFFN
from moe.numeric import safe_ceil
from moe.scoped import ScopedValue
from moe.validation import check_one_of

Array = jax.Array

DROPLESS_MODES = ("padded", "ragged", "ragged_emulated")


@dataclasses.dataclass(frozen=True)
class ExpertParallelOptions:
    """Attributes:
      enabled: `experiments.runtime.mesh.Sharding.configure_dispatch` sets
        token-choice MoE layers to this dispatch whenever the "expert" rule
        maps to mesh axes of total size > 1 (False: leave expert-sharded
        weights to XLA's automatic partitioning).
      dropless: how dropless layers (capacity_factor None) exchange tokens:
        one of `DROPLESS_MODES`.
      buffer_factor: padded mode: None (default) sizes each (device, expert)
        buffer to the worst case, T_shard slots, so nothing is dropped; a
        number bounds it to that many times the balanced load k * T_shard / E
        (an opt-in: what overflows is dropped and reported).
    """

    enabled: bool = True
    dropless: str = "padded"
    buffer_factor: float | None = None

    def __post_init__(self):
        check_one_of("dropless", self.dropless, DROPLESS_MODES)
        if self.buffer_factor is not None and not self.buffer_factor > 0:
            raise ValueError(f"buffer_factor must be > 0 or None (worst-case buffers, exact), "
                             f"got {self.buffer_factor}")


_active_options: ScopedValue[ExpertParallelOptions] = ScopedValue()


def use_options(options: ExpertParallelOptions
                ) -> contextlib.AbstractContextManager[ExpertParallelOptions]:
    """Makes `options` active for MoE layers traced inside the block."""
    return _active_options.use(options)


def active_options() -> ExpertParallelOptions:
    return _active_options.get() or ExpertParallelOptions()


def expert_parallel_size() -> int:
    """ep: the total size of the mesh axes the "expert" rule maps to (1 without a mesh)."""
    mesh = sharding.context_mesh()
    return math.prod(mesh.shape[a] for a in sharding.active_axes("expert")) if mesh else 1


def shard_capacity(num_tokens: int, k: int, num_experts: int, capacity: int | None, *,
                   shards: int, options: ExpertParallelOptions) -> int | None:
    """Slots per (shard, expert) buffer: ceil(C / shards) with a capacity; in
    padded dropless mode T_shard (the worst case), or with a buffer factor
    min(T_shard, ceil(buffer_factor * k * T_shard / E)); None (exact sizes) in
    the ragged modes."""
    if capacity is not None:
        return -(-capacity // shards)
    if options.dropless == "padded":
        worst_case = max(1, num_tokens // shards)
        if options.buffer_factor is None:
            return worst_case
        return min(worst_case, max(1, safe_ceil(
            options.buffer_factor * k * (num_tokens // shards) / num_experts)))
    return None


def may_drop(num_experts: int, k: int, options: ExpertParallelOptions) -> bool:
    """Whether a dropless layer's exchange can overflow: padded mode with a buffer
    factor below E / k, so buffers (of any call size) may hold fewer than the
    T_shard slots of the worst case."""
    return (options.dropless == "padded" and options.buffer_factor is not None
            and options.buffer_factor * k < num_experts)


def dispatch_rows(num_tokens: int, k: int, num_experts: int, capacity: int | None, *,
                  shards: int, options: ExpertParallelOptions) -> int:
    """Expert rows this dispatch computes over all devices for one call of
    `num_tokens` tokens: every (shard, expert) buffer in full, or the T * k
    assignments in the ragged modes (for the FLOP counter)."""
    per_shard = shard_capacity(num_tokens, k, num_experts, capacity, shards=shards,
                               options=options)
    if per_shard is None:
        return num_tokens * k
    return shards * num_experts * per_shard


def describe(ep_axes: tuple[str, ...], ep: int, shard_capacity_: int | None,
             options: ExpertParallelOptions, *, known: bool = True,
             drops: bool | None = None) -> str:
    """One log line: "dispatch: expert_parallel over mesh axes (...), capacity per shard C,
    dropless mode M (what it guarantees)".

    `known=False`: the tokens per call are not known yet, so neither is C.
    `drops`: whether a dropless layer's exchange can overflow (`may_drop`); None
    when no layer is dropless (the mode then does not apply).
    """
    if not known:
        capacity = "set per call"
    elif shard_capacity_ is None:
        capacity = "exact (ragged exchange)"
    else:
        capacity = str(shard_capacity_)
    line = (f"dispatch: expert_parallel over mesh axes {ep_axes} (ep={ep}), capacity per shard "
            f"{capacity}, dropless mode {options.dropless!r}")
    if drops:
        line += (f" (BOUNDED buffer, Sharding.ep_buffer_factor={options.buffer_factor}: "
                 f"assignments that overflow it are DROPPED; the drop rate is on the progress "
                 f"line and in the summary)")
    elif drops is not None and options.dropless == "padded":
        line += " (worst-case buffers: exact, nothing dropped)"
    return line


@dataclasses.dataclass(frozen=True)
class _Plan:
    mode: str  # "capacity" or one of DROPLESS_MODES
    num_experts: int
    ep: int
    ep_axes: tuple[str, ...]
    hidden_axes: tuple[str, ...]
    shard_capacity: int | None


def expert_parallel_dispatch(x: Array, expert_index: Array, weights: Array, ffn: ExpertFFN, *,
                             capacity: int | None, priority: Array | None = None,
                             mask: Array | None = None) -> DispatchOutput:
    """Token-choice dispatch across expert-parallel devices (see the module docstring).

    x `[T, d]`, expert_index `[T, k] int32`, weights `[T, k]`, mask `[T]`,
    priority `[T]` -> DispatchOutput(y `[T, d]`, keep `[T, k] bool`).
    """
    options = active_options()
    num_tokens, k = expert_index.shape
    num_experts = ffn.num_experts
    mesh, rules = sharding.context_mesh(), sharding.active_rules()
    if mesh is None or rules is None:
        shards, ep_axes, hidden_axes, batch_axes = 1, (), (), ()
    else:
        batch_axes = sharding.mesh_axes_for(sharding.BATCH, rules)
        ep_axes = sharding.mesh_axes_for("expert", rules)
        missing = [a for a in ep_axes if a not in batch_axes]
        if missing:
            raise ValueError(f"expert parallelism needs the batch rule to include the expert "
                             f"mesh axes {ep_axes}; batch maps to {batch_axes}")
        wi_spec = sharding.logical_to_spec(sharding.EXPERT_WI_AXES, rules)
        hidden_axes = tuple(a for a in sharding.spec_axes(wi_spec[2]) if a not in batch_axes)
        model_axes = [a for a in sharding.spec_axes(wi_spec[1]) if a not in batch_axes]
        if model_axes:
            raise ValueError(f"expert parallelism cannot shard the experts' embed dimension over "
                             f"non-batch mesh axes {model_axes}; change the 'embed' rule")
        shards = math.prod(mesh.shape[a] for a in batch_axes)
    ep = math.prod(mesh.shape[a] for a in ep_axes) if mesh is not None and rules else 1
    if num_experts % ep:
        raise ValueError(f"num_experts={num_experts} must be divisible by the expert-parallel "
                         f"size {ep} (mesh axes {ep_axes})")
    if num_tokens % shards:
        raise ValueError(f"{num_tokens} tokens cannot be split over {shards} batch shards "
                         f"(mesh axes {batch_axes})")
    mode = "capacity" if capacity is not None else options.dropless
    slots = shard_capacity(num_tokens, k, num_experts, capacity, shards=shards, options=options)
    if capacity is None:
        if mode == "ragged" and ep > 1 and _mesh_platform(mesh) == "cpu":
            raise ValueError("expert-parallel dropless='ragged' needs lax.ragged_all_to_all, "
                             "which is not implemented on CPU; use dropless='padded' (or "
                             "'ragged_emulated' for a slow reference)")
    plan = _Plan(mode, num_experts, ep, ep_axes, hidden_axes, slots)
    mask = jnp.ones((num_tokens,), jnp.float32) if mask is None else mask
    args = [x, expert_index.astype(jnp.int32), weights, mask, ffn.wi, ffn.wo]
    glu = ffn.wi_gate is not None
    if glu:
        args.append(ffn.wi_gate)
    has_priority = priority is not None
    if has_priority:
        args.append(priority)

    def body(x, expert_index, weights, mask, wi, wo, *rest):
        wi_gate = rest[0] if glu else None
        prio = rest[-1] if has_priority else None
        local_ffn = ExpertFFN(wi=wi, wo=wo, wi_gate=wi_gate, activation=ffn.activation)
        return _shard_dispatch(x, expert_index, weights, mask, prio, local_ffn, plan)

    if mesh is None or rules is None:
        y, keep = body(*args)
        return DispatchOutput(y, keep)
    tokens = PartitionSpec(batch_axes or None)
    rows = PartitionSpec(batch_axes or None, None)
    ep_entry = ep_axes or None
    hidden_entry = hidden_axes or None
    w_in = PartitionSpec(ep_entry, None, hidden_entry)
    w_out = PartitionSpec(ep_entry, hidden_entry, None)
    in_specs = [rows, rows, rows, tokens, w_in, w_out] + ([w_in] if glu else [])
    in_specs += [tokens] if has_priority else []
    y, keep = jax.shard_map(body, in_specs=tuple(in_specs), out_specs=(rows, rows))(*args)
    return DispatchOutput(y, keep)


def _mesh_platform(mesh) -> str | None:
    """The mesh devices' platform; None for an abstract mesh without devices (export)."""
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    return getattr(device, "platform", None)


def _all_to_all(x: Array, axes: tuple[str, ...]) -> Array:
    """Block i of dimension 0 goes to expert rank i; block i of the result came from rank i."""
    if not axes:
        return x
    return jax.lax.all_to_all(x, axes, 0, 0, tiled=True)


def _shard_dispatch(x, expert_index, weights, mask, priority, ffn: ExpertFFN,
                    plan: _Plan) -> tuple[Array, Array]:
    """One device's part: x `[T_s, d]` local tokens, ffn holding its E/ep experts."""
    if plan.mode in ("ragged", "ragged_emulated"):
        exchange = (jax.lax.ragged_all_to_all if plan.mode == "ragged"
                    else emulated_ragged_all_to_all)
        return _ragged_shard_dispatch(x, expert_index, weights, ffn, plan, exchange)
    ep, local_experts, cap = plan.ep, plan.num_experts // plan.ep, plan.shard_capacity
    d = x.shape[-1]
    layout = capacity_layout(expert_index, plan.num_experts, cap, priority=priority, mask=mask)
    buffers = gather_to_rows(x, layout).reshape(ep, local_experts, cap, d)
    received = _all_to_all(buffers, plan.ep_axes)  # [ep (source), E/ep, C, d]
    expert_in = received.transpose(1, 0, 2, 3).reshape(local_experts, ep * cap, d)
    out = ffn.batched(expert_in)
    if plan.hidden_axes:
        out = jax.lax.psum(out, plan.hidden_axes)
    out = out.reshape(local_experts, ep, cap, d).transpose(1, 0, 2, 3)
    returned = _all_to_all(out, plan.ep_axes).reshape(plan.num_experts * cap, d)
    return combine_from_rows(returned, weights, layout), layout.keep


RaggedAllToAll = Callable[..., Array]


def emulated_ragged_all_to_all(operand: Array, output: Array, input_offsets: Array,
                               send_sizes: Array, output_offsets: Array, recv_sizes: Array, *,
                               axis_name) -> Array:
    """`lax.ragged_all_to_all` semantics built from all_gather (works on CPU; ep x traffic)."""
    del recv_sizes  # implied by the gathered send sizes
    all_operand = jax.lax.all_gather(operand, axis_name)  # [ep, M, d]
    all_in = jax.lax.all_gather(input_offsets, axis_name)  # [src, dst]
    all_sizes = jax.lax.all_gather(send_sizes, axis_name)
    all_out = jax.lax.all_gather(output_offsets, axis_name)
    me = jax.lax.axis_index(axis_name)
    rows = jnp.arange(output.shape[0])
    for src in range(all_operand.shape[0]):
        start, size, source_start = all_out[src, me], all_sizes[src, me], all_in[src, me]
        inside = (rows >= start) & (rows < start + size)
        source_rows = jnp.clip(source_start + rows - start, 0, operand.shape[0] - 1)
        output = jnp.where(inside[:, None], all_operand[src][source_rows], output)
    return output


def _ragged_dot(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def _ragged_shard_dispatch(x, expert_index, weights, ffn: ExpertFFN, plan: _Plan,
                           exchange: RaggedAllToAll) -> tuple[Array, Array]:
    """Dropless: exact-size exchange of expert-sorted rows (buffers hold ep * T_s * k rows)."""
    ep, local_experts, axes = plan.ep, plan.num_experts // plan.ep, plan.ep_axes
    layout, group_sizes = sorted_layout(expert_index, plan.num_experts)
    rows = gather_to_rows(x, layout)  # [M, d], sorted by expert, so by destination
    num_rows, d = rows.shape
    if not axes:
        out = ffn.grouped(rows, group_sizes, _ragged_dot)
        if plan.hidden_axes:
            out = jax.lax.psum(out, plan.hidden_axes)
        return combine_from_rows(out, weights, layout), layout.keep
    sizes = group_sizes.reshape(ep, local_experts)
    send_sizes = jnp.sum(sizes, axis=1)  # [ep] rows for each destination
    recv_group_sizes = _all_to_all(sizes, axes)  # [ep (source), E/ep]
    recv_sizes = jnp.sum(recv_group_sizes, axis=1)
    all_sizes = jax.lax.all_gather(send_sizes, axes)  # [source, destination]
    me = jax.lax.axis_index(axes)
    dest_offsets = jnp.cumsum(all_sizes, axis=0) - all_sizes  # where src's chunk lands at dst
    source_offsets = jnp.cumsum(all_sizes, axis=1) - all_sizes  # where src's chunk for dst starts
    capacity = ep * num_rows
    received = exchange(rows, jnp.zeros((capacity, d), rows.dtype), source_offsets[me],
                        send_sizes, dest_offsets[me], recv_sizes, axis_name=axes)
    # Received rows are ordered (source, local expert); regroup them by local expert.
    bounds = jnp.cumsum(recv_group_sizes.reshape(-1))
    segment = jnp.searchsorted(bounds, jnp.arange(capacity), side="right")
    row_expert = jnp.where(segment < ep * local_experts, segment % local_experts, local_experts)
    order = jnp.argsort(row_expert, stable=True)
    inverse = jnp.argsort(order)
    out = ffn.grouped(received[order], jnp.sum(recv_group_sizes, axis=0), _ragged_dot)
    if plan.hidden_axes:
        out = jax.lax.psum(out, plan.hidden_axes)
    returned = exchange(out[inverse], jnp.zeros((num_rows, d), out.dtype), dest_offsets[:, me],
                        recv_sizes, source_offsets[:, me], send_sizes, axis_name=axes)
    return combine_from_rows(returned, weights, layout), layout.keep
