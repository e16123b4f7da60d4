"""The c-BTM experiment driver and report (experiments.cbtm.experiment, .report) on
faked finished pieces (no training). Report: two seeds of k = 1 (dense) and k = 2,
where the 2-cluster top-1 ensemble is 0.10 and 0.12 nats below the dense model:
paired difference -0.11 ± 0.01."""

import json

import pytest

from experiments.cbtm import experiment
from experiments.cbtm.experiment import Plan
from experiments.cbtm.report import BEGIN, END, write_report


def _fake(plan: Plan, seed: int, dense: float, top1: float) -> None:
    for k, losses in ((1, {"top1": dense}), (2, {"top1": top1, "top2": top1 + 0.05})):
        arm = plan.arm(k, seed)
        arm.mkdir(parents=True)
        result = {"ensemble_loss": {n: {"code": v, "prose": v, "all": v}
                                    for n, v in losses.items()},
                  "branch_loss": [{"code": dense, "prose": dense, "all": dense}] * k}
        (arm / "ensemble.json").write_text(json.dumps(result))
        clustering = plan.clustering(k, seed)
        clustering.mkdir(parents=True)
        agreement = {"adjusted_mutual_information": 0.5 * (k - 1), "purity": 0.75,
                     "byte_purity": 0.9, "byte_normalized_mutual_information": 0.6}
        (clustering / "clusters.json").write_text(json.dumps({
            "agreement": {"train": agreement, "validation": agreement},
            "sizes": {"train": [10] * k}}))


def test_report_pairs_by_seed_and_keeps_the_hand_written_text(tmp_path):
    plan = Plan(root=tmp_path / "runs", seeds=(0, 1), clusters=(1, 2))
    _fake(plan, 0, dense=2.0, top1=1.90)
    _fake(plan, 1, dense=2.1, top1=1.98)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cbtm.md").write_text(f"# Title\n\nprose\n\n{BEGIN}\nold\n{END}\n\ntail\n")
    text = write_report(plan, docs).read_text()
    assert text.startswith("# Title\n\nprose\n\n") and text.endswith("\n\ntail\n")
    assert "old" not in text
    assert "| k2 top1 | -0.1100 ± 0.0100 (supported)" in text  # 11 SE below zero
    assert "| 2 | 0.5000 ± 0.0000 (n=2) | 0.7500 ± 0.0000 (n=2) | 0.9000 ± 0.0000 (n=2)" in text
    records = json.loads((docs / "cbtm.json").read_text())["records"]
    assert {"variant": "k1 (dense)", "seed": 0, "workdir": "k1/seed0",
            "valid_loss": {"code": 2.0, "prose": 2.0, "all": 2.0}} in records


def _plan_with_seed_run(tmp_path, config: str, *, k: int, budget: int) -> Plan:
    """A plan of one k at seed 0 over a faked seed run (step 500, `config` as its
    config.gin), its clustering made and its branch0 finished earlier."""
    seeds = tmp_path / "seeds"
    (seeds / "seed0").mkdir(parents=True)
    (seeds / "seed0" / "summary.json").write_text(json.dumps({"step": 500}))
    (seeds / "seed0" / "config.gin").write_text(config + "\n")
    plan = Plan(root=tmp_path / "root", seeds=(0,), clusters=(k,), budget=budget, seed_runs=seeds)
    plan.clustering(k, 0).mkdir(parents=True)
    (plan.clustering(k, 0) / "clusters.json").write_text("{}")
    (plan.arm(k, 0) / "branch0").mkdir(parents=True)
    (plan.arm(k, 0) / "branch0" / "summary.json").write_text("{}")
    return plan


def test_driver_skips_finished_pieces_and_matches_compute(tmp_path, monkeypatch):
    # Seed run at step 500 (faked); k = 2 with budget 8: two branches of 4 steps each.
    # branch0 finished earlier (summary.json), so only branch1 is created and trained.
    plan = _plan_with_seed_run(tmp_path, "DataConfig.max_bytes_per_domain = 1000", k=2, budget=8)
    (plan.root / "seed_eval").mkdir(parents=True)
    (plan.root / "seed_eval" / "seed0.json").write_text("{}")
    calls = []
    monkeypatch.setattr(experiment, "_python", lambda script, *args, env: calls.append(
        (script, args)))
    experiment.run(plan)
    assert [c[0] for c in calls] == ["scripts/branch_checkpoint.py", "scripts/train.py",
                                     "scripts/ensemble_eval.py"]
    params = [a.split("=", 1)[1] for a in calls[1][1] if a.startswith("--gin_param=")]
    assert f"DataConfig.source = 'cluster:{plan.clustering(2, 0).absolute()}:1'" in params
    assert "train.num_steps = 504" in params  # 500 + 8 / 2
    assert "learning_rate_schedule.end_ratio = 1.0" in params  # constant rate
    assert "--top_k=1,2" in calls[2][1]
    with pytest.raises(ValueError, match="--clusters 3: every k must be >= 1 and divide"):
        Plan(root=tmp_path, clusters=(1, 3), budget=8)


def test_report_refuses_an_arm_scored_on_other_tokens_than_the_seed(tmp_path):
    # The seed checkpoint was scored on 16 validation batches, the k = 2 arm on 2 (the
    # branch runs' own small evaluation): the pair would compare different tokens.
    plan = Plan(root=tmp_path / "runs", seeds=(0,), clusters=(1, 2))
    _fake(plan, 0, dense=2.0, top1=1.9)
    tokens = {"code": 30, "prose": 10}
    (plan.root / "seed_eval").mkdir()
    (plan.root / "seed_eval" / "seed0.json").write_text(json.dumps({
        "batches": 16, "scored_tokens": tokens,
        "ensemble_loss": {"top1": {"code": 2.1, "prose": 2.1, "all": 2.1}}}))
    for k, batches in ((1, 16), (2, 2)):
        path = plan.arm(k, 0) / "ensemble.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "batches": batches,
                                    "scored_tokens": tokens}))
    docs = tmp_path / "docs"
    with pytest.raises(ValueError, match=r"k2/seed0/ensemble.json: scored on 2 validation "
                                         r"batches .* on 16 "):
        write_report(plan, docs)


def test_driver_passes_the_seed_runs_validation_size_to_every_evaluation(tmp_path, monkeypatch):
    # The seed run validates on 16 batches; the branches' own config says 2. The seed
    # checkpoint's and the arm's ensemble evaluations must both ask for 16.
    plan = _plan_with_seed_run(tmp_path, "DataConfig.eval_max_batches = 16", k=1, budget=4)
    calls = []
    monkeypatch.setattr(experiment, "_python", lambda script, *args, env: calls.append(
        (script, args)))
    experiment.run(plan)
    evals = [args for script, args in calls if script == "scripts/ensemble_eval.py"]
    assert len(evals) == 2 and all("--eval_max_batches=16" in args for args in evals)
