"""The c-BTM experiment: 1 (dense), 2, 4 and 8 clusters at equal training compute.

  python scripts/cbtm_experiment.py --root=workdirs/sweeps/cbtm --seeds=0,1,2
  python scripts/cbtm_experiment.py --root=workdirs/sweeps/cbtm --report_only
  make experiment NAME=cbtm

Per seed: the research-preset dense seed run (500 steps; --seed_runs=<dir> uses
<dir>/seed<s> instead), a balanced k-means clustering per k, k branches from the seed
checkpoint each trained --budget/k steps on its cluster, and the sparse ensemble's
validation loss per domain (experiments/cbtm/experiment.py). Finished pieces are
skipped, so the command resumes. Then the report (docs/experiments/cbtm.md, .json)
from whatever has finished. Exit status 2 on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.cbtm.experiment import Plan, run
from experiments.cbtm.report import write_report
from experiments.runtime import cli

DOCS = Path(__file__).resolve().parents[1] / "docs" / "experiments"


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated ints, got {text!r}") from None


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="workdirs/sweeps/cbtm", help="Runs go here.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clusters", default="1,2,4,8", help="k values; 1 = dense.")
    parser.add_argument("--budget", type=int, default=160,
                        help="Branch-phase steps per k, split over its k branches.")
    parser.add_argument("--learning_rate", type=float, default=3e-4,
                        help="Constant learning rate of the branch phase.")
    parser.add_argument("--seed_runs", default=None,
                        help="Directory of finished seed runs <dir>/seed<s> to branch from.")
    parser.add_argument("--docs_dir", default=str(DOCS), help="Where the report goes.")
    parser.add_argument("--report_only", action="store_true",
                        help="Only rewrite the report from the finished runs.")
    args = parser.parse_args(argv)
    if args.budget < 1 or not args.learning_rate > 0:
        raise ValueError("--budget must be >= 1 and --learning_rate > 0")
    plan = Plan(root=Path(args.root), seeds=_ints("seeds", args.seeds),
                clusters=_ints("clusters", args.clusters), budget=args.budget,
                learning_rate=args.learning_rate,
                seed_runs=Path(args.seed_runs) if args.seed_runs else None)
    if not args.report_only:
        run(plan)
    print(f"report: {write_report(plan, Path(args.docs_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
