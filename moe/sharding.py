"""Logical axis rules: from the layers' logical axis names to mesh axes.

Every parameter carries logical axis names (`layers/params.py`: "embed",
"mlp", "expert", "heads", "kv", "vocab", "norm"); activations use "batch". A
rule set maps each logical name to mesh axes (a name, a tuple of names, or
None = replicated). `logical_to_spec` turns a parameter's logical axes into a
`PartitionSpec`; this module is the only place specs are derived from names.

A mesh axis shards at most one dimension of an array: when a later dimension
maps to a mesh axis an earlier one already uses, that axis is skipped for it
(so `embed -> ('fsdp', 'expert')` shards non-expert weights over both, while an
expert weight `(expert, embed, mlp)` keeps `expert` on its first dimension).

`use_rules(rules)` makes a rule set active for code traced inside it;
`constrain(x, axes)` applies a sharding constraint from the active rules and
the context mesh (`jax.set_mesh`), and is a no-op without them, so the same
model code runs unsharded.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

from moe.scoped import ScopedValue

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH = "batch"
# The logical axes of the expert FFN input weights (`moe.experts.ExpertFFN`: wi [E, d, f]).
EXPERT_WI_AXES = ("expert", "embed", "mlp")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, tuple[str, ...]], ...]

# batch over (data, fsdp, expert); expert weights over expert; everything else's
# model dimension over fsdp (ZeRO-3); heads and the MLP hidden dimension over tensor.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    (BATCH, ("data", "fsdp", "expert")),
    ("expert", "expert"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("kv", None),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned layers (layers.scan)
)


def normalize_rules(rules: Sequence[Sequence] | Mapping[str, MeshAxes],
                    mesh_axis_names: Sequence[str] = MESH_AXES) -> Rules:
    """Checks a rule set and returns it as `((logical, (mesh axes...)), ...)`.

    Accepts a mapping or a sequence of `(logical name, mesh axes)` pairs; mesh
    axes are a name, a sequence of names or None. Raises ValueError on a
    malformed pair, a logical name given twice, or an unknown mesh axis.
    """
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out, seen = [], set()
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"logical axis rules must be (logical name, mesh axes) pairs, "
                             f"got {pair!r}")
        name, axes = pair
        if name in seen:
            raise ValueError(f"logical axis {name!r} appears twice in the rules")
        seen.add(name)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in axes:
            if axis not in mesh_axis_names:
                raise ValueError(f"rule for {name!r} names mesh axis {axis!r}; mesh axes are "
                                 f"{tuple(mesh_axis_names)}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"rule for {name!r} repeats a mesh axis: {axes}")
        out.append((name, axes))
    return tuple(out)


def mesh_axes_for(logical: str, rules: Rules) -> tuple[str, ...]:
    """The mesh axes `logical` maps to (empty = replicated)."""
    for name, axes in rules:
        if name == logical:
            return axes
    raise ValueError(f"no sharding rule for logical axis {logical!r}; rules cover "
                     f"{tuple(name for name, _ in rules)}")


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules, *,
                    shape: Sequence[int] | None = None,
                    mesh_shape: Mapping[str, int] | None = None,
                    name: str = "array") -> PartitionSpec:
    """The `PartitionSpec` of an array whose dimensions have `logical_axes`.

    A None logical axis is replicated. With `shape` and `mesh_shape`, every
    dimension must be divisible by the product of its mesh axes' sizes
    (ValueError naming `name` otherwise).
    """
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"{name}: logical axes {tuple(logical_axes)} do not match shape "
                         f"{tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(logical_axes):
        axes = () if logical is None else tuple(a for a in mesh_axes_for(logical, rules)
                                                if a not in used)
        used.update(axes)
        if shape is not None and mesh_shape is not None:
            ways = math.prod(mesh_shape[a] for a in axes)
            if shape[dim] % ways:
                raise ValueError(
                    f"{name}: dimension {dim} ({logical!r}, size {shape[dim]}) is not divisible "
                    f"by mesh axes {axes} of total size {ways}; change the mesh shape or the "
                    f"rule for {logical!r}")
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def spec_axes(entry: MeshAxes) -> tuple[str, ...]:
    """The mesh axes of one `PartitionSpec` entry, as a tuple."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


# ---------------------------------------------------------------------------
# The active rules (for code traced under `use_rules`).

_active_rules: ScopedValue[Rules] = ScopedValue()


def use_rules(rules: Sequence[Sequence] | Mapping[str, MeshAxes]
              ) -> contextlib.AbstractContextManager[Rules]:
    """Makes `rules` the active rule set while tracing inside the block."""
    return _active_rules.use(normalize_rules(rules))


def active_rules() -> Rules | None:
    return _active_rules.get()


def context_mesh():
    """The mesh set with `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def active_axes(logical: str) -> tuple[str, ...]:
    """Mesh axes of size > 1 that `logical` maps to under the active rules and
    context mesh (empty without either)."""
    rules, mesh = active_rules(), context_mesh()
    if rules is None or mesh is None:
        return ()
    return tuple(a for a in mesh_axes_for(logical, rules) if mesh.shape.get(a, 1) > 1)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` from the active rules; identity without a
    context mesh or active rules."""
    rules, mesh = active_rules(), context_mesh()
    if rules is None or mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))
