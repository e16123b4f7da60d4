"""Upcycles a dense checkpoint of our trainer into an MoE checkpoint.

  python scripts/upcycle.py --dense_workdir=workdirs/dense \
      --gin_file=gin_configs/upcycling/top2.gin --out_workdir=workdirs/moe --verify
  python scripts/train.py --workdir=workdirs/moe --gin_param='train.num_steps = 1200'

The target model is the dense run's config.gin plus --gin_file/--gin_param and
the flags below (later ones win). Errors are one line (`--verbose` adds the
traceback). Exit status: 2 bad configuration or refused conversion, 5
`--verify` found a difference in a case that should be exact.
See docs/upcycling.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from experiments.convert.upcycle_checkpoint import UpcycleConfig, upcycle
from experiments.runtime import cli
from moe import upcycle as up


def _layers(text: str):
    if text in ("every_other", "all"):
        return text
    try:
        return tuple(int(i) for i in text.split(",") if i.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--moe_layers must be every_other, all or a comma-separated list of layer indices, "
            f"got {text!r}") from None


def _mesh(text: str) -> dict[str, int]:
    shape = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not size.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--mesh must look like 'expert=4' or "
                                             f"'data=2,expert=4', got {text!r}")
        shape[name.strip()] = int(size)
    return shape


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n", 1)[0],
                           remote_ok=("dense_workdir", "out_workdir", "gin_file"))
    p.add_argument("--dense_workdir", required=True, help="Workdir of the dense run.")
    p.add_argument("--out_workdir", required=True, help="New workdir for the MoE run.")
    p.add_argument("--gin_file", action="append", default=[],
                   help="MoE model config applied over the dense config.gin; repeatable.")
    p.add_argument("--gin_param", action="append", default=[],
                   help="Extra gin binding, applied last; repeatable.")
    p.add_argument("--gin_search_path", action="append", default=[])
    p.add_argument("--moe_layers", type=_layers, default=None,
                   help="every_other, all, or e.g. '1,3' (default: the gin config's choice).")
    p.add_argument("--num_experts", type=int, default=None, help="E (default: from gin).")
    p.add_argument("--k", type=int, default=None, help="Experts per token (default: from gin).")
    p.add_argument("--granularity", type=int, default=None,
                   help="G: expert hidden size = dense d_ff / G, virtual groups "
                        "(default: from expert_d_ff in gin, else 1).")
    p.add_argument("--router_init", choices=tuple(up.ROUTER_INITS), default=None,
                   help="Default: virtual_group when G > 1, else normal.")
    p.add_argument("--router_init_std", type=float, default=0.02)
    p.add_argument("--diversify", choices=tuple(up.DIVERSIFY_STRATEGIES), default="copy")
    p.add_argument("--diversify_ratio", type=float, default=0.5,
                   help="mask: keep probability; drop_upcycling: re-initialised fraction.")
    p.add_argument("--noise_std", type=float, default=0.01,
                   help="noise: std relative to each weight matrix's std.")
    p.add_argument("--weight_scaling", choices=up.WEIGHT_SCALINGS, default="balanced")
    p.add_argument("--optimizer_state", choices=("reset", "copy"), default="reset")
    p.add_argument("--seed", type=int, default=0, help="Router init and diversification seed.")
    p.add_argument("--dense_step", type=int, default=None,
                   help="Dense checkpoint step (default: the latest).")
    p.add_argument("--mesh", type=_mesh, default=None,
                   help="Write parameters placed on this mesh (experiments/runtime/mesh.py axes), "
                        "e.g. 'expert=4' or 'fsdp=2,expert=4'.")
    p.add_argument("--verify", action="store_true",
                   help="Compare dense and MoE logits and loss on validation batches.")
    p.add_argument("--verify_batches", type=int, default=2)
    return p.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    config = UpcycleConfig(
        moe_layers=args.moe_layers, num_experts=args.num_experts, k=args.k,
        granularity=args.granularity, router_init=args.router_init,
        router_init_std=args.router_init_std, diversify=args.diversify,
        diversify_ratio=args.diversify_ratio, noise_std=args.noise_std,
        weight_scaling=args.weight_scaling, optimizer_state=args.optimizer_state,
        seed=args.seed, dense_step=args.dense_step, mesh_shape=args.mesh)
    result = upcycle(args.dense_workdir, args.out_workdir, gin_files=args.gin_file,
                     gin_params=args.gin_param, gin_search_paths=args.gin_search_path,
                     config=config, verify=args.verify, verify_batches=args.verify_batches)
    print(f"upcycled step {result.step}: MoE layers {list(result.moe_layers)}, "
          f"E={result.num_experts} k={result.k} G={result.granularity}, router "
          f"{result.router_init}, scales {result.scales}; parameters "
          f"{result.dense_param_count} -> {result.moe_param_count}; wrote {result.out_workdir}")
    if result.verify is not None:
        print(result.verify.render())
        if not result.verify.ok:
            return 5
    elif result.exactness_violations:
        print("not function-preserving at init: " + "; ".join(result.exactness_violations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
