"""Device mesh from config, and placement of everything on it.

The binding is one gin value, `MESH_SHAPE`, a dict over the axes `data`,
`fsdp`, `expert` and `tensor` (missing axes have size 1; one size may be -1,
"the rest of the devices"):

    --gin_param="MESH_SHAPE = {'data': 2, 'expert': 4}"

Unset, a single process trains on one device and a multi-process job puts
every device on `data`. The logical axis rules (`moe.sharding`) come from
`Sharding.rules` (gin); parameters, optimizer state, batches, checkpoint
restore targets and step outputs all get their shardings from them here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moe import sharding
from moe.dispatch import expert_parallel as ep_lib

_log = logging.getLogger(__name__)

MESH_SHAPE_MACRO = "MESH_SHAPE"


def resolve_mesh_shape(shape: Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
    """Axis sizes in `moe.sharding.MESH_AXES` order; -1 takes the remaining devices."""
    shape = dict(shape or {})
    unknown = set(shape) - set(sharding.MESH_AXES)
    if unknown:
        raise ValueError(f"MESH_SHAPE names unknown axes {sorted(unknown)}; axes are "
                         f"{sharding.MESH_AXES}")
    sizes = [shape.get(axis, 1) for axis in sharding.MESH_AXES]
    for axis, size in zip(sharding.MESH_AXES, sizes):
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"MESH_SHAPE[{axis!r}] must be a positive int or -1, got {size!r}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one MESH_SHAPE axis may be -1, got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"MESH_SHAPE {shape}: {num_devices} devices are not divisible by "
                             f"the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"MESH_SHAPE {shape} needs {known} devices, but {num_devices} are "
                         f"available; make the sizes multiply to {num_devices}, or use -1 "
                         f"for one axis to take the rest")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over axes `MESH_AXES` with Auto axis types.

    `shape=None`: one device in a single process, every device on `data` in
    a multi-process job.
    """
    if devices is None:
        if shape is None and jax.process_count() == 1:
            devices = jax.devices()[:1]
        else:
            devices = jax.devices()
    if shape is None:
        shape = {"data": -1}
    sizes = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(sizes, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sizes),
                         devices=list(devices))


def mesh_shape_from_gin() -> dict[str, int] | None:
    """The `MESH_SHAPE` gin macro, or None when it is not bound."""
    try:
        return gin.query_parameter(f"%{MESH_SHAPE_MACRO}")
    except ValueError:
        return None


def _path_key(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def logical_axes_tree(params: Any, logical_axes: Mapping[tuple, Sequence[str]]) -> Any:
    """`params` (a nested dict) with every leaf replaced by its logical axes tuple,
    wrapped in `LogicalAxes` so the tuple stays a leaf."""
    def lookup(path, leaf):
        key = _path_key(path)
        if key not in logical_axes or logical_axes[key] is None:
            raise ValueError(f"parameter {'/'.join(map(str, key))} has no logical_axes metadata")
        return LogicalAxes(tuple(logical_axes[key]))

    return jax.tree_util.tree_map_with_path(lookup, params)


@dataclasses.dataclass(frozen=True)
class LogicalAxes:
    """A leaf holding one parameter's logical axis names."""

    names: tuple[str, ...]



@gin.configurable
class Sharding:
    """The mesh, the logical axis rules and expert-parallel options of a run.

    Args:
      mesh_shape: axis sizes; default the `MESH_SHAPE` gin macro (see module doc).
      rules: `(logical name, mesh axes)` pairs (default `moe.sharding.DEFAULT_RULES`).
      expert_parallel: use the all-to-all dispatch when `expert` > 1.
      ep_dropless: dropless exchange: 'padded' (any platform) or 'ragged'
        (GPU/TPU, `lax.ragged_all_to_all`).
      ep_buffer_factor: None (default): padded buffers sized to the worst
        case (every token of a device to one expert), exactly dropless. A
        number opts into bounded buffers of that many times the balanced
        load, which DROP what overflows them (the start-up line says so; the
        drop rate is on the progress line and in the summary).
      devices: devices to use (default all, or one; see `make_mesh`).
    """

    def __init__(self, mesh_shape: Mapping[str, int] | None = None, *,
                 rules: Sequence[Sequence] | Mapping[str, Any] = sharding.DEFAULT_RULES,
                 expert_parallel: bool = True, ep_dropless: str = "padded",
                 ep_buffer_factor: float | None = None, devices: Sequence[jax.Device] | None = None):
        if mesh_shape is None:
            mesh_shape = mesh_shape_from_gin()
        self.mesh = make_mesh(mesh_shape, devices)
        self.rules = sharding.normalize_rules(rules, sharding.MESH_AXES)
        for logical in (sharding.BATCH, "expert"):
            sharding.mesh_axes_for(logical, self.rules)  # both must have a rule
        try:
            self.ep_options = ep_lib.ExpertParallelOptions(
                enabled=expert_parallel, dropless=ep_dropless, buffer_factor=ep_buffer_factor)
        except ValueError as e:  # name the gin parameters, not the internal fields
            raise ValueError(f"Sharding.ep_{e}") from e

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def batch_shards(self) -> int:
        """How many ways the batch is split (the product of the batch rule's mesh axes)."""
        return math.prod(self.mesh.shape[a]
                         for a in sharding.mesh_axes_for(sharding.BATCH, self.rules))

    @property
    def expert_parallel_size(self) -> int:
        """ep: the product of the mesh axes the "expert" rule maps to."""
        return math.prod(self.mesh.shape[a] for a in sharding.mesh_axes_for("expert", self.rules))

    def configure_dispatch(self, model: Any, *, tokens_per_call: int | None = None) -> str:
        """Chooses the MoE dispatch from this sharding config, before the model is split.

        With `expert_parallel` on and the "expert" rule spanning more than one
        device, every MoE layer whose router allows it (token choice, k per
        token) switches to the all-to-all `expert_parallel` dispatch
        (`MoeLayer.use_expert_parallel`); the FLOP counter then counts that
        dispatch. Returns the log line (also logged), e.g. "dispatch:
        expert_parallel over mesh axes ('expert',) (ep=4), capacity per shard 6"
        for micro-batches of `tokens_per_call` tokens (capacity omitted when None).
        """
        ep = self.expert_parallel_size
        layers = {name: model.moe_layer(name) for name in getattr(model, "moe_layer_names", ())}
        if not layers:
            return "dispatch: no MoE layers"
        enabled = self.ep_options.enabled and ep > 1
        # Layers configured with dispatch='expert_parallel' get this config's shards too.
        switched = [name for name, moe in layers.items()
                    if (enabled or moe.dispatch == "expert_parallel")
                    and moe.use_expert_parallel(self.ep_options, self.batch_shards)]
        if not switched:
            why = "off" if not self.ep_options.enabled else "expert rule spans 1 device"
            line = (f"dispatch: {sorted({m.dispatch for m in layers.values()})} (expert "
                    f"parallelism {why})")
            _log.info(line)
            return line
        moe = layers[switched[0]]
        capacity = None
        if tokens_per_call is not None:
            capacity = ep_lib.shard_capacity(
                tokens_per_call, moe.k, moe.num_experts, moe.capacity(tokens_per_call, False),
                shards=self.batch_shards, options=self.ep_options)
        axes = sharding.mesh_axes_for("expert", self.rules)
        line = ep_lib.describe(axes, ep, capacity, self.ep_options,
                               known=tokens_per_call is not None,
                               drops=self._dropless_may_drop([layers[n] for n in switched]))
        line += f" in layers {switched}"
        kept = sorted(set(layers) - set(switched))
        if kept:
            line += f"; {kept} keep their dispatch (their router needs another one)"
        _log.info(line)
        return line

    def _dropless_may_drop(self, moe_layers: Sequence[Any]) -> bool | None:
        """Whether the exchange of a dropless layer among `moe_layers` (training or
        evaluation capacity None) can overflow; None when none is dropless."""
        dropless = [m for m in moe_layers
                    if m.capacity_factor is None or m.eval_capacity_factor is None]
        if not dropless:
            return None
        return any(ep_lib.may_drop(m.num_experts, m.k, self.ep_options) for m in dropless)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Mesh, rules and expert-parallel options active for code traced inside."""
        with jax.set_mesh(self.mesh), sharding.use_rules(self.rules), \
                ep_lib.use_options(self.ep_options):
            yield

    # -- shardings ---------------------------------------------------------
    def named(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.named(PartitionSpec())

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
             name: str = "array") -> PartitionSpec:
        return sharding.logical_to_spec(logical_axes, self.rules, shape=shape,
                                        mesh_shape=self.mesh.shape, name=name)

    def param_shardings(self, params: Any, logical_axes: Mapping[tuple, Sequence[str]]) -> Any:
        """NamedSharding per parameter from its logical axes (`layers.params.logical_axes_of`)."""
        axes_tree = logical_axes_tree(params, logical_axes)

        def one(path, leaf, axes):
            return self.named(self.spec(axes.names, np.shape(leaf),
                                        name="/".join(map(str, _path_key(path)))))

        return jax.tree_util.tree_map_with_path(one, params, axes_tree)

    def like_params(self, tree: Any, params: Any, param_shardings: Any) -> Any:
        """Shardings for a tree holding copies of the parameters (optimizer
        moments): a leaf whose path ends with a parameter's path and has its
        shape gets that parameter's sharding; every other leaf is replicated."""
        by_path = {}
        for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(param_shardings)):
            by_path[_path_key(path)] = (np.shape(leaf), sh)

        def one(path, leaf):
            key = _path_key(path)
            for start in range(len(key)):
                match = by_path.get(key[start:])
                if match is not None and match[0] == np.shape(leaf):
                    return match[1]
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, tree)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return self.named(self.spec((sharding.BATCH,) + (None,) * (ndim - 1)))

    # -- placement ---------------------------------------------------------
    def place_params(self, params: Any, logical_axes: Mapping[tuple, Sequence[str]]) -> Any:
        """`params` moved onto the mesh, each by its logical axes."""
        return jax.device_put(params, self.param_shardings(params, logical_axes))

    def init_opt_state(self, tx, params: Any) -> Any:
        """`tx.init(params)` compiled straight into place: moments take their
        parameter's sharding (`like_params`), the rest is replicated."""
        abstract = jax.eval_shape(tx.init, params)
        shardings = self.like_params(abstract, params, shardings_of(params))
        with self.context():
            return jax.jit(tx.init, out_shardings=shardings)(params)

    def global_batch(self, local_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded over the batch axes.

        The process's rows must be its contiguous block of the global batch,
        in process order (what `ShardedTrainIterator` yields).
        """
        out = {}
        for name, value in local_batch.items():
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                out[name] = value
                continue
            value = np.asarray(value)
            sh = self.batch_sharding(value.ndim)
            global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
            ways = self.batch_shards
            if global_shape[0] % ways:
                raise ValueError(f"batch[{name!r}] has {global_shape[0]} rows, not divisible by "
                                 f"the {ways} batch shards of mesh {self.mesh_shape}")
            out[name] = jax.make_array_from_process_local_data(sh, value, global_shape)
        return out

    def wrap_train_step(self, step: Callable) -> Callable:
        """`step(params, opt_state, batch, rng, **kw)` under this sharding: the
        batch becomes a global array, tracing sees the mesh and rules, new
        params and optimizer state keep the shardings they came in with and the
        metrics are replicated (readable by every process)."""
        compiled: dict[Any, Callable] = {}

        def jitted(params, opt_state):
            key = jax.tree.structure((params, opt_state))
            if key not in compiled:
                compiled[key] = jax.jit(step, out_shardings=(
                    shardings_of(params), shardings_of(opt_state), self.replicated))
            return compiled[key]

        def run(params, opt_state, batch, *args, **kwargs):
            with self.context():
                return jitted(params, opt_state)(params, opt_state, self.global_batch(batch),
                                                 *args, **kwargs)

        def lower(params, opt_state, batch, *args, **kwargs):
            """`jax.stages.Lowered` of the step for these arguments (HLO inspection)."""
            with self.context():
                return jitted(params, opt_state).lower(params, opt_state,
                                                       self.global_batch(batch), *args, **kwargs)

        run.lower = lower
        return run

    def wrap_eval_step(self, step: Callable) -> Callable:
        """`step(params, batch)` under this sharding, outputs replicated."""
        jitted = jax.jit(step, out_shardings=self.replicated)

        def run(params, batch, *args):
            with self.context():
                return jitted(params, self.global_batch(batch), *args)

        return run


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def abstract_like(tree: Any) -> Any:
    """Restore targets: `ShapeDtypeStruct`s carrying each array's sharding, so a
    checkpoint written on any mesh is read straight onto this one."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
