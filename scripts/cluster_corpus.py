"""Clusters a corpus for c-BTM: tf-idf + SVD (or a model's mean hidden state), balanced k-means.

  python scripts/cluster_corpus.py --source=embedded --clusters=4 --seed=0 \
      --out=workdirs/clusters/k4_seed0

Fits on the source's train split; writes clusters.json (settings, sizes, agreement
with the domain labels), centres.npy, tfidf.npz (hidden.json with --features
hidden:<workdir>) and assignment.jsonl (every document of both splits and its
cluster) atomically into --out, which must not exist. The same flags give the same
clustering. A branch then trains on one cluster with
DataConfig.source = 'cluster:<out>:<i>' (docs/cbtm.md). Exit status 2 on bad input.
"""

from __future__ import annotations

import json
import sys

from experiments.cbtm.clusters import ClusterSpec, cluster_corpus
from experiments.data import corpus
from experiments.runtime import cli


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{name} must be >= 1, got {value}")


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--source", default="embedded",
                        help="Text source: embedded, text:<glob>, jsonl:<path>.")
    parser.add_argument("--clusters", type=int, required=True, help="Number of clusters k.")
    parser.add_argument("--out", required=True, help="New clustering directory.")
    parser.add_argument("--seed", type=int, default=0, help="k-means++ and SVD seed.")
    parser.add_argument("--features", default="tfidf",
                        help="tfidf, or hidden:<workdir> (the run's mean final hidden state).")
    parser.add_argument("--hidden_tokens", type=int, default=128,
                        help="hidden: tokens of each document embedded.")
    parser.add_argument("--max_features", type=int, default=4096, help="tf-idf vocabulary.")
    parser.add_argument("--svd_dims", type=int, default=64, help="Feature dimensions D.")
    parser.add_argument("--validation_fraction", type=float,
                        default=corpus.DEFAULT_VALIDATION_FRACTION,
                        help="As DataConfig.validation_fraction of the branch runs.")
    parser.add_argument("--max_bytes_per_domain", type=int,
                        default=corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
                        help="As DataConfig.max_bytes_per_domain (embedded corpus).")
    parser.add_argument("--cache_dir", default=None, help="Embedded-corpus cache.")
    args = parser.parse_args(argv)
    for name in ("clusters", "max_features", "svd_dims", "max_bytes_per_domain"):
        _positive(name, getattr(args, name))
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    spec = ClusterSpec(source=args.source, num_clusters=args.clusters, seed=args.seed,
                       max_features=args.max_features, svd_dims=args.svd_dims,
                       validation_fraction=args.validation_fraction,
                       max_bytes_per_domain=args.max_bytes_per_domain,
                       features=args.features, hidden_tokens=args.hidden_tokens)
    meta = cluster_corpus(spec, args.out, cache_dir=args.cache_dir)
    agreement = {split: {k: round(v, 4) for k, v in a.items() if isinstance(v, float)}
                 for split, a in meta["agreement"].items()}
    print(json.dumps({"out": args.out, "sizes": meta["sizes"], "agreement": agreement}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
