"""The c-BTM experiment report (experiments.cbtm.report) from faked finished pieces:
two seeds of k = 1 (dense) and k = 2, where the 2-cluster top-1 ensemble is 0.10 and
0.12 nats below the dense model: paired difference -0.11 ± 0.01."""

import json

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
        agreement = {"adjusted_mutual_information": 0.5 * (k - 1), "purity": 0.75}
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
    assert "| 2 | 0.5000 ± 0.0000 (n=2) | 0.7500 ± 0.0000 (n=2)" in text
    records = json.loads((docs / "cbtm.json").read_text())["records"]
    assert {"variant": "k1 (dense)", "seed": 0, "workdir": "k1/seed0",
            "valid_loss": {"code": 2.0, "prose": 2.0, "all": 2.0}} in records
