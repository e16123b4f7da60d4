"""Training checkpoints: orbax `CheckpointManager` plus an integrity check.

A checkpoint at step N is the directory `<checkpoint_dir>/N` with four items:

  params     model parameters (plain pytree, `ocp.args.StandardSave`)
  opt_state  optimizer state (`StandardSave`)
  data       the training iterator's position (JSON)
  meta       JSON: step, the base RNG key, the state of the run's step hooks
             (`experiments.train.hooks`: `{hook name: {key: array}}`, e.g. the
             loss-free selection biases), and digests of params, opt_state and the
             hook state (`experiments.runtime.checksums.tree_digest`:
             sharding-invariant, computed where the arrays live, never gathered
             onto one host).

Format versions: 3 stores hook state as `meta.hook_state`; 2 stored only the
loss-free biases, as `meta.balance_state`, which is read back as the state of
the hook named `LOSS_FREE_HOOK`; 1 had CRC32 checksums. All three restore.

Saves are asynchronous; orbax writes into a temporary directory and renames it
when the save is finalised, so a trainer killed mid-save leaves no step
directory (the temporary one is cleaned up by the next trainer). In a bucket
(`gs://`, no rename) orbax writes the step directory in place and marks it
finalised with a `commit_success.txt` object last; a step without it is not
listed and is cleaned up the same way. A finalised
checkpoint whose files were later damaged is caught at restore: a missing,
truncated or unreadable file or array, or a checksum mismatch. It is then moved
to `<workdir>/corrupt_checkpoints/N` (`N.1`, `N.2`, ... when that name is taken:
nothing is ever deleted there) and the previous step is tried, with a warning
naming both steps.

Before reading a step's arrays, its stored tree structure, shapes and dtypes
(the items' metadata) are compared with the restore targets; a difference is a
configuration change, not damage: `CheckpointMismatchError` is raised and
nothing is moved. Any other error from orbax propagates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import sys
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from experiments.runtime import paths
from experiments.runtime.checksums import tree_digest
from experiments.runtime.log_filters import quiet_read_only_warnings
from layers import scan as scan_lib
from layers.scan import LayerPlan

_log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "data", "meta")
# 3: hook state in `meta.hook_state`. 2: `<item>_digest` (tree_digest).
# 1: `<item>_crc32` (legacy_crc32), still verified.
FORMAT_VERSION = 3
# (meta key suffix, function); the lambdas look the functions up when called.
_DIGESTS = {1: ("crc32", lambda tree: legacy_crc32(tree)),
            2: ("digest", lambda tree: tree_digest(tree)),
            3: ("digest", lambda tree: tree_digest(tree))}
# Formats 1-2 kept the loss-free selection biases in `meta.balance_state`; they
# are the state of the step hook of this name (`experiments.train.loss_free`).
LOSS_FREE_HOOK = "loss_free_balancing"
HookStates = dict[str, dict[str, np.ndarray]]


def legacy_crc32(tree: Any) -> int:
    """Format-1 checksum: CRC32 over the bytes, shapes and dtypes of every leaf, in
    tree order (gathers every array onto the host; only to verify old checkpoints)."""
    crc = 0
    for leaf in jax.tree.leaves(tree):
        array = np.ascontiguousarray(_host_array(leaf))
        crc = zlib.crc32(f"{array.dtype}{array.shape}".encode(), crc)
        crc = zlib.crc32(array.tobytes(), crc)
    return crc


def _host_array(leaf: Any) -> np.ndarray:
    """The whole array on this host; arrays spread over processes are gathered
    (a collective: every process checksums the same trees)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _place_like(tree: Any, abstract: Any) -> Any:
    """`tree`'s arrays on the shardings of `abstract`'s leaves (where they have one)."""
    def place(leaf, like):
        sharding = getattr(like, "sharding", None)
        return leaf if sharding is None else jax.device_put(leaf, sharding)

    return jax.tree.map(place, tree, abstract)


def _default_sharding(abstract: Any) -> Any:
    """Abstract leaves without a sharding restore onto the first local device.

    Orbax otherwise reuses the sharding the checkpoint was written with and
    fails on another device topology (e.g. an upcycled checkpoint written
    sharded over 4 devices, restored by a 1-device trainer).
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def fill(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        return leaf

    return jax.tree.map(fill, abstract)


@dataclasses.dataclass
class Restored:
    """A checkpoint read back and verified."""

    step: int
    params: Any
    opt_state: Any
    data_state: dict[str, Any]
    rng_key_data: np.ndarray
    hook_state: HookStates = dataclasses.field(default_factory=dict)  # {hook: {key: array}}

    @property
    def balance_state(self) -> dict[str, np.ndarray] | None:
        """The loss-free selection biases `{layer: [E] float32}`, if the run had them."""
        return self.hook_state.get(LOSS_FREE_HOOK)


def _encode(array: np.ndarray) -> dict[str, Any]:
    """An array as JSON; float32 values become exact float64 numbers."""
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "values": array.reshape(-1).tolist()}


def _decode(data: dict[str, Any]) -> np.ndarray:
    return np.asarray(data["values"], data["dtype"]).reshape(data["shape"])


class CorruptCheckpointError(RuntimeError):
    """A checkpoint could not be read back intact."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's tree structure, shapes or dtypes differ from the restore
    targets': the run's configuration changed (the checkpoint is intact).

    Attributes:
      step: the checkpoint's step.
      differences: one entry per differing leaf, `'params/<path>: checkpoint
        (128, 64) float32, config (64, 64) float32'` (or 'missing'/'absent').
    """

    def __init__(self, step: int, directory: paths.Path, differences: list[str]):
        self.step, self.directory, self.differences = step, directory, differences
        shown = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
        super().__init__(f"checkpoint at step {step} in {directory} does not match the "
                         f"configured model ({len(differences)} arrays differ: {shown})")


# Messages of errors raised while reading damaged files (tensorstore, orbax).
_DAMAGE_MARKERS = ("error while reading", "error opening", "data_loss", "data loss",
                   "not_found", "not found", "no such file", "unexpected end", "truncat",
                   "corrupt", "checksum", "failed to decode", "decompress",
                   "out_of_range", "error reading")
# ... unless it says the stored and requested arrays differ (a configuration change).
_MISMATCH_MARKERS = ("requested shape", "not compatible with the stored", "dtype mismatch",
                     "structure", "mismatch between")


def is_damage(error: BaseException) -> bool:
    """Whether `error`, raised while reading a checkpoint, means a missing, truncated
    or unreadable file or array (and not, e.g., a bug or a configuration change)."""
    if isinstance(error, (OSError, json.JSONDecodeError, EOFError, UnicodeDecodeError)):
        return True
    if isinstance(error, (TypeError, AttributeError, NameError, KeyboardInterrupt)):
        return False
    text = str(error).lower()
    if any(marker in text for marker in _MISMATCH_MARKERS):
        return False
    return any(marker in text for marker in _DAMAGE_MARKERS)


def _first_line(error: BaseException, limit: int = 200) -> str:
    """An error's message cut to one line (tensorstore appends a multi-line spec)."""
    lines = str(error).strip().splitlines() or [""]
    return lines[0][:limit] + ("..." if len(lines) > 1 or len(lines[0]) > limit else "")


def _path_name(path: tuple[Any, ...]) -> str:
    """`('layer_0', 'ffn', 'wi')` from a tree path, whatever the key types."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return "/".join(names)


def _leaf_specs(tree: Any) -> dict[str, str]:
    """`{path: 'shape dtype'}` of a tree of arrays, abstract arrays or array metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None or not hasattr(leaf, "shape"):
            continue
        out[_path_name(path)] = f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}"
    return out


def tree_differences(item: str, stored: Any, wanted: Any) -> list[str]:
    """Leaves of `stored` and `wanted` whose presence, shape or dtype differ."""
    a, b = _leaf_specs(stored), _leaf_specs(wanted)
    return [f"{item}/{k}: checkpoint {a.get(k, 'absent')}, config {b.get(k, 'absent')}"
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


_quiet_installed = False


def _silence_abandoned_reads() -> None:
    """After a failed restore, tensorstore finishes the reads orbax abandoned and
    calls back into orbax's event loop, which is closed by then: each callback
    would print an 'Event loop is closed' traceback (hundreds on a large model).
    These, and only these, are dropped (once per process, counted in one line)."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    previous = sys.unraisablehook
    dropped = [0]

    def hook(unraisable):
        value = unraisable.exc_value
        if (isinstance(value, RuntimeError) and str(value) == "Event loop is closed") or (
                "_read_array_index_and_device_put" in repr(unraisable.object)):
            dropped[0] += 1
            if dropped[0] == 1:
                _log.info("dropping 'Event loop is closed' errors of reads abandoned by "
                          "a failed checkpoint restore")
            return
        previous(unraisable)

    sys.unraisablehook = hook


@gin.configurable(denylist=["directory", "read_only"])
class Checkpointer:
    """Saves every `save_every` steps and restores the latest intact checkpoint.

    In gin, `Checkpointer.save_every`, `max_to_keep` and `async_save` configure
    the trainer's checkpoints (the trainer sets only `directory`).

    Args:
      directory: where step directories live (created if missing); local or
        `gs://...` (`experiments.runtime.paths`).
      save_every: save when `step % save_every == 0` (and on `force=True`).
      max_to_keep: how many checkpoints orbax keeps (None = all).
      async_save: write in a background thread (orbax async checkpointing).
      corrupt_dir: where damaged checkpoints are moved; default
        `<directory>/../corrupt_checkpoints`.
      read_only: for readers of another process's run (analysis, upcycling):
        never saves, deletes, moves damaged checkpoints aside or cleans up
        temporary directories, which may be a live trainer's save in flight.
    """

    def __init__(self, directory: paths.PathLike, *, save_every: int = 250,
                 max_to_keep: int | None = 3, async_save: bool = True,
                 corrupt_dir: paths.PathLike | None = None, read_only: bool = False):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = paths.as_path(directory)
        self.corrupt_dir = (paths.as_path(corrupt_dir) if corrupt_dir is not None
                            else self.directory.parent / "corrupt_checkpoints")
        self.save_every = save_every
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        with quiet_read_only_warnings() if read_only else contextlib.nullcontext():
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=not read_only,
                cleanup_tmp_directories=not read_only, read_only=read_only,
                enable_async_checkpointing=async_save)
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def pick_step(self, step: int | None, *, option: str = "step") -> int:
        """`step` if it is saved here, else ValueError naming `option`; None = the latest.
        FileNotFoundError when there is no checkpoint at all."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise ValueError(f"{option}={step} not found; checkpoints at steps {steps}")
        return step

    def save(self, step: int, *, params: Any, opt_state: Any, data_state: dict[str, Any],
             rng_key_data: np.ndarray, force: bool = False,
             hook_state: HookStates | None = None) -> bool:
        """Starts saving step `step` if due (or forced); returns whether it did.

        `hook_state`: `{hook name: {key: array}}`, the step hooks' state, kept
        in `meta` (JSON numbers hold float32 exactly) with its own digest."""
        if self.read_only:
            raise ValueError(f"Checkpointer for {self.directory} is read_only; it cannot save")
        if not force and step % self.save_every != 0:
            return False
        if step in self._manager.all_steps():
            return False
        meta = {"step": int(step), "format_version": FORMAT_VERSION,
                    "rng_key_data": np.asarray(rng_key_data).tolist(),
                    "params_digest": tree_digest(params), "opt_state_digest": tree_digest(opt_state)}
        if hook_state:
            states = {hook: {k: np.asarray(v) for k, v in state.items()}
                      for hook, state in hook_state.items()}
            meta["hook_state"] = {hook: {k: _encode(v) for k, v in state.items()}
                                  for hook, state in states.items()}
            meta["hook_state_digest"] = tree_digest(states)
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)), force=True)
        return True

    def restore_step(self, step: int, abstract_params: Any,
                     abstract_opt_state: Any | None) -> Restored:
        """Checkpoint `step`, verified; CorruptCheckpointError if damaged (nothing is moved)."""
        if step not in self.all_steps():
            raise ValueError(f"no checkpoint at step {step} in {self.directory}; "
                             f"steps: {self.all_steps()}")
        self.check_matches(step, abstract_params, abstract_opt_state)
        return self._restore_step(step, abstract_params, abstract_opt_state)

    def stored_metadata(self, step: int, item: str) -> Any:
        """The stored tree of `item` ('params' or 'opt_state') at `step` as array
        metadata (shape, dtype), read without reading any array;
        CorruptCheckpointError if the metadata is missing or unreadable."""
        path = epath.Path(self.directory / str(step) / item)
        try:
            return ocp.StandardCheckpointHandler().metadata(path)
        except Exception as e:
            if not is_damage(e):
                raise
            raise CorruptCheckpointError(f"{item} metadata unreadable: {type(e).__name__}: "
                                         f"{_first_line(e)}") from e

    def _stored_layout(self, step: int, abstract_params: Any, abstract_opt_state: Any | None,
                       ) -> tuple[Any, Any, LayerPlan | None]:
        """The restore targets in the layer layout (scanned or not, `layers.scan`)
        checkpoint `step` was written with, and the targets' own layout when it
        differs (None when the layouts agree)."""
        wanted = scan_lib.find_plan(abstract_params)
        metadata = self.stored_metadata(step, "params")
        stored = scan_lib.find_plan(getattr(metadata, "tree", metadata))
        if wanted is None or stored is None or wanted == stored:
            return abstract_params, abstract_opt_state, None
        strip = functools.partial(jax.tree.map, lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype))
        return (scan_lib.to_layer_plan(strip(abstract_params), stored),
                None if abstract_opt_state is None
                else scan_lib.to_layer_plan(strip(abstract_opt_state), stored), wanted)

    def check_matches(self, step: int, abstract_params: Any,
                      abstract_opt_state: Any | None) -> None:
        """CheckpointMismatchError if checkpoint `step`'s stored structure, shapes or
        dtypes differ from the targets (`abstract_opt_state=None`: params only).
        The layer layout may differ: scanned and unscanned layers convert."""
        abstract_params, abstract_opt_state, _ = self._stored_layout(step, abstract_params,
                                                                     abstract_opt_state)
        differences = tree_differences("params", self.stored_metadata(step, "params"),
                                       abstract_params)
        if abstract_opt_state is not None and not differences:
            differences = tree_differences("opt_state", self.stored_metadata(step, "opt_state"),
                                           abstract_opt_state)
        if differences:
            raise CheckpointMismatchError(step, self.directory, differences)

    def _restore_step(self, step: int, abstract_params: Any,
                      abstract_opt_state: Any | None) -> Restored:
        wanted_params, wanted_opt_state = abstract_params, abstract_opt_state
        abstract_params, abstract_opt_state, wanted_plan = self._stored_layout(
            step, abstract_params, abstract_opt_state)
        restored = self._restore_stored(step, abstract_params, abstract_opt_state)
        if wanted_plan is None:
            return restored
        # Written in the other layer layout: verified as stored, then converted and placed.
        params = _place_like(scan_lib.to_layer_plan(restored.params, wanted_plan), wanted_params)
        opt_state = (None if restored.opt_state is None else _place_like(
            scan_lib.to_layer_plan(restored.opt_state, wanted_plan), wanted_opt_state))
        return dataclasses.replace(restored, params=params, opt_state=opt_state)

    def _restore_stored(self, step: int, abstract_params: Any,
                        abstract_opt_state: Any | None) -> Restored:
        items = {"params": ocp.args.StandardRestore(_default_sharding(abstract_params)),
                     "data": ocp.args.JsonRestore(), "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(_default_sharding(abstract_opt_state))
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for damaged files
            _silence_abandoned_reads()
            if not is_damage(e):
                raise
            raise CorruptCheckpointError(f"restore failed: {type(e).__name__}: "
                                         f"{_first_line(e)}") from e
        meta = out["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CorruptCheckpointError(f"meta item is missing or names another step: {meta!r:.200}")
        version = meta.get("format_version")
        if version not in _DIGESTS:  # newer code wrote it: not damage, do not move it aside
            raise ValueError(f"checkpoint at step {step} in {self.directory} has format_version "
                             f"{version!r}; this code reads {sorted(_DIGESTS)}")
        suffix, digest = _DIGESTS[version]
        trees = {item: out[item] for item in ("params", "opt_state") if item in items}
        hook_state = {}
        if "hook_state" in meta:
            hook_state = {hook: {k: _decode(v) for k, v in state.items()}
                          for hook, state in meta["hook_state"].items()}
            trees["hook_state"] = hook_state
        elif "balance_state" in meta:  # formats 1-2
            trees["balance_state"] = {k: np.asarray(v, np.float32)
                                      for k, v in meta["balance_state"].items()}
            hook_state = {LOSS_FREE_HOOK: trees["balance_state"]}
        for item, tree in trees.items():
            stored, read = meta.get(f"{item}_{suffix}"), digest(tree)
            if read != stored:
                raise CorruptCheckpointError(
                    f"{item} checksum mismatch (stored {stored}, read {read})")
        return Restored(step=step, params=out["params"], opt_state=out.get("opt_state"),
                        data_state=out["data"],
                        rng_key_data=np.asarray(meta["rng_key_data"], np.uint32),
                        hook_state=hook_state)

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any | None,
                       *, quarantine: bool = True,
                       abstract_for_step: Callable[[int], tuple[Any, Any]] | None = None,
                       ) -> Restored | None:
        """The newest intact checkpoint, or None when there is none.

        Damaged checkpoints are skipped with a warning naming their step and,
        with `quarantine`, moved aside. A checkpoint whose structure, shapes or
        dtypes differ from the targets raises CheckpointMismatchError (nothing
        is moved). `abstract_opt_state=None` restores
        everything but the optimizer state (for analysis). `abstract_for_step`,
        if given, returns `(abstract_params, abstract_opt_state)` for a step and
        replaces the two fixed trees (runs whose model structure changes with
        the step, `experiments.train.phases`).
        """
        quarantine = quarantine and not self.read_only
        for step in reversed(self.all_steps()):
            if abstract_for_step is not None:
                abstract_params, abstract_opt_state = abstract_for_step(step)
            try:
                self.check_matches(step, abstract_params, abstract_opt_state)
                return self._restore_step(step, abstract_params, abstract_opt_state)
            except CorruptCheckpointError as e:
                target = self._quarantine(step) if quarantine else None
                previous = [s for s in self.all_steps() if s < step]
                fallback = f"falling back to step {previous[-1]}" if previous else \
                    "no earlier checkpoint; starting from scratch"
                moved = f"moved to {target}; " if quarantine else ""
                message = (f"checkpoint at step {step} in {self.directory} is corrupt or "
                           f"partial ({e}); {moved}{fallback}")
                _log.warning(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        return None

    def _quarantine(self, step: int) -> paths.Path:
        """Moves step `step` to `corrupt_dir/<step>` (or `<step>.1`, `<step>.2`, ...
        when taken: an earlier quarantined checkpoint is never replaced)."""
        self.corrupt_dir.mkdir(parents=True, exist_ok=True)
        target, n = self.corrupt_dir / str(step), 0
        while target.exists():
            n += 1
            target = self.corrupt_dir / f"{step}.{n}"
        paths.move_tree(self.directory / str(step), target)
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until any in-flight asynchronous save is finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
