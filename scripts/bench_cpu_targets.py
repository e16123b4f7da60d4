"""The CPU targets of issue 21, measured in one process: the harness check, the
MoE layers cut into parts, their compiled memory, and the training step.

    python scripts/bench_cpu_targets.py --json docs/benchmarks/cpu_targets.json

Every timing is paired and interleaved (`experiments.bench.timing`): the figure is
the median of per-round ratios; the wall and the process CPU time of every round
are kept in the JSON with the load average before and after each section.
docs/cpu_targets.md explains each section (docs/benchmarks.md, "CPU targets",
has the latest figures against the targets).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from experiments.bench import cpu_targets, report, timing
from experiments.runtime import cli

SECTIONS = ("harness", "layer", "memory", "step")


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="results file (rewritten "
                        "atomically after every section)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8,
                        help="harness: rows B of the [B, S, d] dense baselines")
    parser.add_argument("--layers", default="", help="layer section: comma-separated subset of "
                        + ",".join(c[0] for c in cpu_targets.LAYERS) + " (default all)")
    parser.add_argument("--step_batch", type=int, default=8)
    parser.add_argument("--step_seq", type=int, default=128)
    parser.add_argument("--step_rounds", type=int, default=5)
    parser.add_argument("--step_dtypes", default="bfloat16,float32",
                        help="compute dtypes of the step section, of bfloat16,float32")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"--sections: {s!r} is not one of {SECTIONS}")
    names = tuple(n for n in args.layers.split(",") if n)
    for n in names:
        if n not in [c[0] for c in cpu_targets.LAYERS]:
            parser.error(f"--layers: {n!r} is not one of {[c[0] for c in cpu_targets.LAYERS]}")
    dtypes = tuple(d for d in args.step_dtypes.split(",") if d)
    for d in dtypes:
        if d not in ("bfloat16", "float32"):
            parser.error(f"--step_dtypes: {d!r} is not one of ('bfloat16', 'float32')")
    if args.rounds < 1 or args.step_rounds < 1:
        parser.error("--rounds and --step_rounds must be >= 1")
    if args.tokens % args.batch:
        parser.error(f"--batch must divide --tokens={args.tokens}, got {args.batch}")

    data = dict(command="python scripts/bench_cpu_targets.py " + " ".join(sys.argv[1:] if argv
                                                                           is None else argv),
                device=jax.devices()[0].device_kind, platform=jax.default_backend(),
                machine=platform.machine(), cpus=len(jax.devices("cpu")), jax=jax.__version__,
                load_average_start=timing.load_average(), seconds={})
    for section in sections:
        start = time.monotonic()
        print(f"== {section} (load {timing.load_average()})", flush=True)
        if section == "harness":
            data[section] = cpu_targets.harness(tokens=args.tokens, d_model=args.d_model,
                                                batch=args.batch, rounds=args.rounds)
            for p in data[section][0]["pairs"]:
                print(f"harness {p['moe']} / {p['dense']}: {p['ratio']:.2f}x wall, "
                      f"{p['cpu_ratio']:.2f}x CPU", flush=True)
        elif section == "layer":
            data[section] = cpu_targets.layers(tokens=args.tokens, d_model=args.d_model,
                                               rounds=args.rounds, names=names)
        elif section == "memory":
            data[section] = cpu_targets.memory(tokens=args.tokens, d_model=args.d_model)
        else:
            data[section] = cpu_targets.training_step(
                batch_size=args.step_batch, seq_len=args.step_seq, rounds=args.step_rounds,
                dtypes=dtypes, on_record=lambda records: report.write_json(
                    args.json, dict(data, step=records)))
        data["seconds"][section] = round(time.monotonic() - start, 1)
        data["load_average_end"] = timing.load_average()
        report.write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
