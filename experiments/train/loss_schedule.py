"""A piecewise-constant schedule of one loss weight, as a step hook.

    train.hooks = [@LossWeightSchedule()]
    LossWeightSchedule.weight = 'mtp_weight'      # a LossWeights attribute
    LossWeightSchedule.values = (0.3, 0.1)        # DeepSeek-V3's MTP lambda
    LossWeightSchedule.boundaries = (400,)        # value i applies from step boundaries[i-1] + 1

The weight of step s (1-based) is `values[i]`, i = the number of boundaries < s. It
reaches the train step as a traced input (the step's RouterState, key
`train_step.scheduled_weight_key(weight)`), so a change never recompiles; it
replaces the constant `LossWeights.<weight>`. Logged as `loss_weight/<weight>`. The
schedule is a function of the step, so the hook has no state and a resumed run
continues it exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import gin
import numpy as np

from experiments.train.hooks import HookContext, HookState, StepHook
from experiments.train.train_step import LossWeights, scheduled_weight_key
from moe.layer_aux import MoeAux
from moe.router_state import RouterState


def _schedulable() -> tuple[str, ...]:
    """LossWeights attributes a hook may schedule: the unscoped losses' weights."""
    scoped = {MoeAux.loss_weight_name(n) for n in MoeAux.loss_names()} - {
        MoeAux.loss_weight_name(n) for n in MoeAux.unscoped_loss_names()}
    return tuple(f.name for f in dataclasses.fields(LossWeights)
                 if f.name.endswith("_weight") and f.name not in scoped | {"seq_balance_weight"})


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossWeightSchedule(StepHook):
    """Attributes:
      weight: the `LossWeights` attribute scheduled (e.g. 'mtp_weight', 'z_loss_weight').
      values: the weight in each interval (>= 0).
      boundaries: increasing steps; `len(values) == len(boundaries) + 1`.
    """

    weight: str = "mtp_weight"
    values: tuple[float, ...] = (0.3,)
    boundaries: tuple[int, ...] = ()
    name = "loss_weight_schedule"

    def __post_init__(self):
        allowed = _schedulable()
        if self.weight not in allowed:
            raise ValueError(f"LossWeightSchedule.weight must be one of {allowed}, "
                             f"got {self.weight!r}")
        values, boundaries = tuple(self.values), tuple(self.boundaries)
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"LossWeightSchedule.values needs one more entry than "
                             f"boundaries, got values={values}, boundaries={boundaries}")
        if any(v < 0 for v in values):
            raise ValueError(f"LossWeightSchedule.values must be >= 0, got {values}")
        if any(b < 1 for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
            raise ValueError(f"LossWeightSchedule.boundaries must be increasing steps >= 1, "
                             f"got {boundaries}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "boundaries", boundaries)

    def value(self, step: int) -> float:
        """The weight of optimizer step `step` (1-based)."""
        return float(self.values[int(np.searchsorted(self.boundaries, step, side="left"))])

    def router_state(self, step: int, state: HookState, ctx: HookContext, *,
                     for_eval: bool = False) -> RouterState:
        return RouterState(shared={scheduled_weight_key(self.weight):
                                   np.float32(self.value(step))})

    def scalars(self, step: int, state: HookState, metrics: Mapping[str, Any]) -> dict[str, float]:
        return {f"loss_weight/{self.weight}": self.value(step)}
