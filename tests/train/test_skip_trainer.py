"""Learning to Skip in the trainer (tiny, 8 simulated devices as {data: 2, fsdp: 2,
expert: 2}): per-layer skip rates, the budget loss and the realised FLOPs are logged,
KV-cache generation agrees with the full forward pass, and a checkpoint resume
reproduces the losses."""

import shutil

import numpy as np
import pytest

from experiments.reporting.metrics import read_jsonl
from experiments.train.train_step import LossWeights
from tests.train.test_conditional_compute import _check_generation, _run

SKIP = [
    "TransformerLM.block = @SkipBlock",
    "SkipBlock.unit = 'modules'",
    "SkipBlock.target_skip_rate = 0.5",
    "SkipBlock.init_bias = 0.0",  # mixed decisions from the first step
    "LossWeights.skip_weight = 1.0",
    # 8 simulated devices: batch rows over data x fsdp x expert, expert weights over expert.
    "MESH_SHAPE = {'data': 2, 'fsdp': 2, 'expert': 2}",
    "train.num_microbatches = 1",
]


def test_skip_model_logs_skip_rates_and_realised_flops_and_resumes_exactly(tmp_path):
    workdir = tmp_path / "skip"
    _run(workdir, *SKIP)
    records = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert np.isfinite(r["loss"]) and r["skip_loss"] >= 0
        assert 0 < r["attention_skip_rate"] < 1 and 0 < r["ffn_skip_rate"] < 1
        assert r["realised_flops"] < r["flops"]  # the training step computes every token
        for layer in ("layer_0", "layer_1"):
            assert 0 < r[f"realised_compute/{layer}"] < 1
    params = (workdir / "operative_config.gin").read_text()
    assert "SkipBlock.unit = 'modules'" in params
    _check_generation(workdir)
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    _run(resumed, *SKIP)
    first = {r["step"]: r["loss"] for r in records}
    second = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl", "train")}
    assert second == pytest.approx(first, rel=1e-5)


def test_a_negative_skip_weight_is_refused_by_name():
    with pytest.raises(ValueError, match="skip_weight=-1"):
        LossWeights(skip_weight=-1.0)
