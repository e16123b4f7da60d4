"""One-command experiments: run order, the progress line, the claims section of a report
and `scripts/experiment.py`'s dispatch (no training: runs are faked)."""

import json
import subprocess

import pytest

from experiments.reporting import claims, progress
from experiments.reporting import sweep as sweep_lib


def test_schedule_orders_variant_by_variant_or_seed_by_seed():
    runs = [("a", {}), ("b", {"X.y": 1})]
    assert [(v, s) for v, _, s in progress.schedule(runs, [0, 1], "variant")] == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    # Seed by seed: an interrupted sweep has every variant at the first seeds (paired).
    assert [(v, s) for v, _, s in progress.schedule(runs, [0, 1], "seed")] == [
        ("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    with pytest.raises(ValueError, match=r"sweep order must be one of \['variant', 'seed'\]"):
        progress.schedule(runs, [0], "random")


def test_progress_line_counts_runs_and_estimates_the_rest_from_mean_wall_time():
    # 3 of 8 done, runs took 9 and 11 min: 5 left x 10 min = 50 min.
    line = progress.progress_line("demo", 3, 8, [540.0, 660.0], "b seed 1")
    assert line == ("[sweep demo] 3/8 runs done; next: b seed 1; ETA 50 min "
                    "(5 runs x 10.0 min/run)")
    assert progress.progress_line("demo", 0, 4, []).endswith(
        "ETA unknown until a run finishes (4 to go)")
    assert progress.progress_line("demo", 4, 4, [60.0]) == "[sweep demo] 4/4 runs done; finished"
    assert progress.format_duration(3900) == "1 h 05 min"
    with pytest.raises(ValueError, match=r"runs done must be in \[0, 4\], got 5"):
        progress.progress_line("demo", 5, 4, [])


def _finish(workdir, loss, wall=None):
    # What the report reads of a finished run.
    workdir.mkdir(parents=True)
    (workdir / "summary.json").write_text(json.dumps({"valid_loss": {"all": loss}}))
    (workdir / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "split": "train", "ce": loss}) + "\n"
        + json.dumps({"step": 1, "split": "valid", "loss": loss}) + "\n")
    if wall is not None:
        (workdir / "wall_seconds.txt").write_text(f"{wall}\n")


def test_sweep_trains_seed_by_seed_with_a_progress_line_before_each_run(tmp_path, monkeypatch):
    # y seed 1 finished earlier in 600 s: it is skipped, and the ETA before the first run
    # trained here is estimated from it (3 runs to go x 10 min).
    sweep = sweep_lib.Sweep(gin_files=["unused.gin"], variants={"x": {}, "y": {}},
                            seeds=[0, 1], name="demo")
    _finish(sweep_lib.run_dir(tmp_path, sweep, "y", 1), 2.0, wall=600)
    trained = []

    def fake_child(command, *, cwd, name):
        workdir = next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))
        trained.append(name)
        _finish(tmp_path / workdir, 1.0)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(sweep_lib, "run_child", fake_child)
    log = []
    records = sweep_lib.run_sweep(sweep, tmp_path, log=log.append, order="seed")
    assert trained == ["x seed 0", "y seed 0", "x seed 1"]
    assert [(r["variant"], r["seed"]) for r in records] == [("x", 0), ("y", 0), ("x", 1), ("y", 1)]
    assert log[0] == ("[sweep demo] 1/4 runs done; next: x seed 0; ETA 30 min "
                      "(3 runs x 10.0 min/run)")
    assert log[2].startswith("[sweep demo] 2/4 runs done; ETA")  # after the first run
    assert log[-1] == "[sweep demo] 4/4 runs done; finished"


def _record(variant, seed, loss, mi=None):
    record = {"variant": variant, "seed": seed, "workdir": f"s/{variant}/seed{seed}",
              "valid_loss": {"all": loss}}
    if mi is not None:
        record["routing"] = {"layer_0": {"mi_bits": mi}}
    return record


def test_claims_are_judged_on_paired_seeds_and_a_missing_seed_is_named():
    # global - micro by seed: -0.010, -0.012 (seed 2 of micro never ran): mean -0.011,
    # SE 0.001, 11 SE below zero. MI: global higher by 0.02, 0.04 -> mean +0.03, SE 0.01.
    records = [_record("global", 0, 1.500, 0.05), _record("global", 1, 1.510, 0.07),
               _record("global", 2, 1.520, 0.06),
               _record("micro", 0, 1.510, 0.03), _record("micro", 1, 1.522, 0.03)]
    planned = [(v, s) for v in ("global", "micro", "seq") for s in (0, 1, 2)]
    status = claims.status_lines(planned, records)[0]
    assert status.startswith("**Runs finished: 5 of 9 planned.** Not run yet: "
                             "`micro` seeds [2]; `seq` seeds [0, 1, 2].")
    text = "\n".join(claims.claim_lines([["global", "micro"], ["global", "seq"]], records, 3.0))
    assert ("supported: global - micro = -0.0110 ± 0.0010 (mean ± SE of 2 paired seeds), "
            "more than 3 SE (0.0030) below zero (seeds run by only one side, not paired: [2])"
            in text)
    assert "`global` reaches a lower validation loss than `seq`: no runs of `seq`" in text
    assert "| `global` - `micro` | +0.0300 ± 0.0100 (n=2, inconclusive) |" in text
    assert claims.status_lines([("global", 0)], records[:1])[0].endswith("(the sweep is complete).")


def test_a_claim_naming_no_variant_of_the_sweep_is_refused():
    message = (r"Sweep.claims entries must be \[variant, baseline\] pairs of the sweep's "
               r"variants \['x', 'y'\], got \['x', 'z'\]")
    with pytest.raises(ValueError, match=message):
        sweep_lib.Sweep(gin_files=["a.gin"], variants={"x": {}, "y": {}}, claims=[["x", "z"]])


def _experiment_script():
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("experiment_script",
                                                  REPO / "scripts" / "experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_names_are_the_sweeps_and_each_gets_its_report_writer(capsys):
    script = _experiment_script()
    names = script.experiment_names()
    assert {"calibration", "evomoe", "global_batch_lbl", "loss_free_balancing",
            "upcycling"} <= set(names)
    sweep = script.commands("global_batch_lbl", "R", "D")
    assert sweep == [["scripts/sweep.py", "gin_configs/sweeps/global_batch_lbl.gin", "--root=R",
                      "--docs_dir=D", "--order=seed"]]
    evomoe = script.commands("evomoe", "R", "D")
    assert evomoe[0][3:] == ["--docs_dir=R/evomoe/generic_report", "--order=seed"]
    assert evomoe[1] == ["scripts/evomoe_report.py", "gin_configs/sweeps/evomoe.gin", "--root=R",
                         "--docs_dir=D"]
    assert script.commands("pruning", "R", "D", report_only=True) == [
        ["scripts/pruning_sweep.py", "--root=R/pruning", "--stages=surgery,report",
         "--json=D/pruning.json", "--report=D/pruning.md", "--plot=D/pruning.png"]]
    assert script.commands("pruning", "R", "D", from_records=True)[0][:2] == [
        "scripts/pruning_sweep.py", "--from_records"]
    assert script.commands("cbtm", "R", "D", report_only=True) == [
        ["scripts/cbtm_experiment.py", "--root=R/cbtm", "--docs_dir=D", "--report_only"]]
    assert script.commands("calibration", "R", "D", from_records=True) == [
        ["scripts/calibration_report.py", "--from_records"]]
    with pytest.raises(SystemExit) as exit_info:
        script.main(["no_such_experiment"])
    assert exit_info.value.code == 2
    assert "NAME must be one of [" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main(["evomoe", "--from_records"])
    assert exit_info.value.code == 2
    assert "experiment 'evomoe' has no committed records" in capsys.readouterr().err


def test_every_committed_sweep_parses_for_every_variant():
    # What `make experiment` would hand scripts/train.py for each run of each committed
    # sweep (its gin files, the variant's gin files and bindings, the seed) parses: a
    # misspelt binding or a missing gin file fails here, not an hour into a sweep.
    import gin

    from experiments.runtime import gin_utils
    from experiments.train import trainer  # noqa: F401  (registers every configurable)
    from tests.helpers import REPO

    script = _experiment_script()
    checked = 0
    for name in script.experiment_names():
        if name.startswith("upcycling") or name in script.DRIVERS:  # run by their own drivers
            continue
        sweep = sweep_lib.load_sweep(REPO / "gin_configs" / "sweeps" / f"{name}.gin")
        for variant, bindings in sweep.runs():
            command = sweep_lib.train_command(sweep, bindings, sweep.seeds[0], REPO, variant)
            files = [str(REPO / a.split("=", 1)[1]) for a in command if a.startswith("--gin_file=")]
            params = [a.split("=", 1)[1] for a in command if a.startswith("--gin_param=")]
            gin.clear_config()
            gin_utils.parse(files, params)
            checked += 1
    gin.clear_config()
    assert checked >= 40  # calibration, evomoe, the balancing sweeps and their tiny versions


def test_evomoe_claims_at_equal_flops_read_each_curve_at_the_budget():
    # Two runs of `a` and `b`: validation at 100 and 300 GFLOPs. At a budget of 200
    # GFLOPs each run's loss is the midpoint of its two evaluations, so `a` (3.0 -> 2.0:
    # 2.5) is 0.5 below `b` (3.0 -> 3.0) at seed 0 and 0.3 below at seed 1.
    import importlib.util

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("evomoe_report",
                                                  REPO / "scripts" / "evomoe_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def run(variant, seed, first, last):
        return {"variant": variant, "seed": seed, "workdir": f"{variant}/seed{seed}",
                "valid_flops": [100e9, 300e9], "valid": [first, last]}

    runs = {"a": [run("a", 0, 3.0, 2.0), run("a", 1, 3.0, 2.4)],
            "b": [run("b", 0, 3.0, 3.0), run("b", 1, 3.0, 3.0)]}
    records = report.budget_records(runs, 200e9)
    assert [r["valid_loss"]["all"] for r in records] == pytest.approx([2.5, 2.7, 3.0, 3.0])
    text = "\n".join(claims.claim_lines([["a", "b"]], records, 3.0))
    assert "a - b = -0.4000 ± 0.1000 (mean ± SE of 2 paired seeds)" in text
