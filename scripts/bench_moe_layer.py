"""Times MoeLayer against a dense FFN of equal active FLOPs, per dispatch.

For each configuration the MoE layer and the dense baseline are timed in the
same process, alternating (interleaved rounds), and the reported figure is the
median of the per-round ratios t_moe / t_dense (`experiments.bench.timing`; the
JSON keeps every round's wall and CPU seconds and the load average;
the layer builders are `experiments.bench.layer`, shared with
`scripts/bench_accelerator.py`).

    python scripts/bench_moe_layer.py [--json PATH] [--rounds N] [--small]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from experiments.bench.layer import compile_pair, dense_ffn, moe_layer
from experiments.bench.report import write_json
from experiments.bench.timing import interleaved_wall_cpu, load_average, median_ratio, ratio_summary
from experiments.runtime import cli
from moe.dispatch import available_dispatches, runnable_dispatches

# (name, E, k, d_ff per expert); d_ff * k is constant, so active FLOPs match.
CONFIGS = [("E8_k2", 8, 2, 1024), ("E64_k8_fine", 64, 8, 256)]


def _paired(candidate, baseline, args_c, args_b, rounds: int) -> dict:
    """`timing.ratio_summary` of the wall times, the CPU-time ratio, and every round's raw
    wall and CPU seconds (candidate and dense)."""
    wall, cpu = interleaved_wall_cpu({"moe": (candidate, args_c), "dense": (baseline, args_b)},
                                     rounds)
    return dict(ratio_summary(wall["moe"], wall["dense"]),
                cpu_ratio=median_ratio(cpu["moe"], cpu["dense"]), raw_wall_s=wall,
                raw_cpu_s=cpu)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--small", action="store_true", help="T=512, d=64: a smoke run")
    parser.add_argument("--dispatches", default=",".join(runnable_dispatches()),
                        help="comma-separated dispatch names (default: those that run here "
                             "without Pallas interpret mode or a missing extra)")
    parser.add_argument("--capacity_factors", default="1.25,none",
                        help="comma-separated; 'none' = dropless")
    parser.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    args = parser.parse_args(argv)
    if args.small:
        args.tokens, args.d_model = 512, 64
    dispatches = [d for d in args.dispatches.split(",") if d]
    for d in dispatches:
        if d not in available_dispatches():
            parser.error(f"--dispatches: {d!r} is not one of {available_dispatches()}")
    factors = [None if f.lower() == "none" else float(f) for f in args.capacity_factors.split(",")]
    configs = [c for c in CONFIGS if c[0] in args.configs.split(",")]

    x = jax.random.normal(jax.random.key(0), (args.tokens, args.d_model), jnp.float32)
    results = []

    def save() -> None:  # after every configuration, so a stopped run keeps what it measured
        if args.json:
            write_json(args.json, dict(
                device=jax.devices()[0].device_kind, platform=jax.default_backend(),
                machine=platform.machine(), jax=jax.__version__, tokens=args.tokens,
                d_model=args.d_model, rounds=args.rounds, command=" ".join(sys.argv),
                results=results))

    header = (f"{'config':<13} {'dispatch':<11} {'cf':>5} {'fwd x':>7} {'fwd ms':>8} "
              f"{'f+b x':>7} {'f+b ms':>8} {'dense f+b ms':>12}")
    print(f"device={jax.devices()[0].device_kind} platform={jax.default_backend()} "
          f"T={args.tokens} d={args.d_model} float32, rounds={args.rounds}")
    print(header)
    print("-" * len(header))
    for name, num_experts, k, d_ff in configs:
        dense_params, dense_apply = dense_ffn(args.d_model, k * d_ff, jax.random.key(1))
        dense_fwd, dense_fb = compile_pair(dense_apply, dense_params, x, with_aux=False)
        for dispatch in dispatches:
            for cf in factors:
                params, apply = moe_layer(args.d_model, d_ff, num_experts, k, dispatch, cf)
                try:
                    fwd, fb = compile_pair(apply, params, x, with_aux=True)
                except Exception as err:  # e.g. out of memory for einsum masks at E=64
                    print(f"{name:<13} {dispatch:<11} {cf!s:>5} skipped: {type(err).__name__}")
                    results.append(dict(config=name, dispatch=dispatch, capacity_factor=cf,
                                        skipped=f"{type(err).__name__}: {str(err)[:200]}"))
                    continue
                load = load_average()
                f = _paired(fwd, dense_fwd, (params, x), (dense_params, x), args.rounds)
                b = _paired(fb, dense_fb, (params, x), (dense_params, x), args.rounds)
                print(f"{name:<13} {dispatch:<11} {cf!s:>5} {f['ratio']:>7.2f} "
                      f"{f['ms']:>8.1f} {b['ratio']:>7.2f} {b['ms']:>8.1f} {b['dense_ms']:>12.1f}",
                      flush=True)
                results.append(dict(config=name, num_experts=num_experts, k=k, d_ff=d_ff,
                                    dispatch=dispatch, capacity_factor=cf, forward=f,
                                    forward_backward=b, load_average=[load, load_average()]))
                del fwd, fb
                save()
    save()


if __name__ == "__main__":
    sys.exit(main())
