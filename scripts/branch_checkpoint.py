"""Starts a c-BTM branch workdir from a seed run's checkpoint.

  python scripts/branch_checkpoint.py --seed_workdir=workdirs/seed \
      --out_workdir=workdirs/branch0 [--step=500]
  python scripts/train.py --gin_file=... --workdir=workdirs/branch0 \
      --gin_param="DataConfig.source = 'cluster:workdirs/clusters/k4:0'" \
      --gin_param='train.num_steps = 540'

The new workdir holds the seed's checkpoint at --step (default: the latest) with its
parameters, optimizer state and RNG key, but no data position, so the trainer resumes
at that step with the branch's own data source from its beginning; plus the seed's
config.gin and branch.json. Written atomically; --out_workdir must not exist.
Exit status 2 on bad input. See docs/cbtm.md.
"""

from __future__ import annotations

import sys

from experiments.cbtm.branch import branch_workdir
from experiments.runtime import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed_workdir", required=True, help="The seed run's workdir.")
    parser.add_argument("--out_workdir", required=True, help="New branch workdir.")
    parser.add_argument("--step", type=int, default=None, help="Seed checkpoint step.")
    args = parser.parse_args(argv)
    step = branch_workdir(args.seed_workdir, args.out_workdir, args.step)
    print(f"branch {args.out_workdir} starts at step {step} of {args.seed_workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
