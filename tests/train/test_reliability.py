"""Crash and failure behaviour of scripts/train.py, in subprocesses.

Each test runs the seconds-long `test_tiny.gin` job (20 steps, checkpoints
every 5, 2 micro-batches).
"""

import json
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.reporting.metrics import read_jsonl
from tests.helpers import run_script, shared_training_run, start_script

TINY = "--gin_file=gin_configs/experiments/test_tiny.gin"
FAULTS = "--gin_param=import tests.fault_hooks"  # test-only step hooks


def _stall_at(step: int) -> list[str]:
    return [FAULTS, "--gin_param=train.hooks = [@StallAtStep()]",
            f"--gin_param=StallAtStep.step = {step}"]


def _train(workdir, *params, timeout=180):
    return run_script("scripts/train.py", TINY, *[f"--gin_param={p}" for p in params],
                      f"--workdir={workdir}", "--quiet", timeout=timeout)


def _train_losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl", "train")}


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
        time.sleep(0.1)
    raise TimeoutError("condition not reached")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "uninterrupted", TINY, "--quiet")[0]


def test_kill_9_and_restart_reproduces_losses_exactly(uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    log = tmp_path / "first.log"
    proc = start_script("scripts/train.py", TINY, *_stall_at(13),
                        f"--workdir={workdir}", "--quiet", log_path=log)
    try:
        # Checkpoint 10 is finalised and steps 11-13 are logged past it.
        _wait_for(lambda: (workdir / "checkpoints" / "10").is_dir()
                  and max(_train_losses(workdir), default=0) >= 13, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (workdir / "train.lock").exists()  # left behind by the killed trainer
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _train_losses(uninterrupted)
    resumed = _train_losses(workdir)
    # Every step exactly once: the killed run's steps 11-13 were cut on resume.
    assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl", "train")] == list(range(1, 21))
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step


def test_corrupt_latest_checkpoint_falls_back_and_retrains(uninterrupted, tmp_path):
    workdir = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, workdir)
    for path in (workdir / "checkpoints" / "20" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint at step 20" in result.stderr
    assert "falling back to step 15" in result.stderr
    assert (workdir / "corrupt_checkpoints" / "20").is_dir()
    assert (workdir / "checkpoints" / "20").is_dir()  # saved again after retraining
    expected, resumed = _train_losses(uninterrupted), _train_losses(workdir)
    for step in range(16, 21):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    result = run_script("scripts/train.py", TINY, FAULTS,
                        "--gin_param=train.hooks = [@NanAtStep()]",
                        "--gin_param=NanAtStep.step = 12", f"--workdir={tmp_path}", "--quiet")
    assert result.returncode == 4, result.stderr[-3000:]
    assert "at step 12" in result.stderr
    assert "Last good checkpoint: step 10" in result.stderr
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 10]
    assert max(_train_losses(tmp_path)) == 11  # the NaN step is not logged as a result
    assert not (tmp_path / "train.lock").read_text()  # lock released on the error path


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_checkpoints_finite(workdir: Path) -> None:
    """Every array of every saved checkpoint (params and optimizer state) is finite."""
    for step in _checkpoint_steps(workdir):
        for item in ("params", "opt_state"):
            with warnings.catch_warnings(), ocp.PyTreeCheckpointer() as reader:
                warnings.simplefilter("ignore")  # orbax: sharding read from the checkpoint
                tree = reader.restore(workdir / "checkpoints" / str(step) / item)
            leaves = jax.tree.leaves(tree)
            assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves), (step, item)


def test_nan_gradient_with_finite_loss_is_not_applied_or_saved(tmp_path):
    """A huge learning rate: step 4's loss is finite but its gradient is NaN. The run
    stops there naming it, and every checkpoint it left is finite."""
    result = _train(tmp_path, "learning_rate_schedule.peak_learning_rate = 1e6",
                    "Checkpointer.save_every = 2", "Checkpointer.async_save = False",
                    "train.num_steps = 8")
    assert result.returncode == 4, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "at step 4" in error[0], result.stderr[-3000:]
    assert "gradient norm nan" in error[0] and "non-finite gradients in: " in error[0]
    assert "Last good checkpoint: step 2" in error[0]
    assert "train.max_skipped_steps" in error[0]
    assert _checkpoint_steps(tmp_path) == [2]
    _assert_checkpoints_finite(tmp_path)


def test_max_skipped_steps_skips_bad_steps_and_reports_them(tmp_path):
    result = run_script("scripts/train.py", TINY, FAULTS,
                        "--gin_param=train.hooks = [@NanAtStep()]", "--gin_param=NanAtStep.step = 7",
                        "--gin_param=train.max_skipped_steps = 1", "--gin_param=train.num_steps = 10",
                        f"--workdir={tmp_path}", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 7: non-finite update (loss nan" in result.stderr
    assert "skipped 1 of at most 1" in result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == [7]
    assert sorted(_train_losses(tmp_path)) == [1, 2, 3, 4, 5, 6, 8, 9, 10]  # 7 not logged
    assert _checkpoint_steps(tmp_path) == [5, 10]
    _assert_checkpoints_finite(tmp_path)


def test_second_trainer_on_same_workdir_is_refused(tmp_path):
    log = tmp_path / "first.log"
    workdir = tmp_path / "run"
    proc = start_script("scripts/train.py", TINY, *_stall_at(2),
                        f"--workdir={workdir}", "--quiet", log_path=log)
    try:
        _wait_for(lambda: (workdir / "metrics.jsonl").exists()
                  and max(_train_losses(workdir), default=0) >= 2, proc)
        result = _train(workdir)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert result.returncode == 3
    assert f"PID {proc.pid}" in result.stderr and "in use by another trainer" in result.stderr


def test_cli_names_unknown_binding_and_missing_file(tmp_path):
    result = _train(tmp_path, "train.num_stepz = 3")
    assert result.returncode == 2 and "num_stepz" in result.stderr
    result = _train(tmp_path, "train.checkpoint_every = 3")  # moved to the Checkpointer
    assert result.returncode == 2 and "bind Checkpointer.save_every" in result.stderr
    result = _train(tmp_path, "train.max_skipped_steps = -1")
    assert result.returncode == 2 and "train.max_skipped_steps must be >= 0" in result.stderr
    result = run_script("scripts/train.py", "--gin_file=gin_configs/experiments/nope.gin",
                        f"--workdir={tmp_path}")
    assert result.returncode == 2 and "nope.gin" in result.stderr
