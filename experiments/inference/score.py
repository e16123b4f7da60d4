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

from experiments.data.config import DataConfig
from experiments.data.tokenizers import SentencePieceTokenizer, Tokenizer, make_tokenizer
from experiments.inference import restore as restore_lib

# Tokenizer files stored in a workdir, in order of precedence, each with its
# loader; they win over `DataConfig.tokenizer` (an imported model keeps its own).
WORKDIR_TOKENIZERS: dict[str, Callable[[Path], Tokenizer]] = {
    "tokenizer.model": lambda path: SentencePieceTokenizer(str(path)),
}


@dataclasses.dataclass
class Scorer:
    """A restored model ready to score.

    forward: `ids [1, n] int32 -> logits [1, n, vocab] float32` (jitted).
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


def workdir_tokenizer(workdir: str | Path) -> Tokenizer:
    """The tokenizer file stored in the workdir (`WORKDIR_TOKENIZERS`, first
    present wins), else the run's `DataConfig.tokenizer` (config parsed)."""
    for name, load in WORKDIR_TOKENIZERS.items():
        path = Path(workdir) / name
        if path.is_file():
            return load(path)
    return make_tokenizer(DataConfig().tokenizer)


def load_scorer(workdir: str | Path, step: int | None = None) -> Scorer:
    """Restores `workdir`'s model (latest intact checkpoint, or `step`), read-only
    (`experiments.inference.restore.restore_model`: the run's `config.gin` is
    parsed there, gin is cleared first)."""
    restored = restore_lib.restore_model(workdir, step)
    graphdef, params, rest = restored.graphdef, restored.params, restored.rest
    router_state = restored.router_state

    @jax.jit
    def forward_jit(ids: jax.Array) -> jax.Array:
        logits, _ = nnx.merge(graphdef, params, rest)(
            ids, deterministic=True, router_state=router_state)
        return logits.astype(jnp.float32)

    @jax.jit
    def routing_jit(ids: jax.Array) -> dict[str, jax.Array]:
        _, aux = nnx.merge(graphdef, params, rest)(
            ids, deterministic=True, router_state=router_state)
        return {name: layer_aux.token_experts for name, layer_aux in aux.items()}

    def forward(ids: jax.Array) -> jax.Array:
        with restored.context():
            return forward_jit(ids)

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
