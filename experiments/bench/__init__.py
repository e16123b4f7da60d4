"""Benchmark harness: shared timing (timing.py) and the one-call accelerator
benchmark (`scripts/bench_accelerator.py`: gmm.py, layer.py, step.py, report.py,
peaks.py). See docs/benchmarks.md."""
