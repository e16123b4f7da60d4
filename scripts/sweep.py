"""Runs a sweep (gin bindings x seeds, one workdir each, resumable) and writes its report.

  python scripts/sweep.py gin_configs/sweeps/global_batch_lbl.gin
  python scripts/sweep.py gin_configs/sweeps/loss_free_balancing.gin --report_only
  python scripts/sweep.py gin_configs/sweeps/loss_free_balancing.gin --from_records
  python scripts/sweep.py gin_configs/sweeps/calibration.gin --seeds=1,2 --variants=moe

Runs go to --root/NAME/<variant>/seed<k> (default workdirs/sweeps); finished
runs are skipped and interrupted ones resume from their checkpoints; a progress
line (runs done of the sweep, ETA) is printed before and after every run.
`--order=seed` trains every variant at one seed before the next seed
(`make experiment NAME=...`, scripts/experiment.py, does so). The
report is docs/experiments/NAME.md with plots in docs/experiments/NAME/.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from experiments.reporting import progress
from experiments.reporting import sweep as sweep_lib
from experiments.runtime import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("sweep_file", help="gin file binding Sweep.*")
    parser.add_argument("--root", default="workdirs/sweeps", help="where run workdirs go")
    parser.add_argument("--docs_dir", default="docs/experiments", help="where the report goes")
    parser.add_argument("--report_only", action="store_true",
                        help="only collect finished runs and rewrite the report")
    parser.add_argument("--from_records", action="store_true",
                        help="rewrite the report from its committed DOCS_DIR/NAME/records.json "
                             "(no runs needed; the plots are kept as they are)")
    parser.add_argument("--seeds", default=None,
                        help="train only these of Sweep.seeds (comma-separated), in this order; "
                             "the report still collects every finished run")
    parser.add_argument("--variants", default=None,
                        help="train only these of Sweep.variants (comma-separated), in this order")
    parser.add_argument("--order", default="variant", choices=progress.ORDERS,
                        help="train variant by variant (all seeds of one, then the next) or "
                             "seed by seed (every variant at one seed, then the next seed: "
                             "an interrupted sweep leaves paired results)")
    args = parser.parse_args(argv)
    if args.report_only and args.from_records:
        parser.error("--report_only and --from_records exclude each other")
    sweep = sweep_lib.load_sweep(args.sweep_file)
    subset = dataclasses.replace(sweep, **_subset(parser, sweep, args.seeds, args.variants))
    root = Path(args.root).absolute()
    if args.from_records:
        records = sweep_lib.read_records(Path(args.docs_dir), sweep.name)
        report = sweep_lib.write_report(sweep, records, args.sweep_file, Path(args.docs_dir),
                                        plots=False)
        print(f"wrote {report} ({len(records)} runs, from {sweep_lib.RECORDS_FILE})")
        return 0
    if not args.report_only:
        sweep_lib.run_sweep(subset, root, log=lambda m: print(m, file=sys.stderr, flush=True),
                            order=args.order)
    records = [sweep_lib.collect_run(sweep_lib.run_dir(root, sweep, variant, seed),
                                     variant, seed, root=root, compute=sweep.compute_columns)
               for variant, _ in sweep.runs() for seed in sweep.seeds
               if (sweep_lib.run_dir(root, sweep, variant, seed) / "summary.json").exists()]
    report = sweep_lib.write_report(sweep, records, args.sweep_file, Path(args.docs_dir))
    print(f"wrote {report} ({len(records)} runs)")
    return 0


def _subset(parser, sweep: sweep_lib.Sweep, seeds: str | None,
            variants: str | None) -> dict[str, Any]:
    """`Sweep` fields restricting the training to `--seeds` / `--variants` (refused by name
    when not in the sweep)."""
    out: dict[str, Any] = {}
    if seeds is not None:
        try:
            out["seeds"] = [int(s) for s in seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds: expected comma-separated integers, got {seeds!r}")
        unknown = [s for s in out["seeds"] if s not in sweep.seeds]
        if unknown:
            parser.error(f"--seeds: {unknown} not in Sweep.seeds {list(sweep.seeds)}")
    if variants is not None:
        names = variants.split(",")
        have = dict(sweep.variants) or {"base": {}}
        unknown = [v for v in names if v not in have]
        if unknown:
            parser.error(f"--variants: {unknown} not in Sweep.variants {sorted(have)}")
        out["variants"] = {v: have[v] for v in names}
        # The subset only trains: its claims and per-variant gin files must name its own
        # variants (Sweep validates both), the report is written from the whole sweep.
        out["variant_gin_files"] = {v: f for v, f in sweep.variant_gin_files.items()
                                    if v in names}
        out["claims"] = [c for c in sweep.claims if all(v in names for v in c)]
    return out


if __name__ == "__main__":
    sys.exit(main())
