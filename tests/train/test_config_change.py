"""A configuration change on an existing workdir is refused, never destroys checkpoints.

Run A (tiny), then B with another `TransformerLM.d_model` on the same workdir
(refused: one line, exit 2, nothing changed), then A again (resumes).
"""

from pathlib import Path

from experiments.reporting.metrics import read_jsonl
from tests.helpers import run_script

TINY = "--gin_file=gin_configs/experiments/test_tiny.gin"


def _train(workdir: Path, *params: str):
    return run_script("scripts/train.py", TINY, *[f"--gin_param={p}" for p in params],
                      f"--workdir={workdir}", "--quiet", timeout=180)


def _snapshot(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes()
            for p in sorted(workdir.rglob("*")) if p.is_file()}


def test_model_change_is_refused_and_every_checkpoint_survives(tmp_path):
    workdir = tmp_path / "run"
    first = _train(workdir, "train.num_steps = 5", "train.eval_every = 5")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(workdir)

    changed = _train(workdir, "train.num_steps = 5", "TransformerLM.d_model = 64")
    assert changed.returncode == 2, changed.stderr[-3000:]
    lines = [line for line in changed.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, changed.stderr[-3000:]
    assert "TransformerLM.d_model: checkpoint 32, config 64" in errors[0]
    assert "--workdir" in errors[0] and "upcycle" in errors[0]
    assert "Event loop is closed" not in changed.stderr and len(lines) <= 5, changed.stderr
    assert _snapshot(workdir) == before  # no quarantine, no rewritten metrics/config/lock
    assert not (workdir / "corrupt_checkpoints").exists()

    again = _train(workdir, "train.num_steps = 10", "train.eval_every = 5")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "corrupt" not in again.stderr
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 10]
    # Resumed at 5: the first run's records of steps 1-5 are kept, 6-10 appended.
    records = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == list(range(1, 11))
    (tmp_path / "first.jsonl").write_bytes(before["metrics.jsonl"])
    assert read_jsonl(tmp_path / "first.jsonl", "train") == records[:5]
