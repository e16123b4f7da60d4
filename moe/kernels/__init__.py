"""Grouped matmul kernels for dropless expert dispatch.

`gmm` / `tgmm` (`api.py`) pick a backend by platform: Pallas Mosaic TPU,
Pallas Triton (or opt-in Mosaic GPU) on GPU, the plain-XLA tile loop on CPU.
This package must not import `moe.dispatch` (which imports it).
"""

from moe.kernels.api import BACKENDS, default_tiling, gmm, tgmm

__all__ = ["BACKENDS", "default_tiling", "gmm", "tgmm"]
