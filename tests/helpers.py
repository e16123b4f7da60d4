"""Running the project's scripts in subprocesses for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def script_env(num_devices: int | None = None) -> dict[str, str]:
    """The current environment with the simulated-device XLA flag removed
    (or set to `num_devices`), on CPU."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    if num_devices is not None:
        flags.append(f"{_DEVICE_FLAG}={num_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
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
