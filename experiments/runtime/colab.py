"""The notebooks' shared set-up step: install this repository with the JAX build for the
runtime's accelerator, on Colab only.

Standard library only, so a notebook imports it before JAX is installed. Fetching the
repository cannot live here (this module is part of what is fetched): that stays in each
notebook's first cell (docs/notebooks.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def in_colab() -> bool:
    return "google.colab" in sys.modules


def jax_extra() -> str | None:
    """The setup.py extra for this machine's accelerator: "tpu" (jax[tpu]), "gpu"
    (jax[cuda12]) or None (a CPU runtime: plain jax)."""
    if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ:
        return "tpu"
    if os.path.exists("/dev/nvidia0"):
        return "gpu"
    return None


def install(root: Path) -> None:
    """On Colab, `pip install -e` the repository at `root` with `jax_extra()`; elsewhere
    nothing (a local checkout brings its own environment)."""
    if not in_colab():
        return
    extra = jax_extra()
    spec = f"{root}[{extra}]" if extra else str(root)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", spec], check=True)
    if "jax" in sys.modules:
        print("jax was imported before this install: Runtime > Restart session, then run "
              "all again.")
