"""Auxiliary-loss-free balancing as a step hook: the per-layer selection biases.

The biases `{moe layer: [E] float32}` live outside the trainable parameters:
they are the hook's state, which the trainer checkpoints. Each step they
reach the routers as the `selection_bias` of the step's `RouterState`
(selection only, no gradient, no weight decay, no optimizer state); after the
step they move against its load, `metrics["moe"][layer].counts` (every
micro-batch and, under `jit` over a mesh, every device). See docs/balancing.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from experiments.runtime.checkpoints import LOSS_FREE_HOOK
from experiments.train.hooks import HookContext, HookState, StepHook, TrainState
from moe import bias_balancing
from moe.layer_aux import MoeAux
from moe.router_state import SELECTION_BIAS, RouterState

Biases = dict[str, np.ndarray]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossFreeBalancing(bias_balancing.BiasUpdate, StepHook):
    """The bias update (`moe.bias_balancing.BiasUpdate`: rule, rate, schedule,
    decay_steps, freeze_fraction, recenter) as a step hook.

    Attributes:
      enabled: add this hook to the run (`experiments.train.config.TrainSetup.
        from_gin`); the fields of `BiasUpdate` configure it.
    """

    enabled: bool = False
    name = LOSS_FREE_HOOK

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as e:
            raise ValueError(f"LossFreeBalancing: {e}") from None

    def init_state(self, ctx: HookContext) -> HookState:
        """Zero biases for every MoE layer of the current model."""
        return {layer: np.zeros((e,), np.float32) for layer, e in ctx.experts_per_layer.items()}

    def restore_state(self, saved: HookState | None, step: int, ctx: HookContext) -> HookState:
        if saved is None:
            raise ValueError(f"LossFreeBalancing.enabled but the checkpoint at step {step} holds "
                             f"no selection biases; resume with the configuration it was "
                             f"trained with")
        return dict(saved)

    def _current(self, state: HookState, ctx: HookContext) -> Biases:
        """The biases of the current model's MoE layers (zeros for layers not seen yet)."""
        return {layer: state[layer] if layer in state else np.zeros((e,), np.float32)
                for layer, e in ctx.experts_per_layer.items()}

    def router_state(self, step: int, state: HookState, ctx: HookContext, *,
                     for_eval: bool = False) -> RouterState:
        return RouterState(layers={layer: {SELECTION_BIAS: bias}
                                   for layer, bias in self._current(state, ctx).items()})

    def after_step(self, step: int, state: HookState, train: TrainState,
                   metrics: Mapping[str, Any], ctx: HookContext) -> tuple[HookState, TrainState]:
        biases = self._current(state, ctx)
        if biases:
            state = {**state, **self.update(biases, metrics["moe"], step, ctx.num_steps)}
        return state, train

    def update(self, biases: Biases, moe_stats: Mapping[str, MoeAux], step: int,
               num_steps: int) -> Biases:
        """Biases after optimizer step `step` (1-based), from that step's counts."""
        return {layer: np.asarray(_update(
            jnp.asarray(bias), jnp.asarray(moe_stats[layer].counts, jnp.float32),
            self.rate_at(step - 1, num_steps), jnp.asarray(moe_stats[layer].num_tokens),
            rule=self.rule, recenter=self.recenter))
            for layer, bias in biases.items()}


@functools.partial(jax.jit, static_argnames=("rule", "recenter"))
def _update(bias, counts, rate, num_tokens, *, rule, recenter):
    return bias_balancing.update_bias(bias, counts, rate, rule=rule, recenter=recenter,
                                      num_tokens=num_tokens)
