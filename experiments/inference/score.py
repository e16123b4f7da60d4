"""Scoring: log p(ids[i] | ids[:i]) of a token sequence under a workdir's model.

`load_scorer(workdir)` restores the run's model read-only
(`experiments.inference.restore`: dropless MoE layers, the checkpoint's
loss-free selection biases applied as in training, the run's mesh when its
config binds MESH_SHAPE). `score(scorer, ids)` runs one deterministic forward
pass (no KV cache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.inference import restore as restore_lib


@dataclasses.dataclass
class Scorer:
    """A restored model ready to score.

    forward: `ids [B, n] int32, segment_ids [B, n] int32 | None -> logits
    [B, n, vocab] float32` (jitted; segment 0 = padding, excluded from
    attention and MoE routing).
    routing: `ids [1, n] int32 -> {MoE layer name: token_experts [n, k] int32}`
    (jitted; the experts each token is sent to, as scored).
    """

    workdir: Path
    step: int
    vocab_size: int
    forward: Callable[[jax.Array], jax.Array]
    selection_biases: bool
    routing: Callable[[jax.Array], dict[str, jax.Array]] | None = None


@dataclasses.dataclass
class Scores:
    """ids `[n]`; logprobs `[n - 1]`: log p(ids[i] | ids[:i]) for i = 1..n-1; total: their sum."""

    ids: list[int]
    logprobs: list[float]
    total: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_scorer(workdir: str | Path, step: int | None = None) -> Scorer:
    """Restores `workdir`'s model (latest intact checkpoint, or `step`), read-only
    (`experiments.inference.restore.restore_model`: the run's `config.gin` is
    parsed there, gin is cleared first)."""
    restored = restore_lib.restore_model(workdir, step)
    graphdef, params, rest = restored.graphdef, restored.params, restored.rest
    router_state = restored.router_state

    @jax.jit
    def forward_jit(ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        logits, _ = nnx.merge(graphdef, params, rest)(
            ids, segment_ids=segment_ids, deterministic=True, router_state=router_state)
        return logits.astype(jnp.float32)

    @jax.jit
    def routing_jit(ids: jax.Array) -> dict[str, jax.Array]:
        _, aux = nnx.merge(graphdef, params, rest)(
            ids, deterministic=True, router_state=router_state)
        return {name: layer_aux.token_experts for name, layer_aux in aux.items()
                if layer_aux.is_moe}

    def forward(ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        with restored.context():
            return forward_jit(ids, segment_ids)

    def routing(ids: jax.Array) -> dict[str, jax.Array]:
        with restored.context():
            return routing_jit(ids)

    return Scorer(workdir=restored.workdir, step=restored.step, vocab_size=restored.vocab_size,
                  forward=forward, selection_biases=not router_state.empty, routing=routing)


def check_ids(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """`[n] int32`; refuses fewer than 2 tokens and ids outside [0, vocab_size)."""
    array = np.asarray(list(ids), np.int64)
    if array.ndim != 1 or array.size < 2:
        raise ValueError(f"scoring needs at least 2 tokens, got {array.size}")
    bad = array[(array < 0) | (array >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    return array.astype(np.int32)


def score(scorer: Scorer, ids: Sequence[int]) -> Scores:
    """Log-probability of each token given the ones before it (one forward pass)."""
    array = check_ids(ids, scorer.vocab_size)
    logits = scorer.forward(jnp.asarray(array[None]))[0]  # [n, V]
    logprobs = jax.nn.log_softmax(logits[:-1], axis=-1)
    picked = np.asarray(jnp.take_along_axis(logprobs, jnp.asarray(array[1:, None]), axis=-1))[:, 0]
    values = [float(v) for v in picked]
    return Scores(ids=[int(i) for i in array], logprobs=values, total=float(np.sum(picked)))


@dataclasses.dataclass
class TokenScores:
    """logprobs `[n - 1] float32`: log p(ids[i] | ids[:i]), i = 1..n-1; greedy
    `[n - 1] bool`: whether ids[i] is the argmax of that distribution."""

    logprobs: np.ndarray
    greedy: np.ndarray


def length_bucket(n: int, minimum: int = 16) -> int:
    """The padded length of an `n`-token input: the next power of two >= `minimum`."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@jax.jit
def _pick(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits `[B, L, V]`, targets `[B, L]` -> (log p(target) `[B, L]`, target == argmax `[B, L]`)."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def score_batch(scorer: Scorer, sequences: Sequence[Sequence[int]], *,
                batch_size: int = 8) -> list[TokenScores]:
    """`score` for many sequences, in batches of `batch_size` rows.

    Each sequence's input `ids[:-1]` is right-padded to its length bucket
    (`length_bucket`) with segment id 0, and batches are padded to
    `batch_size` rows, so the forward compiles once per length bucket; padding
    changes no real token's logits (causal attention within the segment, no
    routing of padding; MoE layers are dropless). Sequences are grouped by
    bucket, longest first; results come back in the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arrays = [check_ids(ids, scorer.vocab_size) for ids in sequences]
    order = sorted(range(len(arrays)), key=lambda i: -arrays[i].size)
    results: list[TokenScores | None] = [None] * len(arrays)
    start = 0
    while start < len(order):
        bucket = length_bucket(arrays[order[start]].size - 1)
        rows = [order[start]]
        while (len(rows) < batch_size and start + len(rows) < len(order) and
               length_bucket(arrays[order[start + len(rows)]].size - 1) == bucket):
            rows.append(order[start + len(rows)])
        start += len(rows)
        ids = np.zeros((batch_size, bucket), np.int32)
        targets = np.zeros((batch_size, bucket), np.int32)
        segments = np.zeros((batch_size, bucket), np.int32)
        for row, i in enumerate(rows):
            n = arrays[i].size - 1
            ids[row, :n], targets[row, :n], segments[row, :n] = arrays[i][:-1], arrays[i][1:], 1
        logits = scorer.forward(jnp.asarray(ids), jnp.asarray(segments))
        picked, greedy = (np.asarray(a) for a in _pick(logits, jnp.asarray(targets)))
        for row, i in enumerate(rows):
            n = arrays[i].size - 1
            results[i] = TokenScores(logprobs=picked[row, :n].astype(np.float32),
                                     greedy=greedy[row, :n].astype(bool))
    return results  # type: ignore[return-value]
