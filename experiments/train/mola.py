"""`train.model_cls = @mola_lm`: MoLA LoRA experts on a frozen dense base run
(`layers.mola`; docs/conditional_compute.md, "MoLA").

The base is referenced, not copied: `mola_lm.base_workdir` names a finished dense
run (its `checkpoints/<base_step>/params`), and every build of the model (the
trainer's start and resume, `scripts/generate.py`, the routing analysis) reads the
base weights from there. The run's own checkpoints hold only the LoRA and router
parameters and their optimizer state. The base model is built from this run's
`TransformerLM` bindings (include the base run's model gin); a base checkpoint of
another shape is refused, naming the differences.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import numpy as np
from flax import nnx

from experiments.runtime import paths
from experiments.runtime.checkpoints import Checkpointer, CheckpointMismatchError
from layers.mola import add_lora_experts, check_options, freeze
from layers.routers import BaseRouter, TopKRouter
from layers.transformer import TransformerLM

SEED_FIELD = "{seed}"


@gin.configurable(denylist=["vocab_size", "rngs"])
def mola_lm(vocab_size: int, *, rngs: nnx.Rngs, base_workdir: str | None = None,
            base_step: int | None = None, experts_per_layer: Sequence[int] = (),
            k: int = 2, rank: int = 8, alpha: float = 16.0,
            router: Callable[..., BaseRouter] = TopKRouter,
            base: Callable[..., Any] = TransformerLM) -> TransformerLM:
    """The base model with its weights from `base_workdir`, frozen, and routed LoRA
    experts on every layer's FFN (`layers.mola.add_lora_experts`).

    Args (gin: `mola_lm.<name>`):
      base_workdir: the dense base run's workdir (local or gs://); a relative path
        is taken from the current directory (the repo root for `make experiment`);
        '{seed}' in it becomes this run's `train.seed` (one base per seed in a sweep).
      base_step: the base checkpoint's step; None = the latest.
      experts_per_layer: E_l per layer, bottom to top (e.g. [2, 4, 6, 8]); one
        entry per layer of the base model.
      k: experts per token in every layer, in [1, min E_l].
      rank: LoRA rank r (>= 1).
      alpha: LoRA scale numerator, s = alpha / r (> 0).
      router: the token-choice router factory (its options on its class, e.g.
        `TopKRouter.score`).
      base: the base model factory (default `TransformerLM` with its gin bindings).
    """
    if not base_workdir:
        raise ValueError("mola_lm.base_workdir must name the dense base run's workdir "
                         "(its checkpoints hold the frozen weights)")
    if base_step is not None and (isinstance(base_step, bool) or not isinstance(base_step, int)
                                  or base_step < 0):
        raise ValueError(f"mola_lm.base_step must be None or an int >= 0, got {base_step!r}")
    model = base(vocab_size=vocab_size, rngs=rngs)
    check_options(experts_per_layer, model.num_layers, k=k, rank=rank, alpha=alpha)
    _, state, _ = nnx.split(model, nnx.Param, ...)
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                            nnx.to_pure_dict(state))
    stored = _read_base(resolve_base(base_workdir), base_step, abstract)
    nnx.replace_by_pure_dict(state, stored)
    nnx.update(model, state)
    freeze(model)
    add_lora_experts(model, experts_per_layer, k=k, rank=rank, alpha=alpha, router=router,
                     rngs=rngs)
    return model


def resolve_base(base_workdir: str) -> str:
    """`base_workdir` with '{seed}' replaced by `train.seed`, absolute when local."""
    if SEED_FIELD in base_workdir:
        try:
            seed = gin.query_parameter("train.seed")
        except ValueError:  # not bound: the trainer's default
            seed = 0
        base_workdir = base_workdir.replace(SEED_FIELD, str(seed))
    path = paths.as_path(base_workdir)
    return str(path) if str(path).startswith("gs://") else os.path.abspath(base_workdir)


def _spec(abstract: Any) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """A hashable description of the restore targets (part of the cache key)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return tuple((jax.tree_util.keystr(p), tuple(a.shape), str(a.dtype)) for p, a in flat)


_CACHE: dict[tuple[str, int | None, tuple], Any] = {}


def _read_base(workdir: str, step: int | None, abstract: Any) -> Any:
    """The base checkpoint's params as numpy arrays, cached per (workdir, step, shapes):
    the trainer builds the model more than once. Read in a worker thread: `build_model`
    traces the model factory under `nnx.jit`, and the restore must run eagerly."""
    key = (workdir, step, _spec(abstract))
    if key not in _CACHE:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            value = pool.submit(_read_base_eagerly, workdir, step, abstract).result()
        _CACHE.clear()  # one base at a time
        _CACHE[key] = value
    return _CACHE[key]


def _read_base_eagerly(workdir: str, step: int | None, abstract: Any) -> Any:
    directory = paths.as_path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ValueError(f"mola_lm.base_workdir={workdir!r} has no checkpoints/ directory: "
                         f"train the dense base run first (a relative base_workdir is taken "
                         f"from the current directory, {os.getcwd()!r})")
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        try:
            picked = checkpointer.pick_step(step, option="mola_lm.base_step")
        except FileNotFoundError as e:
            raise ValueError(f"mola_lm.base_workdir={workdir!r}: {e}") from e
        try:
            restored = checkpointer.restore_step(picked, abstract, None)
        except CheckpointMismatchError as e:
            raise ValueError(f"mola_lm.base_workdir={workdir!r} step {picked} does not match "
                             f"the base model of this run's TransformerLM bindings (include "
                             f"the base run's model gin): {e}") from e
    finally:
        checkpointer.close()
    return jax.tree.map(np.asarray, restored.params)
