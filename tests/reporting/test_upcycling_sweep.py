"""scripts/upcycling_sweep.py's summary on hand-made run curves (no training)."""

import importlib.util

import numpy as np
import pytest

from tests.helpers import REPO


def _module():
    spec = importlib.util.spec_from_file_location("upcycling_sweep",
                                                  REPO / "scripts" / "upcycling_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seed(finals: dict[str, float]) -> dict:
    # Every run is evaluated at steps 250 and 500; the upcycled runs start at N = 250
    # from the upcycled checkpoint's loss (the `step0` record), the dense run and the
    # MoE from scratch have their own curves.
    out = {"upcycle_step": 250}
    for run, final in finals.items():
        curves = {"valid": [[250, final + 0.5], [500, final]], "train": []}
        if run not in ("dense", "scratch"):
            curves.update(step0={"loss_diff": 0.01, "max_abs_logit_diff": 0.1},
                          param_count=10, dense_param_count=4)
        out[run] = curves
    return out


def test_summary_pairs_every_arm_with_the_dense_continuation_by_seed():
    sweep = _module()
    # Seed 0: every arm 0.10 below dense; seed 1: 0.20 below, except drop-upcycling,
    # which is 0.10 above dense at seed 1 (so its differences are -0.1 and +0.1).
    results = {0: _seed({"dense": 2.0, **{r: 1.9 for r in sweep.RUNS if r != "dense"}}),
               1: _seed({"dense": 2.1, **{r: 1.9 for r in sweep.RUNS if r != "dense"},
                         "e8_drop": 2.2})}
    summary = sweep.summarize(results)
    assert set(summary["runs"]) == set(sweep.RUNS)
    assert {"e8_top2", "e8_noise", "e8_drop", "e32_g4"} <= set(sweep.UPCYCLED)
    assert summary["runs"]["e8_noise"]["final_valid"] == [1.9, 1.9]
    assert summary["runs"]["dense"]["valid_mean"] == pytest.approx([2.55, 2.05])
    noise = summary["paired_vs_dense"]["e8_noise"]
    assert noise["diffs"] == pytest.approx([-0.1, -0.2])
    assert noise["mean"] == pytest.approx(-0.15)
    assert noise["se"] == pytest.approx(np.std([-0.1, -0.2], ddof=1) / np.sqrt(2))
    drop = summary["paired_vs_dense"]["e8_drop"]
    assert drop["mean"] == pytest.approx(0.0, abs=1e-12)
    assert drop["verdict"].startswith("inconclusive")
    assert "dense" not in summary["paired_vs_dense"]
