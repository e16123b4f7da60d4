"""The c-BTM sparse ensemble's validation loss per domain.

  python scripts/ensemble_eval.py --clusters=workdirs/clusters/k4_seed0 \
      --branch=workdirs/b0 --branch=workdirs/b1 --branch=workdirs/b2 --branch=workdirs/b3 \
      --top_k=1,2,4 --temperature=0.1 --prefix_tokens=32 --json=workdirs/ens_k4.json

--branch j is the run trained on cluster j (DataConfig.source = 'cluster:<dir>:j'); one
cluster with one run trained on the whole source is the single model. Per packed
segment of the clustered source's validation split, the first --prefix_tokens tokens
choose the weights (softmax of -||e - c_j||²/T over the --top_k nearest centres) and
the remaining tokens are scored under the mixture of the branches' next-token
probabilities. Prints (and with --json writes atomically) the ensemble's loss for
each --top_k and each branch's own loss on the same tokens. Exit status 2 on bad input.
See docs/cbtm.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments.cbtm.evaluate import EnsembleSpec, evaluate_ensemble
from experiments.data.files import write_atomically
from experiments.runtime import cli


def _top_k(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--top_k must be comma-separated ints, got {text!r}") from None
    return values


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clusters", required=True, help="Clustering directory.")
    parser.add_argument("--branch", action="append", required=True,
                        help="Branch workdir; one per cluster, in cluster order.")
    parser.add_argument("--top_k", default="1", help="Clusters kept per context, e.g. 1,2.")
    parser.add_argument("--temperature", type=float, default=0.1, help="T of the weights.")
    parser.add_argument("--prefix_tokens", type=int, default=32,
                        help="Tokens of each segment that choose its weights (not scored).")
    parser.add_argument("--eval_max_batches", type=int, default=None,
                        help="Validation batches (default: the runs' DataConfig).")
    parser.add_argument("--json", default=None, help="Write the result here (atomically).")
    args = parser.parse_args(argv)
    if args.eval_max_batches is not None and args.eval_max_batches < 1:
        raise ValueError(f"--eval_max_batches must be >= 1, got {args.eval_max_batches}")
    spec = EnsembleSpec(clusters=args.clusters, branches=tuple(args.branch),
                        top_k=_top_k(args.top_k), temperature=args.temperature,
                        prefix_tokens=args.prefix_tokens,
                        eval_max_batches=args.eval_max_batches)
    result = evaluate_ensemble(spec)
    text = json.dumps(result, indent=2)
    if args.json:
        write_atomically(Path(args.json), (text + "\n").encode("utf-8"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
