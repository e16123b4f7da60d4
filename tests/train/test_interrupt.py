"""Graceful interruption: the signal guard in-process, and SIGTERM/SIGINT sent to
scripts/train.py runs of the seconds-long `test_tiny.gin` job (20 steps,
checkpoints every 5)."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from experiments.reporting.metrics import read_jsonl
from experiments.train import interrupt
from tests.helpers import run_script, shared_training_run, start_script

TINY = "--gin_file=gin_configs/experiments/test_tiny.gin"
FAULTS = "--gin_param=import tests.fault_hooks"  # test-only step hooks


# --- the guard, in this process ----------------------------------------------------------

class _FakeCheckpointer:
    directory = Path("/ckpt")
    waited = False

    def wait(self):
        self.waited = True


def test_first_signal_sets_flag_second_aborts_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with interrupt.InterruptGuard() as guard:
        assert not guard.stop_requested()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert interrupt.received_signal() == signal.SIGINT
        assert guard.stop_requested()
        checkpointer = _FakeCheckpointer()
        stopped = guard.stopped(7, checkpointer)
        assert checkpointer.waited and stopped.exit_status == 130
        assert str(stopped) == ("interrupted at step 7; checkpoint saved in /ckpt; "
                                "run the same command to resume")
        with pytest.raises(interrupt.Aborted) as aborted:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert aborted.value.exit_status == 130
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # a third kills at once
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert interrupt.received_signal() is None


def test_sigterm_exit_status_and_no_handlers_outside_the_main_thread():
    with interrupt.InterruptGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert guard.stop_requested()
        assert guard.stopped(3, _FakeCheckpointer()).exit_status == 143
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def in_thread():
        with interrupt.InterruptGuard() as guard:
            seen.append((signal.getsignal(signal.SIGTERM), guard.stop_requested()))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [(before, False)]


# --- scripts/train.py ------------------------------------------------------------------

def _wait_for_line(log: Path, text: str, proc, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        assert proc.poll() is None, f"trainer exited early with {proc.returncode}"
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} not in {log}")


def _interrupt_at(workdir: Path, log: Path, step: int, signum: int) -> tuple[int, str]:
    """Runs the tiny job to step `step`, sends `signum`; returns (exit status, output)."""
    proc = start_script("scripts/train.py", TINY, FAULTS,
                        "--gin_param=train.hooks = [@WaitForSignalAtStep()]",
                        f"--gin_param=WaitForSignalAtStep.step = {step}",
                        f"--workdir={workdir}", "--quiet", log_path=log)
    try:
        _wait_for_line(log, f"WaitForSignalAtStep({step}): waiting", proc)
        os.kill(proc.pid, signum)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def _checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _train_losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl", "train")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    # The same shared run as tests/train/test_reliability.py's.
    return shared_training_run(tmp_path_factory, "uninterrupted", TINY, "--quiet")[0]


def test_sigterm_saves_the_next_step_and_the_rerun_resumes_exactly(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    status, output = _interrupt_at(workdir, tmp_path / "first.log", 7, signal.SIGTERM)
    assert status == 143, output[-3000:]
    # Signalled after step 7: step 8 is finished and saved (checkpoints every 5).
    assert (f"interrupted at step 8; checkpoint saved in {workdir / 'checkpoints'}; "
            "run the same command to resume") in output
    assert "Traceback" not in output
    assert _checkpoint_steps(workdir) == [5, 8]
    assert not (workdir / "train.lock").read_text()  # lock released
    result = run_script("scripts/train.py", TINY, f"--workdir={workdir}", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl", "train")]
    assert steps == list(range(1, 21))
    expected, resumed = _train_losses(uninterrupted), _train_losses(workdir)
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step


def test_sigint_exits_130_with_a_checkpoint(tmp_path):
    status, output = _interrupt_at(tmp_path / "run", tmp_path / "first.log", 2, signal.SIGINT)
    assert status == 130, output[-3000:]
    assert "interrupted at step 3; checkpoint saved in" in output
    assert "KeyboardInterrupt" not in output and "Traceback" not in output
    assert _checkpoint_steps(tmp_path / "run") == [3]


def test_second_ctrl_c_aborts_at_once(tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    proc = start_script("scripts/train.py", TINY, FAULTS,
                        "--gin_param=train.hooks = [@StallAtStep()]",
                        "--gin_param=StallAtStep.step = 2",  # never returns by itself
                        f"--workdir={workdir}", "--quiet", log_path=log)
    try:
        _wait_for_line(log, "StallAtStep(2): stalling", proc)
        os.kill(proc.pid, signal.SIGINT)
        _wait_for_line(log, "SIGINT received", proc)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 130, output[-3000:]
    assert "SIGINT again: aborted; the current step is not saved" in output
    assert "Traceback" not in output
    assert not (workdir / "checkpoints" / "3").exists()
    assert not (workdir / "train.lock").read_text()
