"""The issue-19 experiment drivers and reports (scripts/efficientscale_sweep.py,
scripts/tomoe_sweep.py, experiments/reporting/surgery_experiments.py) on hand-made
records and fake run directories: no model is built, nothing is trained."""

import importlib.util
import json
import shutil

import pytest

from experiments.reporting import protocol
from experiments.reporting import surgery_experiments as se
from tests.helpers import REPO


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_total_flops_sums_the_phases_up_to_a_step():
    # 250 small steps at 10 FLOPs, then 250 large ones at 40: 2500 + 250 * 40 at the end,
    # 2500 + 50 * 40 at step 300, 100 * 10 at step 100.
    r = {"flops_per_step": [[0, 10.0], [250, 40.0]], "steps": 500}
    assert se.total_flops(r) == 12500.0
    assert se.total_flops(r, 300) == 4500.0
    assert se.total_flops(r, 100) == 1000.0


def _es(variant, seed, loss):
    return {"variant": variant, "seed": seed, "workdir": f"seed{seed}/{variant}",
            "valid_loss": {"all": loss}, "steps": 4, "flops_per_step": [[0, 1.0]],
            "valid_curve": [[2, None, loss + 1], [4, None, loss]]}


def test_efficientscale_report_states_the_paired_verdicts_and_what_is_missing(tmp_path):
    # grown_e8 is 0.10 +- ~0.003 below scratch on three seeds: supported, i.e. the
    # paper's direction is reproduced; small_e8 is above both; seed 2 of small_dense
    # is missing.
    records = []
    for seed, (g, s, d) in enumerate([(1.50, 1.60, 1.70), (1.51, 1.60, 1.72), (1.49, 1.60, 1.71)]):
        records += [_es("grown_e8", seed, g), _es("scratch", seed, s), _es("small_e8", seed, d)]
        if seed < 2:
            records.append(_es("small_dense", seed, 2.0))
    planned = [(v, s) for v in se.ES_VARIANTS for s in (0, 1, 2)]
    text = se.efficientscale_markdown(records, planned, n_steps=2, m_steps=2, command="CMD")
    v = protocol.verdict(protocol.paired(records, "grown_e8", "scratch"), se.THRESHOLD)
    assert v.outcome == "supported"
    assert v.text() in text
    assert "**Runs finished: 11 of 12 planned.** Not run yet: `small_dense` seeds [2]" in text
    assert ("Scale-up + scale-out reaches a lower loss than the MoE from scratch at equal "
            "steps (it also spends fewer FLOPs: its first N steps are the small model's): "
            "**reproduced**") in text
    assert "Scaling up before scaling out beats upcycling the small model directly: " \
           "**reproduced**" in text
    assert "(not a paper claim: the direct arm is much smaller): **contradicted**" in text
    se.efficientscale_plot(records, tmp_path / "p.png", 2)
    assert (tmp_path / "p.png").stat().st_size > 0


def _finish(workdir, losses, flops, summary_extra=None):
    # What collect_run and the driver read of a finished run: evaluations at `losses`'s
    # steps, one training record per step with `flops`.
    workdir.mkdir(parents=True)
    steps = sorted(losses)
    (workdir / "summary.json").write_text(json.dumps(
        {"valid_loss": {"all": losses[steps[-1]]}, "step": steps[-1], "wall_time_s": 1.0,
         "steps_this_run": 1, **(summary_extra or {})}))
    lines = [{"step": s, "split": "train", "ce": 1.0, "flops": flops} for s in steps]
    lines += [{"step": s, "split": "valid", "loss": losses[s]} for s in steps]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_efficientscale_collect_joins_the_small_models_history_to_the_upcycled_runs(tmp_path):
    # N = 2: the upcycled arm's curve is the small dense model's evaluations before step 2,
    # the upcycled model's loss at step 2 (upcycle.json's verify), then its own; its FLOPs
    # are the small model's per step until N, its own after.
    script = _script("efficientscale_sweep")
    d = tmp_path / "seed0"
    _finish(d / "small_dense", {1: 3.0, 2: 2.5, 4: 2.2}, 5.0)
    _finish(d / "grown_e8", {3: 2.0, 4: 1.9}, 20.0)
    (d / "grown_e8" / "upcycle.json").write_text(json.dumps(
        {"verify": {"moe_loss": 2.6, "dense_loss": 2.5}, "moe_param_count": 9,
         "dense_param_count": 4}))
    (d / "grown_dense").mkdir()
    (d / "grown_dense" / "scale_up.json").write_text(json.dumps(
        {"verify": {"source_loss": 2.5, "grown_loss": 2.5, "max_abs_logit_diff": 1e-6}}))
    # scratch: an earlier run of the same config linked into the root (reported as such).
    _finish(tmp_path / "earlier_run", {2: 2.4, 4: 1.8}, 20.0)
    (d / "scratch").symlink_to(tmp_path / "earlier_run")
    records = script.collect(tmp_path, [0, 1], 2)
    assert [r["variant"] for r in records] == ["grown_e8", "scratch", "small_dense"]
    grown = records[0]
    assert grown["valid_curve"] == [[1, None, 3.0], [2, None, 2.6], [3, None, 2.0],
                                    [4, None, 1.9]]
    assert grown["flops_per_step"] == [[0, 5.0], [2, 20.0]]
    assert grown["step0"] == {"small_loss": 2.5, "moe_loss": 2.6, "grown_loss": 2.5,
                              "grow_max_abs_logit_diff": 1e-6}
    assert grown["workdir"] == "seed0/grown_e8"
    assert records[1]["flops_per_step"] == [[0, 20.0]]
    assert records[1]["reused"] and records[1]["workdir"] == "seed0/scratch"
    assert "The `scratch` runs of seeds [0] are earlier runs of exactly this configuration" \
        in se.efficientscale_markdown(records, [], n_steps=2, m_steps=2, command="CMD")


def _tomoe_json(out, dense, moe, static, errors=(0.1, 0.2)):
    out.mkdir(parents=True)
    (out / "tomoe.json").write_text(json.dumps({
        "verify": {"dense_loss": dense, "moe_loss": moe, "static_pruning_loss": static},
        "layers": {f"layer_{i}": {"error": e} for i, e in enumerate(errors)}}))


def test_tomoe_collect_reads_static_once_per_fraction_and_refuses_disagreement(tmp_path):
    # Two conversions at f = 1/2 report the same static loss: one static record; the
    # untrained conversion is recorded but never claimed against static.
    script = _script("tomoe_sweep")
    d = tmp_path / "seed0"
    _tomoe_json(d / "tomoe_e8_f50", 1.5, 1.7, 1.9)
    _tomoe_json(d / "tomoe_e8_f50_untrained", 1.5, 2.4, 1.9)
    records = script.collect(tmp_path, [0])
    assert [(r["variant"], r["valid_loss"]["all"]) for r in records] == [
        ("dense", 1.5), ("static_f50", 1.9), ("tomoe_e8_f50", 1.7),
        ("tomoe_e8_f50_untrained", 2.4)]
    assert records[1]["workdir"] == "seed0/tomoe_e8_f50"
    assert records[2]["layer_errors"] == {"layer_0": 0.1, "layer_1": 0.2}
    assert se.tomoe_claims(records) == [("tomoe_e8_f50", "static_f50")]
    assert se.ablation_claims(records) == [("tomoe_e8_f50", "tomoe_e8_f50_untrained")]
    _tomoe_json(d / "tomoe_e16_f50", 1.5, 1.6, 1.95)
    with pytest.raises(ValueError, match="static pruning loss 1.95 differs"):
        script.collect(tmp_path, [0])


def test_tomoe_report_says_where_the_paper_is_contradicted(tmp_path):
    # At f = 1/2 ToMoE beats static on all three seeds; at f = 1/4 it is worse on all
    # three by about 0.1: the paper's claim is reproduced at 1/2, contradicted at 1/4.
    records = []
    for seed in range(3):
        for f, tomoe_loss, static in ((0.5, 1.70 + 0.01 * seed, 1.90),
                                      (0.25, 2.30 + 0.01 * seed, 2.20)):
            base = {"seed": seed, "fraction": f}
            records += [
                {**base, "variant": se.variant_name("static", f), "method": "static",
                 "workdir": f"seed{seed}/x", "valid_loss": {"all": static}},
                {**base, "variant": se.variant_name("tomoe", f, 8), "method": "tomoe",
                 "num_experts": 8, "workdir": f"seed{seed}/y",
                 "valid_loss": {"all": tomoe_loss}}]
        records.append({"variant": "dense", "seed": seed, "fraction": 1.0, "method": "dense",
                        "workdir": f"seed{seed}/dense", "valid_loss": {"all": 1.5}})
    config = {"steps": 200, "tokens_per_step": 1024, "learning_rate": 0.01,
              "data_batches": 8, "max_tokens": 16384, "verify_batches": 16}
    text = se.tomoe_markdown(records, [], config=config, command="CMD")
    assert "`tomoe_e8_f50` beats `static_f50` at f = 0.5: **reproduced**" in text
    assert "`tomoe_e8_f25` beats `static_f25` at f = 0.25: **contradicted**" in text
    se.tomoe_plot(records, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["efficientscale", "tomoe_pruning"])
def test_committed_report_is_regenerated_from_its_records(tmp_path, name):
    # The committed report is what its driver writes from the committed records alone.
    script = _script({"efficientscale": "efficientscale_sweep",
                      "tomoe_pruning": "tomoe_sweep"}[name])
    docs = REPO / "docs" / "experiments"
    (tmp_path / name).mkdir()
    shutil.copy(docs / name / "records.json", tmp_path / name / "records.json")
    assert script.main(["--from_records", f"--docs_dir={tmp_path}"]) == 0
    assert (tmp_path / f"{name}.md").read_text() == (docs / f"{name}.md").read_text()


def test_experiment_script_dispatches_the_driven_experiments():
    script = _script("experiment")
    assert {"efficientscale", "tomoe_pruning"} <= set(script.experiment_names())
    assert script.commands("tomoe_pruning", "R", "D") == [[
        "scripts/tomoe_sweep.py", "--sweep_gin=gin_configs/sweeps/tomoe_pruning.gin",
        "--docs_dir=D", "--root=R/tomoe_pruning"]]
    assert script.commands("efficientscale", "R", "D", from_records=True)[0][-1] == \
        "--from_records"
