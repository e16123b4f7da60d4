"""The pruning experiment's report and driver bookkeeping on hand-made records (no training).

Scenario: two trained MoEs (E = 8, E = 16), three seeds, one domain ('code'). Pruning to
keep 3/4 costs (almost) nothing, to 1/2 costs 0.10 nats for E = 8 but only 0.005 for
E = 16 (a significant but tiny difference, under the 1% tolerance), to 1/4 costs both a lot:
so the E = 8 degradation starts at keep 1/2 and the E = 16 one at keep 1/4, i.e. E = 16
tolerates more pruning, as UNCURL claims.
"""

from __future__ import annotations

import json
import re

import pytest

from experiments.reporting import pruning_report as pr
from tests.helpers import script_main

SOURCE = {0: 1.50, 1: 1.52, 2: 1.51}
# increase over the source per (E, fraction), per seed (small seed noise so SE > 0)
INCREASE = {(8, 0.75): (0.001, -0.002, 0.0015), (8, 0.5): (0.10, 0.11, 0.09),
            (8, 0.25): (0.30, 0.32, 0.31), (16, 0.75): (0.000, 0.001, -0.001),
            (16, 0.5): (0.005, 0.0052, 0.0048), (16, 0.25): (0.20, 0.22, 0.21)}


def _records() -> list[dict]:
    records = []
    for e in (8, 16):
        for seed, base in SOURCE.items():
            records.append({"kind": "source", "E": e, "seed": seed,
                            "workdir": f"sources/e{e}/seed{seed}",
                            "loss": {"code": base, "prose": base + 0.1}})
            for f in (0.75, 0.5, 0.25):
                up = INCREASE[(e, f)][seed]
                for method, extra in (("uncurl", 0.0), ("merge", -0.02)):
                    records.append({"kind": "surgery", "E": e, "seed": seed, "domain": "code",
                                    "method": method, "fraction": f, "kept": round(f * e),
                                    "workdir": "x", "loss": base + up + extra,
                                    "recovered": base + up / 2 if method == "uncurl" else None,
                                    "recovery_steps": 50})
    for seed in SOURCE:  # the E' = 4 MoE from scratch: 0.05 worse than the sources
        records.append({"kind": "scratch", "E": 4, "seed": seed, "steps": 550,
                        "workdir": f"scratch/e4/seed{seed}",
                        "loss": {"code": SOURCE[seed] + 0.05 + 0.001 * seed}})
    return records


def test_threshold_is_the_mildest_fraction_judged_degraded():
    res = pr.Results(_records())
    start8, marks8 = pr.threshold_fraction(res, 8, "code", "uncurl", recovered=False)
    start16, marks16 = pr.threshold_fraction(res, 16, "code", "uncurl", recovered=False)
    assert start8 == "from keep 1/2"
    assert marks8 == ["3/4: ok", "1/2: degraded", "1/4: degraded"]
    # E = 16 at 1/2: +0.005 is many SE above zero but under 1% of 1.51: not degraded.
    assert start16 == "from keep 1/4"
    assert marks16[1] == "1/2: ok"


def test_threshold_needs_two_seeds():
    one_seed = [r for r in _records() if r["seed"] == 0]
    start, marks = pr.threshold_fraction(pr.Results(one_seed), 8, "code", "uncurl", False)
    assert start == "not judged (n<2)" and all(m.endswith("-") for m in marks)


def test_e_comparison_and_scratch_and_merge_cells():
    res = pr.Results(_records())
    # E16 increase - E8 increase at keep 1/2 = 0.005 - 0.10 < 0: E = 16 degrades less.
    row = next(line for line in pr.e_comparison_table(res, "code") if line.startswith("| uncurl | none"))
    assert "-0.0950" in row and "E=16 degrades less" in row
    # E' = 4 is E = 8 at 1/2 and E = 16 at 1/4; pruned+recovered - scratch for E=8 at 1/2:
    # (0.05 recovered increase) - (0.05 + 0.001 seed) -> about -0.001.
    rows = [line for line in pr.scratch_table(res, "code") if line.startswith("| 8 | 1/2 | 4 | uncurl")]
    assert len(rows) == 1 and "-0.0010" in rows[0]
    assert not any(line.startswith("| 8 | 3/4") for line in pr.scratch_table(res, "code"))
    # The same kept E' = 4: E = 16 at 1/4 (+0.21) vs E = 8 at 1/2 (+0.10): E = 8 better.
    same = [line for line in pr.same_kept_table(res, "code")
            if line.startswith("| 4 | 1/4 | 1/2 | uncurl | none")]
    assert len(same) == 1 and "+0.1100" in same[0] and "E=8 better" in same[0]
    merge = next(line for line in pr.versus_table(res, "code", [("merge", "uncurl")])
                 if line.startswith("| 8 | merge − uncurl | none"))
    assert merge.count("-0.0200") == 3 and "merge better" in merge


def test_render_reports_status_and_no_absolute_paths(tmp_path):
    data = {"settings": {"experts": [8, 16], "seeds": [0, 1, 2], "domains": ["code"],
                         "fractions": [0.75, 0.5, 0.25], "methods": ["uncurl", "merge"],
                         "recover_methods": ["uncurl"], "recover_domains": ["code"],
                         "recovery_steps": 50, "source_steps": 500, "scratch_experts": [2, 4],
                         "eval_batches": 16, "task_batches": 8},
            "plan": {"sources": 6, "surgeries": 36, "recovery fine-tunes": 18,
                     "from-scratch MoEs": 6},
            "records": _records()}
    text = pr.render(data)
    assert "Partial" in text and "from-scratch MoEs 3 of 6" in text
    assert "- code, uncurl, no recovery: E=8: from keep 1/2; E=16: from keep 1/4." in text
    assert not re.search(r"(^|[\s`(])/(work|tmp|home)/", text)
    # The driver rewrites report and plot from the records file alone.
    records_file = tmp_path / "pruning.json"
    records_file.write_text(json.dumps(data))
    main = script_main("pruning_sweep.py")
    assert main(["--from_records", f"--json={records_file}", f"--report={tmp_path}/r.md",
                 f"--plot={tmp_path}/r.png"]) == 0
    assert (tmp_path / "r.md").read_text() == text and (tmp_path / "r.png").stat().st_size > 0


def test_driver_collects_finished_units_relative_to_the_root(tmp_path):
    """A hand-made sweep tree: one source evaluated, one surgery with its eval and a
    recovered run, one scratch run; everything else of the plan missing."""
    main = script_main("pruning_sweep.py")
    root = tmp_path / "sweep"
    (root / "evals").mkdir(parents=True)
    (root / "evals/source_e8_seed0.json").write_text(json.dumps({"code": 1.5, "prose": 1.6}))
    unit = root / "surgery/e8/seed0/code/uncurl_keep4"
    unit.mkdir(parents=True)
    (unit / "eval.json").write_text(json.dumps({"loss": 1.9, "domain_loss": {}}))
    rec = root / "recovered/e8/seed0/code/uncurl_keep4"
    rec.mkdir(parents=True)
    (rec / "summary.json").write_text(json.dumps({"step": 550, "valid_loss": {"code": 1.6}}))
    scratch = root / "scratch/e4/seed0"
    scratch.mkdir(parents=True)
    (scratch / "summary.json").write_text(json.dumps({"step": 550, "valid_loss": {"code": 1.7}}))
    out = tmp_path / "p.json"
    assert main([f"--root={root}", "--experts=8", "--seeds=0", "--domains=code",
                 "--fractions=0.5", "--methods=uncurl,frequency", "--recover_methods=uncurl",
                 "--recover_domains=code",
                 "--scratch_experts=4",
                 "--stages=report", f"--json={out}"]) == 0
    data = json.loads(out.read_text())
    assert data["plan"] == {"sources": 1, "surgeries": 2, "recovery fine-tunes": 1,
                            "from-scratch MoEs": 1}
    kinds = {r["kind"]: r for r in data["records"]}
    assert kinds["source"]["workdir"] == "sources/e8/seed0"
    assert kinds["surgery"] == {"kind": "surgery", "E": 8, "seed": 0, "domain": "code",
                                "method": "uncurl", "fraction": 0.5, "kept": 4,
                                "workdir": "surgery/e8/seed0/code/uncurl_keep4", "loss": 1.9,
                                "recovered": 1.6, "recovery_steps": 50,
                                "recovered_workdir": "recovered/e8/seed0/code/uncurl_keep4"}
    assert kinds["scratch"]["loss"] == {"code": 1.7} and len(data["records"]) == 3


@pytest.mark.parametrize("argv,flag", [
    (["--methods=uncurl,magnitude"], "--methods"),
    (["--fractions=0.5,1.0"], "--fractions"),
    (["--recovery_steps=-1"], "--recovery_steps"),
])
def test_driver_refuses_bad_flags(tmp_path, capsys, argv, flag):
    main = script_main("pruning_sweep.py")
    assert main([f"--root={tmp_path}", "--stages=report", f"--json={tmp_path}/p.json", *argv]) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
