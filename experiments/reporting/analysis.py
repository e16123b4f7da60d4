"""Routing analysis on domain x expert count matrices, and plots.

A count matrix `C[d, e]` holds how many tokens of domain d were assigned to
expert e (a token routed to k experts counts k times).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments.runtime import paths
from moe import balance


def _check_counts(counts: Any) -> np.ndarray:
    c = np.asarray(counts, np.float64)
    if c.ndim != 2:
        raise ValueError(f"counts must be a [domains, experts] matrix, got shape {c.shape}")
    if np.any(c < 0) or not np.all(np.isfinite(c)):
        raise ValueError("counts must be finite and non-negative")
    return c


def routing_fractions(counts: Any) -> np.ndarray:
    """`[D, E]`: per domain, the share of its assignments each expert got (rows sum to 1;
    a domain with no tokens gets a zero row)."""
    c = _check_counts(counts)
    totals = c.sum(axis=1, keepdims=True)
    return np.divide(c, totals, out=np.zeros_like(c), where=totals > 0)


def mutual_information(counts: Any) -> float:
    """I(domain; expert) in nats of the joint distribution `counts / counts.sum()`.

    0 when routing is independent of the domain; log(min(D, E)) at most, reached
    e.g. by a perfectly specialised square matrix.
    """
    c = _check_counts(counts)
    total = c.sum()
    if total == 0:
        return 0.0
    joint = c / total
    p_domain = joint.sum(axis=1, keepdims=True)
    p_expert = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    ratio = joint[nz] / (p_domain @ p_expert)[nz]
    return float(max(np.sum(joint[nz] * np.log(ratio)), 0.0))


def max_violation(expert_counts: Any) -> float:
    """`moe.balance.max_violation` of a `[E]` count vector, as a Python float."""
    c = np.asarray(expert_counts, np.float32)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"expert_counts must be a non-empty vector, got shape {c.shape}")
    return float(balance.max_violation(jnp.asarray(c)))


def layer_report(counts: Any, domains: Sequence[str]) -> dict[str, Any]:
    """JSON-able summary of one layer's domain x expert counts."""
    c = _check_counts(counts)
    if len(domains) != c.shape[0]:
        raise ValueError(f"{len(domains)} domain names for {c.shape[0]} count rows")
    expert_totals = c.sum(axis=0)
    return {
        "domains": list(domains),
        "counts": c.tolist(),
        "routing_fractions": routing_fractions(c).tolist(),
        "expert_load": (expert_totals / max(expert_totals.sum(), 1.0)).tolist(),
        "mutual_information_nats": mutual_information(c),
        "mutual_information_bits": mutual_information(c) / np.log(2.0),
        "max_violation": max_violation(expert_totals),
        "max_violation_per_domain": {d: max_violation(row) for d, row in zip(domains, c)},
    }


def plot_heatmap(counts: Any, domains: Sequence[str], title: str, path: paths.PathLike,
                 label: str = "fraction of domain's assignments") -> None:
    """Domain x expert heat map of routing fractions, saved as PNG (`label`: the colour
    bar's; Soft MoE passes its combine-weight mass as counts)."""
    # A bare Figure (no pyplot): saving needs no backend, and the caller's (a Jupyter
    # kernel's inline one) is left alone.
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    fractions = routing_fractions(counts)
    num_domains, num_experts = fractions.shape
    fig = Figure(figsize=(max(4.0, 0.35 * num_experts + 2), 0.6 * num_domains + 1.6))
    ax = fig.subplots()
    image = ax.imshow(fractions, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_yticks(range(num_domains), labels=list(domains))
    ax.set_xticks(range(num_experts))
    ax.tick_params(axis="x", labelsize=6 if num_experts > 16 else 9)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    save_png(fig, path)


def plot_loss_curves(records: Sequence[dict[str, Any]], path: paths.PathLike,
                     entropy_nats: float | None = None) -> None:
    """Train and validation loss against step from `metrics.jsonl` records."""
    # A bare Figure (no pyplot): saving needs no backend, and the caller's (a Jupyter
    # kernel's inline one) is left alone.
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    train = [r for r in records if r.get("split") == "train" and "ce" in r]
    valid = [r for r in records if r.get("split") == "valid" and "loss" in r]
    if train:
        ax.plot([r["step"] for r in train], [r["ce"] for r in train], lw=0.8, label="train CE")
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid CE")
        for name in sorted({k for r in valid for k in r if k.endswith("/loss")}):
            points = [r for r in valid if name in r]
            ax.plot([r["step"] for r in points], [r[name] for r in points], "--",
                    label=f"valid {name.removesuffix('/loss')}")
    if entropy_nats is not None:
        ax.axhline(entropy_nats, color="gray", ls=":", label="byte unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig: Any, path: paths.PathLike) -> None:
    """`fig` as a PNG file at `path` (local or `gs://`, written whole)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    paths.write_bytes(path, buffer.getvalue())
