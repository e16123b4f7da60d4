"""Times `moe.kernels.gmm` against a dense matmul of equal FLOPs and `jax.lax.ragged_dot`.

Per shape the three are timed in one process in interleaved rounds (the
order alternates every round; `experiments.bench.timing`) and the reported
ratios are medians of the per-round paired ratios, so slow drift of the
machine cancels. `scripts/bench_accelerator.py` runs the same comparison at
more shapes with a correctness check. FLOPs count
only the useful work, `2 * M * K * N` per matmul (three matmuls with the
backward pass).

Shapes (rows M = tokens * top-k; groups from uniform random routing):
  mixtral      E=8,  top-2, 8192 tokens: M=16384, K=4096, N=14336/8=1792
  fine_grained E=64, top-8, 8192 tokens: M=65536, K=4096, N=448, so that
               top-k * N, the active FLOPs per token, equals mixtral's
`--small` swaps in CPU-sized shapes with the same E and top-k.

    python scripts/bench_gmm.py [--small] [--dtype bfloat16] [--backend xla]
                                [--mode fwd|fwd_bwd|both] [--json PATH]

On CPU only `--backend xla` (the default there) is meaningful: a Pallas
backend runs in interpret mode on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from experiments.runtime import cli
from moe import kernels


class Shape(NamedTuple):
    name: str
    rows: int  # M
    k: int
    n: int
    num_groups: int  # E


SHAPES = [Shape("mixtral", 16384, 4096, 1792, 8), Shape("fine_grained", 65536, 4096, 448, 64)]
SMALL_SHAPES = [Shape("mixtral_small", 1024, 256, 512, 8),
                Shape("fine_grained_small", 4096, 256, 128, 64)]
MODES = ("fwd", "fwd_bwd")


def _group_sizes(shape: Shape, seed: int) -> jax.Array:
    probs = np.full(shape.num_groups, 1.0 / shape.num_groups)
    return jnp.asarray(np.random.default_rng(seed).multinomial(shape.rows, probs), jnp.int32)


def _with_backward(matmul: Callable) -> Callable:
    """`(a, b, cot) -> (out, da, db)`: the forward and both input gradients."""

    def run(a, b, cot):
        out, vjp = jax.vjp(matmul, a, b)
        return (out, *vjp(cot))

    return run


def _candidates(shape: Shape, dtype, backend: str | None, tiling, mode: str, seed: int):
    """name -> (jitted fn, args), all of the same useful FLOPs."""
    keys = jax.random.split(jax.random.key(seed), 4)
    lhs = jax.random.normal(keys[0], (shape.rows, shape.k), dtype)
    rhs = jax.random.normal(keys[1], (shape.num_groups, shape.k, shape.n), dtype)
    dense_rhs = jax.random.normal(keys[2], (shape.k, shape.n), dtype)
    cot = jax.random.normal(keys[3], (shape.rows, shape.n), dtype)
    group_sizes = _group_sizes(shape, seed)
    matmuls = {
        "gmm": (lambda a, b: kernels.gmm(a, b, group_sizes, tiling=tiling, backend=backend),
                rhs),
        "dense": (lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype),
                  dense_rhs),
        "ragged_dot": (lambda a, b: jax.lax.ragged_dot(a, b, group_sizes), rhs),
    }
    out = {}
    for name, (matmul, weights) in matmuls.items():
        if mode == "fwd":
            out[name] = (jax.jit(matmul), (lhs, weights))
        else:
            out[name] = (jax.jit(_with_backward(matmul)), (lhs, weights, cot))
    return out


def bench(shape: Shape, dtype, backend: str | None, tiling, mode: str, rounds: int,
          min_time: float, seed: int) -> dict:
    fns = _candidates(shape, dtype, backend, tiling, mode, seed)
    times = timing.interleaved(fns, rounds, min_time)  # compiles first (not timed)
    flops = 2 * shape.rows * shape.k * shape.n * (1 if mode == "fwd" else 3)

    def tflops(name: str) -> float:
        return flops / statistics.median(times[name]) / 1e12

    def paired(baseline: str) -> float:
        # Throughput of gmm relative to the baseline: t_baseline / t_gmm, per round.
        return timing.median_ratio(times[baseline], times["gmm"])

    return {"shape": shape.name, "rows": shape.rows, "k": shape.k, "n": shape.n,
                "num_groups": shape.num_groups, "mode": mode, "rounds": rounds,
                "gmm_tflops": tflops("gmm"), "dense_tflops": tflops("dense"),
                "ragged_dot_tflops": tflops("ragged_dot"),
                "gmm_over_dense": paired("dense"), "gmm_over_ragged_dot": paired("ragged_dot"),
                "gmm_ms": 1e3 * statistics.median(times["gmm"])}


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--backend", default=None, choices=kernels.BACKENDS,
                        help="moe.kernels backend (default: by platform)")
    parser.add_argument("--tiling", type=int, nargs=3, default=None, metavar=("TM", "TK", "TN"))
    parser.add_argument("--mode", default="both", choices=MODES + ("both",))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.05,
                        help="seconds per timed measurement (sets the calls per measurement)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")

    dtype = jnp.dtype(args.dtype)
    tiling = tuple(args.tiling) if args.tiling else None
    modes = MODES if args.mode == "both" else (args.mode,)
    device = jax.devices()[0]
    header = (f"device={device.device_kind} ({jax.default_backend()}) dtype={dtype.name} "
              f"backend={args.backend or 'auto'} tiling={tiling or 'default'}")
    print(header)
    print(f"{'shape':<20}{'mode':<9}{'gmm TF/s':>10}{'dense TF/s':>12}{'ragged TF/s':>13}"
          f"{'gmm/dense':>11}{'gmm/ragged':>12}{'gmm ms':>10}")
    results = []
    for shape in (SMALL_SHAPES if args.small else SHAPES):
        for mode in modes:
            row = bench(shape, dtype, args.backend, tiling, mode, args.rounds, args.min_time,
                        args.seed)
            results.append(row)
            print(f"{row['shape']:<20}{mode:<9}{row['gmm_tflops']:>10.4f}"
                  f"{row['dense_tflops']:>12.4f}{row['ragged_dot_tflops']:>13.4f}"
                  f"{row['gmm_over_dense']:>11.3f}{row['gmm_over_ragged_dot']:>12.3f}"
                  f"{row['gmm_ms']:>10.3f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": device.device_kind, "platform": jax.default_backend(), "dtype": dtype.name,
            "backend": args.backend, "tiling": tiling, "jax": jax.__version__,
            "host": platform.node(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
