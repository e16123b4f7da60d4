"""EvoMoE training phases: dense warm-up -> diversify -> DTS soft -> hard.

A `PhasePlan` (gin) splits the optimizer steps 1..num_steps of one run:

  steps 1..dense_steps                 "dense": the model with one expert-sized
                                       dense FFN at every MoE position
                                       (`TransformerLM(dense_baseline=True, k=1)`);
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

Everything is a pure function of the step, so a checkpoint taken in any phase
resumes into that phase: the state saved after step s has the dense structure
iff s < dense_steps, and the gate inputs of step s come from `dts_state(s)`.
Without a plan (`train.phase_plan = None`) there is a single structure, "model".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe import upcycle
from moe.dense_to_sparse import TEMPERATURE_SCHEDULES, DtsState, temperature_schedule
from moe.validation import check_one_of

_log = logging.getLogger(__name__)

DENSE, MOE, SINGLE = "dense", "moe", "model"
PHASES = ("dense", "soft", "hard")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """The EvoMoE schedule (spec §5). Values marked [U] in the spec are fields here.

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


class Runtime(NamedTuple):
    """What the trainer holds per model structure.

    structure: "dense", "moe" or "model"; params, opt_state: its initial state,
    or only its shapes (`jax.ShapeDtypeStruct`) once the trainer has taken it;
    moe_layers: its MoE layer names; train_step, eval_step: jitted steps;
    flops: its `experiments.train.flops.FlopCounter`.
    """

    structure: str
    params: Any
    opt_state: Any
    moe_layers: list[str]
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    flops: Any


def structure_after(plan: PhasePlan | None, step: int) -> str:
    """Model structure of the state after `step` optimizer steps (0 = initial state)."""
    if plan is None:
        return SINGLE
    return DENSE if step < plan.dense_steps else MOE


def model_factory(model_cls: Callable[..., Any], structure: str) -> Callable[..., Any]:
    """`model_cls` for "model"/"moe"; for "dense" the same model with an
    expert-sized dense FFN at every MoE position."""
    if structure == DENSE:
        return functools.partial(model_cls, dense_baseline=True, k=1)
    if structure in (MOE, SINGLE):
        return model_cls
    raise ValueError(f"structure must be one of {(DENSE, MOE, SINGLE)}, got {structure!r}")


def step_kwargs(plan: PhasePlan | None, step: int) -> dict[str, Any]:
    """Extra arguments of the train step for step `step`."""
    if plan is None or plan.phase(step) == "dense":
        return {}
    return {"model_kwargs": {"dts_state": plan.dts_state(step)}}


def step_scalars(plan: PhasePlan | None, step: int,
                 moe_stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Train scalars of step `step`: `active_experts` (mean over MoE layers of the
    experts per token) when the step ran MoE layers; with a plan, `phase` (0
    dense, 1 soft, 2 hard) and, after the dense phase, `gate_temperature`."""
    out = {}
    if moe_stats:
        out["active_experts"] = float(np.mean([float(s["active_experts"])
                                               for s in moe_stats.values()]))
    if plan is None:
        return out
    phase = plan.phase(step)
    out["phase"] = float(PHASES.index(phase))
    if phase != "dense":
        out["gate_temperature"] = plan.temperature(step)
    return out


def check_moe_model(plan: PhasePlan | None, model: Any) -> None:
    """A plan with a soft phase needs MoE layers with gating='dense_to_sparse'."""
    if plan is None or plan.soft_until <= plan.dense_steps:
        return
    names = tuple(getattr(model, "moe_layer_names", ()))
    gated = [n for n in names if getattr(getattr(model, n).ffn, "gating", None)
             == "dense_to_sparse"]
    if not gated:
        raise ValueError(
            f"PhasePlan has a soft phase (steps {plan.dense_steps + 1}..{plan.soft_until}) but "
            f"the model has no MoE layer with gating='dense_to_sparse' (MoE layers: {names}); "
            f"set TransformerLM.moe_kwargs['gating'] = 'dense_to_sparse'")


def diversify_key(base_key: jax.Array, step: int) -> jax.Array:
    """The RNG key of the diversify step after `step` (a stream the steps never use)."""
    return jax.random.fold_in(jax.random.fold_in(base_key, step), 0x0D1F)


def diversify_params(dense_params: Mapping[str, Any], moe_params: Mapping[str, Any],
                     moe_layers: list[str], plan: PhasePlan, rng: jax.Array) -> dict[str, Any]:
    """MoE parameters from a dense model's.

    Every MoE-model parameter whose path and shape exist in `dense_params` is
    copied; each MoE layer's `ffn/experts` are spawned from the dense
    `ffn` weights of that layer; what is left (the routers) keeps its value in
    `moe_params`, a freshly initialised MoE model.
    """
    dense_flat = dict(_flatten(dense_params))
    out = {}
    fresh = []
    for path, value in _flatten(moe_params):
        source = dense_flat.get(path)
        if source is not None and source.shape == value.shape:
            out[path] = source
        else:
            out[path] = value
            if not (len(path) > 2 and path[0] in moe_layers and path[1:3] == ("ffn", "experts")):
                fresh.append("/".join(path))
    for i, layer in enumerate(moe_layers):
        dense_ffn = {name: w for name, w in dense_params[layer]["ffn"].items()}
        experts = moe_params[layer]["ffn"]["experts"]
        num_experts = next(iter(experts.values())).shape[0]
        spawned = upcycle.spawn_experts(dense_ffn, num_experts, strategy=plan.diversify,
                                        rng=jax.random.fold_in(rng, i),
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
            out[(layer, "ffn", "experts", name)] = w.astype(experts[name].dtype)
    _log.info("diversify: %d layers spawned with %r; fresh parameters: %s", len(moe_layers),
              plan.diversify, fresh)
    return _unflatten(out)


def transfer_opt_state(old_state: Any, new_params: Any, tx: optax.GradientTransformation,
                       moe_layers: list[str], *, copy_moments: bool) -> Any:
    """The optimizer state for `new_params` after a structure change.

    Leaves of `tx.init(new_params)` whose path and shape exist in `old_state`
    are copied (moments of unchanged parameters, step counts and so the
    learning-rate schedule position). With `copy_moments`, the moments of a
    layer's `ffn/experts/<w>` are the dense `ffn/<w>` moments broadcast over
    experts; otherwise, like the router's, they start at zero.
    """
    fresh = tx.init(new_params)
    old = {jax.tree_util.keystr(p): leaf
           for p, leaf in jax.tree_util.tree_flatten_with_path(old_state)[0]}

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        source = old.get(key)
        if source is not None and np.shape(source) == np.shape(leaf):
            return jnp.asarray(source, leaf.dtype)
        if copy_moments:
            for layer in moe_layers:
                prefix = f"['{layer}']['ffn']['experts']"
                if prefix in key:
                    dense = old.get(key.replace(prefix, f"['{layer}']['ffn']"))
                    if dense is not None and np.shape(dense) == np.shape(leaf)[1:]:
                        return jnp.broadcast_to(jnp.asarray(dense, leaf.dtype), leaf.shape)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, fresh)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out
