"""The trainer's per-structure runtimes and the start/resume of a run."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.data import pipeline as data_lib
from experiments.reporting import console
from experiments.runtime import mesh as mesh_lib
from experiments.runtime.checkpoints import Checkpointer
from experiments.train import hooks as hooks_lib
from experiments.train.config import TrainSetup, check_data_vocab
from experiments.train.evaluation import make_eval_step
from experiments.train.flops import FlopCounter, flop_counter
from experiments.train.hooks import HookContext, HookState, StepHook, TrainState
from experiments.train.train_step import make_train_step
from layers.params import logical_axes_of

_log = logging.getLogger(__name__)


def build_model(model_cls: Callable[..., Any], vocab_size: int, seed: int) -> nnx.Module:
    """`model_cls(vocab_size=..., rngs=...)`, other arguments from gin.

    Initialised inside one `nnx.jit`: eagerly, every initializer would be
    compiled on its own (seconds on CPU).
    """
    return nnx.jit(lambda: model_cls(vocab_size=vocab_size, rngs=nnx.Rngs(params=seed)))()


def check_model(setup: TrainSetup) -> None:
    """Builds the first and last model structures' shapes only (`nnx.eval_shape`:
    nothing compiled or allocated), checks them with the hooks and chooses their
    dispatch, so that the model's configuration errors surface before the trainer
    touches the workdir."""
    vocab_size, seed = setup.vocab_size, setup.config.seed
    check_data_vocab(vocab_size, setup.data)
    for structure in dict.fromkeys(hooks_lib.structure_after(setup.hooks, step)
                                   for step in (0, setup.config.num_steps)):
        factory = hooks_lib.model_for(setup.hooks, structure, setup.config.model_cls)
        model = nnx.eval_shape(
            lambda f=factory: f(vocab_size=vocab_size, rngs=nnx.Rngs(params=seed)))
        for hook in setup.hooks:
            hook.check_model(structure, model)
        setup.sharding.configure_dispatch(model, tokens_per_call=_tokens_per_call(setup))


def _tokens_per_call(setup: TrainSetup) -> int:
    return setup.data.batch_size // setup.config.num_microbatches * setup.data.seq_len


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any], Any]:
    """`(graphdef, params as a plain nested dict, other state)`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest


class Runtime(NamedTuple):
    """What the trainer holds per model structure.

    params, opt_state: its initial state, or only its shapes
    (`jax.ShapeDtypeStruct`) once the trainer has taken it; experts_per_layer:
    `{moe layer: E}`; train_step, eval_step: the sharded steps; flops: its
    `FlopCounter`; param_counts: (total, active per token) parameters.
    """

    structure: str
    params: Any
    opt_state: Any
    experts_per_layer: dict[str, int]
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    flops: FlopCounter
    param_counts: tuple[int, int] = (0, 0)


class Runtimes:
    """The runtime of each model structure of a run, built when first needed."""

    def __init__(self, setup: TrainSetup, tx: Any):
        self.setup, self.tx = setup, tx
        self._built: dict[str, Runtime] = {}
        self.dispatch_lines: dict[str, str] = {}  # {structure: the dispatch that runs}

    def __getitem__(self, structure: str) -> Runtime:
        if structure not in self._built:
            self._built[structure] = self._build(structure)
        return self._built[structure]

    def _build(self, structure: str) -> Runtime:
        setup, config = self.setup, self.setup.config
        factory = hooks_lib.model_for(setup.hooks, structure, config.model_cls)
        model = build_model(factory, setup.vocab_size, config.seed)
        for hook in setup.hooks:
            hook.check_model(structure, model)
        sharder, num_domains = setup.sharding, len(setup.data.domains())
        self.dispatch_lines[structure] = sharder.configure_dispatch(
            model, tokens_per_call=_tokens_per_call(setup))
        graphdef, params, rest = split_model(model)
        params = sharder.place_params(params, logical_axes_of(model))
        train_step = make_train_step(graphdef, rest, self.tx, loss_weights=setup.loss_weights,
                                     num_microbatches=config.num_microbatches,
                                     num_domains=num_domains,
                                     data_parallel_size=sharder.batch_shards)
        return Runtime(
            structure=structure, params=params, opt_state=sharder.init_opt_state(self.tx, params),
            experts_per_layer=dict(getattr(model, "experts_per_layer", {})),
            train_step=sharder.wrap_train_step(train_step),
            eval_step=sharder.wrap_eval_step(make_eval_step(graphdef, rest, num_domains)),
            flops=flop_counter(model, batch_size=setup.data.batch_size,
                               seq_len=setup.data.seq_len,
                               num_microbatches=config.num_microbatches),
            param_counts=console.param_counts(model))

    def take_initial_state(self, structure: str) -> tuple[Any, Any]:
        """The structure's initial (params, opt_state). The runtime keeps only their
        shapes afterwards: no second model and optimizer state stays on the devices."""
        r = self[structure]
        self._built[structure] = r._replace(params=mesh_lib.abstract_like(r.params),
                                            opt_state=mesh_lib.abstract_like(r.opt_state))
        return r.params, r.opt_state

    def abstract_state(self, step: int) -> tuple[Any, Any]:
        """Restore targets of the state after `step` steps, on this run's mesh."""
        r = self[hooks_lib.structure_after(self.setup.hooks, step)]
        return mesh_lib.abstract_like((r.params, r.opt_state))


@dataclasses.dataclass
class RunState:
    """Everything the loop carries from step to step."""

    step: int
    train: TrainState
    base_key: jax.Array
    hook_states: dict[str, HookState]
    ctx: HookContext
    resumed: bool


def start(setup: TrainSetup, runtimes: Runtimes, checkpointer: Checkpointer, train_iter: Any,
          flush: Callable[[], None]) -> RunState:
    """The latest intact checkpoint's state (data position included), or a fresh one."""
    hooks: Sequence[StepHook] = setup.hooks
    restored = checkpointer.restore_latest(None, None,
                                           abstract_for_step=runtimes.abstract_state)
    step = 0 if restored is None else restored.step
    structure = hooks_lib.structure_after(hooks, step)
    params, opt_state = runtimes.take_initial_state(structure)  # dropped below when resuming
    base_key = jax.random.PRNGKey(setup.config.seed)
    if restored is not None:
        params, opt_state = restored.params, restored.opt_state
        base_key = jnp.asarray(restored.rng_key_data, jnp.uint32)
        if restored.data_state:  # {} = an imported model: the data starts at the beginning
            data_lib.restore_iterator_state(train_iter, restored.data_state)
    ctx = HookContext(num_steps=setup.config.num_steps, base_key=base_key, tx=runtimes.tx,
                      structure=structure, experts_per_layer=runtimes[structure].experts_per_layer,
                      initial_state=runtimes.take_initial_state,
                      experts_of=lambda s: runtimes[s].experts_per_layer, flush=flush)
    if restored is None:
        states = {h.name: h.init_state(ctx) for h in hooks}
    else:
        states = {h.name: h.restore_state(restored.hook_state.get(h.name), step, ctx)
                  for h in hooks}
        _log.info("resumed from step %d of %s", step, checkpointer.directory)
    return RunState(step=step, train=TrainState(structure, params, opt_state), base_key=base_key,
                    hook_states=states, ctx=ctx, resumed=restored is not None)


def after_step(hooks: Sequence[StepHook], run: RunState, metrics: Any,
               runtimes: Runtimes) -> None:
    """Every hook's `after_step`, in order; follows a change of model structure."""
    train = run.train
    for hook in hooks:
        run.hook_states[hook.name], train = hook.after_step(
            run.step, run.hook_states[hook.name], train, metrics, run.ctx)
    if train.structure != run.train.structure:
        run.ctx = run.ctx.for_structure(train.structure)
        runtimes[train.structure]
    run.train = train
