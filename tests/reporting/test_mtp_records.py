"""docs/experiments/mtp.md is what scripts/mtp_report.py writes from its committed records
(docs/experiments/mtp/records.json; no training, no model): the report is regenerated in a
temporary docs directory and compared, and the paired verdict it states is recomputed."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

from experiments.reporting import protocol

REPO = Path(__file__).resolve().parents[2]
RECORDS = REPO / "docs/experiments/mtp/records.json"
REPORT = REPO / "docs/experiments/mtp.md"


def test_mtp_report_is_regenerated_from_its_records(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("mtp_report", REPO / "scripts" / "mtp_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    (tmp_path / "mtp").mkdir()
    shutil.copy(RECORDS, tmp_path / "mtp" / "records.json")
    monkeypatch.chdir(REPO)  # the sweep file's path is relative to the repository
    assert module.main(["--from_records", f"--docs_dir={tmp_path}"]) == 0
    assert (tmp_path / "mtp.md").read_text() == REPORT.read_text()
    records = json.loads(RECORDS.read_text())
    verdict = protocol.verdict(protocol.paired(records, "mtp", "none"), 3.0)
    assert verdict.text() in REPORT.read_text()
