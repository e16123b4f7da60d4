"""Peak dense matmul throughput per accelerator, for MFU.

Vendor figures per chip (one device as jax counts it), dense (no 2:4
sparsity), TFLOP/s. Only bf16 is listed: a float32 run's MFU is left absent
(its peak depends on TF32 / precision settings), as is every device not in
the table, CPUs included: an MFU is never invented.
"""

from __future__ import annotations

# (substring of jax's `device_kind`, lower-cased; bf16 TFLOP/s). The first match
# wins, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l4", 121.0),
    ("tpu v6 lite", 918.0),  # Trillium (v6e)
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
    ("tpu v3", 123.0),
    ("tpu v2", 45.0),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Peak TFLOP/s of one device of `device_kind` at `dtype`, or None when unknown."""
    if dtype != "bfloat16":
        return None
    kind = device_kind.lower()
    for needle, peak in PEAK_BF16_TFLOPS:
        if needle in kind:
            return peak
    return None


def mfu(flops: float, seconds: float, device_kind: str, dtype: str,
        num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    peak = peak_tflops(device_kind, dtype)
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12 * num_devices)
