"""Tokenizes text, JSONL and Parquet files once into token shards for `shards:<dir>` runs.

  python scripts/prepare_data.py --input 'data/*.jsonl.zst' --output corpora/mydata \
      --tokenizer sentencepiece:workdirs/spm/code8k.model --workers 8
  python scripts/prepare_data.py --input 'hub_export/**/*.parquet' --output corpora/hub \
      --text_field content --domain_field lang
  python scripts/prepare_data.py --verify corpora/mydata

Inputs: text files (one document each), JSONL (`.jsonl`/`.ndjson`/`.json`, plain,
`.gz` or `.zst`; one object per line) and Parquet (one row per document); the format
comes from the suffix unless --format names it. Train with
`DataConfig.source = 'shards:<output>'` and the same `DataConfig.tokenizer`.
Killed runs resume: rerun the same command; finished shards are kept. Exit status 2
on bad input (a file that is not UTF-8 unless --skip_bad_files, a line that is not
JSON, a missing column, an empty corpus, a vocabulary too large for --dtype).
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.data import corpus, inputs, prepare, shards
from experiments.runtime import cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0], remote_ok=("verify", "output"))
    parser.add_argument("--input", action="append", default=[],
                        help="File, glob ('**' recurses) or directory (every file under "
                             "it); repeat for several.")
    parser.add_argument("--output", help="Directory of the shards (created).")
    parser.add_argument("--verify", metavar="DIR",
                        help="Only check every shard file of DIR against its manifest (sha256).")
    parser.add_argument("--tokenizer", default="byte",
                        help="Tokenizer spec, as DataConfig.tokenizer (default: byte).")
    parser.add_argument("--format", choices=inputs.FORMATS, default="auto",
                        help="Input format; auto: by suffix (.parquet, .jsonl[.gz|.zst], else text).")
    parser.add_argument("--text_field", default="text", help="JSONL key / Parquet column of the text.")
    parser.add_argument("--domain_field", default="domain",
                        help="JSONL key / Parquet column of the domain (optional in the data).")
    parser.add_argument("--default_domain", default="text",
                        help="Domain of text files and of records without a domain.")
    parser.add_argument("--validation_fraction", type=float,
                        default=corpus.DEFAULT_VALIDATION_FRACTION,
                        help="Share of documents held out, by a hash of the document key.")
    parser.add_argument("--dtype", choices=("auto", *shards.DTYPES), default="auto",
                        help="Token dtype; auto: uint16 when the vocabulary fits, else uint32.")
    parser.add_argument("--shard_bytes", type=int, default=prepare.DEFAULT_SHARD_BYTES,
                        help="Files are grouped into shards of at most this much input "
                             "(a larger file is a shard of its own); a shard is the unit of "
                             "parallel work and of resume.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="Worker processes (default: the CPU count).")
    parser.add_argument("--skip_bad_files", action="store_true",
                        help="Skip (and list in the manifest) files that cannot be read or are "
                             "not UTF-8, instead of stopping.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)
    if args.verify is not None:
        if args.output is not None or args.input:
            parser.error("--verify takes no --input or --output")
    elif args.output is None or not args.input:
        parser.error("--input and --output are required (or --verify DIR)")
    return args


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify is not None:
        manifest = prepare.verify(args.verify)
        print(f"{args.verify}: {len(manifest['shards'])} shards match the manifest")
        return 0
    options = prepare.Options(
        tokenizer=args.tokenizer, format=args.format,
        fields=inputs.FieldOptions(args.text_field, args.domain_field, args.default_domain),
        validation_fraction=args.validation_fraction, dtype=args.dtype,
        shard_bytes=args.shard_bytes, skip_bad_files=args.skip_bad_files)
    manifest = prepare.prepare(args.input, args.output, options, workers=args.workers,
                               progress=not args.no_progress)
    splits = manifest["splits"]
    print(f"wrote {args.output}: {len(manifest['shards'])} shards, dtype {manifest['dtype']}, "
          f"domains {manifest['domains']}; "
          + ", ".join(f"{s} {splits[s]['documents']} documents / {splits[s]['tokens']} tokens"
                      for s in shards.SPLITS)
          + (f"; skipped {len(manifest['skipped_files'])} bad files"
             if manifest["skipped_files"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
