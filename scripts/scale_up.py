"""Grows a dense checkpoint in width and depth (scale-up), function-preserving where it can.

  python scripts/scale_up.py --workdir=workdirs/dense --out_workdir=workdirs/dense_big \
      --d_model=192 --d_ff=768 --num_heads=6 --num_layers=8 --verify
  python scripts/upcycle.py --dense_workdir=workdirs/dense_big --out_workdir=workdirs/moe_big ...

Width (d_ff, heads): --width_scheme=fpi (Net2Net split copies: exact) or aki (copies
of the next layer's units: not exact). d_model: --d_model_scheme=zero (new residual
dimensions zero, RMSNorm epsilon and gains rescaled: exact) or copy (duplicated
dimensions: approximate under RMSNorm). Depth: --depth_scheme=identity (copies whose
residual writes are zero: exact), duplicate or stack (not exact). --verify reports
max |dlogit| against the source. See docs/surgery.md ("Scale-up"). Exit status: 2
bad input (nothing written), 5 --verify found a difference where the schemes are exact.
"""

from __future__ import annotations

import sys

from experiments.convert.scale_up import ScaleUpConfig, scale_up
from experiments.runtime import cli
from moe import scale_up as su


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--workdir", required=True, help="The dense run's workdir.")
    p.add_argument("--out_workdir", required=True, help="New workdir (must not exist).")
    p.add_argument("--d_model", type=int, default=None, help="Target d_model (default: same).")
    p.add_argument("--d_ff", type=int, default=None, help="Target d_ff (default: same).")
    p.add_argument("--num_heads", type=int, default=None,
                   help="Target heads (head_dim is kept; default: same).")
    p.add_argument("--num_layers", type=int, default=None, help="Target depth (default: same).")
    p.add_argument("--width_scheme", choices=su.WIDTH_SCHEMES, default="fpi")
    p.add_argument("--d_model_scheme", choices=su.D_MODEL_SCHEMES, default="zero")
    p.add_argument("--depth_scheme", choices=su.DEPTH_SCHEMES, default="identity")
    p.add_argument("--step", type=int, default=None, help="Source step (default: latest).")
    p.add_argument("--verify", action="store_true",
                   help="Compare source and grown logits on validation batches.")
    p.add_argument("--verify_batches", type=int, default=2)
    args = p.parse_args(argv)
    if args.verify_batches < 1:
        p.error(f"--verify_batches must be >= 1, got {args.verify_batches}")
    config = ScaleUpConfig(d_model=args.d_model, d_ff=args.d_ff, num_heads=args.num_heads,
                           num_layers=args.num_layers, width=args.width_scheme,
                           d_model_scheme=args.d_model_scheme, depth=args.depth_scheme,
                           step=args.step)
    result = scale_up(args.workdir, args.out_workdir, config, verify=args.verify,
                      verify_batches=args.verify_batches)
    s, t = result.source, result.target
    print(f"scaled up step {result.step}: d_model {s.d_model}->{t.d_model}, d_ff {s.d_ff}->"
          f"{t.d_ff}, heads {s.num_heads}->{t.num_heads}, layers {s.num_layers}->"
          f"{t.num_layers}; parameters {result.param_counts[0]} -> {result.param_counts[1]}; "
          f"{'function-preserving' if not result.violations else 'not function-preserving'}; "
          f"wrote {result.out_workdir}")
    if result.verify is not None:
        print(result.verify.render())
        if not result.verify.ok:
            return 5
    return 0


if __name__ == "__main__":
    sys.exit(main())
