"""Training and validation batches per process: logical data shards, so the
global batch does not depend on how many processes read it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import gin
import jax
import numpy as np

from experiments.data import pipeline as data_lib


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


@gin.configurable(denylist=["data_config", "seed"])
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


make_sharded_train_iterator.gin_set_by = {"data_config": "DataConfig.*", "seed": "train.seed"}


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


