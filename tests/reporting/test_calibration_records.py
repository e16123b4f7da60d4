"""The calibration claim of docs/experiments/calibration.md, re-checked from its committed
records (docs/experiments/calibration/records.json; no training): the paired MoE - dense
difference and its standard error recomputed from the per-seed final losses, the
verdict the report states, and that the runs were made with the preset as committed."""

import json
import math
from pathlib import Path

import gin
import numpy as np
import pytest

from experiments.reporting import protocol
from experiments.runtime import gin_utils
from experiments.train import trainer  # noqa: F401  registers the configurables config.gin binds

REPO = Path(__file__).resolve().parents[2]
RECORDS = REPO / "docs/experiments/calibration/records.json"
REPORT = REPO / "docs/experiments/calibration.md"
THRESHOLD = 3.0


@pytest.fixture(scope="module")
def final():
    return json.loads(RECORDS.read_text())["final"]


def test_moe_vs_dense_active_gap_and_se_recomputed(final):
    loss = {(r["variant"], r["seed"]): r["valid_loss"]["all"] for r in final}
    seeds = sorted(s for v, s in loss if v == "moe" and ("dense_active", s) in loss)
    diffs = [loss["moe", s] - loss["dense_active", s] for s in seeds]
    mean = float(np.mean(diffs))
    se = float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
    p = protocol.paired(final, "moe", "dense_active")
    assert p.seeds == tuple(seeds) and len(seeds) == 3
    assert p.mean == pytest.approx(mean) and p.se == pytest.approx(se)
    v = protocol.verdict(p, THRESHOLD)
    # The report states this verdict, with these numbers, for these records.
    assert v.text() in REPORT.read_text()
    assert v.outcome == "supported" and mean + THRESHOLD * se < 0  # the calibration target


def test_runs_are_the_committed_preset_and_workdirs_are_relative(final):
    for r in final:
        protocol.relative_workdir(r["workdir"])
        assert r["workdir"].startswith(f"calibration/{r['variant']}/seed")
    moe = next(r for r in final if r["variant"] == "moe")
    gin.clear_config()
    try:
        gin_utils.parse([str(REPO / "gin_configs/experiments/research.gin")],
                        [f"train.seed = {moe['seed']}"])
        assert gin.config_str() == moe["config"], "research.gin changed since its calibration"
    finally:
        gin.clear_config()
