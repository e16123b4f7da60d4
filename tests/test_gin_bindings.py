"""Every gin binding a user can write takes effect or is refused.

For gin_configs/experiments/default.gin, research.gin and test_tiny.gin: build what a
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
import json
from pathlib import Path
from unittest import mock

import gin
import jax
import pytest
from flax import nnx

from experiments.data import prepare
from experiments.data.config import DataConfig
from experiments.data.tokenizers import train_sentencepiece
from experiments.runtime import gin_utils
from tests import gin_walk
from tests.helpers import path_with_both_splits

REPO = Path(__file__).resolve().parent.parent


# --- How a run builds its collaborators -------------------------------------
# THE ONE PLACE THAT KNOWS HOW A TRAINING RUN CONSTRUCTS THINGS FROM GIN. Keep it
# in step with experiments/train/trainer.py (and scripts/train.py); everything
# else in this file is generic. Its imports are local so that a rename there
# breaks only this function.


def register_configurables() -> None:
    """Imports what scripts/train.py imports, so every configurable is registered."""
    from experiments.train import trainer  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


def build_run(workdir: Path) -> None:
    """Builds what a training run builds from gin, in the trainer's order, without a step.

    `TrainSetup.from_gin()` builds the trainer's collaborators (TrainConfig, as
    the gin name `train`; DataConfig, LossWeights, Sharding, the hooks); then the
    schedule and optimizer, the Checkpointer, the model
    (`model_cls(vocab_size=, rngs=)`) and the data iterators. The model is built
    under `nnx.eval_shape` (shapes only); the data iterators last, since they
    are the slowest (the walk stops a build once the configurable it tests has
    been called).
    """
    # pylint: disable=g-import-not-at-top
    from experiments.data import sharded as sharded_data
    from experiments.train import hooks
    from experiments.train.config import TrainSetup
    from experiments.train.optim import learning_rate_schedule, make_optimizer

    setup = TrainSetup.from_gin()
    config, data_config = setup.config, setup.data
    vocab_size = data_config.vocab_size()
    make_optimizer(learning_rate_schedule(config.num_steps))
    setup.checkpointer(workdir / "checkpoints").close()
    structure = hooks.structure_after(setup.hooks, 0)
    model_cls = hooks.model_for(setup.hooks, structure, config.model_cls)
    nnx.eval_shape(lambda: model_cls(vocab_size=vocab_size, rngs=nnx.Rngs(params=config.seed)))
    data_config.domains()
    sharded_data.make_sharded_train_iterator(data_config, config.seed)
    sharded_data.eval_batches(data_config)


# --- Generic from here on ----------------------------------------------------


# Valid alternatives for parameters whose type alone does not give one (strings
# with a fixed set of values); others get a value derived from their type.
ALTERNATIVES = {
    "TransformerLM.activation": "gelu",
    "TransformerLM.dtype": "bfloat16",
    "TransformerLM.param_dtype": "bfloat16",
    "TransformerLM.remat_policy": "full",
    "MoeLayer.dispatch": "einsum",
    "MoeLayer.activation": "gelu",
    "TopKRouter.score": "sigmoid",
    "DenseMLP.activation": "gelu",
    "Experts.activation": "gelu",
    "LossWeights.layer_reduction": "mean",
    "LossWeights.lbl_scope": "sequence",
    "LossWeights.lbl_global_mode": "causal",
    "LossFreeBalancing.rule": "proportional",
    "LossFreeBalancing.schedule": "inverse",
    "Sharding.ep_dropless": "ragged",
    "initialize_distributed.enabled": False,
    "open_split.verify": "full",
}

TINY = "gin_configs/experiments/test_tiny.gin"
# Each case: a config file plus extra bindings (formatted with the paths of the
# `files` fixture). The file-source case reaches the JSONL reader and the
# SentencePiece tokenizer, the text case the text-file reader.
CASES = {
    "default": ("gin_configs/experiments/default.gin", ()),
    # The calibrated research preset (docs/experiments/calibration.md), on less of the corpus.
    "research": ("gin_configs/experiments/research.gin",
                 ("DataConfig.max_bytes_per_domain = 300000",)),
    "test_tiny": (TINY, ()),
    "test_tiny_jsonl_sentencepiece": (TINY, (
        "DataConfig.source = 'jsonl:{jsonl}'", "DataConfig.tokenizer = 'sentencepiece:{spm}'",
        "DataConfig.validation_fraction = 0.5")),
    "test_tiny_text": (TINY, ("DataConfig.source = 'text:{text}'",
                              "DataConfig.validation_fraction = 0.5")),
    "test_tiny_shards": (TINY, ("DataConfig.source = 'shards:{shards}'",
                                "DataConfig.validation_fraction = 0.5")),
}


def _minimal(selector: str) -> str:
    return gin.config._REGISTRY.minimal_selector(selector)  # pylint: disable=protected-access


def _refuse_distributed(**kwargs):
    raise RuntimeError("jax.distributed.initialize is not called by this test")


_WALKS: dict[str, tuple[list[str], list[gin_walk.Outcome]]] = {}


def _walk(case: str, workdir: Path, files: dict[str, str]):
    """(configurables called, outcomes) for one case, computed once per module."""
    if case in _WALKS:
        return _WALKS[case]
    register_configurables()
    gin_file, bindings = CASES[case]
    setup = functools.partial(gin_utils.parse, [str(REPO / gin_file)],
                              [b.format(**files) for b in bindings])
    alternatives = {}
    for selector, entry in gin_walk.registered().items():
        for name in gin_walk.bindable_parameters(entry):
            if f"{_minimal(selector)}.{name}" in ALTERNATIVES:
                alternatives[f"{selector}.{name}"] = ALTERNATIVES[f"{_minimal(selector)}.{name}"]
    with mock.patch.object(jax.distributed, "initialize", _refuse_distributed):
        called, outcomes = gin_walk.walk(setup, lambda: build_run(workdir / case), alternatives)
    for o in outcomes:
        selector, _, name = o.key.rpartition(".")
        o.key = f"{_minimal(selector)}.{name}"
    _WALKS[case] = [_minimal(s) for s in called], outcomes
    return _WALKS[case]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gin_walk")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A JSONL file, a directory of text files, a SentencePiece model and the JSONL
    file prepared as token shards, with records in both splits at validation_fraction
    0.5."""
    root = tmp_path_factory.mktemp("gin_walk_data")
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 8
             for i in range(24)]
    jsonl = path_with_both_splits(
        lambda i: root / f"docs{i}.jsonl",
        lambda p: [[f"{p}:{line}" for line in range(1, len(texts) + 1)]], 0.5)
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    text_dir = path_with_both_splits(
        lambda i: root / f"text{i}",
        lambda d: [[str(d / f"{j}.txt") for j in range(len(texts))]], 0.5)
    text_dir.mkdir()
    for j, t in enumerate(texts):
        (text_dir / f"{j}.txt").write_text(t, encoding="utf-8")
    spm = root / "spm.model"
    train_sentencepiece(texts, spm, vocab_size=300)
    shards = root / "shards"
    prepare.prepare([str(jsonl)], shards, prepare.Options(validation_fraction=0.5),
                    progress=False)
    return {"jsonl": str(jsonl), "text": str(text_dir / "*.txt"), "spm": str(spm),
            "shards": str(shards)}


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@gin.configurable(module="gin_walk_toy")
class _Leaf:
    def __init__(self, size: int, *, scale: float = 1.0, name: str = "leaf"):
        self.size, self.scale, self.name = size, scale, name


@gin.configurable(module="gin_walk_toy", denylist=["size"])
class _DeniedLeaf:
    def __init__(self, size: int, *, scale: float = 1.0):
        self.size, self.scale = size, scale


@gin.configurable(module="gin_walk_toy")
def _toy_parent(width: int = 4, validated: int = 1):
    if validated > 1:
        raise ValueError(f"validated must be <= 1, got {validated}")
    return _Leaf(width, scale=2.0), _DeniedLeaf(width)


def test_the_walk_tells_ignored_from_reached_bindings():
    """A toy parent passes `_Leaf.size` (positionally) and `_Leaf.scale` itself:
    both bindings are accepted by gin and overridden, so the walk must call them
    ignored. `_DeniedLeaf.size` is denylisted: not bindable, so not walked (and
    gin refuses it). The rest reach their callee, or its validation names them."""
    _, outcomes = gin_walk.walk(lambda: None, _toy_parent)
    verdicts = {o.key.replace("gin_walk_toy.", ""): o.verdict for o in outcomes}
    assert verdicts == {
        "_toy_parent.width": "reached", "_toy_parent.validated": "reached",
        "_Leaf.size": "ignored", "_Leaf.scale": "ignored", "_Leaf.name": "reached",
        "_DeniedLeaf.scale": "reached"}
    with pytest.raises(ValueError, match="denylisted"):
        gin.bind_parameter("_DeniedLeaf.size", 3)
    report = gin_walk.report(outcomes)
    assert "_Leaf:" in report and ".scale: ignored: bound 2.74, the callee received 2.0" in report


# Configurables each case must reach; otherwise the binding test below would pass
# vacuously (e.g. if the build stopped early or a rename hid a configurable).
EXPECTED_CALLS = ("train", "DataConfig", "TransformerLM", "MoeLayer", "LossWeights",
                  "LossFreeBalancing", "Sharding", "learning_rate_schedule", "make_optimizer",
                  "Checkpointer", "make_sharded_train_iterator", "make_train_iterator",
                  "make_eval_iterator", "initialize_distributed")
EXPECTED_CASE_CALLS = {"test_tiny_jsonl_sentencepiece": ("load_jsonl", "SentencePieceTokenizer"),
                       "test_tiny_text": ("load_text_files",),
                       "test_tiny_shards": ("open_split",)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_walk_covers_the_run(case, workdir, files):
    called, outcomes = _walk(case, workdir, files)
    for expected in EXPECTED_CALLS + EXPECTED_CASE_CALLS.get(case, ()):
        assert expected in called, (expected, called)
    assert len(outcomes) > 50


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_binding_takes_effect_or_is_refused(case, workdir, files):
    _, outcomes = _walk(case, workdir, files)
    bad = [o for o in outcomes if o.verdict in ("ignored", "not called")]
    assert not bad, (f"{len(bad)} of {len(outcomes)} bindable parameters in case {case} "
                     f"are accepted by gin but do not reach the object:\n"
                     f"{gin_walk.report(outcomes)}")


def _literal(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _literal(v) for k, v in value.items())
    return False


def _record_tiny_run(workdir: Path, files: dict[str, str]) -> gin_walk.Recording:
    register_configurables()
    gin_file, bindings = CASES["test_tiny"]
    gin_utils.parse([str(REPO / gin_file)], [b.format(**files) for b in bindings])
    recording = gin_walk.Recording()
    with mock.patch.object(jax.distributed, "initialize", _refuse_distributed), \
            gin_walk.record_calls(recording):
        build_run(workdir)
    return recording


def test_operative_config_rebuilds_the_data_config(tmp_path, files):
    """operative_config.gin, parsed on its own, gives back the DataConfig and the
    iterator options of the run that wrote it."""
    recording = _record_tiny_run(tmp_path / "run", files)
    path = gin_utils.write_operative_config(tmp_path)
    text = path.read_text(encoding="utf-8")
    for line in ("DataConfig.seq_len = 32", "DataConfig.batch_size = 8",
                 "DataConfig.eval_batch_size = 8", "DataConfig.max_bytes_per_domain = 300000",
                 "DataConfig.tokenizer = 'byte'", "make_train_iterator.add_bos = False"):
        assert line in text, line
    (built,) = [c.arguments for c in recording.calls[_full("DataConfig")]]
    gin.clear_config()
    gin_utils.parse([str(path)], [])
    assert DataConfig() == DataConfig(**{k: v for k, v in built.items() if k != "self"})


def _full(name: str) -> str:
    return gin.config._REGISTRY.get_match(name).selector  # pylint: disable=protected-access


def test_operative_config_records_every_value_that_shaped_the_run(tmp_path, files):
    """Every literal argument a configurable received in the run is in
    operative_config.gin (re-parsed on its own) with that value. A value passed
    by the caller over a bindable parameter is missing from it: the operative
    config would not describe the run."""
    recording = _record_tiny_run(tmp_path / "run", files)
    path = gin_utils.write_operative_config(tmp_path)
    gin.clear_config()
    gin_utils.parse([str(path)], [])
    entries = gin_walk.registered()
    missing = []
    for selector, calls in sorted(recording.calls.items()):
        bindable = gin_walk.bindable_parameters(entries[selector])
        for call in calls:
            for name, value in call.arguments.items():
                if name not in bindable or not _literal(value):
                    continue
                key = f"{call.scope}/{selector}.{name}" if call.scope else f"{selector}.{name}"
                try:
                    recorded = gin.query_parameter(key)
                except ValueError:
                    recorded = "<absent>"
                if recorded != value or type(recorded) is not type(value):
                    missing.append(f"{_minimal(selector)}.{name}: ran with {value!r}, "
                                   f"operative config has {recorded!r}")
    assert not missing, "\n".join(sorted(set(missing)))
