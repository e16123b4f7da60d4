#!/usr/bin/env bash
# One call on a lent GPU/TPU machine: the whole accelerator benchmark, results under $OUT.
#
#   OUT=/some/dir bash scripts/device_bench.sh [extra bench_accelerator.py flags]
#
# Installs nothing (the device machine has no network). It needs, already there:
# a Python ($PYTHON, else .venv/bin/python, else python3) with this project's
# dependencies (jax, flax, optax, gin-config, orbax-checkpoint, tensorboardX,
# numpy) and a jax built for the accelerator (jax[cuda12] on a GPU, jax[tpu] on a
# TPU); tokamax is optional (recorded as "not installed" when absent). Run from
# the repository root. Writes to $OUT (default ./device_bench_out):
#   environment.txt          jax version and devices, nvidia-smi, load average
#   bench_accelerator.json   every figure and error (rewritten after each case)
#   benchmarks.md            docs/benchmarks.md with this device's section filled in
#   bench_accelerator.log    the progress lines
# Copy benchmarks.md over docs/benchmarks.md and the JSON to docs/ to keep them.
# The benchmark's own budget is 420 s; `timeout` stops it at $BENCH_TIMEOUT_S
# (default 540 s), after which the partial results are still written.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-device_bench_out}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
mkdir -p "$OUT"
cp docs/benchmarks.md "$OUT/benchmarks.md"
{
  echo "python: $PY"; date -u; uptime
  "$PY" -c "import importlib.util as u; print('missing packages:', [m for m in ('jax', 'flax', 'optax', 'gin', 'orbax', 'tensorboardX', 'numpy', 'grain') if u.find_spec(m) is None] or 'none', '; tokamax:', 'yes' if u.find_spec('tokamax') else 'no')"
  "$PY" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
  nvidia-smi -L 2>/dev/null || true
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
PYTHONPATH=. timeout --kill-after=30 "${BENCH_TIMEOUT_S:-540}" "$PY" scripts/bench_accelerator.py \
  --json "$OUT/bench_accelerator.json" --doc "$OUT/benchmarks.md" "$@" 2>&1 \
  | tee "$OUT/bench_accelerator.log"
status=${PIPESTATUS[0]}
echo "bench_accelerator exit status $status" | tee -a "$OUT/bench_accelerator.log"
exit "$status"
