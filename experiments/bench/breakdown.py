"""Where the MoE layer's forward+backward time goes: the layer cut into parts.

Each part is compiled on its own (forward+backward, gradients of its inputs and
weights) and timed interleaved with the whole layer and the dense FFN
(`experiments.bench.timing`), so the parts are read as shares of one round:

  router   logits, softmax, top-k and the auxiliary losses (loss 0.01 * lbl plus the
           combine weights, so the backward runs through the softmax);
  layout   the routing decision -> row layout (slot ranks, argsort, group sizes);
           integer work, forward only;
  experts  the expert FFN on rows already laid out: the grouped matmul over the rows
           sorted by expert (dropless; capacity mode of `sort` on CPU: the kept rows),
           else the batched `[E, C, d]` matmuls (capacity buffers). `sort` on CPU:
           tile-aligned groups through `moe.kernels.padded_fused`, whose loops gather
           the rows and add the weighted outputs back, so there this part includes the
           permutation and the combine;
  rest     layer - router - layout - experts: the gathers into rows and back, the
           combine and its backward (unless fused into `experts`), the statistics.

A profiler trace (`jax.profiler`) gives op-level times too, but XLA:CPU runs
independent ops of one program concurrently, so per-op durations overlap and do
not add up; this cut adds up by construction.
"""

from __future__ import annotations

import statistics
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.bench import timing
from experiments.bench.layer import compile_pair, dense_ffn, moe_layer
from layers import MoeLayer
from moe.dispatch import dispatchers
from moe.dispatch.capacity import assign_slots
from moe.dispatch.layout import capacity_layout, gather_to_rows, padded_layout, sorted_layout
from moe.kernels import api as kernel_api
from moe.kernels import padded_gmm, xla_gmm

# The grouped matmul behind each dropless dispatch the cut knows.
_GMM = {"sort": xla_gmm.gmm, "pallas": kernel_api.dispatch_gmm,
        "ragged_dot": lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs, rhs, sizes)}


def _router_call(layer: MoeLayer, x: jax.Array, capacity: int | None):
    graphdef, params = nnx.split(layer.router, nnx.Param)

    def loss(params, x):
        decision = nnx.merge(graphdef, params)(
            x, mask=jnp.ones(x.shape[:1]), capacity=capacity, deterministic=True, rng=None,
            state={})
        return 0.01 * decision.aux.lbl + jnp.sum(decision.weights)

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile(), (params, x)


def _routing(layer: MoeLayer, x: jax.Array, capacity: int | None):
    decision = layer.router(x, mask=jnp.ones(x.shape[:1]), capacity=capacity,
                            deterministic=True, rng=None, state={})
    return decision.expert_index


def _grouped_capacity(dispatch: str, capacity: int | None) -> bool:
    """Whether the dispatch's capacity mode sends only the kept rows through its grouped
    matmul here (`sort` on CPU, `moe.dispatch.registry`)."""
    return capacity is not None and dispatch == "sort" and jax.default_backend() == "cpu"


def _padded(dispatch: str) -> bool:
    """Whether the dispatch lays its grouped rows out tile-aligned here (`sort` on CPU)."""
    return dispatch == "sort" and dispatchers.padded_layout_active()


def _layout(expert_index: jax.Array, num_experts: int, capacity: int | None, grouped: bool,
            padded: bool = False):
    """(RowLayout, group sizes or None) as the dispatch builds it."""
    if capacity is not None and not grouped:
        return capacity_layout(expert_index, num_experts, capacity), None
    keep = None
    if capacity is not None:
        _, keep = assign_slots(expert_index, num_experts, capacity)
        expert_index = jnp.where(keep, expert_index, num_experts)
    layout, sizes = sorted_layout(expert_index, num_experts + (keep is not None))
    sizes = sizes[:num_experts]
    if padded:
        layout = padded_layout(layout, sizes, expert_index, padded_gmm.DEFAULT_TILE_M)
    return (layout if keep is None else layout._replace(keep=keep)), sizes


def _kept_fraction(expert_index: jax.Array, num_experts: int, capacity: int | None) -> float:
    """Share of the assignments the capacity keeps (1.0 dropless): the work done."""
    if capacity is None:
        return 1.0
    return float(jnp.mean(assign_slots(expert_index, num_experts, capacity)[1]))


def _layout_call(num_experts: int, capacity: int | None, grouped: bool, padded: bool,
                 expert_index: jax.Array):
    fn = jax.jit(lambda index: _layout(index, num_experts, capacity, grouped, padded))
    return fn, (expert_index,)


def _experts_call(layer: MoeLayer, dispatch: str, x: jax.Array, expert_index: jax.Array,
                  capacity: int | None, grouped: bool, padded: bool):
    ffn = layer.experts.ffn(jnp.float32)
    num_experts = layer.num_experts
    layout, sizes = _layout(expert_index, num_experts, capacity, grouped, padded)
    if padded:  # the permutation runs inside the fused matmuls: it is timed here
        plan = (padded_gmm.DEFAULT_TILE_M,
                padded_gmm.chunk_for(expert_index.size, num_experts, padded_gmm.DEFAULT_TILE_M))
        weights = layout.keep / expert_index.shape[1]

        def loss(ffn, rows):
            return jnp.mean(dispatchers.rows_through_experts(rows, layout, sizes, weights, ffn,
                                                             None, plan) ** 2)
        rows = x
    elif sizes is not None:
        rows = gather_to_rows(x, layout)

        def loss(ffn, rows):
            return jnp.mean(ffn.grouped(rows, sizes, _GMM[dispatch]) ** 2)
    else:
        rows = gather_to_rows(x, layout).reshape(num_experts, capacity, x.shape[1])

        def loss(ffn, rows):
            return jnp.mean(ffn.batched(rows) ** 2)

    fb = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(ffn, rows).compile()
    return fb, (ffn, rows)


# A compared variant that is not a registered dispatch: `sort` with the tile-loop grouped
# matmul of `moe.kernels.xla_gmm` (what `sort` ran on CPU before the padded layout).
TILE_LOOP = "sort_tile_loop"


def _compared_layer(name: str, d_model: int, d_ff: int, num_experts: int, k: int,
                    capacity_factor: float | None, x: jax.Array) -> timing.Call:
    dispatch = "sort" if name == TILE_LOOP else name
    params, apply = moe_layer(d_model, d_ff, num_experts, k, dispatch, capacity_factor)
    with dispatchers.padded_layout_on(() if name == TILE_LOOP else ("cpu",)):
        return compile_pair(apply, params, x, with_aux=True)[1], (params, x)


def layer_breakdown(*, tokens: int, d_model: int, d_ff: int, num_experts: int, k: int,
                    dispatch: str, capacity_factor: float | None, rounds: int,
                    compare: tuple[str, ...] = (), seed: int = 0) -> dict[str, Any]:
    """Median wall and CPU ms of layer / router / layout / experts / dense (forward+
    backward; layout forward only), interleaved over `rounds`, and the derived rest;
    `ratio`: the median of the per-round layer / dense ratios (wall; `cpu_ratio` CPU).
    The layer is `experiments.bench.layer.moe_layer` on `x [tokens, d_model]` float32;
    the dense FFN has `d_ff = k * d_ff` (equal active FLOPs). `compare`: other dispatches
    whose whole layer is timed in the same rounds (`compared`: their ratio to dense), or
    `TILE_LOOP` (`sort` through the tile-loop grouped matmul)."""
    x = jax.random.normal(jax.random.key(seed), (tokens, d_model), jnp.float32)
    params, apply = moe_layer(d_model, d_ff, num_experts, k, dispatch, capacity_factor)
    layer = MoeLayer(d_model, d_ff, num_experts, k, dispatch=dispatch,
                     capacity_factor=capacity_factor, rngs=nnx.Rngs(seed))
    capacity = layer.capacity(tokens, deterministic=True)
    grouped = _grouped_capacity(dispatch, capacity)
    padded = _padded(dispatch)
    expert_index = jax.jit(lambda x: _routing(layer, x, capacity))(x)
    dense_params, dense_apply = dense_ffn(d_model, k * d_ff, jax.random.key(1))
    calls = {
        "layer": (compile_pair(apply, params, x, with_aux=True)[1], (params, x)),
        "router": _router_call(layer, x, capacity),
        "layout": _layout_call(num_experts, capacity, grouped, padded, expert_index),
        "experts": _experts_call(layer, dispatch, x, expert_index, capacity, grouped, padded),
        "dense": (compile_pair(dense_apply, dense_params, x, with_aux=False)[1],
                  (dense_params, x)),
    }
    for other in compare:
        calls[f"layer_{other}"] = _compared_layer(other, d_model, d_ff, num_experts, k,
                                                  capacity_factor, x)
    load_before = timing.load_average()
    wall, cpu = timing.interleaved_wall_cpu(calls, rounds)
    record: dict[str, Any] = dict(
        tokens=tokens, d_model=d_model, d_ff=d_ff, num_experts=num_experts, k=k,
        dispatch=dispatch, capacity_factor=capacity_factor, capacity=capacity, rounds=rounds,
        grouped_capacity=grouped, padded_layout=padded,
        kept_fraction=_kept_fraction(expert_index, num_experts, capacity),
        load_average=[load_before, timing.load_average()],
        ratio=timing.ratio_summary(wall["layer"], wall["dense"]),
        cpu_ratio=timing.ratio_summary(cpu["layer"], cpu["dense"]),
        compared={other: dict(timing.ratio_summary(wall[f"layer_{other}"], wall["dense"]),
                              cpu_ratio=timing.median_ratio(cpu[f"layer_{other}"], cpu["dense"]))
                  for other in compare},
        raw_wall_s=wall, raw_cpu_s=cpu)
    for clock, times in (("wall", wall), ("cpu", cpu)):
        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        ms = {name: value for name, value in ms.items() if not name.startswith("layer_")}
        ms["rest"] = ms["layer"] - ms["router"] - ms["layout"] - ms["experts"]
        record[f"{clock}_ms"] = ms
        record[f"{clock}_over_dense"] = {name: value / ms["dense"] for name, value in ms.items()}
    return record
