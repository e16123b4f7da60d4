"""Reproduces one experiment report with one command: its runs (resumable), then its report.

  python scripts/experiment.py global_batch_lbl       # or: make experiment NAME=global_batch_lbl
  python scripts/experiment.py loss_free_balancing --report_only
  python scripts/experiment.py --list

NAME is a sweep of gin_configs/sweeps/ (NAME.gin); the report is
docs/experiments/NAME.md. The runs go to --root/NAME/<variant>/seed<k> (default
workdirs/sweeps) and are trained one at a time, seed by seed (every variant at
the first seed, then the next seed: an interrupted sweep leaves paired results).
Finished runs are skipped and an interrupted one resumes from its checkpoint, so
rerunning the same command continues the sweep. Before and after every run a
progress line gives the runs done of the whole sweep and the ETA.

The report writer is the experiment's own where it has one (`evomoe`:
scripts/evomoe_report.py; `calibration`: scripts/calibration_report.py;
`upcycling`: scripts/upcycling_sweep.py, which also trains its runs and writes the
summary NAME.json and plot NAME.png that the hand-written report cites; the
experiments of `DRIVERS`: their driver trains, converts and reports), else the
sweep report of scripts/sweep.py. `--report_only` rewrites the report from the
finished runs; `--from_records` from the records committed beside the report
(no runs needed; sweep-report experiments only).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from experiments.runtime import cli

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "gin_configs" / "sweeps"
# Experiments whose report is not the generic sweep report: their writer's command line.
REPORTERS = {
    "evomoe": lambda sweep, root, docs: ["scripts/evomoe_report.py", sweep, f"--root={root}",
                                         f"--docs_dir={docs}"],
    "calibration": lambda sweep, root, docs: ["scripts/calibration_report.py", f"--root={root}"],
}
# Experiments run by their own driver: it trains and converts what is missing, then writes
# the report (and, for the sweep-gin drivers, its records docs/experiments/NAME/records.json
# and its plot). Each entry: (name, root, docs_dir, report_only, from_records) -> command.
DriverCommand = Callable[[str, str, str, bool, bool], list[str]]


def _sweep_gin_driver(script: str) -> DriverCommand:
    """A driver configured by gin_configs/sweeps/NAME.gin that can also rewrite its report
    from its committed records."""
    def command(name: str, root: str, docs: str, report_only: bool,
                from_records: bool) -> list[str]:
        mode = (["--from_records"] if from_records else
                [f"--root={root}/{name}"] + (["--report_only"] if report_only else []))
        return [script, f"--sweep_gin=gin_configs/sweeps/{name}.gin", f"--docs_dir={docs}",
                *mode]
    return command


def _cbtm(name: str, root: str, docs: str, report_only: bool, from_records: bool) -> list[str]:
    if from_records:
        raise ValueError(f"--from_records: experiment {name!r} has no committed records "
                         f"to rewrite its report from; use --report_only")
    return (["scripts/cbtm_experiment.py", f"--root={root}/{name}", f"--docs_dir={docs}"]
            + (["--report_only"] if report_only else []))


def _pruning(name: str, root: str, docs: str, report_only: bool,
             from_records: bool) -> list[str]:
    out = [f"--json={docs}/{name}.json", f"--report={docs}/{name}.md", f"--plot={docs}/{name}.png"]
    if from_records:
        return ["scripts/pruning_sweep.py", "--from_records", *out]
    # --report_only trains nothing: the surgeries of finished sources are evaluation only.
    stages = ["--stages=surgery,report"] if report_only else []
    return ["scripts/pruning_sweep.py", f"--root={root}/{name}", *stages, *out]


DRIVERS: dict[str, DriverCommand] = {
    "pruning": _pruning,
    "efficientscale": _sweep_gin_driver("scripts/efficientscale_sweep.py"),
    "tomoe_pruning": _sweep_gin_driver("scripts/tomoe_sweep.py"),
    "cbtm": _cbtm,
}


def experiment_names() -> list[str]:
    """The sweeps of gin_configs/sweeps/ and the experiments of DRIVERS, by name."""
    return sorted({p.stem for p in SWEEPS.glob("*.gin")} | set(DRIVERS))


def commands(name: str, root: str, docs_dir: str, *, report_only: bool = False,
             from_records: bool = False) -> list[list[str]]:
    """The scripts (paths from the repo root, with their arguments) that reproduce `name`."""
    if name in DRIVERS:
        return [DRIVERS[name](name, root, docs_dir, report_only, from_records)]
    sweep = f"gin_configs/sweeps/{name}.gin"
    if name.startswith("upcycling"):
        if report_only:
            raise ValueError("--report_only: the upcycling driver trains the runs that are "
                             "missing; use --from_records to rewrite its summary")
        if from_records:
            return [["scripts/upcycling_sweep.py", f"--json={docs_dir}/{name}.json",
                     "--from_json"]]
        return [["scripts/upcycling_sweep.py", f"--sweep_gin={sweep}", f"--root={root}/{name}",
                 "--seeds=0,1,2", f"--json={docs_dir}/{name}.json",
                 f"--plot={docs_dir}/{name}.png"]]
    reporter = REPORTERS.get(name.removesuffix("_tiny"))
    if from_records:
        if reporter is not None and name != "calibration":
            raise ValueError(f"--from_records: experiment {name!r} has no committed records "
                             f"to rewrite its report from; use --report_only")
        if name == "calibration":
            return [["scripts/calibration_report.py", "--from_records"]]
        return [["scripts/sweep.py", sweep, f"--docs_dir={docs_dir}", "--from_records"]]
    # An experiment with its own report writer leaves the sweep runner's generic report
    # beside its runs, not in docs.
    sweep_docs = docs_dir if reporter is None else f"{root}/{name}/generic_report"
    train = ["scripts/sweep.py", sweep, f"--root={root}", f"--docs_dir={sweep_docs}",
             "--order=seed"] + (["--report_only"] if report_only else [])
    if reporter is not None:
        return [train, reporter(sweep, root, docs_dir)]
    return [train]


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("name", nargs="?", help="the experiment: a sweep of gin_configs/sweeps/")
    parser.add_argument("--root", default="workdirs/sweeps", help="where run workdirs go")
    parser.add_argument("--docs_dir", default="docs/experiments", help="where the report goes")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing; rewrite the report from the finished runs")
    parser.add_argument("--from_records", action="store_true",
                        help="train nothing; rewrite the report from its committed records")
    parser.add_argument("--list", action="store_true", help="print the experiment names")
    args = parser.parse_args(argv)
    names = experiment_names()
    if args.list:
        print("\n".join(names))
        return 0
    if args.name not in names:
        parser.error(f"NAME must be one of {names}, got {args.name!r}")
    if args.report_only and args.from_records:
        parser.error("--report_only and --from_records exclude each other")
    try:  # absolute: the scripts run in the repo root, wherever this was started
        steps = commands(args.name, str(Path(args.root).absolute()),
                         str(Path(args.docs_dir).absolute()), report_only=args.report_only,
                         from_records=args.from_records)
    except ValueError as e:
        parser.error(str(e))
    for step in steps:
        print("+ python " + " ".join(step), file=sys.stderr, flush=True)
        code = subprocess.run([sys.executable, *step], cwd=REPO, check=False).returncode
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
