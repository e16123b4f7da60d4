"""Merges similar experts of a trained MoE checkpoint (weights averaged per group).

  python scripts/merge_experts.py --workdir=workdirs/moe --out_workdir=workdirs/moe_merged \
      --task_source=embedded --task_domain=code --keep=4 --method=frequency_weighted

Groups come from the task's routing statistics (--grouping=spectral: UNCURL's
clusters of router-logit similarity; dominant: MC-SMoE, the E' most-used
experts as centres) or from --groups='0,1;2;3' (the same for every layer).
Each group's weights are averaged, weighted by routing frequency
(frequency_weighted) or equally (uniform); --router_merge=combine averages
the router rows the same way (E' experts), alias keeps every router row and
gives the members the merged weights (E slots, exact for identical experts).
See docs/surgery.md. Exit status 2 on bad input (nothing is written).
"""

from __future__ import annotations

import argparse
import logging
import sys

from experiments.convert import expert_surgery as ex
from experiments.runtime import cli
from moe import expert_surgery as es


def _groups(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(i) for i in g.split(",")) for g in text.split(";"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--groups must look like '0,1;2;3' (groups of expert indices separated by ';'), "
            f"got {text!r}") from None


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ex.add_flags(parser)
    parser.add_argument("--method", choices=es.MERGE_WEIGHTINGS, default="frequency_weighted")
    parser.add_argument("--grouping", choices=es.GROUPINGS, default="spectral")
    parser.add_argument("--groups", type=_groups, default=None,
                        help="Explicit groups, e.g. '0,1;2;3' (instead of --keep/--grouping).")
    parser.add_argument("--router_merge", choices=es.ROUTER_MERGES, default="combine")
    args = parser.parse_args(argv)
    task = ex.task_from_args(args)
    if args.groups is not None and (args.keep is not None or args.keep_fraction is not None):
        parser.error("--groups sets the number of experts: give it without --keep/--keep_fraction")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    ex.run_from_args(ex.merge_experts, args, task, method=args.method, grouping=args.grouping,
                     groups=args.groups, router_merge=args.router_merge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
