"""Scores a token sequence under a workdir's model: log p(token | tokens before it).

  python scripts/score.py --workdir=workdirs/default --text="Hello world"
  python scripts/score.py --workdir=workdirs/imported --ids=1,72,101 --json

Restores the latest intact checkpoint read-only (or --step), runs one
deterministic forward pass with MoE layers dropless and the loss-free selection
biases applied, and prints one line per scored token (or, with --json, an
object with `ids`, `logprobs` = log p(ids[i] | ids[:i]) for i = 1..n-1, and
`total`). --text is encoded with the workdir's tokenizer (its tokenizer.json
or tokenizer.model, else the run's DataConfig.tokenizer). Exit status 2
when the workdir has no checkpoint, an id is outside the vocabulary, or there
are fewer than 2 tokens.
"""

from __future__ import annotations

import json
import sys

from experiments.inference import score as score_lib
from experiments.inference.tokenizer import workdir_tokenizer
from experiments.runtime import cli


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        cli.fail(f"--ids must be comma-separated integers, got {text!r}")


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workdir", required=True, help="A training or imported workdir.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ids", help="Comma-separated token ids, e.g. 1,72,101.")
    source.add_argument("--text", help="Text, encoded with the workdir's tokenizer.")
    parser.add_argument("--step", type=int, default=None,
                        help="Checkpoint step (default: the latest intact one).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args(argv)
    ids = _parse_ids(args.ids) if args.ids is not None else None
    scorer = score_lib.load_scorer(args.workdir, args.step)
    if ids is None:
        ids = workdir_tokenizer(args.workdir).encode(args.text)
    scores = score_lib.score(scorer, ids)
    if args.json:
        print(json.dumps(scores.as_dict()))
        return 0
    for i, (token, logprob) in enumerate(zip(scores.ids[1:], scores.logprobs), start=1):
        print(f"{i}\t{token}\t{logprob:.6f}")
    print(f"total\t{scores.total:.6f}\t({len(scores.logprobs)} tokens, step {scorer.step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
