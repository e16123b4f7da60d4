"""Throughput accounting per step: tokens/s/device, model TFLOP/s/device, MFU, data wait.

MFU = achieved model FLOP/s per device / the device's peak. Peaks are dense
bf16 matmul figures per chip from the vendors' data sheets (`PEAK_TFLOPS`,
matched on `jax.Device.device_kind` by prefix); `train.peak_tflops` overrides
them. Where no peak is known (CPU, an unlisted device) the MFU scalar is absent
rather than invented. Model FLOPs are the FLOP counter's
(`experiments.train.flops`): training FLOPs of the tokens the step processed,
not counting recomputation under remat.
"""

from __future__ import annotations

from typing import Any

# Dense bf16 peak TFLOP/s per device (chip), by device kind prefix.
PEAK_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA A100": 312.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA B200": 2250.0,
}


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """The device's peak TFLOP/s: `override` if given, else the longest matching
    `PEAK_TFLOPS` prefix of `device_kind`, else None (unknown: no MFU)."""
    if override is not None:
        return float(override)
    matches = [k for k in PEAK_TFLOPS if device_kind.startswith(k)]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def throughput_scalars(*, tokens: float, flops: float, step_seconds: float,
                       data_seconds: float, num_devices: int,
                       peak: float | None) -> dict[str, Any]:
    """The step's throughput scalars.

    tokens: real tokens of the step (all processes); flops: its model training
    FLOPs; step_seconds: wall time since the previous step's record (data wait,
    step and logging); data_seconds: of which waiting for the next batch;
    peak: TFLOP/s per device or None. -> tokens_per_sec_per_device,
    tflops_per_device, data_wait_fraction, and mfu when `peak` is known.
    """
    seconds = max(step_seconds, 1e-9)
    tflops = flops / seconds / max(num_devices, 1) / 1e12
    out = {"tokens_per_sec_per_device": tokens / seconds / max(num_devices, 1),
           "tflops_per_device": tflops,
           "data_wait_fraction": min(max(data_seconds / seconds, 0.0), 1.0)}
    if peak:
        out["mfu"] = tflops / peak
    return out
