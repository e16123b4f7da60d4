"""Every gin binding a user can write takes effect or is refused.

For gin_configs/experiments/default.gin and test_tiny.gin: build what a
training run builds (model shapes, data, optimizer, loss weights, sharding,
checkpointer; no training step), record which configurables gin called, then
for every bindable parameter of each (signature minus gin's denylist) bind a
distinctive value, rebuild, and check that every call received it (or that gin
or the callee's validation refused it, naming the parameter). A parameter whose
callee received another value was overridden by its caller: a binding on it is
accepted and silently ignored. See tests/gin_walk.py for the mechanics.
"""

from __future__ import annotations

import functools
from pathlib import Path
from unittest import mock

import gin
import jax
import pytest
from flax import nnx

from experiments.data import sharded as sharded_data
from experiments.data.config import DataConfig
from experiments.runtime import gin_utils
from experiments.runtime import mesh as mesh_lib
from experiments.runtime.checkpoints import Checkpointer
from experiments.train import loss_free, phases, trainer
from experiments.train.optim import learning_rate_schedule, make_optimizer
from experiments.train.train_step import LossWeights
from tests import gin_walk

REPO = Path(__file__).resolve().parent.parent


class _Settings(Exception):
    """Carries the trainer's settings out of `train()` before it builds anything."""

    def __init__(self, settings):
        super().__init__("settings")
        self.settings = settings


def _train_settings(workdir: Path) -> dict:
    def capture(workdir, **settings):
        raise _Settings(settings)

    with mock.patch.object(trainer, "_train_locked", capture):
        try:
            trainer.train(workdir)
        except _Settings as s:
            return s.settings
    raise AssertionError("train() did not reach _train_locked")


def build_run(workdir: Path) -> None:
    """Builds what a training run builds from gin, in the trainer's order, without a step.

    THE ONE PLACE THAT KNOWS HOW A RUN CONSTRUCTS ITS COLLABORATORS: keep it in
    step with experiments/train/trainer.py. Today `train()` receives its
    settings from gin and `_train_locked` constructs DataConfig(), the schedule
    and optimizer, LossWeights(), LossFreeBalancing(), Sharding(), the
    Checkpointer, the model (`model_cls(vocab_size=, rngs=)`) and the data
    iterators. The model is built under `nnx.eval_shape` (no arrays).
    """
    s = _train_settings(workdir)
    data_config = DataConfig()
    vocab_size = data_config.vocab_size()
    make_optimizer(learning_rate_schedule(s["num_steps"]))
    LossWeights()
    loss_free.LossFreeBalancing()
    mesh_lib.Sharding()
    Checkpointer(workdir / "checkpoints", save_every=s["checkpoint_every"],
                 max_to_keep=s["max_to_keep"], async_save=s["async_checkpoints"]).close()
    model_cls = phases.model_factory(s["model_cls"], phases.structure_after(s["phase_plan"], 0))
    nnx.eval_shape(lambda: model_cls(vocab_size=vocab_size, rngs=nnx.Rngs(params=s["seed"])))
    data_config.domains()
    sharded_data.make_sharded_train_iterator(data_config, s["seed"])
    sharded_data.eval_batches(data_config)


# Valid alternatives for parameters whose type alone does not give one (strings
# with a fixed set of values); others get a value derived from their type.
ALTERNATIVES = {
    "TransformerLM.activation": "gelu",
    "TransformerLM.dtype": "bfloat16",
    "TransformerLM.param_dtype": "bfloat16",
    "MoeLayer.dispatch": "dense",
    "MoeLayer.routing_type": "expert_choice",
    "MoeLayer.score": "sigmoid",
    "MoeLayer.activation": "gelu",
    "MoeLayer.gating": "dense_to_sparse",
    "DenseMLP.activation": "gelu",
    "Experts.activation": "gelu",
    "LossWeights.layer_reduction": "mean",
    "LossWeights.lbl_scope": "sequence",
    "LossWeights.lbl_global_mode": "causal",
    "LossFreeBalancing.rule": "proportional",
    "LossFreeBalancing.schedule": "inverse",
    "Sharding.ep_dropless": "ragged",
    "initialize_distributed.enabled": False,
}

CONFIGS = {
    "default": "gin_configs/experiments/default.gin",
    "test_tiny": "gin_configs/experiments/test_tiny.gin",
}


def _minimal(selector: str) -> str:
    return gin.config._REGISTRY.minimal_selector(selector)  # pylint: disable=protected-access


def _refuse_distributed(**kwargs):
    raise RuntimeError("jax.distributed.initialize is not called by this test")


@functools.cache
def _walk(config: str, workdir: Path) -> tuple[list[str], list[gin_walk.Outcome]]:
    # Import the modules a run registers (the model's layers come in via the trainer).
    setup = functools.partial(gin_utils.parse, [str(REPO / CONFIGS[config])], [])
    alternatives = {}
    for selector in gin_walk.registered():
        for name in gin_walk.bindable_parameters(gin_walk.registered()[selector]):
            short = f"{_minimal(selector)}.{name}"
            if short in ALTERNATIVES:
                alternatives[f"{selector}.{name}"] = ALTERNATIVES[short]
    with mock.patch.object(jax.distributed, "initialize", _refuse_distributed):
        called, outcomes = gin_walk.walk(setup, lambda: build_run(workdir), alternatives)
    for o in outcomes:
        selector, _, name = o.key.rpartition(".")
        o.key = f"{_minimal(selector)}.{name}"
    return [_minimal(s) for s in called], outcomes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gin_walk")


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_walk_covers_the_run(config, workdir):
    """The walk must see the model, its layers and the trainer's collaborators;
    otherwise the binding test below would pass vacuously."""
    called, outcomes = _walk(config, workdir / config)
    for expected in ("train", "DataConfig", "TransformerLM", "MoeLayer", "LossWeights",
                     "make_optimizer", "Checkpointer", "make_train_iterator"):
        assert expected in called, (expected, called)
    assert len(outcomes) > 50


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_binding_takes_effect_or_is_refused(config, workdir):
    _, outcomes = _walk(config, workdir / config)
    bad = [o for o in outcomes if o.verdict in ("ignored", "not called")]
    assert not bad, (f"{len(bad)} of {len(outcomes)} bindable parameters of {CONFIGS[config]} "
                     f"are accepted by gin but do not reach the object:\n"
                     f"{gin_walk.report(outcomes)}")
