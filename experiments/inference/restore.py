"""A workdir's model, restored read-only for inference (scoring, generation).

`restore_model(workdir)` parses the run's `config.gin` (gin is cleared first),
builds the model, makes its MoE layers dropless, restores the parameters of
the latest intact checkpoint (or `step`) without writing anything (a training
run may still be writing), and turns the checkpoint's loss-free selection
biases into the `router_state` the forward gets, as in training.

Dropless: every `MoeLayer`'s `eval_capacity_factor` is set to None on the
built model (a static attribute, part of the graph), so a run trained with a
capacity factor drops no token at inference. Gin cannot express this
(`MoeLayer.eval_capacity_factor = None` means "same as capacity_factor").

Sharding: when the run's config binds `MESH_SHAPE`, the model gets the run's
`Sharding` (mesh, logical axis rules, expert-parallel options) as in
training: `Sharding.configure_dispatch` chooses the MoE dispatch (the
all-to-all expert-parallel one when the "expert" rule spans devices) before
the model is split, and the parameters are placed on the mesh by their
logical axes. Code calling the model traces under `RestoredModel.context()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from experiments.runtime import gin_utils, paths
from experiments.runtime import mesh as mesh_lib
from experiments.runtime.checkpoints import Checkpointer
from experiments.train import trainer  # noqa: F401  (registers the run config's configurables)
from experiments.train.config import model_vocab_size
from experiments.train.run_state import build_model, split_model
from layers.moe_layer import MoeLayer
from layers.params import logical_axes_of
from moe.router_state import SELECTION_BIAS, RouterState


@dataclasses.dataclass
class RestoredModel:
    """A checkpoint's model, ready for deterministic forward passes.

    graphdef, params (nested dict of arrays, on the mesh when `sharding` is
    set), rest (non-parameter state): `nnx.merge(graphdef, params, rest)` is the
    model (`model()`). router_state: the checkpoint's selection biases (empty
    when it has none). sharding: the run's `Sharding` when its config binds
    MESH_SHAPE, else None. dispatch: the dispatch line (`configure_dispatch`).
    """

    workdir: paths.Path
    step: int
    vocab_size: int
    graphdef: nnx.GraphDef
    params: Any
    rest: Any
    router_state: RouterState
    sharding: mesh_lib.Sharding | None = None
    dispatch: str = ""

    def model(self) -> nnx.Module:
        """The merged nnx module (inside jit: merge there, from the fields)."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The run's mesh, rules and expert-parallel options (nothing when unsharded)."""
        if self.sharding is None:
            yield
        else:
            with self.sharding.context():
                yield

    @property
    def batch_shards(self) -> int:
        """How many ways a batch is split on the mesh (1 unsharded)."""
        return 1 if self.sharding is None else self.sharding.batch_shards


def model_cls() -> type:
    """`train.model_cls` as configured in the run (TransformerLM by default)."""
    try:
        return gin.query_parameter("train.model_cls").scoped_configurable_fn
    except ValueError:
        from layers.transformer import TransformerLM  # pylint: disable=g-import-not-at-top
        return TransformerLM


def make_dropless(model: nnx.Module) -> int:
    """Sets `eval_capacity_factor = None` on every MoeLayer of `model`; returns how many."""
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, MoeLayer)]
    for layer in layers:
        layer.eval_capacity_factor = None
    return len(layers)


def parse_run_config(workdir: paths.PathLike) -> None:
    """Clears gin and parses the workdir's saved `config.gin` (local or `gs://`)."""
    workdir = paths.as_path(workdir)
    path = workdir / gin_utils.CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir!s} a training or imported workdir?")
    gin.clear_config()
    gin_utils.parse([str(path)], [])


def restore_model(workdir: paths.PathLike, step: int | None = None, *,
                  causal_only: bool = True) -> RestoredModel:
    """Restores `workdir`'s model (latest intact checkpoint, or `step`), read-only.

    Refuses a non-causal model when `causal_only` (scoring and generation need
    a decoder; the routing analysis and statistics do not) and a workdir
    without checkpoints (FileNotFoundError).
    """
    workdir = paths.as_path(workdir)
    parse_run_config(workdir)
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir() or not any(checkpoints.iterdir()):
        raise FileNotFoundError(f"no checkpoint under {checkpoints}")
    vocab_size = model_vocab_size()
    model = build_model(model_cls(), vocab_size, seed=0)
    if causal_only and not getattr(model, "causal", True):
        raise ValueError(f"{workdir}: scoring and generation need a causal decoder; the run has "
                         f"TransformerLM.causal = False")
    make_dropless(model)
    sharding = mesh_lib.Sharding() if mesh_lib.mesh_shape_from_gin() is not None else None
    dispatch = "" if sharding is None else sharding.configure_dispatch(model)
    graphdef, params, rest = split_model(model)
    checkpointer = Checkpointer(checkpoints, read_only=True)
    try:
        abstract = jax.eval_shape(lambda: params)
        if step is None:
            restored = checkpointer.restore_latest(abstract, None)
        else:
            restored = checkpointer.restore_step(step, abstract, None)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no intact checkpoint under {checkpoints}")
    params = restored.params
    if sharding is not None:
        params = sharding.place_params(params, logical_axes_of(model))
    biases = restored.balance_state or {}
    router_state = RouterState(layers={
        layer: {SELECTION_BIAS: jnp.asarray(biases[layer])}
        for layer in getattr(model, "moe_layer_names", ()) if layer in biases})
    return RestoredModel(workdir=workdir, step=restored.step, vocab_size=vocab_size,
                         graphdef=graphdef, params=params, rest=rest, router_state=router_state,
                         sharding=sharding, dispatch=dispatch)
