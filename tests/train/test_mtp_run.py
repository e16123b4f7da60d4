"""A tiny run with multi-token prediction through the trainer (in-process): the MTP
module's block is a MoE block, lambda follows a LossWeightSchedule (0.3, then 0.1 from
step 4), and a resume from the step-3 checkpoint must reproduce every logged loss
exactly (the MTP parameters and the schedule's position are part of the run's state)."""

import json
import shutil

import gin

from experiments.reporting.metrics import read_jsonl
from experiments.runtime import gin_utils
from experiments.train.config import TrainSetup
from experiments.train.trainer import train
from tests.helpers import REPO

TINY_GIN = REPO / "gin_configs/experiments/test_tiny.gin"
MTP = ["TransformerLM.mtp = @MultiTokenPrediction", "MultiTokenPrediction.moe = True",
       "train.hooks = [@LossWeightSchedule()]", "LossWeightSchedule.values = (0.3, 0.1)",
       "LossWeightSchedule.boundaries = (3,)"]


def _run(workdir):
    gin.clear_config()
    try:
        gin_utils.parse([str(TINY_GIN)], ["train.num_steps = 5", "Checkpointer.save_every = 3",
                                          "train.eval_every = 5", "train.log_every = 1",
                                          "Checkpointer.async_save = False",
                                          "DataConfig.eval_max_batches = 1", *MTP])
        return train(workdir, TrainSetup.from_gin(quiet=True))
    finally:
        gin.clear_config()


def test_mtp_run_logs_per_depth_schedules_lambda_and_resumes_exactly(tmp_path):
    workdir = tmp_path / "run"
    _run(workdir)
    records = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["loss_weight/mtp_weight"] for r in records] == [0.3, 0.3, 0.3, 0.1, 0.1]
    for r in records:
        assert r["mtp_loss"] == r["mtp/loss_depth_1"] > 0
    # Evaluation skips the MTP modules: routing statistics of the model's layers only.
    summary = json.loads((workdir / "summary.json").read_text())
    assert "layer_1" in summary["moe"] and "mtp_1" not in summary["moe"]
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "5")
    _run(resumed)
    again = read_jsonl(resumed / "metrics.jsonl", "train")
    keys = ("loss", "ce", "mtp_loss", "lbl", "grad_norm", "loss_weight/mtp_weight")
    assert [{k: r[k] for k in keys} for r in again] == [{k: r[k] for k in keys}
                                                        for r in records]
    assert (read_jsonl(resumed / "metrics.jsonl", "valid")[-1]["loss"]
            == read_jsonl(workdir / "metrics.jsonl", "valid")[-1]["loss"])
