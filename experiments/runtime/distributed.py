"""Multi-host start-up: `jax.distributed` on request, and per-process log directories."""

from __future__ import annotations

import logging
import os

import gin
import jax

from experiments.runtime import paths

_log = logging.getLogger(__name__)


def process_log_dir(workdir: paths.Path) -> paths.Path:
    """Where this process writes metrics, configs and its summary: the workdir for
    process 0, `<workdir>/process_<i>/` for the others (checkpoints are shared)."""
    if jax.process_index() == 0:
        return workdir
    path = workdir / f"process_{jax.process_index()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@gin.configurable
def initialize_distributed(enabled: bool | None = None, *, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Calls `jax.distributed.initialize` when asked; returns whether it did.

    Asked by `enabled=True` (gin) or the environment: `MOE_DISTRIBUTED=1`,
    or `MOE_COORDINATOR_ADDRESS` (with `MOE_NUM_PROCESSES`, `MOE_PROCESS_ID`).
    Arguments left None are auto-detected by JAX (TPU pod slices, Slurm,
    ...). On CPU (`JAX_PLATFORMS=cpu`) cross-process collectives use gloo.
    Must run before anything touches a JAX backend.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("MOE_COORDINATOR_ADDRESS")
    if num_processes is None and "MOE_NUM_PROCESSES" in env:
        num_processes = int(env["MOE_NUM_PROCESSES"])
    if process_id is None and "MOE_PROCESS_ID" in env:
        process_id = int(env["MOE_PROCESS_ID"])
    if enabled is None:
        enabled = env.get("MOE_DISTRIBUTED", "") == "1" or coordinator_address is not None
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    if env.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    _log.info("jax.distributed: process %d of %d, %d local / %d global devices",
              jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count())
    return True
