"""Imports a Llama/Mistral-style safetensors decoder as a dense checkpoint of ours.

  python scripts/import_dense.py --model_dir=path/to/hf_model \
      --gin_file=gin_configs/data/my_data.gin --out_workdir=workdirs/imported
  python scripts/upcycle.py --dense_workdir=workdirs/imported --moe_layers=every_other \
      --num_experts=8 --k=2 --out_workdir=workdirs/imported_moe --verify

The name mapping is in experiments/convert/import_dense.py and docs/upcycling.md.
Exit status 2 when the model or the configuration cannot be imported.
"""

from __future__ import annotations

import logging
import sys

from experiments.convert.import_dense import import_dense
from experiments.runtime import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model_dir", required=True,
                        help="Directory with config.json and *.safetensors.")
    parser.add_argument("--out_workdir", required=True)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="Data/training config (the model comes from config.json).")
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        out = import_dense(args.model_dir, args.out_workdir, gin_files=args.gin_file,
                           gin_params=args.gin_param, seed=args.seed)
    except KeyError as e:  # a key config.json or the safetensors lack
        cli.fail(f"{args.model_dir}: config.json or the safetensors lack {e.args[0]!r}")
    print(f"imported {args.model_dir} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
