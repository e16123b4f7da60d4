"""Workdirs and corpora in a bucket, end to end against a GCS emulator on localhost.

One emulator (`gcp-storage-emulator`, in memory, started by tests/gcs_emulator.py
with the generation header real GCS sends) per module; every client is
pointed at it by the environment the fixture sets: gcsfs and google-cloud-storage
by `STORAGE_EMULATOR_HOST`, tensorstore (orbax's array writes) by
`TENSORSTORE_GCS_HTTP_URL` with `GOOGLE_AUTH_TOKEN_FOR_TESTING` as credentials.
The scripts started here inherit it.

Scenario: the tiny job trains in `gs://<bucket>/run`, is stopped by SIGTERM after
step 7 (checkpoint of step 8 in the bucket, lease released) and resumed by a
rerun: its losses are those of the uninterrupted local run, and metrics.jsonl and
the TensorBoard events in the bucket hold each step once. The routing analysis
reads that run's config.gin, checkpoint and metrics from the bucket and writes
its report there; a dense run copied into the bucket is upcycled into another
bucket workdir and restored from it. Prepared shards read from the bucket give
the batches of the same shards on disk. The lease refuses a second trainer,
is taken over once expired, and the holder that lost it notices.

What the emulator does not check: conditional writes (`ifGenerationMatch`), which
it ignores; the lease's race handling that depends on them is documented, not
tested here.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request

import gin
import jax
import numpy as np
import pytest

for _module in ("gcp_storage_emulator", "gcsfs"):  # the dev and gcs extras install them
    if importlib.util.find_spec(_module) is None:  # (not imported: gcsfs reads its
        pytest.skip(f"{_module} is not installed", allow_module_level=True)  # env at import)

from experiments.data import pipeline as data  # noqa: E402
from experiments.data import prepare  # noqa: E402
from experiments.reporting.metrics import read_jsonl  # noqa: E402
from experiments.reporting.tb_purge import Event, read_records  # noqa: E402
from experiments.runtime import lease, paths  # noqa: E402
from experiments.runtime.workdir_lock import WorkdirLockedError, workdir_lock  # noqa: E402
from tests.data.test_prepare import FRACTION, SEQ_LEN, _write_jsonl  # noqa: E402
from tests.helpers import REPO, run_script, shared_training_run  # noqa: E402
from tests.train.test_interrupt import TINY, _interrupt_at  # noqa: E402

BUCKET = "moe-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator's URL; this process's environment (and so the scripts') points at it."""
    url = f"http://localhost:{_free_port()}"
    log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", url.rsplit(":", 1)[1],
                             BUCKET], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    patch = pytest.MonkeyPatch()
    for name, value in {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                        # no bucket-type probe (zonal/HNS) through the control-plane API
                        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}.items():
        patch.setenv(name, value)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "emulator did not start"
                time.sleep(0.1)
        yield url
    finally:
        patch.undo()
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _fs():
    return paths.filesystem(f"gs://{BUCKET}")


def _upload(local, remote: str) -> None:
    """Copies the directory `local` to `remote` (`gs://...`), one upload per file
    (gcsfs's recursive put probes every parent and is slow on the emulator)."""
    for root, _, files in os.walk(local):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), local)
            paths.write_bytes(f"{remote}/{relative}", open(os.path.join(root, name), "rb").read())


def _train_losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(f"{workdir}/metrics.jsonl", "train")}


@pytest.fixture(scope="module")
def bucket_run(emulator, tmp_path_factory):
    """The tiny job in the bucket: SIGTERM after step 7, then the same command again."""
    workdir, logs = f"gs://{BUCKET}/run", tmp_path_factory.mktemp("bucket_run")
    status, output = _interrupt_at(workdir, logs / "first.log", 7, signal.SIGTERM)
    steps = sorted(int(p.rsplit("/", 1)[1]) for p in _fs().ls(f"{BUCKET}/run/checkpoints")
                   if p.rsplit("/", 1)[1].isdigit())
    lock_left = _fs().exists(f"{BUCKET}/run/train.lock")
    rerun = run_script("scripts/train.py", TINY, f"--workdir={workdir}", "--quiet")
    return workdir, (status, output, steps, lock_left), rerun


def test_train_stop_and_resume_in_the_bucket_is_exact(bucket_run, tmp_path_factory):
    workdir, (status, output, steps, lock_left), rerun = bucket_run
    assert status == 143, output[-3000:]
    assert f"interrupted at step 8; checkpoint saved in {workdir}/checkpoints" in output
    assert steps == [5, 8] and not lock_left  # checkpoints in the bucket, lease released
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not _fs().exists(f"{BUCKET}/run/train.lock")
    assert [r["step"] for r in read_jsonl(f"{workdir}/metrics.jsonl", "train")] == \
        list(range(1, 21))
    uninterrupted = shared_training_run(tmp_path_factory, "uninterrupted", TINY, "--quiet")[0]
    expected, resumed = _train_losses(str(uninterrupted)), _train_losses(workdir)
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step
    # TensorBoard in the bucket: one train/loss point per step after the resume.
    events = [p for p in _fs().find(f"{BUCKET}/run/tensorboard")
              if "events.out.tfevents" in p]
    loss_steps = sorted(event.step for path in events for record in read_records(f"gs://{path}")
                        for event in [Event.FromString(record)] if event.HasField("summary")
                        and any(v.tag == "train/loss" for v in event.summary.value))
    assert loss_steps == list(range(1, 21))
    assert _fs().exists(f"{BUCKET}/run/summary.json") and _fs().exists(f"{BUCKET}/run/config.gin")



def test_routing_analysis_reads_and_writes_the_bucket(bucket_run, clean_gin):
    from experiments.reporting import routing_report  # pylint: disable=g-import-not-at-top

    workdir = bucket_run[0]
    routing_report.parse_run_config(workdir)  # the run's config.gin, from the bucket
    report = routing_report.analyze_workdir(workdir, max_batches=1)
    assert report["step"] == 20 and report["layers"]
    assert f"{workdir}/analysis/routing.json" in report["files"]
    for name in report["files"]:
        assert paths.as_path(name).is_file(), name
    assert paths.as_path(f"{workdir}/analysis/loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_upcycle_from_and_into_the_bucket(emulator, tmp_path_factory, clean_gin):
    from experiments.convert import upcycle_checkpoint as ex  # pylint: disable=g-import-not-at-top
    from experiments.runtime.checkpoints import Checkpointer  # pylint: disable=g-import-not-at-top
    from tests.convert.test_upcycle_checkpoint import DENSE_ARGS, DENSE_STEPS

    dense, _ = shared_training_run(tmp_path_factory, "upcycle_dense", *DENSE_ARGS)
    _upload(dense, f"gs://{BUCKET}/dense")
    out = f"gs://{BUCKET}/moe"
    result = ex.upcycle(f"gs://{BUCKET}/dense", out,
                        config=ex.UpcycleConfig(moe_layers="every_other", num_experts=4, k=2))
    assert result.step == DENSE_STEPS and str(result.out_workdir) == out
    assert paths.as_path(f"{out}/{ex.UPCYCLE_FILE}").is_file()
    assert "MoeLayer" in paths.as_path(f"{out}/config.gin").read_text()
    # The MoE checkpoint in the bucket (its arrays are read back by the trainer's
    # resume and the analysis above; here its stored tree, without reading arrays).
    reader = Checkpointer(f"{out}/checkpoints", read_only=True)
    try:
        assert reader.all_steps() == [DENSE_STEPS]
        stored = reader.stored_metadata(DENSE_STEPS, "params")
    finally:
        reader.close()
    names = "/".join(map(str, jax.tree_util.tree_flatten_with_path(stored)[0]))
    assert "experts" in names and "router" in names


def test_prepared_shards_read_from_the_bucket(emulator, tmp_path):
    local = tmp_path / "shards"
    prepare.prepare([_write_jsonl(tmp_path, "docs")], local,
                    prepare.Options(validation_fraction=FRACTION), progress=False)
    _upload(local, f"gs://{BUCKET}/corpus")
    remote = f"gs://{BUCKET}/corpus"
    assert prepare.verify(remote)["shards"]  # sizes and sha256 of every object
    common = {"seq_len": SEQ_LEN, "batch_size": 3, "validation_fraction": FRACTION}
    ours = list(data.make_eval_iterator(f"shards:{remote}", **common))
    disk = list(data.make_eval_iterator(f"shards:{local}", **common))
    assert len(ours) == len(disk) > 0
    for a, b in zip(ours, disk):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with pytest.raises(paths.RemotePathError, match=r"prepare_data.py --output cannot use "
                                                     r"'gs://moe-test/new': .*no rename"):
        prepare.prepare([str(tmp_path / "docs*.jsonl")], f"gs://{BUCKET}/new")


def test_lease_refuses_a_second_trainer_and_is_taken_over_when_expired(emulator):
    path = f"gs://{BUCKET}/leased/train.lock"
    first = lease.LeaseLock(path, ttl_seconds=60)
    with first:
        with pytest.raises(WorkdirLockedError, match=r"in use by another trainer \(.*:\d+, "
                                                     r"lease .* expires in \d+ s"):
            lease.LeaseLock(path, ttl_seconds=60).acquire()
        later = lease.LeaseLock(path, ttl_seconds=60, clock=lambda: time.time() + 61)
        later.acquire()  # the first lease has expired by this clock: taken over
        try:
            first.renew()  # what the heartbeat does: it finds another token
            with pytest.raises(WorkdirLockedError, match="lost the workdir lease"):
                first.check()
        finally:
            later.release()
    assert not _fs().exists(f"{BUCKET}/leased/train.lock")  # the last holder deleted it


def test_lease_ttl_is_bound_in_gin(clean_gin):
    gin.parse_config("LeaseLock.ttl_seconds = 45")
    lock = workdir_lock(f"gs://{BUCKET}/bound")
    assert isinstance(lock, lease.LeaseLock) and lock.ttl == 45.0
    assert lock.path == f"gs://{BUCKET}/bound/train.lock"


def test_the_profiler_refuses_a_bucket_workdir_before_anything_is_touched():
    from experiments.train import trainer  # pylint: disable=g-import-not-at-top

    setup = types.SimpleNamespace(config=types.SimpleNamespace(profile_steps="1:2"))
    with pytest.raises(paths.RemotePathError, match=r"^train.profile_steps \(the jax profiler "
                                                     r"trace\) cannot use 'gs://b/w': the "
                                                     r"profiler writes its trace with local"):
        trainer.train("gs://b/w", setup)


def test_scripts_that_only_read_local_files_refuse_a_bucket_path(capsys):
    from experiments.runtime import cli  # pylint: disable=g-import-not-at-top

    parser = cli.ArgumentParser(prog="score.py", remote_ok=("gin_file",))
    parser.add_argument("--workdir")
    parser.add_argument("--gin_file", action="append", default=[])
    assert parser.parse_args(["--gin_file=gs://b/c.gin", "--workdir=w"]).workdir == "w"
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--workdir=gs://b/run"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(
        "error: --workdir 'gs://b/run': score.py reads and writes local files only")
