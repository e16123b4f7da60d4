"""Conditional-compute models in the trainer (in-process, tiny, 8 simulated devices
as {data: 2, fsdp: 2, expert: 2}): zero-computation experts, Soft MoE and WideNet,
each with a checkpoint resume that must reproduce the losses."""

import dataclasses
import json
import shutil

import gin
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.inference.generate import Generator
from experiments.inference.restore import restore_model
from experiments.reporting.metrics import read_jsonl
from experiments.runtime import gin_utils
from experiments.train.config import TrainSetup
from experiments.train.trainer import train
from tests.helpers import REPO

TINY_GIN = REPO / "gin_configs/experiments/test_tiny.gin"
NULL_EXPERTS = [
    "MoeLayer.router = @NullExpertRouter",
    "NullExpertRouter.null_experts = ('zero', 'copy', 'const')",
    "NullExpertRouter.weight_rule = 'zero_then_renorm'",
    "NullExpertRouter.null_balance_weight = 0.5",
    # 8 simulated devices: batch rows over data x fsdp x expert, expert weights over expert.
    "MESH_SHAPE = {'data': 2, 'fsdp': 2, 'expert': 2}",
    "train.num_microbatches = 1",
]


def _run(workdir, *bindings):
    gin.clear_config()
    try:
        gin_utils.parse([str(TINY_GIN)], ["train.num_steps = 6", "Checkpointer.save_every = 3",
                                          "train.eval_every = 6", "train.log_every = 1",
                                          "Checkpointer.async_save = False",
                                          "DataConfig.eval_max_batches = 1", *bindings])
        return train(workdir, dataclasses.replace(TrainSetup.from_gin(quiet=True)))
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def null_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("null") / "run"
    return workdir, _run(workdir, *NULL_EXPERTS)


def test_null_expert_run_logs_realised_experts_and_resumes_exactly(null_run, tmp_path):
    workdir, _ = null_run
    records = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        # k = 2 choices per token: realised FFN experts + null choices add up to 2.
        assert 0 < r["null_fraction"] < 1
        assert r["active_experts"] + 2 * r["null_fraction"] == pytest.approx(2.0, abs=1e-5)
        assert np.isfinite(r["loss"])
    # Dropless sort: the FLOPs follow the realised FFN rows, so they change with routing.
    assert len({r["flops"] for r in records}) > 1
    _check_generation(workdir)  # the decode path adds the copy/const outputs too
    params = (workdir / "operative_config.gin").read_text()
    assert "NullExpertRouter.null_experts = ('zero', 'copy', 'const')" in params
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    _run(resumed, *NULL_EXPERTS)
    first = {r["step"]: r["loss"] for r in records}
    second = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl", "train")}
    assert second == pytest.approx(first, rel=1e-5)


SOFT_MOE = [
    # The trainer's objective is next-token prediction; an encoder sees the target, so the
    # loss says nothing here: the run checks that the block trains, shards and resumes.
    "TransformerLM.causal = False",
    "TransformerLM.moe_block = @SoftMoeLayer",
    "SoftMoeLayer.num_experts = 4",
    "SoftMoeLayer.slots_per_expert = 2",
    "SoftMoeLayer.d_ff = 32",
    "MESH_SHAPE = {'data': 2, 'fsdp': 2, 'expert': 2}",
    "train.num_microbatches = 1",
]


def test_soft_moe_encoder_trains_sharded_and_resumes_exactly(tmp_path):
    workdir = tmp_path / "soft"
    summary = _run(workdir, *SOFT_MOE)
    records = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["dropped_fraction"] == 0.0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    # FLOPs: static (n x p slot rows per sequence), the same every step.
    assert len({r["flops"] for r in records}) == 1
    np.testing.assert_allclose(summary["moe"]["layer_1"]["load"], [0.25] * 4)
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    _run(resumed, *SOFT_MOE)
    first = {r["step"]: r["loss"] for r in records}
    second = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl", "train")}
    assert second == pytest.approx(first, rel=1e-5)


WIDENET = [
    "train.model_cls = @widenet_lm",
    "TransformerLM.num_layers = 3",
    "TransformerLM.moe_every = 1",
    "MESH_SHAPE = {'data': 2, 'fsdp': 2, 'expert': 2}",
    "train.num_microbatches = 1",
]


def test_widenet_trains_sharded_with_one_copy_and_resumes_exactly(tmp_path):
    workdir = tmp_path / "widenet"
    _run(workdir, *WIDENET)
    records = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"]
    # The checkpoint holds one attention and one MoE FFN (under layer_0).
    metadata = json.loads((workdir / "checkpoints" / "6" / "params" / "_METADATA").read_text())
    paths = set(metadata["tree_metadata"])
    assert "('layer_0', 'attention', 'query')" in paths
    assert "('layer_0', 'ffn', 'router', 'kernel')" in paths
    deeper = {p for p in paths if p.startswith(("('layer_1'", "('layer_2'"))}
    assert deeper == {f"('layer_{i}', '{norm}', 'scale')" for i in (1, 2)
                      for norm in ("attention_norm", "ffn_norm")}
    _check_generation(workdir)
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    _run(resumed, *WIDENET)
    first = {r["step"]: r["loss"] for r in records}
    second = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl", "train")}
    assert second == pytest.approx(first, rel=1e-5)


def _check_generation(workdir):
    """Restore the run (through `train.model_cls`) and decode with the KV cache:
    greedy tokens equal the argmax of a full forward pass over the prompt and the
    tokens before (WideNet: one cache per layer over the shared attention)."""
    gin.clear_config()
    try:
        restored = restore_model(workdir)
        prompt = [5, 6, 7, 8, 9]
        new = Generator(restored).generate([prompt], max_new_tokens=4)[0]
        with restored.context():
            logits, _ = restored.model()(jnp.asarray([prompt + new[:-1]], jnp.int32))
    finally:
        gin.clear_config()
    assert len(new) == 4
    assert np.asarray(jnp.argmax(logits[0, len(prompt) - 1:], -1)).tolist() == new
