"""SIGTERM to one process of a 2-process localhost job (scripts/train.py, 2 x 4 CPU
devices, the set-up of tests/runtime/test_multihost.py): both processes stop after
the same step, which is saved once."""

import os
import re
import signal
import socket
import subprocess
import time

from experiments.reporting.metrics import read_jsonl
from tests.helpers import REPO, script_command, script_env
from tests.runtime.test_multihost import EP_MESH, TINY


def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
    workdir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for index in range(2):
        env = script_env(4)
        env.update(MOE_COORDINATOR_ADDRESS=f"localhost:{port}", MOE_NUM_PROCESSES="2",
                   MOE_PROCESS_ID=str(index))
        procs.append(subprocess.Popen(
            script_command("scripts/train.py", *TINY, EP_MESH,
                           "--gin_param=train.num_steps = 1000",
                           "--gin_param=Checkpointer.save_every = 1000",
                           f"--workdir={workdir}"),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and read_jsonl(metrics, "train")):  # step 1 done
            assert time.monotonic() < deadline, "the job did not reach step 1"
            assert all(p.poll() is None for p in procs), [p.poll() for p in procs]
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGTERM)  # process 1 only
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errs = [err for _, err in results]
    assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for e in errs]
    stops = [re.findall(r"interrupted at step (\d+); checkpoint saved in", e) for e in errs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], errs
    step = int(stops[0][0])
    assert step < 1000
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(step)]
    assert max(r["step"] for r in read_jsonl(metrics, "train")) == step
    assert max(r["step"] for r in read_jsonl(workdir / "process_1" / "metrics.jsonl",
                                            "train")) == step
