"""Running the project's scripts in subprocesses for end-to-end tests."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
# Scripts started by tests share a persistent XLA compilation cache: the tiny
# runs compile the same programs, and compiling dominates their run time.
COMPILATION_CACHE = Path(tempfile.gettempdir()) / f"sparse_moe_tests_xla_cache_{os.getuid()}"


def script_env(num_devices: int | None = None) -> dict[str, str]:
    """The current environment with the simulated-device XLA flag removed
    (or set to `num_devices`), on CPU."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    if num_devices is not None:
        flags.append(f"{_DEVICE_FLAG}={num_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(COMPILATION_CACHE))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def script_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / script), *args]


def run_script(script: str, *args: str, timeout: float = 180,
               num_devices: int | None = None) -> subprocess.CompletedProcess:
    """Runs `script` (relative to the repo) to completion; output captured as text."""
    return subprocess.run(script_command(script, *args), cwd=REPO, env=script_env(num_devices),
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_script(script: str, *args: str, num_devices: int | None = None,
                 log_path: Path | None = None) -> subprocess.Popen:
    """Starts `script` in the background; stdout and stderr go to `log_path` (or are dropped)."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(script_command(script, *args), cwd=REPO, env=script_env(num_devices),
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory shared by all xdist workers of this pytest session."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


def run_script_once(tmp_path_factory, name: str, script: str, *args: str,
                    timeout: float = 180, num_devices: int | None = None
                    ) -> subprocess.CompletedProcess:
    """Runs `script *args` once per pytest session, even when several xdist workers
    ask for it (module fixtures run once per worker, and they share the directory
    from `shared_dir(name)`); every caller gets the first run's result."""
    import fcntl  # pylint: disable=g-import-not-at-top

    directory = shared_dir(tmp_path_factory, name)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = directory.parent / f"{name}.result.json"
        if not record.exists():
            result = run_script(script, *args, timeout=timeout, num_devices=num_devices)
            record.write_text(json.dumps({"args": result.args, "returncode": result.returncode,
                                          "stdout": result.stdout, "stderr": result.stderr}))
        saved = json.loads(record.read_text())
    return subprocess.CompletedProcess(saved["args"], saved["returncode"], saved["stdout"],
                                       saved["stderr"])


def shared_training_run(tmp_path_factory, name: str, *args: str,
                        timeout: float = 180) -> tuple[Path, str]:
    """Runs `scripts/train.py *args --workdir=<shared dir>` once per session, even
    when several xdist workers ask for it; returns (workdir, its stdout)."""
    workdir = shared_dir(tmp_path_factory, name)
    result = run_script_once(tmp_path_factory, name, "scripts/train.py", *args,
                             f"--workdir={workdir}", timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"training run {name} failed:\n{result.stderr[-3000:]}")
    return workdir, result.stdout


def shared_run_stderr(tmp_path_factory, name: str) -> str:
    """The stderr of the run `run_script_once(name, ...)` (or `shared_training_run`) did."""
    record = shared_dir(tmp_path_factory, name).parent / f"{name}.result.json"
    return json.loads(record.read_text())["stderr"]


def path_with_both_splits(candidate: Callable[[int], Path],
                          record_groups: Callable[[Path], Iterable[Iterable[str]]],
                          validation_fraction: float, min_validation: int = 1) -> Path:
    """The first `candidate(i)` for which every group of record paths from
    `record_groups(candidate(i))` has train records and at least `min_validation`
    validation records.

    `corpus.split_of` hashes a record's path, and tests write their records under
    temporary directories that change every run, so fixed names would leave a
    split empty in some runs.
    """
    from experiments.data.corpus import split_of  # pylint: disable=g-import-not-at-top

    for i in range(1000):
        path = candidate(i)
        splits = [[split_of(key, validation_fraction) for key in group]
                  for group in record_groups(path)]
        if all("train" in s and s.count("validation") >= min_validation for s in splits):
            return path
    raise RuntimeError("no candidate path puts records into both splits")


def script_main(script: str) -> Callable[[list[str]], int]:
    """`scripts/<script>`'s `main(argv)` loaded in-process, returning its exit status
    (a `SystemExit`'s code included, as the CLIs exit 2 on bad input)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def call(argv: list[str]) -> int:
        try:
            return module.main(argv)
        except SystemExit as e:
            return e.code
    return call


def packed_batch(rows: int, length: int, vocab_size: int = 16) -> dict[str, Any]:
    """A training batch `[rows, length]` of one real segment per row: inputs
    0, 1, 2, ... mod `vocab_size`, targets the next id, every weight 1, domain 0."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    inputs = (np.arange(rows * length).reshape(rows, length) % vocab_size).astype(np.int32)
    ones = np.ones((rows, length), np.int32)
    return {"inputs": inputs, "targets": (inputs + 1) % vocab_size,
            "weights": ones.astype(np.float32), "segment_ids": ones,
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "domain": np.zeros((rows, length), np.int32)}
