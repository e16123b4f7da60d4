"""Routing-analysis maths on hand-made domain x expert count matrices."""

import math
import subprocess
import sys

import numpy as np
import pytest

from experiments.reporting import analysis
from tests.helpers import REPO, script_env


def test_mutual_information_zero_when_routing_ignores_domain():
    counts = np.outer([30.0, 70.0], [0.1, 0.2, 0.3, 0.4]) * 10
    assert analysis.mutual_information(counts) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_log2_for_perfect_2x2_specialisation():
    assert analysis.mutual_information([[50, 0], [0, 50]]) == pytest.approx(math.log(2))
    # Unequal domain sizes: I = H(domain).
    p = np.array([0.25, 0.75])
    assert analysis.mutual_information([[25, 0], [0, 75]]) == pytest.approx(
        -(p * np.log(p)).sum())


def test_mutual_information_partial_specialisation_between_bounds():
    mi = analysis.mutual_information([[40, 10], [10, 40]])
    # Binary symmetric channel with error 0.2: I = log 2 - H(0.2).
    expected = math.log(2) + 0.2 * math.log(0.2) + 0.8 * math.log(0.8)
    assert mi == pytest.approx(expected)


def test_routing_fractions_rows_sum_to_one_and_empty_domain_is_zero():
    f = analysis.routing_fractions([[1, 3], [0, 0]])
    np.testing.assert_allclose(f, [[0.25, 0.75], [0.0, 0.0]])


def test_max_violation():
    assert analysis.max_violation([10, 10, 10, 10]) == pytest.approx(0.0)
    assert analysis.max_violation([40, 0, 0, 0]) == pytest.approx(3.0)
    assert analysis.max_violation([0, 0]) == 0.0


def test_layer_report_contents():
    report = analysis.layer_report([[50, 0], [0, 50]], ["code", "prose"])
    assert report["mutual_information_bits"] == pytest.approx(1.0)
    assert report["expert_load"] == [0.5, 0.5]
    assert report["max_violation"] == pytest.approx(0.0)
    assert report["max_violation_per_domain"]["code"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [[1, 2, 3], [[-1, 2]], [[np.nan, 1]]])
def test_bad_counts_rejected(bad):
    with pytest.raises(ValueError, match="counts"):
        analysis.mutual_information(bad)


def test_layer_report_domain_count_mismatch():
    with pytest.raises(ValueError, match="domain names"):
        analysis.layer_report([[1, 2]], ["code", "prose"])


def test_plots_write_png(tmp_path):
    analysis.plot_heatmap([[5, 1], [1, 5]], ["code", "prose"], "layer_1", tmp_path / "h.png")
    records = [{"step": s, "split": "train", "ce": 3.0 - 0.1 * s} for s in range(1, 5)]
    records.append({"step": 4, "split": "valid", "loss": 2.7, "code/loss": 2.5})
    analysis.plot_loss_curves(records, tmp_path / "loss.png", entropy_nats=3.2)
    for name in ("h.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_library_plots_leave_the_matplotlib_backend_alone(tmp_path):
    # A Jupyter kernel's inline backend must survive the library's figures: the plot
    # helpers draw on a bare Figure. Here the caller's backend is svg; before, it became Agg.
    code = f"""
import matplotlib
from experiments.reporting import analysis, sweep
analysis.plot_heatmap([[5, 1], [1, 5]], ["code", "prose"], "t", {str(tmp_path / "h.png")!r})
analysis.plot_loss_curves([{{"step": 1, "split": "train", "ce": 3.0}}], {str(tmp_path / "l.png")!r})
run = {{"variant": "a", "curves": {{"ce": [[1, 3.0], [2, 2.0]]}},
        "routing": {{"layer_1": {{"fractions": [[0.5, 0.5]], "domains": ["code"], "mi_bits": 0.0}}}}}}
sweep.plot_curves([run], "ce", "ce", {str(tmp_path / "c.png")!r}, window=1)
sweep.plot_heatmaps([run], {str(tmp_path / "m.png")!r})
print(matplotlib.get_backend())
"""
    env = script_env()
    env["MPLBACKEND"] = "svg"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "svg"
    for name in ("h.png", "l.png", "c.png", "m.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_library_code_never_switches_the_matplotlib_backend():
    # Scripts may choose a backend; moe/, layers/ and experiments/ may not.
    offenders = [str(p.relative_to(REPO)) for package in ("moe", "layers", "experiments")
                 for p in (REPO / package).rglob("*.py")
                 if "matplotlib.use(" in p.read_text() or "pyplot.switch_backend" in p.read_text()]
    assert offenders == []
