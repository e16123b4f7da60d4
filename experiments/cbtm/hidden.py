"""Document features from a trained model: its mean final hidden state.

The paper's alternative to tf-idf: embed each document with a language model and
cluster the embeddings. Here `e(d) = normalise(mean_t h_t)`, with `h_t` the run's final
hidden states (after the final norm, before the output projection) over the first
`max_tokens` tokens of the document (the run's tokenizer, one row per document, no
packing); an empty text maps to the zero vector. The model is restored once per
process (which re-parses gin with the run's config, `experiments.inference.restore`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.data.config import DataConfig
from experiments.data.tokenizers import encode_to_array, make_tokenizer
from experiments.inference.restore import restore_model
from experiments.runtime.checkpoints import Checkpointer

_ROWS = 32


@dataclasses.dataclass(frozen=True)
class HiddenFeatures:
    """workdir: the run whose model embeds; step: its checkpoint; max_tokens: tokens of
    each text that are embedded."""

    workdir: str
    step: int
    max_tokens: int

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """`[N, d_model] float32` unit rows (zero rows for texts without tokens)."""
        mean_hidden, tokenizer = _embedder(self.workdir, self.step)
        rows = []
        for start in range(0, len(texts), _ROWS):
            chunk = texts[start:start + _ROWS]
            ids = np.full((_ROWS, self.max_tokens), tokenizer.pad_id, np.int32)
            seg = np.zeros((_ROWS, self.max_tokens), np.int32)
            for i, text in enumerate(chunk):
                tokens = encode_to_array(tokenizer, text)[:self.max_tokens]
                ids[i, :len(tokens)], seg[i, :len(tokens)] = tokens, 1
            rows.append(np.asarray(mean_hidden(ids, seg))[:len(chunk)])
        x = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return np.where(norms > 0, x / np.maximum(norms, 1e-30), 0.0).astype(np.float32)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> HiddenFeatures:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


@functools.lru_cache(maxsize=4)
def _embedder(workdir: str, step: int) -> tuple[Callable[..., jax.Array], Any]:
    """The jitted `(ids [B, S], segment_ids [B, S]) -> mean hidden [B, d_model]` of the
    run's checkpoint and the run's tokenizer (restored once per process)."""
    restored = restore_model(workdir, step)
    tokenizer = make_tokenizer(DataConfig().tokenizer)
    graphdef, params, rest = restored.graphdef, restored.params, restored.rest

    @jax.jit
    def mean_hidden_jit(ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params, rest)
        object.__setattr__(model, "head", lambda x: x.astype(jnp.float32))  # no unembedding
        hidden, _ = model(ids, segment_ids=segment_ids, deterministic=True,
                          router_state=restored.router_state)
        real = (segment_ids > 0)[..., None]
        return (hidden * real).sum(1) / jnp.maximum(real.sum(1), 1)

    def mean_hidden(ids: np.ndarray, segment_ids: np.ndarray) -> jax.Array:
        with restored.context():
            return mean_hidden_jit(ids, segment_ids)

    return mean_hidden, tokenizer


def hidden_features(workdir: str, max_tokens: int) -> HiddenFeatures:
    """The featuriser of `workdir`'s latest checkpoint (checked to exist)."""
    if max_tokens < 1:
        raise ValueError(f"--hidden_tokens must be >= 1, got {max_tokens}")
    checkpoints = Path(workdir) / "checkpoints"
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"--features 'hidden:{workdir}': no checkpoints/ there")
    checkpointer = Checkpointer(checkpoints, read_only=True)
    try:
        step = checkpointer.pick_step(None, option="--features")
    finally:
        checkpointer.close()
    return HiddenFeatures(workdir=str(Path(workdir).absolute()), step=step,
                          max_tokens=max_tokens)
