"""TensorBoard event files are cut back to the resumed step, as metrics.jsonl is."""

import time

from tbparse import SummaryReader

from experiments.reporting.metrics import MetricsWriter
from experiments.reporting.tb_purge import purge_events


def _steps(directory, tag="train/a"):
    scalars = SummaryReader(str(directory)).scalars
    return sorted(scalars[scalars["tag"] == tag]["step"].tolist())


def _run(workdir, steps, resume_step=None):
    writer = MetricsWriter(workdir, resume_step=resume_step)
    for step in steps:
        writer.write(step, "train", {"a": float(step)}, tb_scalars={"moe/x": 1.0})
        writer.histogram("moe/h", [1.0, 2.0], step)
    writer.close()
    time.sleep(1.05)  # a new event file name (its name holds the second)


def test_one_point_per_step_after_several_resumes(tmp_path):
    _run(tmp_path, range(1, 11))
    _run(tmp_path, range(6, 11), resume_step=5)
    _run(tmp_path, range(8, 11), resume_step=7)
    tb = tmp_path / "tensorboard"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 3
    assert _steps(tb) == list(range(1, 11))
    assert _steps(tb, "moe/x") == list(range(1, 11))
    assert sorted(SummaryReader(str(tb)).histograms["step"].tolist()) == list(range(1, 11))
    # A fresh start (no checkpoint to resume from) drops the earlier run's events too.
    _run(tmp_path, range(1, 4))
    assert _steps(tb) == [1, 2, 3]


def test_purge_drops_a_torn_last_record(tmp_path):
    _run(tmp_path, range(1, 4))
    (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    path.write_bytes(path.read_bytes() + b"\x10\x00\x00")  # a record cut by a kill
    # Step 3: two scalars and a histogram.
    assert purge_events(tmp_path / "tensorboard", last_step=2) == 3
    assert _steps(tmp_path / "tensorboard") == [1, 2]
    assert purge_events(tmp_path / "nowhere", last_step=0) == 0
