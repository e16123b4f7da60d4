"""`train.profile_steps` / `scripts/train.py --profile_steps=N:M`: a jax profiler trace."""

import pytest

from experiments.train.config import TrainConfig
from experiments.train.profiling import StepRange, parse_profile_steps
from tests.helpers import run_script

TINY_GIN = "gin_configs/experiments/test_tiny.gin"


def test_parse_accepts_ranges_and_none():
    assert parse_profile_steps("5:7") == StepRange(5, 7)
    assert parse_profile_steps("3:3", num_steps=3) == StepRange(3, 3)
    assert parse_profile_steps(None) is None
    assert parse_profile_steps("") is None


@pytest.mark.parametrize("value", ["5", "0:2", "3:2", "a:b", "1:2:3", "-1:2", " : ", 7])
def test_parse_refuses_bad_values_naming_the_flag(value):
    with pytest.raises(ValueError, match=r"--profile_steps must be 'N:M'"):
        parse_profile_steps(value, "--profile_steps")


def test_range_past_the_last_step_is_refused_by_the_config():
    # A trace that would never be stopped by the loop's end is a configuration error.
    with pytest.raises(ValueError, match=r"train.profile_steps = '2:9' .*train.num_steps = 5"):
        TrainConfig(num_steps=5, profile_steps="2:9")
    with pytest.raises(ValueError, match=r"train.profile_steps must be 'N:M'"):
        TrainConfig(num_steps=5, profile_steps="two")


def test_cli_refuses_a_bad_range_before_touching_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    result = run_script("scripts/train.py", f"--gin_file={TINY_GIN}", f"--workdir={workdir}",
                        "--profile_steps=4:2")
    assert result.returncode == 2, result.stderr
    assert "--profile_steps must be 'N:M'" in result.stderr
    result = run_script("scripts/train.py", f"--gin_file={TINY_GIN}", f"--workdir={workdir}",
                        "--gin_param=train.num_steps = 3", "--profile_steps=2:5")
    assert result.returncode == 2, result.stderr
    assert "--profile_steps = '2:5' ends after the run's last step" in result.stderr
    assert not workdir.exists()


def test_three_step_run_writes_a_trace_of_steps_2_to_3(tmp_path):
    """A 3-step tiny run with --profile_steps=2:3: the trace files (xplane.pb) appear
    under the run's TensorBoard directory, beside the event files."""
    workdir = tmp_path / "run"
    result = run_script("scripts/train.py", f"--gin_file={TINY_GIN}", f"--workdir={workdir}",
                        "--gin_param=train.num_steps = 3", "--gin_param=train.eval_every = 3",
                        "--gin_param=Checkpointer.save_every = 100", "--quiet",
                        "--profile_steps=2:3", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    traces = list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, sorted(p for p in (workdir / "tensorboard").rglob("*"))
    assert traces[0].stat().st_size > 0
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
