"""The end-of-run summary: a JSON-able dict and its plain-text rendering."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments.reporting.metrics import load_fractions
from moe import balance


class DomainLossWindow:
    """Token-weighted train loss per domain over the last `window` steps."""

    def __init__(self, domains: list[str], window: int):
        self.domains = domains
        self.window = window
        self._ce: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []

    def add(self, ce_sum: np.ndarray, tokens: np.ndarray) -> None:
        self._ce.append(np.asarray(ce_sum, np.float64))
        self._tokens.append(np.asarray(tokens, np.float64))
        del self._ce[:-self.window], self._tokens[:-self.window]

    def losses(self) -> dict[str, float]:
        if not self._ce:
            return {}
        ce, tokens = sum(self._ce), sum(self._tokens)
        out = {d: float(ce[i] / tokens[i]) for i, d in enumerate(self.domains) if tokens[i] > 0}
        if tokens.sum() > 0:
            out["all"] = float(ce.sum() / tokens.sum())
        return out


class DroppedMean:
    """Mean dropped fraction per MoE layer over the train steps of this run."""

    def __init__(self):
        self._sums: dict[str, float] = {}
        self._steps = 0

    def add(self, layer_stats: dict[str, Any]) -> None:
        self._steps += 1
        for layer, stats in layer_stats.items():
            if getattr(stats, "dropped_fraction", None) is not None:
                self._sums[layer] = self._sums.get(layer, 0.0) + float(stats.dropped_fraction)

    def means(self) -> dict[str, float]:
        return {layer: total / self._steps for layer, total in self._sums.items()}


def render(summary: dict[str, Any]) -> str:
    """Human-readable text of `summary` (see `Trainer._summary`)."""
    nats_to_bits = 1.0 / math.log(2.0)
    lines = [f"=== training summary (step {summary['step']}) ==="]
    entropy = summary.get("unigram_entropy")
    if entropy:
        lines.append(f"corpus byte unigram entropy: {entropy['nats_per_byte']:.4f} nats/byte "
                     f"= {entropy['bits_per_byte']:.4f} bits/byte")
    lines.append(f"{'domain':<12} {'train nats':>11} {'train bits':>11} {'valid nats':>11} "
                 f"{'valid bits':>11}")
    train, valid = summary.get("train_loss", {}), summary.get("valid_loss", {})
    for domain in [*summary["domains"], "all"]:
        t, v = train.get(domain), valid.get(domain)
        cells = [f"{x:>11.4f}" if x is not None else f"{'-':>11}"
                 for x in (t, None if t is None else t * nats_to_bits,
                           v, None if v is None else v * nats_to_bits)]
        lines.append(f"{domain:<12} {' '.join(cells)}")
    if summary.get("tokenizer") != "byte" and entropy:
        lines.append("(losses are per token; the unigram entropy is per byte)")
    for layer, info in summary.get("moe", {}).items():
        load = " ".join(f"{x:.3f}" for x in info["load"])
        train = info.get("train_dropped_fraction")
        dropped = (f"dropped {info['dropped_fraction']:.4f}" if train is None else
                   f"dropped train {train:.4f} valid {info['dropped_fraction']:.4f}")
        lines.append(f"{layer}: expert load [{load}] {dropped} "
                     f"MaxVio {info['max_violation']:.3f}")
    if "wall_time_s" in summary:
        lines.append(f"wall time {summary['wall_time_s']:.1f} s for {summary['steps_this_run']} "
                     f"steps in this run; {summary['tokens_seen']:,} tokens seen in all "
                     f"{summary['step']} steps")
    lines.append("workdir:")
    for name, path in summary["paths"].items():
        lines.append(f"  {name:<16} {path}")
    return "\n".join(lines)


def moe_summary(expert_counts: dict[str, np.ndarray], dropped: dict[str, float], *,
                train_dropped: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Per MoE layer: validation expert load shares, dropped fraction and MaxVio of
    the counts, and (given `train_dropped`) the mean dropped fraction in training."""
    out = {}
    for layer, counts in expert_counts.items():
        out[layer] = {"load": load_fractions(counts).tolist(),
                      "dropped_fraction": float(dropped.get(layer, 0.0)),
                      "max_violation": float(balance.max_violation(jnp.asarray(counts)))}
        if train_dropped is not None and layer in train_dropped:
            out[layer]["train_dropped_fraction"] = float(train_dropped[layer])
    return out
