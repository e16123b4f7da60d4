"""Balanced k-means and the agreement of a clustering with labels.

Balanced k-means (as c-BTM clusters its corpus, so every branch gets an equal share of
the documents): Lloyd iterations whose assignment step gives every cluster
`floor(n / k)` or `floor(n / k) + 1` documents. The assignment is greedy by distance:
all (document, cluster) pairs in increasing squared distance (ties: document, then
cluster index), each document taking the first cluster that still has room; once
`n mod k` clusters hold `floor(n / k) + 1`, the others are capped at `floor(n / k)`.
Initial centres: k-means++ from a seeded generator. Deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def squared_distances(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """`[N, k] float64` ||x_i - c_j||^2 of `x [N, D]` and `centres [k, D]`."""
    x, centres = x.astype(np.float64), centres.astype(np.float64)
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.maximum(d, 0.0)


def balanced_assign(distances: np.ndarray) -> np.ndarray:
    """`[N] int` the greedy balanced assignment of the module docstring (`distances [N, k]`)."""
    n, k = distances.shape
    floor, extra = divmod(n, k)
    order = np.lexsort((np.tile(np.arange(k), n), np.repeat(np.arange(n), k),
                        distances.reshape(-1)))
    assign = np.full(n, -1, np.int64)
    sizes = np.zeros(k, np.int64)
    full_at_extra = 0  # clusters that reached floor + 1
    for flat in order:
        i, j = divmod(int(flat), k)
        if assign[i] >= 0:
            continue
        if sizes[j] > floor or (sizes[j] == floor and full_at_extra == extra):
            continue  # full
        assign[i] = j
        sizes[j] += 1
        if sizes[j] == floor + 1:
            full_at_extra += 1
    return assign


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = squared_distances(x, np.stack(centres)).min(1)
        total = d.sum()
        pick = rng.choice(len(x), p=d / total) if total > 0 else rng.integers(len(x))
        centres.append(x[pick])
    return np.stack(centres).astype(np.float64)


def balanced_kmeans(x: np.ndarray, k: int, *, seed: int, max_iterations: int = 50,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Balanced k-means of `x [N, D]`: (centres `[k, D] float32`, assignment `[N] int64`).

    Stops when the assignment no longer changes or after `max_iterations` updates.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"--clusters must be an int >= 1, got {k!r}")
    if k > len(x):
        raise ValueError(f"--clusters {k} > the {len(x)} documents to cluster: every "
                         f"cluster needs at least one document")
    rng = np.random.default_rng(seed)
    centres = _kmeans_plus_plus(x.astype(np.float64), k, rng)
    assign = balanced_assign(squared_distances(x, centres))
    for _ in range(max_iterations):
        centres = np.stack([x[assign == j].mean(0) for j in range(k)]).astype(np.float64)
        new = balanced_assign(squared_distances(x, centres))
        if np.array_equal(new, assign):
            break
        assign = new
    return centres.astype(np.float32), assign


def contingency(labels: Sequence[int], clusters: Sequence[int], num_labels: int,
                num_clusters: int, counts: Sequence[int] | None = None) -> np.ndarray:
    """`[num_labels, num_clusters] int64` the number (or the sum of `counts`) of items
    per (label, cluster) pair."""
    table = np.zeros((num_labels, num_clusters), np.int64)
    np.add.at(table, (np.asarray(labels, np.int64), np.asarray(clusters, np.int64)),
              1 if counts is None else np.asarray(counts, np.int64))
    return table


def purity(table: np.ndarray) -> float:
    """Share of items whose cluster's majority label is their own."""
    return float(table.max(0).sum() / table.sum())


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(table: np.ndarray) -> float:
    n = table.sum()
    a, b = table.sum(1), table.sum(0)
    nz = table > 0
    outer = np.outer(a, b)
    return float((table[nz] / n * np.log(n * table[nz] / outer[nz])).sum())


def normalized_mutual_information(table: np.ndarray) -> float:
    """MI / mean(H(labels), H(clusters)) (no chance correction: usable on weighted
    tables, e.g. bytes); 1.0 when both are a single block."""
    h = (_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2.0
    return 1.0 if h == 0.0 else float(mutual_information(table) / h)


def expected_mutual_information(table: np.ndarray) -> float:
    """E[MI] of two clusterings with the table's margins under random permutation
    (Vinh et al. 2010), the correction term of the adjusted mutual information."""
    n = int(table.sum())
    a, b = table.sum(1).astype(int), table.sum(0).astype(int)
    lg = [math.lgamma(i + 1) for i in range(n + 1)]
    emi = 0.0
    for ai in a:
        for bj in b:
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                term = nij / n * math.log(n * nij / (ai * bj))
                log_p = (lg[ai] + lg[bj] + lg[n - ai] + lg[n - bj] - lg[n] - lg[nij]
                         - lg[ai - nij] - lg[bj - nij] - lg[n - ai - bj + nij])
                emi += term * math.exp(log_p)
    return emi


def adjusted_mutual_information(table: np.ndarray) -> float:
    """AMI with the arithmetic-mean normaliser (scikit-learn's default): 1 for identical
    partitions, ~0 for independent ones; 1.0 when both are a single block."""
    h_labels, h_clusters = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_labels == 0.0 and h_clusters == 0.0:
        return 1.0
    emi = expected_mutual_information(table)
    denominator = (h_labels + h_clusters) / 2.0 - emi
    if abs(denominator) < 1e-15:
        return 0.0
    return float((mutual_information(table) - emi) / denominator)
