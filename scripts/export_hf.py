"""Exports a checkpoint of ours as a Hugging Face safetensors model directory.

  python scripts/export_hf.py --workdir=workdirs/run --out_dir=exported [--step=N] \
      [--dtype=bfloat16] [--drop_selection_bias]

The family follows from the model: dense -> Llama (Mistral with a sliding
window, Qwen2 with Q/K/V biases, Qwen3 with per-head Q/K norm); MoE -> Mixtral
(renormalised top-k), Qwen2-MoE (gated shared expert), Qwen3-MoE (per-head Q/K
norm), OLMoE (projection Q/K norm); multi-head latent attention -> DeepSeek-V3
(sigmoid routers; the loss-free biases become e_score_correction_bias) or
DeepSeek-V2 (softmax routers). What no family represents (expert choice,
DTS, capacity dropping, selection biases without --drop_selection_bias, ...) is
refused naming the feature; see docs/interop.md. Exit status 2 on refusal.
"""

from __future__ import annotations

import logging
import sys

from experiments.convert.hf.exporter import export_hf
from experiments.convert.hf.importer import DTYPES
from experiments.runtime import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workdir", required=True, help="A workdir with config.gin and "
                        "checkpoints/.")
    parser.add_argument("--out_dir", required=True, help="New HF model directory.")
    parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default: "
                        "the latest).")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--drop_selection_bias", action="store_true",
                        help="Export a router with selection biases without them (changes "
                        "routing).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    out = export_hf(args.workdir, args.out_dir, step=args.step, dtype=args.dtype,
                    drop_selection_bias=args.drop_selection_bias)
    print(f"exported {args.workdir} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
