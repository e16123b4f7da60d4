"""Trains a whitespace-preserving SentencePiece model on local data.

Trains on the 'train' split of a source (the validation split stays unseen)
and reports bytes per token on the validation split. Nothing is downloaded.

  python scripts/train_tokenizer.py --output workdirs/spm/code8k.model
  python scripts/train_tokenizer.py --source 'text:data/**/*.txt' \
      --output workdirs/spm/text.model --vocab_size 4096

Use the model with ``tokenizer='sentencepiece:<output>'``. Needs the optional
``sentencepiece`` package (``pip install -e '.[seqio]'``).
"""

from __future__ import annotations

import argparse
import sys
import time

from experiments.data import corpus
from experiments.data.sources import load_source_split
from experiments.data.tokenizers import MODEL_TYPES, train_sentencepiece
from experiments.runtime import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--output", required=True, help="Path of the .model file to write."
    )
    parser.add_argument(
        "--source",
        default="embedded",
        help="'embedded', 'text:<glob>' or 'jsonl:<path>'.",
    )
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--model_type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument(
        "--input_sentence_size",
        type=int,
        default=1_000_000,
        help="Cap on sampled training sentences (0 = all).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--validation_fraction", type=float, default=corpus.DEFAULT_VALIDATION_FRACTION
    )
    parser.add_argument(
        "--cache_dir", default=None, help="Embedded-corpus cache directory."
    )
    parser.add_argument(
        "--max_bytes_per_domain", type=int, default=corpus.DEFAULT_MAX_BYTES_PER_DOMAIN
    )
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kwargs = {
        "validation_fraction": args.validation_fraction,
        "cache_dir": args.cache_dir,
        "max_bytes_per_domain": args.max_bytes_per_domain,
    }
    train = load_source_split(args.source, "train", **kwargs).records
    start = time.perf_counter()
    tokenizer = train_sentencepiece(
        (r["text"] for r in train),
        args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        input_sentence_size=args.input_sentence_size,
        seed=args.seed,
    )
    print(
        f"wrote {args.output}: vocab_size={tokenizer.vocab_size}, "
        f"{len(train)} training documents, {time.perf_counter() - start:.1f}s"
    )
    validation = load_source_split(args.source, "validation", **kwargs).records
    if validation:
        num_bytes = sum(len(r["text"].encode("utf-8")) for r in validation)
        num_tokens = sum(len(tokenizer.encode(r["text"])) for r in validation)
        print(f"validation: {num_bytes / max(num_tokens, 1):.2f} bytes per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
