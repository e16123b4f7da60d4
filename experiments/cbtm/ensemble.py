"""The c-BTM sparse ensemble's validation loss.

For a context h (here: the first `prefix_tokens` tokens of a packed segment, decoded
to text) with features e(h) (`experiments.cbtm.features`, the clustering's fitted
featuriser) and cluster centres c_1..c_k:

    w_j(h) ∝ exp(-||e(h) - c_j||² / T)   for the top_k clusters nearest to e(h),
    w_j(h) = 0                            for the others (renormalised to sum to 1),
    p(x_t | x_<t) = Σ_j w_j(h) p_j(x_t | x_<t),

with p_j the branch trained on cluster j. Only the tokens after the prefix are scored
(t >= prefix_tokens within the segment: the prefix is context the weights already saw),
and every model and ensemble is scored on exactly those tokens. With `prefix_tokens=0`
the context is empty (e(h) = 0) and every real token is scored. With one cluster the
ensemble is the single model (w = 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.cbtm import kmeans
from experiments.cbtm.clusters import CLUSTERS_FILE, SOURCE_PREFIX, Clustering, parse_cluster_argument


def ensemble_weights(features: np.ndarray, centres: np.ndarray, *, top_k: int,
                     temperature: float) -> np.ndarray:
    """`[N, k] float64` the weights above for `features [N, D]`, `centres [k, D]`.
    Ties in distance keep the lower cluster index."""
    k = centres.shape[0]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= k:
        raise ValueError(f"--top_k {top_k!r} must be in 1..{k} (the clustering's "
                         f"{k} clusters)")
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    logits = -kmeans.squared_distances(features, centres) / temperature
    order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    kept = np.take_along_axis(logits, order, axis=1)
    kept = np.exp(kept - kept.max(1, keepdims=True))
    weights = np.zeros_like(logits)
    np.put_along_axis(weights, order, kept / kept.sum(1, keepdims=True), axis=1)
    return weights


@dataclasses.dataclass(frozen=True)
class Contexts:
    """The segments of the validation batches and what is scored.

    segment_of: per batch `[B, S] int64` the token's context index (-1: padding).
    scored: per batch `[B, S] bool` the tokens scored (real, after the prefix).
    texts: the decoded prefix of each context.
    """

    segment_of: list[np.ndarray]
    scored: list[np.ndarray]
    texts: list[str]


def contexts(batches: Sequence[dict[str, np.ndarray]], decode: Any,
             prefix_tokens: int) -> Contexts:
    """Splits every packed row into its segments; `decode(ids) -> str`."""
    if prefix_tokens < 0:
        raise ValueError(f"--prefix_tokens must be >= 0, got {prefix_tokens}")
    segment_of, scored, texts = [], [], []
    for batch in batches:
        seg, pos = batch["segment_ids"], batch["positions"]
        index = np.full(seg.shape, -1, np.int64)
        for row in range(seg.shape[0]):
            for s in np.unique(seg[row][seg[row] > 0]):
                where = seg[row] == s
                index[row][where] = len(texts)
                prefix = batch["inputs"][row][where & (pos[row] < prefix_tokens)]
                texts.append(decode([int(t) for t in prefix]))
        segment_of.append(index)
        scored.append((batch["weights"] > 0) & (pos >= prefix_tokens) & (index >= 0))
    return Contexts(segment_of, scored, texts)


def target_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`[B, S] float64` log softmax(logits)[target] of `logits [B, S, V]`."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return np.take_along_axis(logits, targets[..., None].astype(np.int64), -1)[..., 0] - log_z


def mixture_logprobs(branch_logprobs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`[...]` log Σ_j w_j p_j of `branch_logprobs [k, ...]` and `weights [..., k]`."""
    with np.errstate(divide="ignore"):
        log_w = np.log(np.moveaxis(weights, -1, 0))
    terms = log_w + branch_logprobs
    top = terms.max(0)
    return top + np.log(np.exp(terms - top).sum(0))


def domain_losses(nll: Sequence[np.ndarray], scored: Sequence[np.ndarray],
                  domain: Sequence[np.ndarray], domains: Sequence[str]) -> dict[str, float]:
    """Mean negative log-likelihood per domain and over all scored tokens."""
    nll_all = np.concatenate([x[m] for x, m in zip(nll, scored)])
    dom_all = np.concatenate([d[m] for d, m in zip(domain, scored)])
    out = {name: float(nll_all[dom_all == i].mean()) for i, name in enumerate(domains)
           if (dom_all == i).any()}
    out["all"] = float(nll_all.mean()) if len(nll_all) else float("nan")
    return out


def check_branch_sources(clustering: Clustering, sources: Sequence[str]) -> None:
    """Branch j must have trained on cluster j of this clustering when it trained on a
    cluster at all (a branch on the whole source, e.g. the dense baseline, is allowed
    with one cluster)."""
    k = clustering.num_clusters
    if len(sources) != k:
        raise ValueError(f"--branch given {len(sources)} workdirs, --clusters "
                         f"{str(clustering.directory)!r} has {k} clusters: give one branch "
                         f"per cluster, in cluster order")
    for j, source in enumerate(sources):
        if not source.startswith(SOURCE_PREFIX):
            if k > 1:
                raise ValueError(f"--branch #{j} trained on {source!r}, not on cluster {j} "
                                 f"('cluster:<dir>:{j}')")
            continue
        directory, index = parse_cluster_argument(source[len(SOURCE_PREFIX):])
        same_dir = Path(directory).resolve() == clustering.directory.resolve() or (
            (Path(directory) / CLUSTERS_FILE).is_file() and
            (Path(directory) / CLUSTERS_FILE).read_bytes() ==
            (clustering.directory / CLUSTERS_FILE).read_bytes())
        if index != j or not same_dir:
            raise ValueError(f"--branch #{j} trained on {source!r}, not on cluster {j} of "
                             f"--clusters {str(clustering.directory)!r}")
