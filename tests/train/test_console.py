"""Console output of the trainer and of analyze_routing: the start-up block, the
compile notice, eval lines, the summary's wall time and tokens, EvoMoE phase
announcements, the dense-workdir message and no orbax read-only notices."""

import io
import json
import logging
import math
import re

import numpy as np

from experiments.reporting import console
from experiments.reporting.metrics import ProgressLine, read_jsonl
from experiments.runtime.checkpoints import Checkpointer
from experiments.train.phases import PhasePlan
from tests.helpers import run_script, shared_run_stderr
from tests.train.test_trainer import TINY_GIN, tiny_run  # noqa: F401  (the shared 30-step run)


def test_startup_block_compile_notice_and_eval_lines(tiny_run, tmp_path_factory):  # noqa: F811
    workdir, _ = tiny_run
    lines = shared_run_stderr(tmp_path_factory, "tiny_run").splitlines()

    def index(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    block = [index(p) for p in ("devices: 1 x cpu", "mesh: data=1", "dispatch: ", "parameters: ",
                                f"workdir: {workdir}", "fresh start", "compiling the train step…",
                                "compiled the train step and ran the first step in ")]
    assert block == sorted(block) and block[-1] < index("[")  # before the first progress line
    counts = re.search(r"\(([\d,]+) / ([\d,]+)\)", lines[block[3]]).groups()
    total, active = (int(c.replace(",", "")) for c in counts)
    assert total > active > 0  # top-2 of 4 experts
    evals = [line for line in lines if line.startswith("eval step ")]
    valid = read_jsonl(workdir / "metrics.jsonl", "valid")
    assert [int(line.split()[2][:-1]) for line in evals] == [r["step"] for r in valid] == [10, 20, 30]
    for line, record in zip(evals, valid):
        assert f"loss {record['loss']:.4f} nats/byte = {record['loss'] / math.log(2):.3f} bits/byte" \
            in line
        assert f"code {record['code/loss'] / math.log(2):.3f}" in line and "prose " in line


def test_summary_has_wall_time_and_tokens_seen(tiny_run):  # noqa: F811
    workdir, stdout = tiny_run
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["wall_time_s"] > 0 and summary["steps_this_run"] == 30
    assert summary["tokens_seen"] == 30 * 8 * 32  # steps x batch_size x seq_len
    assert f"{summary['tokens_seen']:,} tokens seen in all 30 steps" in stdout
    assert "wall time " in stdout


def test_eval_line_formats():
    assert console.eval_line(5, 2.0, {"a": 1.0}, bits_per_byte=False) == \
        "eval step 5: loss 2.0000 nats/token; a 1.0000"
    assert console.eval_line(5, math.log(2), {"a": 2 * math.log(2)}, bits_per_byte=True) == \
        "eval step 5: loss 0.6931 nats/byte = 1.000 bits/byte; a 2.000 bits/byte"


def test_console_lines_break_a_pending_progress_line_and_quiet_prints_nothing():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    progress = ProgressLine(10, stream=stream)
    out = console.Console(stream=stream)
    out.progress = progress
    progress.update(5, 1.0, 100.0)
    out.print("eval step 5: ...")
    progress.finish()
    text = stream.getvalue()
    assert text.startswith("\r[") and text.endswith("s\neval step 5: ...\n")
    assert text.count("\n") == 2  # finish() adds no second newline
    quiet = console.Console(quiet=True, stream=io.StringIO())
    quiet.before_step("model")
    quiet.after_step()
    quiet.print("x")
    assert quiet.stream.getvalue() == "" and quiet.elapsed() >= 0


def test_phase_plan_announces_each_phase_once():
    plan = PhasePlan(dense_steps=4, soft_until=8, max_temperature=2.0, min_temperature=0.5,
                     temperature_decay_steps=2)
    said = {step: plan.messages(step, {}) for step in range(1, 12)}
    assert [s for s, m in said.items() if m] == [1, 5, 9]
    assert "dense phase: steps 1..4" in said[1][0]
    assert "diversified the dense model" in said[5][0] and "steps 5..8" in said[5][0]
    assert "temperature 2 -> 0.5" in said[5][0]
    assert "hard phase" in said[9][0]
    assert [s for s in range(1, 5) if PhasePlan(soft_until=2).messages(s, {})] == [1, 3]


def test_read_only_checkpointer_logs_no_read_only_notices(tmp_path, caplog):
    (tmp_path / "checkpoints").mkdir()
    with caplog.at_level(logging.INFO):
        Checkpointer(tmp_path / "checkpoints", read_only=True).close()
        logging.getLogger("absl").warning("another absl warning")  # the filter is gone
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in messages if "read_only" in m or "read only" in m], messages
    assert "another absl warning" in messages


def test_analyze_routing_prints_paths_and_no_read_only_notices(tiny_run, tmp_path):  # noqa: F811
    workdir, _ = tiny_run
    result = run_script("scripts/analyze_routing.py", f"--workdir={workdir}",
                        f"--output_dir={tmp_path}", "--max_batches=1")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("routing_layer_1.json", "routing_layer_1.png", "routing.json", "loss_curves.png"):
        assert f"  {tmp_path / name}\n" in result.stdout
        assert (tmp_path / name).is_file()
    assert "read only" not in result.stderr and "read_only" not in result.stderr


def test_analyze_routing_on_a_dense_workdir_says_so(tmp_path):
    workdir = tmp_path / "dense"
    result = run_script("scripts/train.py", f"--gin_file={TINY_GIN}", "--quiet",
                        "--gin_param=TransformerLM.moe_every = 0",
                        "--gin_param=train.num_steps = 2", "--gin_param=train.eval_every = 2",
                        "--gin_param=DataConfig.eval_max_batches = 1", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("scripts/analyze_routing.py", f"--workdir={workdir}", "--max_batches=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the model is dense (no MoE layers): no routing to analyse" in result.stdout
    assert f"  {workdir / 'analysis' / 'routing.json'}\n" in result.stdout
    assert json.loads((workdir / "analysis" / "routing.json").read_text())["layers"] == {}
    assert np.isfinite(json.loads((workdir / "summary.json").read_text())["wall_time_s"])
