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
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
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
        raise ValueError(f"MESH_SHAPE {shape} needs {known} devices; there are {num_devices} "
                         f"(use -1 for 'the rest')")
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
      ep_buffer_factor: padded slots per (device, expert), in units of the
        balanced load.
      devices: devices to use (default all, or one; see `make_mesh`).
    """

    def __init__(self, mesh_shape: Mapping[str, int] | None = None, *,
                 rules: Sequence[Sequence] | Mapping[str, Any] = sharding.DEFAULT_RULES,
                 expert_parallel: bool = True, ep_dropless: str = "padded",
                 ep_buffer_factor: float = 2.0, devices: Sequence[jax.Device] | None = None):
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


# ---------------------------------------------------------------------------
# Data: logical shards, so the global batch does not depend on the process count.

class ShardedTrainIterator:
    """The global training batch as `num_shards` logical data shards.

    Shard i is the grain pipeline over chunks `[i::num_shards]` yielding
    `global_batch / num_shards` rows; the global batch is the shards' rows in
    shard order. Process p reads only shards `[p * n / P, (p + 1) * n / P)`
    and yields their rows (its block of the global batch), so a run gives the
    same batches with 1 process or with P. `get_state` gathers every shard's
    position (across processes) so any process count can resume from it.
    """

    def __init__(self, make_shard: Callable[[int, int, int], Any], *, global_batch_size: int,
                 num_shards: int, process_index: int, process_count: int):
        if num_shards < 1 or num_shards % process_count:
            raise ValueError(f"data_shards={num_shards} must be a positive multiple of the "
                             f"process count {process_count}")
        if global_batch_size % num_shards:
            raise ValueError(f"batch_size={global_batch_size} is not divisible by "
                             f"data_shards={num_shards}")
        per_process = num_shards // process_count
        self.shard_ids = list(range(process_index * per_process, (process_index + 1) * per_process))
        rows = global_batch_size // num_shards
        self._iterators = {i: make_shard(i, num_shards, rows) for i in self.shard_ids}
        self.process_count = process_count

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(self._iterators[i]) for i in self.shard_ids]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict[str, Any]:
        from experiments import data as data_lib  # pylint: disable=g-import-not-at-top

        local = {str(i): data_lib.iterator_state(it) for i, it in self._iterators.items()}
        if self.process_count == 1:
            return {"shards": local}
        return {"shards": _allgather_json(local)}

    def set_state(self, state: dict[str, Any]) -> None:
        shards = state.get("shards") if isinstance(state, dict) else None
        if not isinstance(shards, dict):
            raise ValueError("data state is not from a ShardedTrainIterator (no 'shards')")
        missing = [i for i in self.shard_ids if str(i) not in shards]
        if missing:
            raise ValueError(f"data state lacks shards {missing} (it has {sorted(shards)}); "
                             f"was data_shards changed?")
        for i in self.shard_ids:
            self._iterators[i].set_state(shards[str(i)])


def _allgather_json(local: dict[str, Any]) -> dict[str, Any]:
    """Merges every process's dict (a collective: all processes must call it)."""
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    payload = np.frombuffer(json.dumps(local).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([payload.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:payload.size] = payload
    gathered = multihost_utils.process_allgather(padded)
    merged: dict[str, Any] = {}
    for row, length in zip(np.asarray(gathered), np.asarray(lengths).reshape(-1)):
        merged.update(json.loads(bytes(row[:int(length)]).decode()))
    return merged


@gin.configurable
def make_sharded_train_iterator(data_config, seed: int, *, data_shards: int | None = None):
    """The trainer's training iterator.

    `data_shards` None: one shard per process (a single process gets the plain
    grain iterator, as before). Set it (a multiple of the process count) to
    make the batches independent of how many processes read them.
    """
    count, index = jax.process_count(), jax.process_index()
    num_shards = count if data_shards is None else data_shards
    if num_shards == 1:
        return data_config.train_iterator(seed)
    return ShardedTrainIterator(
        lambda i, n, rows: data_config.train_iterator(
            seed, batch_size=rows, process_index=i, process_count=n),
        global_batch_size=data_config.batch_size, num_shards=num_shards,
        process_index=index, process_count=count)


def eval_batches(data_config) -> list[dict[str, np.ndarray]]:
    """This process's rows of the validation batches. Every process builds the
    same global batches (the whole validation split) and keeps its block, so
    evaluation does not depend on the process count."""
    batches = data_config.eval_batches(process_index=0, process_count=1)
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return batches
    rows = data_config.eval_batch_size
    if rows % count:
        raise ValueError(f"eval_batch_size={rows} is not divisible by {count} processes")
    block = rows // count
    return [{k: v[index * block:(index + 1) * block] for k, v in b.items()} for b in batches]


# ---------------------------------------------------------------------------
# Multi-host start-up.

def process_log_dir(workdir: Path) -> Path:
    """Where this process writes metrics, configs and its summary: the workdir for
    process 0, `<workdir>/process_<i>/` for the others (checkpoints are shared)."""
    if jax.process_index() == 0:
        return workdir
    path = workdir / f"process_{jax.process_index()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@gin.configurable
def initialize_distributed(enabled: bool | None = None, *, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize` when asked; returns whether it did.

    Asked by `enabled=True` (gin) or the environment: `MOE_DISTRIBUTED=1`,
    or `MOE_COORDINATOR_ADDRESS` (with `MOE_NUM_PROCESSES`, `MOE_PROCESS_ID`).
    Arguments left None are auto-detected by JAX (TPU pod slices, Slurm,
    ...). On CPU (`JAX_PLATFORMS=cpu`) cross-process collectives use gloo.
    Must run before anything touches a JAX backend.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("MOE_COORDINATOR_ADDRESS")
    if num_processes is None and "MOE_NUM_PROCESSES" in env:
        num_processes = int(env["MOE_NUM_PROCESSES"])
    if process_id is None and "MOE_PROCESS_ID" in env:
        process_id = int(env["MOE_PROCESS_ID"])
    if enabled is None:
        enabled = env.get("MOE_DISTRIBUTED", "") == "1" or coordinator_address is not None
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    if env.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    _log.info("jax.distributed: process %d of %d, %d local / %d global devices",
              jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count())
    return True
