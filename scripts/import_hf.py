"""Imports a Hugging Face safetensors decoder as a workdir of ours.

  python scripts/import_hf.py --hf_dir=path/to/hf_model --out_workdir=workdirs/imported \
      [--gin_file=gin_configs/data/my_data.gin] [--dtype=bfloat16]

Families: Llama, Mistral, Qwen2, Qwen3 (dense); Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE (MoE); DeepSeek-V2, DeepSeek-V3 (multi-head latent attention + MoE; V3's
correction biases become loss-free selection biases, its MTP layers are skipped).
The model comes from config.json (vocab_size included); --gin_file and
--gin_param add the data/training config. The workdir holds checkpoints/0,
config.gin and the model's tokenizer.json; scripts/train.py continues it and
scripts/upcycle.py upcycles a dense one. Mapping tables: docs/interop.md.
Exit status 2 when the model or the configuration cannot be imported.
"""

from __future__ import annotations

import logging
import sys

from experiments.convert.hf.importer import DTYPES, import_hf
from experiments.runtime import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hf_dir", required=True,
                        help="Directory with config.json and *.safetensors.")
    parser.add_argument("--out_workdir", required=True)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="Data/training config (the model comes from config.json).")
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="Parameter dtype of the checkpoint.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        out = import_hf(args.hf_dir, args.out_workdir, gin_files=args.gin_file,
                        gin_params=args.gin_param, dtype=args.dtype, seed=args.seed)
    except KeyError as e:  # a key config.json lacks
        cli.fail(f"{args.hf_dir}/config.json lacks {e.args[0]!r}")
    print(f"imported {args.hf_dir} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
