"""One dense -> MoE tree mapper, for parameters and optimizer state.

Both the sparse upcycling of a dense checkpoint (`experiments.convert.
upcycle_checkpoint`) and the EvoMoE diversify switch (`experiments.train.
phases`) turn a dense `TransformerLM` parameter tree into the tree of a MoE
model of the same sizes, and carry the optimizer state over. They differ only
in how a MoE layer's experts are made from its dense FFN and how strictly the
other leaves must match, so both call `map_tree`:

  * a leaf at `<moe layer>/ffn/experts/<w>` comes from `experts_for(layer,
    dense_ffn, target_experts)` (`{w: [E, ...]}`), built once per layer from
    the dense `<moe layer>/ffn/<w>` leaves;
  * any other target leaf is copied from the dense tree at the same path when
    it exists with the same shape (`copy(source, target)`), else it comes from
    `missing(path, target)` (a fresh router, zero moments), which may refuse.

Paths are tuples of keys (`flax.traverse_util.flatten_dict`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from flax import traverse_util

Path = tuple[str, ...]
FFN, EXPERTS = "ffn", "experts"
# experts_for(layer, {w: dense FFN leaf}, {w: target expert leaf}) -> {w: [E, ...]}
ExpertsFn = Callable[[str, dict[str, Any], dict[str, Any]], Mapping[str, Any]]


def flatten(tree: Mapping[str, Any]) -> dict[Path, Any]:
    return traverse_util.flatten_dict(tree)


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat))


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def moe_ffn_part(path: Path, moe_layers: Sequence[str]) -> str | None:
    """`"experts"`, `"router"`, ... for a leaf under `<moe layer>/ffn/<part>/`, else None."""
    if len(path) > 3 and path[0] in moe_layers and path[1] == FFN:
        return path[2]
    return None


def _keep_source(source: Any, target: Any) -> Any:
    del target
    return source


def map_tree(dense: Mapping[str, Any], target: Mapping[str, Any], moe_layers: Sequence[str], *,
             experts_for: ExpertsFn, missing: Callable[[Path, Any], Any],
             copy: Callable[[Any, Any], Any] = _keep_source) -> dict[str, Any]:
    """A tree shaped like `target` (arrays or `ShapeDtypeStruct`s) built from `dense`.

    See the module docstring. `copy(source, target)` may cast or check the
    copied leaf; `missing(path, target)` gives the value of a target leaf the
    dense tree has no same-shaped source for (outside the experts).
    """
    flat_dense, flat_target = flatten(dense), flatten(target)
    experts: dict[str, Mapping[str, Any]] = {}
    out = {}
    for path, leaf in flat_target.items():
        if moe_ffn_part(path, moe_layers) == EXPERTS:
            layer = path[0]
            if layer not in experts:
                ffn = {p[2]: v for p, v in flat_dense.items()
                       if len(p) == 3 and p[:2] == (layer, FFN)}
                targets = {p[3]: v for p, v in flat_target.items()
                           if len(p) == 4 and p[:3] == (layer, FFN, EXPERTS)}
                experts[layer] = experts_for(layer, ffn, targets)
            out[path] = experts[layer][path[3]]
            continue
        source = flat_dense.get(path)
        if source is not None and tuple(source.shape) == tuple(leaf.shape):
            out[path] = copy(source, leaf)
        else:
            out[path] = missing(path, leaf)
    return unflatten(out)


def unmapped_dense_paths(dense: Mapping[str, Any], target: Mapping[str, Any],
                         moe_layers: Sequence[str]) -> list[Path]:
    """Dense leaves with no place in the target (the MoE layers' dense FFNs excepted)."""
    flat_target = flatten(target)
    return [p for p in flatten(dense)
            if p not in flat_target and not (len(p) >= 2 and p[0] in moe_layers and p[1] == FFN)]


def map_opt_state(dense_state: Any, target_template: Any, param_keys: set[str], *,
                  moments: Callable[[Any, Any], Any],
                  other: Callable[[Any, Any], Any]) -> Any:
    """The optimizer state of the MoE model from the dense model's.

    Works on any optax state whose per-parameter parts are trees shaped like the
    parameters (dicts with the parameters' top-level keys; AdamW's mu and nu):
    each such part becomes `moments(dense_part, template_part)`, a
    `ScaleByScheduleState` is carried over (the learning-rate schedule
    continues), every other leaf becomes `other(dense_leaf, template_leaf)`.
    `target_template` is the optimizer's fresh state for the MoE parameters.
    """
    def special(x) -> bool:
        return (isinstance(x, optax.ScaleByScheduleState)
                or (isinstance(x, dict) and set(x) == param_keys))

    dense_leaves = jax.tree_util.tree_flatten(dense_state, is_leaf=special)[0]
    template_leaves, treedef = jax.tree_util.tree_flatten(target_template, is_leaf=special)
    if len(dense_leaves) != len(template_leaves):
        raise ValueError("the dense optimizer state does not match this optimizer's structure "
                         f"({len(dense_leaves)} vs {len(template_leaves)} leaves)")
    out = []
    for dense_leaf, template_leaf in zip(dense_leaves, template_leaves):
        if isinstance(template_leaf, optax.ScaleByScheduleState):
            out.append(dense_leaf)
        elif isinstance(template_leaf, dict):
            out.append(moments(dense_leaf, template_leaf))
        else:
            out.append(other(dense_leaf, template_leaf))
    return jax.tree_util.tree_unflatten(treedef, out)


def fresh_opt_state(old_state: Any, template: Any) -> Any:
    """`template` (a fresh optimizer state for the new parameters) with the old state's
    `ScaleByScheduleState`s put back, so the learning-rate schedule continues; for
    conversions whose parameter trees differ in structure (scale-up, ToMoE)."""
    def is_schedule(x) -> bool:
        return isinstance(x, optax.ScaleByScheduleState)

    old = [x for x in jax.tree_util.tree_leaves(old_state, is_leaf=is_schedule)
           if is_schedule(x)]
    leaves, treedef = jax.tree_util.tree_flatten(template, is_leaf=is_schedule)
    slots = [i for i, x in enumerate(leaves) if is_schedule(x)]
    if len(slots) != len(old):
        raise ValueError(f"the source optimizer state has {len(old)} schedule states, this "
                         f"optimizer {len(slots)}")
    for i, state in zip(slots, old):
        leaves[i] = state
    return jax.tree_util.tree_unflatten(treedef, leaves)
