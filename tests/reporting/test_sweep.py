"""Sweep runner (experiments/reporting/sweep.py): grid expansion, commands, resumable runs, report."""

import json

import pytest

from experiments.reporting import sweep as sweep_lib


def _sweep(**kwargs):
    return sweep_lib.Sweep(gin_files=["gin_configs/experiments/test_tiny.gin"], name="demo",
                           **kwargs)


def test_variants_cross_the_grid():
    sweep = _sweep(variants={"a": {"X.y": 1}, "b": {"X.y": 2}},
                   grid={"LossWeights.lbl_weight": [0.0, 0.1]})
    runs = sweep.runs()
    assert [name for name, _ in runs] == ["a,lbl_weight=0.0", "a,lbl_weight=0.1",
                                          "b,lbl_weight=0.0", "b,lbl_weight=0.1"]
    assert runs[3][1] == {"X.y": 2, "LossWeights.lbl_weight": 0.1}
    assert _sweep().runs() == [("base", {})]


def test_train_command_quotes_values_as_gin(tmp_path):
    sweep = _sweep(bindings=["train.num_steps = 5"])
    cmd = sweep_lib.train_command(sweep, {"LossWeights.lbl_scope": "shuffled:8"}, 3, tmp_path)
    assert "--gin_param=LossWeights.lbl_scope = 'shuffled:8'" in cmd
    assert "--gin_param=train.num_steps = 5" in cmd and "--gin_param=train.seed = 3" in cmd


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="gin_files"):
        sweep_lib.Sweep()
    with pytest.raises(ValueError, match=r"Sweep.grid\['x'\]"):
        _sweep(grid={"x": 3})


@pytest.mark.parametrize("kwargs, where", [
    ({"bindings": ["train.seed = 7"]}, r"Sweep.bindings"),
    ({"grid": {"train.seed": [1, 2]}}, r"Sweep.grid"),
    ({"variants": {"a": {"train.seed": 1}}}, r"Sweep.variants\['a'\]"),
])
def test_a_seed_binding_that_sweep_seeds_would_override_is_refused(kwargs, where):
    # train_command appends `train.seed = <seed>` after the sweep's bindings, so a
    # seed bound anywhere else would be silently replaced.
    with pytest.raises(ValueError, match=where + r" binds train.seed.*Sweep.seeds"):
        _sweep(**kwargs)


def _fake_run(workdir, loss, maxvio):
    # What a finished trainer leaves behind, as far as the report reads it.
    workdir.mkdir(parents=True)
    (workdir / "summary.json").write_text(json.dumps(
        {"valid_loss": {"all": loss, "code": loss - 0.1, "prose": loss + 0.1}}))
    records = [{"step": s, "split": "train", "ce": loss + 1.0 / s, "lbl": 1.0,
                "batch_max_violation": maxvio, "sequence_max_violation": 2 * maxvio}
               for s in range(1, 31)]
    records.append({"step": 30, "split": "valid", "loss": loss, "max_violation": maxvio})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_finished_runs_are_skipped_and_reported(tmp_path):
    sweep = _sweep(variants={"x": {}, "y": {}}, seeds=[0, 1])
    for i, (variant, _) in enumerate(sweep.runs()):
        for seed in sweep.seeds:
            _fake_run(sweep_lib.run_dir(tmp_path, sweep, variant, seed), 1.0 + i + seed / 10,
                      0.1 * (i + 1))
    # Every run has its summary.json: nothing is trained.
    records = sweep_lib.run_sweep(sweep, tmp_path, log=lambda m: pytest.fail(m))
    report = sweep_lib.write_report(sweep, records, "demo.gin", tmp_path / "docs")
    text = report.read_text()
    assert "| `x` | 1.0500 ± 0.0707 |" in text  # mean +- sample std of 1.0 and 1.1
    assert "| `y` |" in text and "demo/maxvio_curves.png" in text
    assert (tmp_path / "docs" / "demo" / "maxvio_curves.png").stat().st_size > 0


# A child that, like scripts/train.py, finishes and saves on SIGINT (slowly), and a
# parent that runs it through run_child; the test signals both (one process group).
_CHILD = """
import signal, sys, time
def save(*_):
    time.sleep(1.0)
    open(sys.argv[1], "w").write("saved")
    print("interrupted at step 3; checkpoint saved", file=sys.stderr)
    sys.exit(130)
signal.signal(signal.SIGINT, save)
open(sys.argv[1] + ".ready", "w").write("ready")
time.sleep(60)
"""
_PARENT = """
import signal, sys
# A process started from a background job inherits SIGINT ignored, and Python then installs
# no KeyboardInterrupt handler; a terminal's sweep has one.
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
from experiments.reporting.sweep import SweepInterrupted, run_child
try:
    run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]], cwd=Path.cwd(), name="v seed 0")
except SweepInterrupted as e:
    print("caught:", e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def test_ctrl_c_waits_for_the_running_child_to_save(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO, script_env

    marker = tmp_path / "saved"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, str(marker)], cwd=REPO,
                              env=script_env(), stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    ready = tmp_path / "saved.ready"  # the child has set its handler (the parent, slower
    deadline = time.monotonic() + 60  # to import, started it from inside run_child)
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), "the child never started"
    time.sleep(0.5)  # the parent is inside communicate(), in its KeyboardInterrupt's reach
    os.killpg(parent.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == 130, stderr
    assert marker.read_text() == "saved"  # the child was not killed before saving
    assert "caught: sweep interrupted during run v seed 0 (interrupted at step 3" in stderr


def test_records_name_workdirs_relative_to_the_sweep_root(tmp_path):
    from experiments.reporting.sweep import collect_run

    workdir = tmp_path / "sweep_name" / "variant" / "seed0"
    workdir.mkdir(parents=True)
    (workdir / "summary.json").write_text(json.dumps({"valid_loss": {"all": 2.5}}))
    (workdir / "metrics.jsonl").write_text(
        json.dumps({"split": "train", "step": 1, "loss": 3.0, "ce": 3.0}) + "\n")
    record = collect_run(workdir, "variant", 0, root=tmp_path)
    assert record["workdir"] == "sweep_name/variant/seed0"  # no path of this machine


def test_report_rewritten_from_its_records_is_identical(tmp_path):
    # records.json (no per-step curves) is all a committed report needs to be rewritten.
    sweep = _sweep(variants={"x": {}, "y": {}}, seeds=[0, 1])
    for i, (variant, _) in enumerate(sweep.runs()):
        for seed in sweep.seeds:
            _fake_run(sweep_lib.run_dir(tmp_path, sweep, variant, seed), 1.0 + i + seed / 10, 0.1)
    records = sweep_lib.run_sweep(sweep, tmp_path, log=lambda m: pytest.fail(m))
    report = sweep_lib.write_report(sweep, records, "demo.gin", tmp_path / "docs")
    first = report.read_text()
    plot = (tmp_path / "docs" / "demo" / "train_ce.png").read_bytes()
    stored = sweep_lib.read_records(tmp_path / "docs", "demo")
    assert "curves" not in stored[0] and stored[0]["workdir"] == "demo/x/seed0"
    sweep_lib.write_report(sweep, stored, "demo.gin", tmp_path / "docs", plots=False)
    assert report.read_text() == first
    assert (tmp_path / "docs" / "demo" / "train_ce.png").read_bytes() == plot  # kept
    with pytest.raises(FileNotFoundError, match="records"):
        sweep_lib.read_records(tmp_path / "docs", "other")


def _sweep_script():
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("sweep_script", REPO / "scripts" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_and_variants_restrict_what_is_trained(tmp_path, capsys):
    # Only seed 1 of `x` has finished. Training only that subset trains nothing (a run
    # launched for any other seed or variant would fail: its gin file does not exist),
    # and the report still collects every finished run. The claim and the gin file of `y`
    # (not trained here) must not make the subset invalid.
    sweep_file = tmp_path / "demo.gin"
    sweep_file.write_text("Sweep.gin_files = ['no/such.gin']\n"
                          "Sweep.variants = {'x': {}, 'y': {}}\nSweep.seeds = [0, 1]\n"
                          "Sweep.claims = [['x', 'y']]\n"
                          "Sweep.variant_gin_files = {'y': ['no/y.gin']}\n")
    _fake_run(tmp_path / "runs" / "demo" / "x" / "seed1", 1.5, 0.1)
    script = _sweep_script()
    args = [str(sweep_file), f"--root={tmp_path / 'runs'}", f"--docs_dir={tmp_path / 'docs'}"]
    assert script.main([*args, "--seeds=1", "--variants=x"]) == 0
    assert "| `x` | 1 | 1.5000 |" in (tmp_path / "docs" / "demo.md").read_text()
    for bad, message in (("--seeds=3", "--seeds: [3] not in Sweep.seeds [0, 1]"),
                         ("--seeds=a", "--seeds: expected comma-separated integers"),
                         ("--variants=z", "--variants: ['z'] not in Sweep.variants")):
        with pytest.raises(SystemExit) as exit_info:
            script.main([*args, bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_collect_run_gives_speed_load_and_flops_at_each_evaluation(tmp_path):
    workdir = tmp_path / "demo" / "x" / "seed0"
    _fake_run(workdir, 1.0, 0.1)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        r["flops"] = 10.0 * r["step"]  # step s costs 10 s FLOPs
    lines.insert(10, {"step": 10, "split": "valid", "loss": 2.0})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = json.loads((workdir / "summary.json").read_text())
    summary.update(step=30, steps_this_run=30, wall_time_s=12.0)
    (workdir / "summary.json").write_text(json.dumps(summary))
    (workdir / "load_average.txt").write_text("3.25\n")
    record = sweep_lib.collect_run(workdir, "x", 0, root=tmp_path)
    assert record["valid_flops"] == [10.0 * 55, 10.0 * 465]  # sum of 10 s for s <= 10, <= 30
    assert record["steps"] == 30 and record["steps_per_second"] == 2.5
    assert record["load_average"] == 3.25 and record["workdir"] == "demo/x/seed0"


def test_load_sampler_samples_while_the_block_runs():
    import time

    with sweep_lib.LoadSampler(interval=0.01) as load:
        time.sleep(0.1)
    assert len(load.samples) >= 4 and load.mean() >= 0.0


def test_compute_columns_read_the_model_and_the_second_half_of_the_logged_flops(tmp_path):
    """A run whose config.gin builds a 1-layer dense model of vocabulary 10, 4 logged
    steps: FLOPs 100 each, realised 90 at steps 1-2 and 60 at steps 3-4 (the second half,
    averaged). A run without realised FLOPs reports its training FLOPs as realised."""
    from flax import nnx

    from layers.transformer import TransformerLM

    workdir = tmp_path / "demo" / "x" / "seed0"
    _fake_run(workdir, 1.0, 0.1)
    (workdir / "config.gin").write_text(
        "TransformerLM.d_model = 16\nTransformerLM.num_layers = 1\nTransformerLM.num_heads = 2\n"
        "TransformerLM.d_ff = 32\nTransformerLM.moe_every = 0\ntrain.vocab_size = 10\n")
    steps = [{"step": s, "split": "train", "loss": 1.0, "flops": 100.0,
              "realised_flops": 90.0 if s <= 2 else 60.0} for s in (1, 2, 3, 4)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    record = sweep_lib.collect_run(workdir, "x", 0, root=tmp_path, compute=True)
    params = nnx.eval_shape(lambda: TransformerLM(10, 16, 1, 2, 32, moe_every=0,
                                                  rngs=nnx.Rngs(0))).param_count()
    assert record["params"] == record["active_params"] == params
    assert record["train_flops_per_step"] == 100.0 and record["realised_flops_per_step"] == 60.0
    plain = dict(record, variant="y", realised_flops_per_step=100.0)
    report = sweep_lib.write_report(_sweep(variants={"x": {}, "y": {}}), [record, plain],
                                    "demo.gin", tmp_path / "docs", plots=False).read_text()
    assert "params | active params / token | train FLOPs / step | realised FLOPs / step" in report
    assert f"| {params} | {params} | 100 | 60 |" in report


def test_loss_vs_realised_flops_plot_gives_each_variant_its_mean_and_se(tmp_path):
    """Hand-made records with the compute columns: `skip` (2 seeds, realised FLOPs 60 and
    80 of 100, losses 1.0 and 1.2), `moe` (1 seed, fewer active than total parameters,
    nothing skipped), `dense` (2 seeds, all parameters active, realised = training FLOPs)
    and `diverged` (a NaN loss: no point). Points: means over seeds, SE = sample std /
    sqrt(n) (NaN for one seed); only `dense` gets the dense marker. The report links the
    PNG, also when written from records alone (`plots=False`)."""
    import math

    from experiments.reporting import compute

    def record(variant, seed, loss, realised, params=10, active=10):
        return {"variant": variant, "seed": seed, "workdir": f"{variant}/seed{seed}",
                "valid_loss": {"all": loss}, "valid_max_violation": None,
                "train_batch_max_violation": None, "train_sequence_max_violation": None,
                "wall_seconds": None, "params": params, "active_params": active,
                "train_flops_per_step": 100.0, "realised_flops_per_step": realised}

    records = [record("skip", 0, 1.0, 60.0), record("skip", 1, 1.2, 80.0),
               record("moe", 0, 0.9, 100.0, params=40), record("dense", 0, 1.5, 100.0),
               record("dense", 1, 1.7, 100.0), record("diverged", 0, math.nan, 100.0)]
    points = {p["variant"]: p for p in compute.realised_points(records)}
    assert sorted(points) == ["dense", "moe", "skip"]
    assert points["skip"]["flops"] == 70.0 and points["skip"]["flops_se"] == pytest.approx(10.0)
    assert points["skip"]["loss"] == pytest.approx(1.1)
    assert points["skip"]["loss_se"] == pytest.approx(0.1)
    assert points["dense"]["flops_se"] == 0.0 and points["dense"]["loss"] == pytest.approx(1.6)
    assert points["moe"]["n"] == 1 and math.isnan(points["moe"]["loss_se"])
    assert [points[v]["dense"] for v in ("skip", "moe", "dense")] == [False, False, True]
    sweep = _sweep(variants={v: {} for v in ("skip", "moe", "dense", "diverged")})
    report = sweep_lib.write_report(sweep, records, "demo.gin", tmp_path / "docs",
                                    plots=False).read_text()
    assert (tmp_path / "docs" / "demo" / compute.REALISED_PLOT).stat().st_size > 0
    assert f"](demo/{compute.REALISED_PLOT})" in report
    columns = [key for key, _ in compute.COLUMNS]  # a run without them gets no such plot
    plain = [{k: v for k, v in r.items() if k not in columns} for r in records[:1]]
    assert not compute.plot_loss_vs_realised_flops(plain, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
