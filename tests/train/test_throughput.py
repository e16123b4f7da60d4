"""Throughput accounting (experiments/train/throughput.py) on hand-computed numbers."""

import io

import pytest

from experiments.reporting.metrics import ProgressLine
from experiments.train.config import TrainConfig
from experiments.train.throughput import peak_tflops, throughput_scalars


def test_peaks_by_device_kind_and_override():
    assert peak_tflops("TPU v4") == 275.0
    assert peak_tflops("TPU v5 lite") == 197.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # prefix match
    assert peak_tflops("cpu") is None  # unknown: no MFU rather than an invented one
    assert peak_tflops("cpu", override=2.0) == 2.0


def test_scalars_per_device_and_data_wait():
    # 4 devices, 2 s step (0.5 s of it waiting for data), 8192 tokens, 1.6e15 FLOPs:
    # 1024 tokens/s/device, 200 TFLOP/s/device, MFU 200 / 400 = 0.5, data wait 25%.
    out = throughput_scalars(tokens=8192, flops=1.6e15, step_seconds=2.0, data_seconds=0.5,
                             num_devices=4, peak=400.0)
    assert out == pytest.approx({"tokens_per_sec_per_device": 1024.0, "tflops_per_device": 200.0,
                                 "data_wait_fraction": 0.25, "mfu": 0.5})
    assert "mfu" not in throughput_scalars(tokens=1, flops=1.0, step_seconds=1.0,
                                           data_seconds=0.0, num_devices=1, peak=None)


def test_progress_line_shows_mfu_and_a_visible_data_wait():
    stream = io.StringIO()
    line = ProgressLine(10, 0, stream=stream)
    line.update(1, 2.0, 1000.0, mfu=0.412, data_wait=0.3)
    line.update(2, 2.0, 1000.0, mfu=None, data_wait=0.01)
    first, second = stream.getvalue().splitlines()
    assert "mfu 41.2%" in first and "data wait 30%" in first
    assert "mfu" not in second and "data wait" not in second


def test_peak_binding_is_validated():
    with pytest.raises(ValueError, match="train.peak_tflops must be None or a number > 0"):
        TrainConfig(peak_tflops=0)
