"""The calibration claim of docs/experiments/calibration.md, re-checked from its committed
records (docs/experiments/calibration/records.json; no training): the paired MoE - dense
difference and its standard error recomputed from the per-seed final losses, the verdict
the report states, and that the preset's runs were made with research.gin as committed."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.reporting import protocol

REPO = Path(__file__).resolve().parents[2]
RECORDS = REPO / "docs/experiments/calibration/records.json"
REPORT = REPO / "docs/experiments/calibration.md"
THRESHOLD = 3.0
# What the committed records show for the preset (see the report's findings).
EXPECTED = {"preset": "every", "outcome": "supported"}


@pytest.fixture(scope="module")
def report_script():
    spec = importlib.util.spec_from_file_location("calibration_report",
                                                  REPO / "scripts" / "calibration_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def records():
    return json.loads(RECORDS.read_text())


def test_the_preset_is_the_calibrated_candidate(records, report_script):
    # research.gin, parsed now with each seed, gives exactly the config.gin of that run.
    assert report_script.preset_candidate(records) == EXPECTED["preset"]
    for r in records:
        protocol.relative_workdir(r["workdir"])
        assert r["workdir"] == f"calibration/{r['variant']}/seed{r['seed']}"


def test_moe_vs_dense_active_gap_and_se_recomputed(records):
    loss = {(r["variant"], r["seed"]): r["valid_loss"]["all"] for r in records}
    moe = EXPECTED["preset"] + "_moe"
    seeds = sorted(s for v, s in loss if v == moe and ("dense_active", s) in loss)
    diffs = [loss[moe, s] - loss["dense_active", s] for s in seeds]
    mean = float(np.mean(diffs))
    se = float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
    p = protocol.paired(records, moe, "dense_active")
    assert len(seeds) == 3 and p.seeds == tuple(seeds)
    assert p.mean == pytest.approx(mean) and p.se == pytest.approx(se)
    v = protocol.verdict(p, THRESHOLD)
    assert v.outcome == EXPECTED["outcome"]
    assert (mean + THRESHOLD * se < 0) == (v.outcome == "supported")
    assert v.text() in REPORT.read_text()  # the report states these numbers
