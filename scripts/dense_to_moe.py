"""Converts a dense checkpoint into a MoE of its own hidden-unit groups (ToMoE).

  python scripts/dense_to_moe.py --method=tomoe --workdir=workdirs/dense \
      --out_workdir=workdirs/dense_tomoe --num_experts=8 --active_fraction=0.5 --verify

Per MLP, the hidden units are partitioned into --num_experts equal groups by
co-activation on --data_source (default: the run's own data), and a router is
learned with the dynamic structural pruning objective (straight-through top-k
mask, a penalty driving the active fraction of hidden units to the target); the
weights stay frozen unless --weight_learning_rate > 0. The new workdir trains,
evaluates and generates like any MoE run. See docs/surgery.md ("ToMoE"). Exit
status: 2 bad input (nothing written), 5 --verify found a difference where the
conversion should be exact (k = E, weights frozen).
"""

from __future__ import annotations

import logging
import sys

from experiments.convert.tomoe import ToMoEConfig, tomoe
from experiments.runtime import cli

METHODS = ("tomoe",)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--workdir", required=True, help="The dense run's workdir.")
    p.add_argument("--out_workdir", required=True, help="New workdir (must not exist).")
    p.add_argument("--num_experts", type=int, required=True, help="E: groups per MLP.")
    p.add_argument("--k", type=int, default=None, help="Active experts per token.")
    p.add_argument("--active_fraction", type=float, default=None,
                   help="Target fraction of active hidden units, in (0, 1]; k = fraction x E.")
    p.add_argument("--data_source", default=None,
                   help="DataConfig.source of the calibration data (default: the run's own).")
    p.add_argument("--data_batches", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=200, help="Router training steps per layer.")
    p.add_argument("--learning_rate", type=float, default=1e-2)
    p.add_argument("--weight_learning_rate", type=float, default=0.0,
                   help="0: expert weights frozen; > 0: tuned at this rate.")
    p.add_argument("--tau", type=float, default=0.5, help="Soft-mask temperature.")
    p.add_argument("--penalty", type=float, default=1.0, help="Active-fraction penalty weight.")
    p.add_argument("--tokens_per_step", type=int, default=1024)
    p.add_argument("--no_noise", action="store_true", help="No logistic noise in training.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="Dense step (default: latest).")
    p.add_argument("--verify", action="store_true",
                   help="Compare dense and MoE logits on validation batches.")
    p.add_argument("--verify_batches", type=int, default=2)
    args = p.parse_args(argv)
    if args.verify_batches < 1:
        p.error(f"--verify_batches must be >= 1, got {args.verify_batches}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    config = ToMoEConfig(
        num_experts=args.num_experts, k=args.k, active_fraction=args.active_fraction,
        steps=args.steps, learning_rate=args.learning_rate,
        weight_learning_rate=args.weight_learning_rate, tau=args.tau, penalty=args.penalty,
        noise=not args.no_noise, tokens_per_step=args.tokens_per_step,
        data_source=args.data_source, data_batches=args.data_batches,
        max_tokens=args.max_tokens, seed=args.seed, step=args.step)
    result = tomoe(args.workdir, args.out_workdir, config, verify=args.verify,
                   verify_batches=args.verify_batches)
    errors = ", ".join(f"{n} {m['error']:.4f}" for n, m in result.layers.items())
    print(f"ToMoE step {result.step}: d_ff {result.d_ff} -> E={result.num_experts} experts of "
          f"{result.d_ff // result.num_experts}, k={result.k}; relative MLP error {errors}; "
          f"wrote {result.out_workdir}")
    if result.verify is not None:
        print(result.verify.render())
        if result.static_loss is not None:
            print(f"static structural pruning (the same active units by magnitude): loss "
                  f"{result.static_loss:.6f}")
        if not result.verify.ok:
            return 5
    return 0


if __name__ == "__main__":
    sys.exit(main())
