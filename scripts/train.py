"""Trains a language model from gin configs (t5x-style command line).

  python scripts/train.py --gin_file=gin_configs/experiments/default.gin \
      --workdir=workdirs/default
  python scripts/train.py --gin_file=gin_configs/experiments/default.gin \
      --gin_param='train.num_steps = 200' --gin_param='DataConfig.batch_size = 8' \
      --workdir=/tmp/run

Re-running the same command on a workdir with checkpoints resumes from the
latest intact one; a workdir whose checkpoints hold another model configuration
is refused (exit status 2, nothing changed).

Ctrl-C (SIGINT) or SIGTERM (a preemptible machine's notice) finishes the
current step, saves its checkpoint and exits with `interrupted at step N;
checkpoint saved in <dir>; run the same command to resume`; a second Ctrl-C
aborts at once, without saving the current step.

`--profile_steps=N:M` (or `train.profile_steps = 'N:M'`) writes a jax profiler
trace of steps N..M into <workdir>/tensorboard (docs/training.md, "Profiling a
step").

Errors are one line (`--verbose` adds the traceback); nothing is written when
the configuration or an input is refused. Exit status: 0 done; 2 configuration
error; 3 another trainer holds the workdir; 4 the loss or an update became
NaN/inf; 130 interrupted by SIGINT (checkpoint saved; also after a second
Ctrl-C, without saving); 143 interrupted by SIGTERM (checkpoint saved).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from experiments.runtime import cli, gin_utils, paths
from experiments.runtime.workdir_lock import check_workdir
from experiments.train import profiling
from experiments.train.interrupt import Aborted, Interrupted
from experiments.train.trainer import TrainSetup, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                remote_ok=("workdir", "gin_file"))
    parser.add_argument("--gin_file", action="append", default=[],
                        help="Gin config file; repeatable, later files override earlier ones. "
                             "Default: <workdir>/config.gin when it exists.")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="Gin binding such as 'train.num_steps = 100'; repeatable, "
                             "applied after the files.")
    parser.add_argument("--gin_search_path", action="append", default=[],
                        help="Extra directory to resolve gin `include`s against.")
    parser.add_argument("--workdir", required=True,
                        help="Run directory (checkpoints, metrics, TensorBoard, configs); "
                             "a local path or gs://bucket/dir.")
    parser.add_argument("--quiet", action="store_true", help="No progress line or summary.")
    parser.add_argument("--profile_steps", default=None, metavar="N:M",
                        help="Write a jax profiler trace of steps N..M (inclusive) into "
                             "<workdir>/tensorboard (overrides train.profile_steps).")
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile_steps is not None:
        profiling.parse_profile_steps(args.profile_steps, "--profile_steps")  # before gin
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    check_workdir(args.workdir)
    if not args.gin_file:
        # A workdir written by scripts/upcycle.py (or an earlier run) carries its config.
        saved = paths.as_path(args.workdir) / gin_utils.CONFIG_FILE
        if not saved.is_file():
            cli.fail("at least one --gin_file is required (the workdir has no config.gin)")
        args.gin_file = [str(saved)]
    gin_utils.parse(args.gin_file, args.gin_param, args.gin_search_path)
    setup = TrainSetup.from_gin(**({"quiet": True} if args.quiet else {}))
    if args.profile_steps is not None:
        profiling.parse_profile_steps(args.profile_steps, "--profile_steps",
                                      num_steps=setup.config.num_steps)
        setup = dataclasses.replace(
            setup, config=dataclasses.replace(setup.config, profile_steps=args.profile_steps))
    try:
        # WorkdirLockedError: exit 3, NonFiniteLossError: 4, a refused configuration: 2.
        train(args.workdir, setup)
    except (Interrupted, Aborted) as e:  # the message is the whole story, not an error
        print(e, file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
