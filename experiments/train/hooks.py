"""Step hooks: what a training feature adds to the loop, behind one interface.

A step hook is one class (docs/training.md, "Step hooks", has a worked example). The
trainer calls, for every optimizer step `step` (1-based):

  lines = hook.messages(step, state)                           # printed before the step
  batch = hook.before_step(step, batch)                       # e.g. masked-LM masks
  router_state = merge of hook.router_state(step, state, ctx)  # per-step router inputs
  ... the train step runs with `router_state` ...
  state, train = hook.after_step(step, state, train, metrics, ctx)
  scalars |= hook.scalars(step, state, metrics)                # logged with the step
  ... evaluation (with `hook.router_state(step + 1, state, ctx, for_eval=True)`)
  ... checkpoint (with every hook's `state`) ...
  hook.end_of_step(step, ctx)

A hook's *state* is a flat `{key: numpy array}` it owns: the trainer keeps it
between calls (hooks themselves are frozen configurations), saves it in every
checkpoint under the hook's `name` and hands it back on resume
(`restore_state`). Hooks that change the model's structure during a run (the
EvoMoE dense -> MoE switch) also say which structure the state after a step
has (`structure_after`) and how to build it (`model_for`); `after_step` then
returns the new `TrainState`.

Every method has a no-op default; a hook overrides what it needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from moe.router_state import RouterState

HookState = dict[str, np.ndarray]
Batch = Mapping[str, np.ndarray]
SINGLE = "model"  # the structure of a run whose hooks never change it


class TrainState(NamedTuple):
    """The trained state: its model structure, parameters and optimizer state."""

    structure: str
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What the trainer lends its hooks.

    Attributes:
      num_steps: optimizer steps of the run.
      base_key: the run's base RNG key (`fold_in(base_key, step)` keys step `step`).
      tx: the optimizer.
      structure: the model structure currently trained.
      experts_per_layer: `{moe layer: E}` of that structure's model.
      initial_state: `structure -> (params, opt_state)`, a freshly initialised
        state of another structure (for hooks that switch structure).
      experts_of: `structure -> {moe layer: E}` of any structure.
      flush: waits for in-flight checkpoint saves and flushes the metric files.
    """

    num_steps: int
    base_key: jax.Array
    tx: Any
    structure: str
    experts_per_layer: Mapping[str, int]
    initial_state: Callable[[str], tuple[Any, Any]]
    experts_of: Callable[[str], Mapping[str, int]]
    flush: Callable[[], None] = lambda: None

    def for_structure(self, structure: str) -> HookContext:
        return dataclasses.replace(self, structure=structure,
                                   experts_per_layer=self.experts_of(structure))


class StepHook:
    """Base class of step hooks (see the module docstring)."""

    name: str = ""  # key of the hook's state in checkpoints; unique among a run's hooks

    # -- model structure (only hooks that switch it) --------------------------
    def structure_after(self, step: int) -> str | None:
        """Structure of the state after `step` optimizer steps (0 = initial), or None."""
        del step
        return None

    def model_for(self, structure: str, model_cls: Callable[..., Any]) -> Callable[..., Any] | None:
        """The model constructor of `structure`, or None when the hook does not define it."""
        del structure, model_cls
        return None

    def check_model(self, structure: str, model: Any) -> None:
        """Refuses (ValueError) a model this hook cannot work with."""
        del structure, model

    # -- state -------------------------------------------------------------------
    def init_state(self, ctx: HookContext) -> HookState:
        del ctx
        return {}

    def restore_state(self, saved: HookState | None, step: int, ctx: HookContext) -> HookState:
        """The state on resuming after `step`; `saved` is None when the checkpoint has none."""
        del step
        return dict(saved) if saved is not None else self.init_state(ctx)

    # -- per step -------------------------------------------------------------
    def messages(self, step: int, state: HookState) -> Sequence[str]:
        """Lines the console announces before step `step` runs (e.g. a phase change)."""
        del step, state
        return ()

    def before_step(self, step: int, batch: Batch) -> Batch:
        del step
        return batch

    def eval_batch(self, index: int, batch: Batch) -> Batch:
        """Validation batch `index` as the run evaluates it (rewritten once, before the
        first evaluation; e.g. the masked-LM masks, `experiments.train.objective`)."""
        del index
        return batch

    def router_state(self, step: int, state: HookState, ctx: HookContext, *,
                     for_eval: bool = False) -> RouterState:
        """Router inputs of step `step` (or, `for_eval`, of an evaluation after step - 1)."""
        del step, state, ctx, for_eval
        return RouterState()

    def after_step(self, step: int, state: HookState, train: TrainState,
                   metrics: Mapping[str, Any], ctx: HookContext) -> tuple[HookState, TrainState]:
        """Work after step `step` with its host metrics; may replace the trained state."""
        del step, metrics, ctx
        return state, train

    def scalars(self, step: int, state: HookState, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Train scalars of step `step`, logged with the step's record."""
        del step, state, metrics
        return {}

    def end_of_step(self, step: int, ctx: HookContext) -> None:
        """Called once step `step` is logged, evaluated and (if due) saved."""
        del step, ctx


def check_names(hooks: Sequence[StepHook]) -> None:
    names = [h.name for h in hooks]
    for hook in hooks:
        if not hook.name:
            raise ValueError(f"step hook {type(hook).__name__} has no `name`")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two step hooks share the name(s) {duplicates}; hooks: "
                         f"{[type(h).__name__ for h in hooks]}")


def structure_after(hooks: Sequence[StepHook], step: int) -> str:
    """The model structure after `step` steps: the first hook that decides it, else "model"."""
    for hook in hooks:
        structure = hook.structure_after(step)
        if structure is not None:
            return structure
    return SINGLE


def model_for(hooks: Sequence[StepHook], structure: str,
              model_cls: Callable[..., Any]) -> Callable[..., Any]:
    for hook in hooks:
        factory = hook.model_for(structure, model_cls)
        if factory is not None:
            return factory
    if structure != SINGLE:
        raise ValueError(f"no step hook builds the model structure {structure!r}")
    return model_cls


def router_state(hooks: Sequence[StepHook], states: Mapping[str, HookState], step: int,
                 ctx: HookContext, *, for_eval: bool = False) -> RouterState:
    """All hooks' router inputs merged into one `RouterState` (a key set twice is an error)."""
    merged = RouterState()
    for hook in hooks:
        merged = merged.merge(hook.router_state(step, states[hook.name], ctx, for_eval=for_eval))
    return merged


def eval_batches(hooks: Sequence[StepHook], batches: Sequence[Batch]) -> list[Batch]:
    """The validation batches after every hook's `eval_batch`, in hook order."""
    out = []
    for index, batch in enumerate(batches):
        for hook in hooks:
            batch = hook.eval_batch(index, batch)
        out.append(batch)
    return out


def messages(hooks: Sequence[StepHook], states: Mapping[str, HookState], step: int) -> list[str]:
    """Every hook's announcements before step `step`, in hook order."""
    return [line for hook in hooks for line in hook.messages(step, states[hook.name])]
