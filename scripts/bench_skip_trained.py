"""Learning to Skip on trained workdirs: inference forward time against the realised skip rate.

  python scripts/bench_skip_trained.py --root=workdirs/sweeps/learning_to_skip \\
      --full=top2/seed0 --workdirs=skip_r25/seed0,skip_r50/seed0,dense_l3/seed0,dense_l2/seed0 \\
      --json=docs/bench_skip_trained.json

Restores every workdir (read-only) and runs its jitted deterministic forward on its
run's validation batches (all of them, or `--max_batches` evenly spaced); a model
with skip routers runs with skipped tokens routed out (`SkipBlock.inference =
'route_out'`), checked first against the masked computation on every batch (logits
within `--atol`, the same skipped counts; a mismatch is an error, exit status 1, and
no time is reported). Then all forwards are timed interleaved (`--rounds`, each
measurement `--min_time` seconds or more). Prints one JSON row per workdir (realised
skip rate per layer and overall, validation loss, ms per batch on wall and CPU time,
ratios to `--full`), then a markdown table; `--json PATH` writes them with the
command, the device and the load average (`experiments/bench/skip_trained.py`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments.bench import report
from experiments.bench import skip_trained as lib
from experiments.runtime import cli


def _workdirs(parser: cli.ArgumentParser, text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or not all(names):
        parser.error(f"--workdirs must be comma-separated workdirs, got {text!r}")
    return names


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--full", required=True,
                        help="the full model's workdir (its forward time is 1 in the ratios)")
    parser.add_argument("--workdirs", required=True,
                        help="comma-separated workdirs to compare with --full")
    parser.add_argument("--root", default=None,
                        help="workdirs are relative to this directory (recorded as <root>)")
    parser.add_argument("--max_batches", type=int, default=None,
                        help="at most this many validation batches (default: the run's)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min_time", type=float, default=0.2,
                        help="seconds per measurement (calls are repeated to fill it)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest |route_out - mask| logit difference accepted")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    names = [args.full, *_workdirs(parser, args.workdirs)]
    if len(set(names)) != len(names):
        parser.error(f"--full and --workdirs must name different workdirs, got {names}")
    if args.max_batches is not None and args.max_batches < 1:
        parser.error(f"--max_batches must be >= 1, got {args.max_batches}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not args.min_time >= 0:
        parser.error(f"--min_time must be >= 0, got {args.min_time}")
    if not args.atol > 0:
        parser.error(f"--atol must be > 0, got {args.atol}")
    root = Path(args.root) if args.root is not None else None
    if root is not None and not root.is_dir():
        parser.error(f"--root {args.root!r} is not a directory")
    loaded = [lib.load(root / n if root else Path(n), _label(n, root), args.max_batches)
              for n in names]
    result = lib.bench(loaded[0], loaded[1:], rounds=args.rounds, min_time=args.min_time,
                       atol=args.atol)
    for row in result["rows"]:
        print(json.dumps(row), flush=True)
    table = lib.markdown(result)
    print("\n".join(table))
    if args.json:
        report.write_json(Path(args.json), {"command": _command(args), **result,
                                            "table": table})
    return 0


def _command(args) -> str:
    """The command line, from the parsed flags (`--root` recorded as `<root>`: no path of
    this machine; `--json` left out)."""
    flags = {"full": args.full, "workdirs": args.workdirs,
             "root": None if args.root is None else "<root>", "max_batches": args.max_batches,
             "rounds": args.rounds, "min_time": args.min_time, "atol": args.atol}
    return " ".join(["python scripts/bench_skip_trained.py",
                     *[f"--{k}={v}" for k, v in flags.items() if v is not None]])


def _label(name: str, root: Path | None) -> str:
    """The name given under `--root`, else the workdir's last two path components."""
    return name if root is not None else "/".join(Path(name).parts[-2:])


if __name__ == "__main__":
    sys.exit(main())
