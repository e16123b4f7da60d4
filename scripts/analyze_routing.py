"""Routing analysis of a training run.

  python scripts/analyze_routing.py --workdir=workdirs/default

Restores the latest intact checkpoint of the run (its model and data settings
come from the run's config.gin), routes the labelled validation data and
writes, per MoE layer, a domain x expert heat map (routing_<layer>.png) and
JSON (routing fractions, I(domain; expert), MaxVio), plus routing.json and a
loss-curve plot from metrics.jsonl, into --output_dir (default
<workdir>/analysis), and prints the paths it wrote.

A dense run (no MoE layers) has no routing to analyse: the script says so,
writes routing.json (no layers) and the loss curves, and exits 0 (there is
nothing wrong with the run). Exit status 2 when the workdir has no config.gin
or no intact checkpoint.

A Soft MoE layer has no per-token expert choices: its heat map and JSON hold soft
quantities (the combine-weight mass per domain and expert, I(domain; expert) of that
soft matrix, the dispatch weights' effective tokens per slot), labelled soft.
"""

from __future__ import annotations

import sys

from experiments.reporting import soft_routing
from experiments.reporting.routing_report import analyze_workdir, parse_run_config
from experiments.runtime import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                remote_ok=("workdir", "output_dir"))
    parser.add_argument("--workdir", required=True, help="The training run's workdir.")
    parser.add_argument("--output_dir", default=None,
                        help="Where to write the plots and JSON (default <workdir>/analysis).")
    parser.add_argument("--max_batches", type=int, default=None,
                        help="Route at most this many validation batches.")
    args = parser.parse_args(argv)
    parse_run_config(args.workdir)
    report = analyze_workdir(args.workdir, args.output_dir, args.max_batches)
    if not report["layers"]:
        print(f"{args.workdir}: the model is dense (no MoE layers): no routing to analyse")
    for layer, info in report["layers"].items():
        if info.get("soft"):
            print(soft_routing.summary_line(layer, info))
            continue
        fractions = ", ".join(f"{d}: {max(row):.2f}" for d, row in
                              zip(info["domains"], info["routing_fractions"]))
        print(f"{layer}: I(domain; expert) = {info['mutual_information_bits']:.4f} bits, "
              f"MaxVio = {info['max_violation']:.3f}, top expert share per domain ({fractions})")
    print("wrote:")
    for path in report["files"]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
