"""Prunes the experts of a trained MoE checkpoint, task-aware (UNCURL) or by baseline.

  python scripts/prune_experts.py --workdir=workdirs/moe --out_workdir=workdirs/moe_pruned \
      --task_source=embedded --task_domain=code --keep_fraction=0.5 --method=uncurl

One pass over the task data collects routing statistics (saved under
<workdir>/routing_stats/, reused by later runs with the same task); per MoE
layer the experts to keep are chosen by --method (uncurl: spectral clusters of
router-logit similarity, the most-used member of each kept; frequency: the
most-used; random), and the new workdir holds the pruned checkpoint (same
step), its config.gin (MoeLayer.num_experts = E') and surgery.json. See
docs/surgery.md. Exit status 2 on bad input (nothing is written).
"""

from __future__ import annotations

import logging
import sys

from experiments.convert import expert_surgery as ex
from experiments.runtime import cli
from moe import expert_surgery as es


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ex.add_flags(parser)
    parser.add_argument("--method", choices=es.PRUNE_METHODS, default="uncurl")
    args = parser.parse_args(argv)
    task = ex.task_from_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    ex.run_from_args(ex.prune_experts, args, task, method=args.method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
