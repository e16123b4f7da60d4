"""EvoMoE training phases: dense warm-up -> diversify -> DTS soft -> hard.

A `PhasePlan` (gin) splits the optimizer steps 1..num_steps of one run:

  steps 1..dense_steps                 "dense": the model with one expert-sized
                                       dense FFN at every MoE position
                                       (`TransformerLM(dense_baseline=True, dense_baseline_k=1)`);
  after step dense_steps               diversify: the MoE model is built, every
                                       non-expert parameter is copied from the
                                       dense model, each MoE layer's E experts are
                                       spawned from its dense FFN
                                       (`moe.upcycle.spawn_experts`), the router is
                                       fresh; the optimizer state is carried over
                                       (fresh moments for new parameters, or the
                                       dense FFN's moments if `copy_moments`);
  steps dense_steps+1..soft_until      "soft": dense-to-sparse gate with the
                                       temperature annealed from the first soft step;
  steps soft_until+1..num_steps        "hard": top-k of the Gumbel-softmax (k of
                                       the model, 1 in the paper).

`PhasePlan` is a step hook (`experiments.train.hooks`): it names the model
structure of every step ("dense" or "moe"), builds both, feeds the DTS gate its
temperature and hard flag through the step's `RouterState`, and performs the
diversify switch in `after_step`. Everything is a pure function of the step,
so a checkpoint taken in any phase resumes into that phase: the state saved
after step s has the dense structure iff s < dense_steps, and the gate inputs
of step s come from `dts_state(s)`. The hook keeps no state of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.convert import dense_to_moe
from experiments.train.hooks import HookContext, HookState, StepHook, TrainState
from layers import scan as scan_lib
from moe import upcycle
from moe.dense_to_sparse import TEMPERATURE_SCHEDULES, DtsState, temperature_schedule
from moe.router_state import DTS_HARD, DTS_TEMPERATURE, RouterState
from moe.validation import check_one_of

_log = logging.getLogger(__name__)

DENSE, MOE = "dense", "moe"
PHASES = ("dense", "soft", "hard")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PhasePlan(StepHook):
    """The EvoMoE schedule (docs/evomoe.md), a step hook (`train.phase_plan = @PhasePlan()`).

    Attributes:
      dense_steps: N, steps of dense warm-up (0 = start from the MoE model,
        no diversify).
      soft_until: S >= N, last step of the soft DTS phase; later steps are hard.
        S = N skips the soft phase.
      diversify: spawn strategy, one of `moe.upcycle.DIVERSIFY_STRATEGIES`.
      diversify_ratio: keep probability for "mask" (EvoMoE's zeroed fraction r
        is 1 - ratio), re-initialised fraction for "drop_upcycling".
      diversify_noise_std: noise std for "noise", relative to each matrix's std.
      temperature_schedule: "exponential" or "linear".
      max_temperature, min_temperature: tau_max (first soft step) and tau_min.
      temperature_decay_steps: D, steps from the first soft step to tau_min.
      copy_moments: give each spawned expert the dense FFN's Adam moments
        (else fresh zeros). The router's moments are always fresh.
    """

    dense_steps: int = 0
    soft_until: int = 0
    diversify: str = "mask"
    diversify_ratio: float = 0.5
    diversify_noise_std: float = 0.01
    temperature_schedule: str = "exponential"
    max_temperature: float = 2.0
    min_temperature: float = 0.3
    temperature_decay_steps: int = 1
    copy_moments: bool = False
    name = "evomoe_phases"

    def __post_init__(self):
        if self.dense_steps < 0:
            raise ValueError(f"PhasePlan.dense_steps must be >= 0, got {self.dense_steps}")
        if self.soft_until < self.dense_steps:
            raise ValueError(f"PhasePlan.soft_until must be >= dense_steps={self.dense_steps}, "
                             f"got {self.soft_until}")
        check_one_of("PhasePlan.diversify", self.diversify, upcycle.DIVERSIFY_STRATEGIES)
        check_one_of("PhasePlan.temperature_schedule", self.temperature_schedule,
                     TEMPERATURE_SCHEDULES)
        temperature_schedule(self.temperature_schedule, max_temperature=self.max_temperature,
                             min_temperature=self.min_temperature,
                             decay_steps=self.temperature_decay_steps)  # validates

    def phase(self, step: int) -> str:
        """Phase of optimizer step `step` (1-based): "dense", "soft" or "hard"."""
        if step <= self.dense_steps:
            return "dense"
        return "soft" if step <= self.soft_until else "hard"

    def temperature(self, step: int) -> float:
        """tau of step `step`; n = 0 at the first soft step (tau_max before it)."""
        schedule = temperature_schedule(
            self.temperature_schedule, max_temperature=self.max_temperature,
            min_temperature=self.min_temperature, decay_steps=self.temperature_decay_steps)
        return float(schedule(max(step - self.dense_steps - 1, 0)))

    def dts_state(self, step: int) -> DtsState:
        """The DTS gate inputs of step `step` (traced by the train step)."""
        return DtsState(temperature=np.float32(self.temperature(step)),
                        hard=np.bool_(self.phase(step) == "hard"))

    # -- the step-hook interface ----------------------------------------------
    def structure_after(self, step: int) -> str:
        """Model structure of the state after `step` optimizer steps (0 = initial state)."""
        return DENSE if step < self.dense_steps else MOE

    def model_for(self, structure: str, model_cls: Callable[..., Any]) -> Callable[..., Any] | None:
        """`model_cls` for "moe"; for "dense" the same model with an expert-sized
        dense FFN at every MoE position."""
        if structure == DENSE:
            return functools.partial(model_cls, dense_baseline=True, dense_baseline_k=1)
        return model_cls if structure == MOE else None

    def check_model(self, structure: str, model: Any) -> None:
        if structure == MOE:
            check_moe_model(self, model)

    def router_state(self, step: int, state: HookState, ctx: HookContext, *,
                     for_eval: bool = False) -> RouterState:
        """The gate's temperature and hard flag in training steps after the dense phase
        (evaluation routes without them: the deterministic top-k of the gate)."""
        if for_eval or self.phase(step) == "dense":
            return RouterState()
        dts = self.dts_state(step)
        return RouterState(shared={DTS_TEMPERATURE: dts.temperature, DTS_HARD: dts.hard})

    def after_step(self, step: int, state: HookState, train: TrainState,
                   metrics: Mapping[str, Any], ctx: HookContext) -> tuple[HookState, TrainState]:
        """The diversify switch after the last dense step."""
        if self.structure_after(step) == train.structure:
            return state, train
        fresh_params, _ = ctx.initial_state(MOE)
        moe_layers = list(ctx.experts_of(MOE))
        params = diversify_params(train.params, fresh_params, moe_layers, self,
                                  diversify_key(ctx.base_key, step))
        del fresh_params
        opt_state = transfer_opt_state(train.opt_state, params, ctx.tx, moe_layers,
                                       copy_moments=self.copy_moments)
        return state, TrainState(MOE, params, opt_state)

    def messages(self, step: int, state: HookState) -> list[str]:
        """Announces each phase at its first step (and the diversify before the first MoE step)."""
        phase = self.phase(step)
        if step > 1 and phase == self.phase(step - 1):
            return []
        if phase == "dense":
            return [f"EvoMoE dense phase: steps 1..{self.dense_steps} train the dense model"]
        done = (f"diversified the dense model into the MoE model ({self.diversify!r}) after "
                f"step {self.dense_steps}; " if step == self.dense_steps + 1 and self.dense_steps
                else "")
        if phase == "soft":
            return [f"EvoMoE soft phase: {done}steps {step}..{self.soft_until} route with the "
                    f"dense-to-sparse gate, temperature {self.temperature(step):.3g} -> "
                    f"{self.min_temperature:.3g} ({self.temperature_schedule})"]
        return [f"EvoMoE hard phase: {done}steps {step}.. route with the top-k of the gate"]

    def scalars(self, step: int, state: HookState, metrics: Mapping[str, Any]) -> dict[str, float]:
        """`phase` (0 dense, 1 soft, 2 hard) and, after the dense phase, `gate_temperature`."""
        phase = self.phase(step)
        out = {"phase": float(PHASES.index(phase))}
        if phase != "dense":
            out["gate_temperature"] = self.temperature(step)
        return out


def check_moe_model(plan: PhasePlan | None, model: Any) -> None:
    """A plan with a soft phase needs MoE layers whose router reads the gate's temperature
    (`layers.routers.DenseToSparseRouter`)."""
    if plan is None or plan.soft_until <= plan.dense_steps:
        return
    keys = getattr(model, "router_state_keys", {})
    if not any(DTS_TEMPERATURE in layer_keys for layer_keys in keys.values()):
        raise ValueError(
            f"PhasePlan has a soft phase (steps {plan.dense_steps + 1}..{plan.soft_until}) but "
            f"no MoE layer has the dense-to-sparse gate (MoE layers: {tuple(keys)}); "
            f"set MoeLayer.router = @DenseToSparseRouter")


def diversify_key(base_key: jax.Array, step: int) -> jax.Array:
    """The RNG key of the diversify step after `step` (a stream the steps never use)."""
    return jax.random.fold_in(jax.random.fold_in(base_key, step), 0x0D1F)


def diversify_params(dense_params: Mapping[str, Any], moe_params: Mapping[str, Any],
                     moe_layers: list[str], plan: PhasePlan, rng: jax.Array) -> dict[str, Any]:
    """MoE parameters from a dense model's.

    Every MoE-model parameter whose path and shape exist in `dense_params` is
    copied; each MoE layer's `ffn/experts` are spawned from the dense
    `ffn` weights of that layer; what is left (the routers) keeps its value in
    `moe_params`, a freshly initialised MoE model. Either model may have scanned
    layers (`layers.scan`): the mapping runs unscanned, the result has
    `moe_params`' layout.
    """
    fresh = []
    layout, dense_params = moe_params, scan_lib.unscan_tree(dense_params)
    moe_params = scan_lib.unscan_tree(moe_params)

    def experts_for(layer: str, dense_ffn: dict[str, Any], experts: dict[str, Any]) -> dict:
        spawned = upcycle.spawn_experts(dense_ffn, next(iter(experts.values())).shape[0],
                                        strategy=plan.diversify,
                                        rng=jax.random.fold_in(rng, moe_layers.index(layer)),
                                        ratio=plan.diversify_ratio,
                                        noise_std=plan.diversify_noise_std)
        if set(spawned) != set(experts):
            raise ValueError(f"{layer}: dense FFN weights {sorted(spawned)} do not match the "
                             f"experts' {sorted(experts)}")
        for name, w in spawned.items():
            if w.shape != experts[name].shape:
                raise ValueError(f"{layer}/ffn/experts/{name}: spawned shape {w.shape} != "
                                 f"expert shape {experts[name].shape} (the dense FFN must be "
                                 f"expert-sized)")
        return {name: w.astype(experts[name].dtype) for name, w in spawned.items()}

    def missing(path: tuple[str, ...], leaf: Any) -> Any:
        fresh.append(dense_to_moe.path_str(path))
        return leaf

    out = dense_to_moe.map_tree(dense_params, moe_params, moe_layers,
                                experts_for=experts_for, missing=missing)
    _log.info("diversify: %d layers spawned with %r; fresh parameters: %s", len(moe_layers),
              plan.diversify, fresh)
    return scan_lib.match_layer_layout(out, layout)


def transfer_opt_state(old_state: Any, new_params: Any, tx: optax.GradientTransformation,
                       moe_layers: list[str], *, copy_moments: bool) -> Any:
    """The optimizer state for `new_params` after a structure change.

    Leaves of `tx.init(new_params)` whose path and shape exist in `old_state`
    are copied (moments of unchanged parameters, step counts and so the
    learning-rate schedule position). With `copy_moments`, the moments of a
    layer's `ffn/experts/<w>` are the dense `ffn/<w>` moments broadcast over
    experts; otherwise, like the router's, they start at zero.
    """
    def cast(source: Any, leaf: Any) -> Any:
        return jnp.asarray(source, leaf.dtype)

    def experts_for(layer: str, dense_ffn: dict[str, Any], experts: dict[str, Any]) -> dict:
        out = dict(experts)
        if copy_moments:
            for name, leaf in experts.items():
                dense = dense_ffn.get(name)
                if dense is not None and np.shape(dense) == np.shape(leaf)[1:]:
                    out[name] = jnp.broadcast_to(jnp.asarray(dense, leaf.dtype), leaf.shape)
        return out

    def moments(dense: Any, fresh: Any) -> Any:
        return dense_to_moe.map_tree(dense, fresh, moe_layers, experts_for=experts_for,
                                     missing=lambda path, leaf: leaf, copy=cast)

    def other(dense: Any, fresh: Any) -> Any:
        return cast(dense, fresh) if np.shape(dense) == np.shape(fresh) else fresh

    # The mapping runs on unscanned trees; the result has `new_params`' layout.
    plan = scan_lib.find_plan(new_params)
    unscanned = scan_lib.unscan_tree(new_params)
    old_state = scan_lib.to_layer_plan(old_state, scan_lib.LayerPlan(plan.num_layers))
    out = dense_to_moe.map_opt_state(old_state, tx.init(unscanned), set(unscanned),
                                     moments=moments, other=other)
    return scan_lib.to_layer_plan(out, plan)
