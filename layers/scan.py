"""Scanned layers: the repeating unit of the layer pattern under one `jax.lax.scan`.

A model of N layers whose kinds (dense or MoE FFN) follow a pattern is split
into an unscanned prefix, R repeats of a unit of u layers, and an unscanned
suffix (`LayerPlan`, chosen by `plan_layers`). The unit's u blocks are kept as
`scanned/unit_{j}` (j < u) with every parameter stacked along a leading axis of
size R, logical name `layers` (`LAYERS`; the sharding rules map it, default
unsharded). Layer i = start + r * u + j is repeat r of unit position j; the
other layers stay `layer_{i}`.

Parameter trees (pure nested dicts, as in checkpoints and `nnx.State.to_pure_dict`)
convert between the two layouts with one function, `match_layer_layout(tree,
like)`: it infers both layouts from the trees themselves (no model needed), so
a checkpoint written by either layout loads into either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.params import LAYERS

SCANNED = "scanned"


def layer_name(i: int) -> str:
    return f"layer_{i}"


def unit_name(j: int) -> str:
    return f"unit_{j}"


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Layers [start, start + unit * repeats) are scanned (repeats R of a unit of
    `unit` layers); the others are unscanned. unit = repeats = 0: nothing scanned."""

    num_layers: int
    start: int = 0
    unit: int = 0
    repeats: int = 0

    @property
    def stop(self) -> int:
        return self.start + self.unit * self.repeats

    def location(self, i: int) -> tuple[int, int] | None:
        """`(repeat r, unit position j)` of layer i, or None when it is unscanned."""
        if not self.start <= i < self.stop:
            return None
        return divmod(i - self.start, self.unit)

    def unscanned(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.location(i) is None)

    def unit_layers(self, j: int) -> tuple[int, ...]:
        """The layers at unit position j, one per repeat."""
        return tuple(self.start + r * self.unit + j for r in range(self.repeats))


def plan_layers(kinds: Sequence[Hashable], scan: bool) -> LayerPlan:
    """The plan covering the most layers with a repeated unit (R >= 2), ties going
    to the shorter unit, then the earlier start. `kinds[i]`: what makes layer i's
    parameters differ (e.g. whether its FFN is MoE). scan=False: nothing scanned.

    [dense, moe] * 24 -> unit 2, 24 repeats; all MoE -> unit 1; DeepSeek's
    [dense, moe, moe, moe] -> prefix 1, unit 1, 3 repeats.
    """
    n = len(kinds)
    best = LayerPlan(n)
    if not scan:
        return best
    kinds = list(kinds)
    for u in range(1, n // 2 + 1):
        for p in range(0, n - 2 * u + 1):
            unit, r = kinds[p:p + u], 1
            while p + (r + 1) * u <= n and kinds[p + r * u:p + (r + 1) * u] == unit:
                r += 1
            if r >= 2 and r * u > best.unit * best.repeats:
                best = LayerPlan(n, p, u, r)
    return best


# ---------------------------------------------------------------------------
# Modules: stacking blocks, slicing one repeat back out.

def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the same structure whose variables are the modules' stacked
    along a new leading axis (logical name `layers` prepended to `logical_axes`)."""
    splits = [nnx.split(m) for m in modules]
    graphdef = splits[0][0]
    if any(g != graphdef for g, _ in splits[1:]):
        raise ValueError("the layers of a scanned unit must have the same structure")

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        value = jnp.stack([v[...] for v in variables])
        axes = variables[0].get_metadata().get("logical_axes")
        if axes is None:
            return variables[0].replace(value)
        return variables[0].replace(value, logical_axes=(LAYERS, *axes))

    states = [s for _, s in splits]
    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


class ScannedUnits(nnx.Module):
    """`unit_{j}`: the blocks at unit position j of every repeat, stacked."""

    def __init__(self, blocks: Sequence[Sequence[nnx.Module]]):
        self.num_units = len(blocks)
        for j, group in enumerate(blocks):
            setattr(self, unit_name(j), stack_modules(group))

    def unit(self, j: int) -> nnx.Module:
        return getattr(self, unit_name(j))


def slice_module(module: nnx.Module, r: int) -> nnx.Module:
    """Repeat r of a stacked module, as an ordinary module (its variables sliced)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[r], state))


def scan_units(units: ScannedUnits, body: Callable[..., tuple[Any, Any]], carry: Any,
               xs: Any, remat: Callable[[Callable], Callable]) -> tuple[Any, Any]:
    """`jax.lax.scan` over the repeats: body(units of one repeat, carry, r, x_r) ->
    (carry, y_r); remat wraps the per-repeat function. -> (carry, ys stacked over r)."""
    graphdef, state = nnx.split(units)
    repeats = jax.tree.leaves(state)[0].shape[0]

    def step(carry, inputs):
        r, params, x = inputs
        return body(nnx.merge(graphdef, params), carry, r, x)

    return jax.lax.scan(remat(step), carry, (jnp.arange(repeats, dtype=jnp.int32), state, xs))


# ---------------------------------------------------------------------------
# Parameter trees (pure nested dicts): scanned <-> unscanned.

def _stack_leaves(leaves: Sequence[Any]) -> Any:
    first = leaves[0]
    if isinstance(first, (np.ndarray, np.generic)):
        return np.stack(leaves)
    if isinstance(first, jax.Array) and not isinstance(first, jax.core.Tracer) \
            and not first.is_fully_addressable:
        raise ValueError("cannot stack arrays that span processes; convert on one host")
    if isinstance(first, jax.Array):
        return jnp.stack(leaves)
    if hasattr(first, "shape") and hasattr(first, "dtype"):  # ShapeDtypeStruct, metadata
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    raise TypeError(f"cannot stack a leaf of type {type(first).__name__}")


def _slice_leaf(leaf: Any, r: int) -> Any:
    if isinstance(leaf, (np.ndarray, jax.Array)):
        return leaf[r]
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
    raise TypeError(f"cannot slice a leaf of type {type(leaf).__name__}")


def _map_leaves(fn: Callable[..., Any], *trees: Any) -> Any:
    """fn over the leaves of nested dicts of the same structure."""
    if isinstance(trees[0], Mapping):
        keys = list(trees[0])
        for t in trees[1:]:
            if not isinstance(t, Mapping) or set(t) != set(keys):
                raise ValueError("the layers of a scanned unit must have the same parameters; "
                                 f"got keys {sorted(map(str, keys))} and "
                                 f"{sorted(map(str, t)) if isinstance(t, Mapping) else t!r}")
        return {k: _map_leaves(fn, *(t[k] for t in trees)) for k in keys}
    return fn(*trees)


def is_layer_tree(tree: Any) -> bool:
    """Whether `tree` is a dict holding a model's layers (`layer_{i}` or `scanned`)."""
    return isinstance(tree, Mapping) and any(
        str(k) == SCANNED or str(k).startswith("layer_") for k in tree)


def tree_plan(tree: Mapping[str, Any]) -> LayerPlan:
    """The layout of a layers tree: which layers are scanned, read from the keys
    (`layer_{i}` present; `scanned/unit_{j}` with R = the leading dimension)."""
    present = sorted(int(str(k)[len("layer_"):]) for k in tree
                     if str(k).startswith("layer_") and str(k)[len("layer_"):].isdigit())
    if SCANNED not in tree:
        return LayerPlan(len(present))
    units = tree[SCANNED]
    unit = len(units)
    leaves = jax.tree.leaves(units[unit_name(0)])
    repeats = int(leaves[0].shape[0])
    start = next((i for i, k in enumerate(present) if k != i), len(present))
    return LayerPlan(len(present) + unit * repeats, start, unit, repeats)


def unscan_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The unscanned layout (`layer_{i}` for every layer) of a layers tree; other keys kept."""
    if SCANNED not in tree:
        return dict(tree)
    plan = tree_plan(tree)
    out = {k: v for k, v in tree.items() if k != SCANNED}
    for j in range(plan.unit):
        stacked = tree[SCANNED][unit_name(j)]
        for r, i in enumerate(plan.unit_layers(j)):
            out[layer_name(i)] = _map_leaves(lambda a, r=r: _slice_leaf(a, r), stacked)
    return _ordered(out, plan)


def scan_tree(tree: Mapping[str, Any], plan: LayerPlan) -> dict[str, Any]:
    """The layout of `plan` for a layers tree in either layout."""
    tree = unscan_tree(tree)
    if not plan.repeats:
        return tree
    missing = [i for i in range(plan.num_layers) if layer_name(i) not in tree]
    if missing:
        raise ValueError(f"the parameter tree lacks layers {missing} of a "
                         f"{plan.num_layers}-layer model")
    out = {k: v for k, v in tree.items()
           if not (str(k).startswith("layer_") and tree_index(k) in range(plan.start, plan.stop))}
    out[SCANNED] = {unit_name(j): _map_leaves(lambda *ls: _stack_leaves(ls),
                                              *(tree[layer_name(i)] for i in plan.unit_layers(j)))
                    for j in range(plan.unit)}
    return _ordered(out, plan)


def tree_index(key: Any) -> int:
    return int(str(key)[len("layer_"):])


def _ordered(tree: dict[str, Any], plan: LayerPlan) -> dict[str, Any]:
    """Layers in model order (prefix, scanned, suffix), other keys first."""
    def rank(key: Any) -> tuple[int, int]:
        k = str(key)
        if k == SCANNED:
            return (1, plan.start)
        if k.startswith("layer_") and k[len("layer_"):].isdigit():
            i = tree_index(k)
            return (1, i if i < plan.start else i + 1)
        return (0, 0)
    return {k: tree[k] for k in sorted(tree, key=rank)}


def match_layer_layout(tree: Any, like: Any) -> Any:
    """`tree` with every layers dict in it converted to the layout of the dict at
    the same place in `like` (scanned or not, the same unit and start). Walks
    dicts, lists, tuples and named tuples (optimizer states), so parameters and
    their optimizer moments convert alike. Leaves: arrays (numpy or jax, stacked
    on their host) or shape structs."""
    if is_layer_tree(tree) and is_layer_tree(like):
        target = tree_plan(like)
        converted = scan_tree(tree, target) if target.repeats else unscan_tree(tree)
        return {k: match_layer_layout(v, like[k]) if k in like else v
                for k, v in converted.items()}
    if isinstance(tree, Mapping) and isinstance(like, Mapping):
        return {k: match_layer_layout(v, like[k]) if k in like else v for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and isinstance(like, (list, tuple)) \
            and len(tree) == len(like):
        items = [match_layer_layout(a, b) for a, b in zip(tree, like)]
        if hasattr(tree, "_fields"):
            return type(tree)(*items)
        return type(tree)(items)
    return tree


def same_layer_layout(tree: Any, like: Any) -> bool:
    """Whether every layers dict of `tree` has the layout of `like`'s."""
    if is_layer_tree(tree) and is_layer_tree(like):
        if tree_plan(tree) != tree_plan(like):
            return False
    if isinstance(tree, Mapping) and isinstance(like, Mapping):
        return all(same_layer_layout(v, like[k]) for k, v in tree.items() if k in like)
    if isinstance(tree, (list, tuple)) and isinstance(like, (list, tuple)):
        return all(same_layer_layout(a, b) for a, b in zip(tree, like))
    return True


def find_plan(tree: Any) -> LayerPlan | None:
    """The layout of the first layers dict found in `tree` (None if it has none)."""
    if is_layer_tree(tree):
        return tree_plan(tree)
    children = (tree.values() if isinstance(tree, Mapping)
                else tree if isinstance(tree, (list, tuple)) else ())
    for child in children:
        plan = find_plan(child)
        if plan is not None:
            return plan
    return None


def to_layer_plan(tree: Any, plan: LayerPlan) -> Any:
    """`tree` with every layers dict in it (parameters, optimizer moments) in the
    layout of `plan`; containers walked as by `match_layer_layout`."""
    if is_layer_tree(tree):
        converted = scan_tree(tree, plan) if plan.repeats else unscan_tree(tree)
        return {k: v if str(k).startswith("layer_") or k == SCANNED else to_layer_plan(v, plan)
                for k, v in converted.items()}
    if isinstance(tree, Mapping):
        return {k: to_layer_plan(v, plan) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [to_layer_plan(v, plan) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree
