"""Step hooks: a toy hook through a real (in-process) run and resume, and the
loss-free and EvoMoE hooks through the same interface."""

import dataclasses
import json

import gin
import jax
import numpy as np
import pytest

from experiments.reporting.metrics import read_jsonl
from experiments.runtime import gin_utils
from experiments.train import hooks as hooks_lib
from experiments.train.config import TrainSetup
from experiments.train.hooks import HookContext, StepHook, TrainState
from experiments.train.loss_free import LossFreeBalancing
from experiments.train.phases import PhasePlan
from experiments.train.trainer import train
from moe.layer_aux import MoeAux
from moe.router_state import DTS_HARD, DTS_TEMPERATURE, SELECTION_BIAS, RouterState
from tests.helpers import REPO

TINY_GIN = REPO / "gin_configs/experiments/test_tiny.gin"


@dataclasses.dataclass(frozen=True)
class PinExperts(StepHook):
    """A toy hook. Router input: a selection bias of +100 on experts 0 and 1 of every
    MoE layer, so top-2 routing sends every token there. State: the number of steps
    seen and the last step's share of layer_1's assignments on experts 0 and 1.
    Scalars: both."""

    name = "pin_experts"

    def init_state(self, ctx):
        return {"steps": np.zeros((), np.int32), "share": np.zeros((), np.float32)}

    def router_state(self, step, state, ctx, *, for_eval=False):
        return RouterState(layers={layer: {SELECTION_BIAS: np.float32([100, 100] + [0] * (e - 2))}
                                   for layer, e in ctx.experts_per_layer.items()})

    def after_step(self, step, state, train, metrics, ctx):
        counts = np.asarray(metrics["moe"]["layer_1"].counts)
        return {"steps": state["steps"] + 1,
                "share": np.float32(counts[:2].sum() / counts.sum())}, train

    def scalars(self, step, state, metrics):
        return {"pin/steps": float(state["steps"]), "pin/share": float(state["share"])}


def _run(workdir, *bindings):
    gin.clear_config()
    gin_utils.parse([str(TINY_GIN)], ["train.num_steps = 6", "Checkpointer.save_every = 3",
                                      "train.eval_every = 6", "Checkpointer.async_save = False",
                                      *bindings])
    setup = TrainSetup.from_gin(quiet=True)
    setup = dataclasses.replace(setup, hooks=(*setup.hooks, PinExperts()))
    return train(workdir, setup)


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hooks") / "run"
    try:
        summary = _run(workdir)
    finally:
        gin.clear_config()
    return workdir, summary


def test_toy_hook_router_state_reaches_the_model_and_its_scalars_are_logged(pinned_run):
    workdir, summary = pinned_run
    train_records = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["pin/steps"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    # The bias pinned every assignment of every step to experts 0 and 1 ...
    assert all(r["pin/share"] == 1.0 for r in train_records)
    # ... and evaluation routed with it too.
    np.testing.assert_allclose(summary["moe"]["layer_1"]["load"], [0.5, 0.5, 0.0, 0.0])


def test_toy_hook_state_is_checkpointed_and_restored_on_resume(pinned_run, tmp_path):
    import shutil

    workdir, _ = pinned_run
    meta = json.loads((workdir / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["hook_state"]["pin_experts"]["steps"]["values"] == [6]
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    try:
        _run(resumed)
    finally:
        gin.clear_config()
    # Steps 4-6 continue the count restored from checkpoint 3.
    steps = [r["pin/steps"] for r in read_jsonl(resumed / "metrics.jsonl", "train")]
    assert steps == [1, 2, 3, 4, 5, 6]
    first = {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl", "train")}
    second = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl", "train")}
    assert second == pytest.approx(first, rel=1e-6)


# --- the built-in hooks through the interface ------------------------------------------

def _ctx(experts, **kwargs):
    return HookContext(num_steps=10, base_key=jax.random.PRNGKey(0), tx=None,
                       structure="model", experts_per_layer=experts,
                       initial_state=kwargs.get("initial_state"),
                       experts_of=kwargs.get("experts_of", lambda s: experts))


def test_loss_free_hook_owns_biases_feeds_them_to_the_router_and_updates_them():
    hook = LossFreeBalancing(enabled=True, rate=0.5)
    ctx = _ctx({"layer_1": 4})
    state = hook.init_state(ctx)
    np.testing.assert_array_equal(state["layer_1"], np.zeros(4, np.float32))
    # Expert 0 took every assignment: the sign rule moves it down by u, the others up.
    metrics = {"moe": {"layer_1": MoeAux(counts=np.float32([8, 0, 0, 0]),
                                          num_tokens=np.float32(4))}}
    state, train = hook.after_step(1, state, TrainState("model", None, None), metrics, ctx)
    np.testing.assert_array_equal(state["layer_1"], np.float32([-0.5, 0.5, 0.5, 0.5]))
    routed = hook.router_state(2, state, ctx)
    np.testing.assert_array_equal(routed.for_layer("layer_1")[SELECTION_BIAS], state["layer_1"])
    assert hook.router_state(2, state, ctx, for_eval=True).layers == routed.layers
    # A model without MoE layers (EvoMoE's dense phase) gets no bias and keeps none.
    dense = _ctx({})
    assert hook.router_state(1, {}, dense).empty
    assert hook.after_step(1, {}, train, {"moe": {}}, dense)[0] == {}
    with pytest.raises(ValueError, match="checkpoint at step 3 holds no selection biases"):
        hook.restore_state(None, 3, ctx)


def test_phase_plan_hook_feeds_the_gate_and_switches_structure_after_the_dense_steps():
    plan = PhasePlan(dense_steps=2, soft_until=3, temperature_schedule="linear",
                     max_temperature=2.0, min_temperature=1.0, temperature_decay_steps=1)
    assert hooks_lib.structure_after([plan], 1) == "dense"
    assert hooks_lib.structure_after([plan], 2) == "moe"
    ctx = _ctx({})
    assert plan.router_state(2, {}, ctx).empty  # dense step
    soft, hard = plan.router_state(3, {}, ctx), plan.router_state(4, {}, ctx)
    assert float(soft.shared[DTS_TEMPERATURE]) == 2.0 and not bool(soft.shared[DTS_HARD])
    assert float(hard.shared[DTS_TEMPERATURE]) == 1.0 and bool(hard.shared[DTS_HARD])
    assert plan.router_state(3, {}, ctx, for_eval=True).empty
    # after_step: nothing before the last dense step, then the diversify switch.
    dense = TrainState("dense", {"p": 1}, {"o": 1})
    assert plan.after_step(1, {}, dense, {}, ctx) == ({}, dense)
    calls = []

    def initial_state(structure):
        calls.append(structure)
        raise RuntimeError("builds the MoE state")

    ctx = _ctx({}, initial_state=initial_state)
    with pytest.raises(RuntimeError, match="builds the MoE state"):
        plan.after_step(2, {}, dense, {}, ctx)
    assert calls == ["moe"]


def test_router_states_of_hooks_merge_and_a_key_set_twice_is_refused():
    ctx = _ctx({"layer_1": 4})
    hooks = [LossFreeBalancing(enabled=True), PhasePlan(dense_steps=0, soft_until=2)]
    states = {h.name: h.init_state(ctx) for h in hooks}
    merged = hooks_lib.router_state(hooks, states, 1, ctx)
    assert set(merged.for_layer("layer_1")) == {SELECTION_BIAS, DTS_TEMPERATURE, DTS_HARD}
    twice = [PinExperts(), LossFreeBalancing(enabled=True)]
    states = {h.name: h.init_state(ctx) for h in twice}
    with pytest.raises(ValueError, match="selection_bias"):
        hooks_lib.router_state(twice, states, 1, ctx)
    with pytest.raises(ValueError, match="share the name"):
        hooks_lib.check_names([PinExperts(), PinExperts()])
