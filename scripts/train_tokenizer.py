"""Trains a tokenizer on local data: a whitespace-preserving SentencePiece model, or a
byte-level BPE `tokenizer.json` (the `tokenizers` package).

Trains on the 'train' split of a source (the validation split stays unseen)
and reports bytes per token on the validation split. Nothing is downloaded.

  python scripts/train_tokenizer.py --output workdirs/spm/code8k.model
  python scripts/train_tokenizer.py --source 'text:data/**/*.txt' \
      --output workdirs/spm/text.model --vocab_size 4096
  python scripts/train_tokenizer.py --format hf --output workdirs/bpe/code8k

Use a SentencePiece model with ``tokenizer='sentencepiece:<output>'`` (needs the
optional ``sentencepiece`` package, ``pip install -e '.[seqio]'``); ``--format hf``
writes a directory (tokenizer.json, tokenizer_config.json naming pad/bos/eos) for
``tokenizer='hf:<output>'`` (``experiments/data/bpe.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from experiments.data import corpus
from experiments.data.bpe import train_byte_level_bpe
from experiments.data.sources import load_source_split
from experiments.data.tokenizers import MODEL_TYPES, HFTokenizer, Tokenizer, train_sentencepiece
from experiments.runtime import cli

FORMATS = ("sentencepiece", "hf")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--output", required=True,
        help="sentencepiece: the .model file to write; hf: the directory to write.",
    )
    parser.add_argument("--format", choices=FORMATS, default="sentencepiece",
                        help="sentencepiece (a .model) or hf (a byte-level BPE tokenizer.json).")
    parser.add_argument(
        "--source",
        default="embedded",
        help="'embedded', 'text:<glob>' or 'jsonl:<path>'.",
    )
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--model_type", choices=MODEL_TYPES, default="bpe",
                        help="sentencepiece only (hf is always bpe).")
    parser.add_argument(
        "--input_sentence_size",
        type=int,
        default=None,
        help="sentencepiece only: cap on sampled training sentences (0 = all; "
        "default 1000000).",
    )
    parser.add_argument("--seed", type=int, default=None,
                        help="sentencepiece only: seed of the sentence sampling (default 0).")
    parser.add_argument("--min_frequency", type=int, default=None,
                        help="hf only: merge a pair only if seen this often (default 2).")
    parser.add_argument(
        "--validation_fraction", type=float, default=corpus.DEFAULT_VALIDATION_FRACTION
    )
    parser.add_argument(
        "--cache_dir", default=None, help="Embedded-corpus cache directory."
    )
    parser.add_argument(
        "--max_bytes_per_domain", type=int, default=corpus.DEFAULT_MAX_BYTES_PER_DOMAIN
    )
    args = parser.parse_args(argv)
    # Flags of the other format are refused, not ignored.
    other = ((("--input_sentence_size", args.input_sentence_size), ("--seed", args.seed))
             if args.format == "hf" else (("--min_frequency", args.min_frequency),))
    for flag, value in other:
        if value is not None:
            parser.error(f"{flag} applies to --format "
                         f"{'sentencepiece' if args.format == 'hf' else 'hf'} only")
    if args.format == "hf" and args.model_type != "bpe":
        parser.error(f"--model_type {args.model_type} needs --format sentencepiece "
                     f"(--format hf trains a byte-level BPE)")
    return args


def _train(args: argparse.Namespace, texts: Iterator[str]) -> tuple[Tokenizer, str]:
    """(the trained tokenizer, where it was written)."""
    if args.format == "hf":
        try:
            path = train_byte_level_bpe(texts, args.output, vocab_size=args.vocab_size,
                                        min_frequency=2 if args.min_frequency is None
                                        else args.min_frequency)
        except ValueError as e:
            raise ValueError(f"--{e}") from None  # names the flag
        return HFTokenizer(path), str(path.parent)
    tokenizer = train_sentencepiece(
        texts,
        args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        input_sentence_size=(1_000_000 if args.input_sentence_size is None
                             else args.input_sentence_size),
        seed=0 if args.seed is None else args.seed,
    )
    return tokenizer, args.output


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
    tokenizer, written = _train(args, (r["text"] for r in train))
    print(
        f"wrote {written}: vocab_size={tokenizer.vocab_size}, "
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
