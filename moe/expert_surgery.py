"""Expert pruning and merging on one MoE layer's parameters (pure numpy/JAX, no Flax).

A MoE layer's parameter subtree is `{"router": {"kernel": [d, E], "bias"?: [E]},
"experts": {"wi": [E, d, f], "wi_gate"?: [E, d, f], "wo": [E, f, d]}, ...}`
(shared experts and the shared gate are left as they are). The loss-free
selection bias of the layer, when the run has one, is a `[E]` vector beside it.

  prune_layer   keeps the experts `keep` (in their original order): expert
                slices, router columns, router-bias and selection-bias entries.
  merge_layer   one expert per group: the members' weights averaged with
                weights proportional to their routing frequency; the router
                either combines the members' columns into one (`combine`, E'
                experts) or keeps every column and gives each member the
                merged weights (`alias`, E slots, E' distinct experts; exact
                when the members are identical).

How the experts to keep or the groups are chosen (frequency, random, UNCURL's
spectral clustering of router-logit similarity, MC-SMoE's dominant experts)
is below; docs/surgery.md has the formulas and the choices we made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moe.expert_stats import RoutingStats

PRUNE_METHODS = ("uncurl", "frequency", "random")
MERGE_WEIGHTINGS = ("frequency_weighted", "uniform")
GROUPINGS = ("spectral", "dominant")
ROUTER_MERGES = ("combine", "alias")
_EXPERT_LEAVES = ("wi", "wi_gate", "wo")
_ROUTER_LEAVES = ("kernel", "bias")


def _num_experts(layer: Mapping[str, Any]) -> int:
    return int(np.shape(layer["router"]["kernel"])[-1])


def _check_layer(layer: Mapping[str, Any]) -> int:
    if "router" not in layer or "experts" not in layer:
        raise ValueError(f"not a MoE layer's parameters: keys {sorted(layer)}")
    e = _num_experts(layer)
    unknown = [k for k in layer["router"] if k not in _ROUTER_LEAVES] + [
        k for k in layer["experts"] if k not in _EXPERT_LEAVES]
    if unknown:
        raise ValueError(f"expert surgery does not know the router/expert parameters {unknown}")
    for name, leaf in layer["experts"].items():
        if np.shape(leaf)[0] != e:
            raise ValueError(f"experts/{name} has {np.shape(leaf)[0]} experts, the router {e}")
    return e


def check_keep(keep: Sequence[int], num_experts: int) -> list[int]:
    kept = sorted(int(i) for i in keep)
    if not kept or len(set(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= num_experts:
        raise ValueError(f"keep must be distinct expert indices in [0, {num_experts}), got "
                         f"{list(keep)}")
    return kept


def prune_layer(layer: Mapping[str, Any], keep: Sequence[int],
                selection_bias: Any | None = None) -> tuple[dict[str, Any], Any | None]:
    """The layer with only the experts `keep` (sorted: order is never changed).

    -> (new layer subtree, new `[E']` selection bias or None).
    """
    e = _check_layer(layer)
    idx = np.asarray(check_keep(keep, e))
    out = dict(layer)
    out["experts"] = {k: np.asarray(v)[idx] for k, v in layer["experts"].items()}
    router = {"kernel": np.asarray(layer["router"]["kernel"])[..., idx]}
    if "bias" in layer["router"]:
        router["bias"] = np.asarray(layer["router"]["bias"])[idx]
    out["router"] = router
    bias = None if selection_bias is None else np.asarray(selection_bias)[idx]
    return out, bias


def check_groups(groups: Sequence[Sequence[int]], num_experts: int) -> list[list[int]]:
    """Groups that partition range(E), each sorted, ordered by their first member."""
    groups = [sorted(int(i) for i in g) for g in groups]
    flat = sorted(i for g in groups for i in g)
    if any(not g for g in groups) or flat != list(range(num_experts)):
        raise ValueError(f"groups must partition the experts 0..{num_experts - 1} (each exactly "
                         f"once, no empty group), got {groups}")
    return sorted(groups, key=lambda g: g[0])


def merge_coefficients(group: Sequence[int], frequency: np.ndarray | None) -> np.ndarray:
    """`[|g|]` averaging weights: f_i / sum f (uniform when frequency is None or sums to 0)."""
    if frequency is None:
        return np.full(len(group), 1.0 / len(group))
    f = np.asarray(frequency, np.float64)[list(group)]
    return f / f.sum() if f.sum() > 0 else np.full(len(group), 1.0 / len(group))


def merge_layer(layer: Mapping[str, Any], groups: Sequence[Sequence[int]],
                frequency: np.ndarray | None = None, selection_bias: Any | None = None,
                router: str = "combine") -> tuple[dict[str, Any], Any | None]:
    """One expert per group: W_g = sum_{i in g} c_i W_i with c = `merge_coefficients`
    (wi, wi_gate, wo separately).

    router "combine": E' = len(groups) experts; router column, router bias and
    selection bias of group g are the same c-weighted average of the members'.
    router "alias": E slots kept; every member gets W_g, router and biases unchanged.
    -> (new layer subtree, new selection bias or None).
    """
    if router not in ROUTER_MERGES:
        raise ValueError(f"router must be one of {ROUTER_MERGES}, got {router!r}")
    e = _check_layer(layer)
    groups = check_groups(groups, e)
    coef = [merge_coefficients(g, frequency) for g in groups]

    def average(stack: Any, axis: int) -> np.ndarray:
        a = np.moveaxis(np.asarray(stack), axis, 0)
        merged = np.stack([np.tensordot(c, a[g], axes=1) for g, c in zip(groups, coef)])
        return np.moveaxis(merged, 0, axis).astype(a.dtype)

    merged_experts = {k: average(v, 0) for k, v in layer["experts"].items()}
    out = dict(layer)
    if router == "alias":
        slot = np.empty(e, np.int64)
        for gi, g in enumerate(groups):
            slot[g] = gi
        out["experts"] = {k: v[slot] for k, v in merged_experts.items()}
        return out, None if selection_bias is None else np.asarray(selection_bias)
    out["experts"] = merged_experts
    new_router = {"kernel": average(layer["router"]["kernel"], -1)}
    if "bias" in layer["router"]:
        new_router["bias"] = average(layer["router"]["bias"], 0)
    out["router"] = new_router
    return out, None if selection_bias is None else average(selection_bias, 0)


# ---------------------------------------------------------------------------
# Choosing what to keep or merge.


def frequency_keep(stats: RoutingStats, keep: int) -> list[int]:
    """The `keep` most-used experts (ties: lower index first)."""
    counts = np.asarray(stats.counts, np.float64)
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    return sorted(order[:keep])


def random_keep(num_experts: int, keep: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(num_experts, size=keep, replace=False).tolist())


def logit_affinity(stats: RoutingStats) -> np.ndarray:
    """`[E, E]` A_ij = max(0, cos(z_:,i, z_:,j)) of the router-logit columns, A_ii = 1."""
    a = np.maximum(stats.logit_cosine, 0.0)
    np.fill_diagonal(a, 1.0)
    return a


def spectral_clusters(affinity: np.ndarray, n_clusters: int, seed: int = 0,
                      iterations: int = 100) -> list[list[int]]:
    """Normalised spectral clustering (Ng, Jordan, Weiss) into exactly `n_clusters`
    non-empty groups: the `n_clusters` eigenvectors of the smallest eigenvalues of
    L = I - D^-1/2 A D^-1/2, rows normalised, then k-means with farthest-point
    initialisation (deterministic given `seed`); an emptied cluster takes the
    point farthest from its centre."""
    a = np.asarray(affinity, np.float64)
    e = a.shape[0]
    if not 1 <= n_clusters <= e:
        raise ValueError(f"n_clusters must be in [1, {e}], got {n_clusters}")
    degree = np.maximum(a.sum(axis=1), 1e-12)
    inv = 1.0 / np.sqrt(degree)
    laplacian = np.eye(e) - inv[:, None] * a * inv[None, :]
    _, vectors = np.linalg.eigh(laplacian)
    u = vectors[:, :n_clusters]
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centres = [u[int(rng.integers(e))]]
    while len(centres) < n_clusters:
        dist = np.min([np.sum((u - c) ** 2, axis=1) for c in centres], axis=0)
        centres.append(u[int(np.argmax(dist))])
    centres = np.stack(centres)
    labels = np.full(e, -1)
    for _ in range(iterations):
        new = np.argmin(((u[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        for c in range(n_clusters):  # keep every cluster non-empty
            if not np.any(new == c):
                d = ((u - centres[new]) ** 2).sum(-1)
                d[[i for i in range(e) if np.sum(new == new[i]) < 2]] = -1.0
                new[int(np.argmax(d))] = c
        if np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([u[labels == c].mean(axis=0) for c in range(n_clusters)])
    return sorted(([int(i) for i in np.flatnonzero(labels == c)] for c in range(n_clusters)),
                  key=lambda g: g[0])


def uncurl_keep(stats: RoutingStats, keep: int, seed: int = 0,
                ) -> tuple[list[int], list[list[int]]]:
    """UNCURL-style task-aware pruning: spectral clusters of the logit affinity
    (`logit_affinity`) into `keep` groups; each group keeps its most-used member
    on the task (ties: lower index). -> (kept experts, clusters)."""
    clusters = spectral_clusters(logit_affinity(stats), keep, seed)
    counts = np.asarray(stats.counts, np.float64)
    kept = [min(g, key=lambda i: (-counts[i], i)) for g in clusters]
    return sorted(kept), clusters


def dominant_groups(stats: RoutingStats, n_groups: int) -> list[list[int]]:
    """MC-SMoE grouping: the `n_groups` most-used experts are centres; every other
    expert joins the centre whose router-logit column is most similar (cosine)."""
    centres = frequency_keep(stats, n_groups)
    cos = stats.logit_cosine
    groups = {c: [c] for c in centres}
    for i in range(stats.num_experts):
        if i not in groups:
            best = max(centres, key=lambda c: (cos[i, c], -c))
            groups[best].append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def spectral_groups(stats: RoutingStats, n_groups: int, seed: int = 0) -> list[list[int]]:
    """UNCURL's clusters used as merge groups."""
    return spectral_clusters(logit_affinity(stats), n_groups, seed)
