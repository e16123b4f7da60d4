"""MoLA in the trainer (tiny, 8 simulated devices as {data: 2, fsdp: 2, expert: 2}): LoRA
experts on a frozen dense base run that the MoLA run references by its workdir.

The base is a tiny dense model's initial weights saved as a checkpoint (no training
needed: the test is about what the MoLA run does with them). The run must keep the base
bit-identical (its checkpoint and the weights the model computes with), checkpoint only
the LoRA and router parameters, log a per-layer expert load for layers of different E,
resume exactly, and generate through scripts' restore path."""

import json
import shutil

import gin
import jax
import numpy as np
import pytest
from flax import nnx

from experiments.data.config import DataConfig
from experiments.inference.restore import restore_model
from experiments.inference.routing_stats import collect_stats
from experiments.reporting.metrics import read_jsonl
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from experiments.runtime.checksums import tree_digest
from experiments.train.mola import mola_lm
from experiments.train.run_state import build_model, split_model
from layers.mola import FrozenParam
from layers.transformer import TransformerLM
from tests.train.test_conditional_compute import TINY_GIN, _check_generation, _run

DENSE = ["TransformerLM.moe_every = 0"]


def _save_base(workdir) -> dict:
    """A tiny dense model's initial params as checkpoint 7 of `workdir`; returns them."""
    gin.clear_config()
    try:
        gin_utils.parse([str(TINY_GIN)], DENSE)
        model = build_model(TransformerLM, DataConfig().vocab_size(), seed=3)
    finally:
        gin.clear_config()
    params = jax.tree.map(np.asarray, split_model(model)[1])
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
    checkpointer.save(7, params=params, opt_state={"count": np.zeros((), np.int32)},
                      data_state={}, rng_key_data=np.zeros(2, np.uint32), force=True)
    checkpointer.close()
    return params


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """(workdir, params) of the saved tiny dense base."""
    workdir = tmp_path_factory.mktemp("mola") / "base"
    return workdir, _save_base(workdir)


def _flat(tree, prefix=""):
    """A nested dict's leaves as `{'a/b/c': leaf}`."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items()
            for k, v in _flat(sub, f"{prefix}/{key}" if prefix else str(key)).items()}


def _mola_bindings(base) -> list[str]:
    return [*DENSE, "train.model_cls = @mola_lm", f"mola_lm.base_workdir = '{base}'",
            "mola_lm.experts_per_layer = [2, 4]", "mola_lm.k = 2", "mola_lm.rank = 4",
            "MESH_SHAPE = {'data': 2, 'fsdp': 2, 'expert': 2}", "train.num_microbatches = 1"]


def _stored_params(workdir, step):
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        metadata = checkpointer.stored_metadata(step, "params")
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                getattr(metadata, "tree", metadata))
        return jax.tree.map(np.asarray, checkpointer.restore_step(step, abstract, None).params)
    finally:
        checkpointer.close()


def test_mola_run_keeps_the_base_bit_identical_and_resumes_exactly(base_run, tmp_path):
    base, base_params = base_run
    base_digest = tree_digest(_stored_params(base, 7))
    workdir = tmp_path / "mola"
    summary = _run(workdir, *_mola_bindings(base))
    records = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["active_experts"] == 2.0 for r in records)
    # Per-layer expert load, E = 2 and 4.
    assert [len(summary["moe"][layer]["load"]) for layer in ("layer_0", "layer_1")] == [2, 4]
    # The run's checkpoints hold the LoRA and router parameters only.
    paths = set(json.loads((workdir / "checkpoints" / "6" / "params" / "_METADATA")
                           .read_text())["tree_metadata"])
    assert paths == {f"('layer_{i}', 'ffn', {leaf})" for i in (0, 1) for leaf in
                     ("'router', 'kernel'", *(f"'experts', '{m}_{ab}'" for m in ("up", "down")
                                              for ab in "ab"))}
    # The base: its checkpoint unchanged, and the restored run computes with exactly it.
    assert tree_digest(_stored_params(base, 7)) == base_digest
    gin.clear_config()
    try:
        restored = restore_model(workdir)
        model = restored.model()
    finally:
        gin.clear_config()
    frozen = {"/".join(map(str, p)).replace("/ffn/base/", "/ffn/"): np.asarray(v[...])
              for p, v in nnx.to_flat_state(nnx.state(model, FrozenParam))}
    flat_base = _flat(base_params)
    assert frozen.keys() == flat_base.keys()
    for path, value in flat_base.items():
        np.testing.assert_array_equal(frozen[path], value, err_msg=path)
    assert np.any(np.asarray(model.layer_1.ffn.experts.down_b[...]) != 0)  # it trained
    # The routing analysis' statistics pass (the blocks record their own statistics).
    batch = {k: v[:2] for k, v in DataConfig(seq_len=32, eval_batch_size=2,
                                             max_bytes_per_domain=300000).eval_batches()[0]
             .items()}
    stats = collect_stats(restored, [batch])
    assert {layer: s.counts.shape for layer, s in stats.items()} == {"layer_0": (2,),
                                                                     "layer_1": (4,)}
    assert all(s.counts.sum() == 2 * s.num_tokens for s in stats.values())
    _check_generation(workdir)
    # Exact resume: step 6 again from checkpoint 3 (the base re-read from its run).
    final = _stored_params(workdir, 6)
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    _run(resumed, *_mola_bindings(base))
    jax.tree.map(np.testing.assert_array_equal, _stored_params(resumed, 6), final)
    first = {r["step"]: r["loss"] for r in records}
    second = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl", "train")}
    assert second == first


@pytest.mark.parametrize("bindings, match", [
    ([], r"mola_lm.base_workdir must name the dense base run's workdir"),
    (["mola_lm.base_workdir = '{missing}'"], r"has no checkpoints/ directory"),
    (["mola_lm.base_workdir = '{base}'", "mola_lm.base_step = 5"],
     r"mola_lm.base_step=5 not found; checkpoints at steps \[7\]"),
    (["mola_lm.base_workdir = '{base}'", "TransformerLM.d_ff = 48"],
     r"step 7 does not match the base model of this run's TransformerLM bindings"),
    (["mola_lm.base_workdir = '{base}'", "mola_lm.base_step = -1"],
     r"mola_lm.base_step must be None or an int >= 0, got -1"),
])
def test_a_missing_or_mismatched_base_is_refused_by_name(base_run, tmp_path, bindings, match):
    base = base_run[0]
    bindings = [b.format(base=base, missing=tmp_path / "nothing") for b in bindings]
    gin.clear_config()
    try:
        gin_utils.parse([str(TINY_GIN)], [*DENSE, "mola_lm.experts_per_layer = [2, 2]",
                                          *bindings])
        with pytest.raises(ValueError, match=match):
            nnx.eval_shape(lambda: mola_lm(vocab_size=DataConfig().vocab_size(),
                                           rngs=nnx.Rngs(0)))
    finally:
        gin.clear_config()
