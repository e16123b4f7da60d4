"""scripts/bench_skip_trained.py (experiments/bench/skip_trained.py) on tiny trained
workdirs: the full model is the test preset's top-2 MoE of the surgery tests (6 steps,
shared with them), the skip model the same preset with a skip router per layer, trained
for 2 steps (router bias 0 at init, so tokens split between running and skipping a
layer) and evaluated by the trainer on the one validation batch the bench uses."""

import contextlib
import json
import types

import numpy as np
import pytest

from experiments.bench import skip_trained
from tests.convert.test_expert_surgery import PARAMS, TINY
from tests.helpers import script_main, shared_training_run

SKIP = ["train.num_steps = 2", "Checkpointer.save_every = 2", "Checkpointer.async_save = False",
        "train.eval_every = 2", "train.num_microbatches = 1", "DataConfig.eval_max_batches = 1",
        "TransformerLM.block = @SkipBlock", "SkipBlock.unit = 'layer'",
        "SkipBlock.estimator = 'gumbel'", "SkipBlock.init_bias = 0.0",
        "SkipBlock.target_skip_rate = 0.5", "LossWeights.skip_weight = 1.0"]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """{name: workdir} of the full and the skip model."""
    gin_params = lambda params: [f"--gin_param={p}" for p in params]
    return {"full": shared_training_run(tmp_path_factory, "surgery_tiny", TINY, "--quiet",
                                        *gin_params(PARAMS))[0],
            "skip": shared_training_run(tmp_path_factory, "skip_bench_tiny", TINY, "--quiet",
                                        *gin_params(SKIP))[0]}


def test_trained_workdirs_are_checked_then_timed(workdirs, tmp_path):
    """The JSON rows: the full model first (ratio 1, nothing skipped, no mask reference),
    the skip model with a realised skip rate strictly between 0 and 1 in every layer,
    route_out logits equal to mask's, and its validation loss equal to the trainer's own
    on the same batch (the checkpoint was loaded and run as in evaluation). The recorded
    command names no path of this machine."""
    root = workdirs["full"].parent
    skip = workdirs["skip"].relative_to(root)
    out = tmp_path / "bench.json"
    assert script_main("bench_skip_trained.py")(
        [f"--root={root}", f"--full={workdirs['full'].name}", f"--workdirs={skip}",
         "--max_batches=1", "--rounds=1", "--min_time=0", f"--json={out}"]) == 0
    result = json.loads(out.read_text())
    full_row, skip_row = result["rows"]
    assert skip_row["label"] == str(skip) and result["batches"] == 1
    assert full_row["route_out_vs_full_wall"] == 1.0 and full_row["skip_rate"] == {}
    assert full_row["max_abs_logit_diff"] is None and "mask_wall_ms" not in full_row
    assert sorted(skip_row["skip_rate"]) == ["layer_0", "layer_1"]
    for rates in skip_row["skip_rate"].values():
        assert 0 < rates["attention"] == rates["ffn"] < 1  # unit 'layer': one decision
    assert skip_row["skip_rate_overall"] == pytest.approx(
        np.mean([r["ffn"] for r in skip_row["skip_rate"].values()]), abs=1e-4)
    assert skip_row["max_abs_logit_diff"] <= 1e-4 and skip_row["mask_cpu_ms"] > 0
    summary = json.loads((workdirs["skip"] / "summary.json").read_text())
    assert skip_row["valid_loss"] == pytest.approx(summary["valid_loss"]["all"], abs=1e-4)
    assert str(root) not in result["command"] and "--root=<root>" in result["command"]
    assert len(result["table"]) == 4
    assert result["table"][3].startswith(f"| `{skip}` | 2 | 0.5 |")


def _stub(route_out_logits, route_out_skipped):
    """A hand-made loaded skip model of one batch whose mask forward gives logits 1.0 and
    skips 3 tokens of layer_0's FFN; its route_out forward gives what it is told."""
    batch = {"inputs": np.ones((1, 4), np.int32)}
    restored = types.SimpleNamespace(params=None, rest=None, context=contextlib.nullcontext)
    forwards = {"route_out": lambda *_: (route_out_logits, route_out_skipped),
                "mask": lambda *_: (np.ones((1, 4, 2)), {"layer_0": {"ffn": 3.0}})}
    return skip_trained.Loaded(label="stub", restored=restored, forwards=forwards,
                               batches=[batch], targets=[], unit="ffn", target_skip_rate=0.5)


def test_a_route_out_path_that_disagrees_with_mask_reports_no_rate():
    """Logits within atol pass (skip rate 3 of 4 tokens); logits off by 0.01 or another
    skipped count stop the bench, naming the workdir and batch."""
    good = np.ones((1, 4, 2)) + 1e-6
    diff, rates = skip_trained.check_route_out(_stub(good, {"layer_0": {"ffn": 3.0}}), 1e-4)
    assert diff == pytest.approx(1e-6) and rates == {"layer_0": {"ffn": 0.75}}
    with pytest.raises(skip_trained.RouteOutMismatch,
                       match=r"stub: batch 0: route_out logits differ from mask's by up to "
                             r"0.01 > --atol=0.0001"):
        skip_trained.check_route_out(_stub(good + 0.01, {"layer_0": {"ffn": 3.0}}), 1e-4)
    with pytest.raises(skip_trained.RouteOutMismatch, match="stub: batch 0: route_out skips"):
        skip_trained.check_route_out(_stub(good, {"layer_0": {"ffn": 2.0}}), 1e-4)


def test_batches_of_another_preset_are_refused():
    """Two hand-made loaded workdirs whose single validation batch differs in one token."""
    def loaded(label, token):
        batch = {"inputs": np.array([[1, token]], np.int32)}
        return skip_trained.Loaded(label=label, restored=None, forwards={}, batches=[batch],
                                   targets=[], unit=None, target_skip_rate=None)

    skip_trained.check_same_batches(loaded("a", 2), loaded("b", 2))
    with pytest.raises(ValueError, match="b: its run validates on other batches than the "
                                         "full model a"):
        skip_trained.check_same_batches(loaded("a", 2), loaded("b", 3))


@pytest.mark.parametrize("flag, message", [
    ("--rounds=0", "--rounds must be >= 1, got 0"),
    ("--atol=0", "--atol must be > 0"),
    ("--max_batches=0", "--max_batches must be >= 1"),
    ("--workdirs=a,,b", "--workdirs must be comma-separated workdirs"),
    ("--workdirs=f", "--full and --workdirs must name different workdirs"),
])
def test_bad_flags_are_refused_by_name(flag, message, capsys):
    # Checked before any workdir is read (f and g do not exist).
    assert script_main("bench_skip_trained.py")(
        ["--full=f", "--workdirs=g", flag]) == 2
    assert message in capsys.readouterr().err
