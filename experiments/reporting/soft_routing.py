"""The routing analysis of a Soft MoE layer: soft domain x expert matrices and the
dispatch concentration (`moe.soft_stats`; docs/conditional_compute.md, "Routing
statistics of Soft MoE").

Hard routing's counts become the combine-weight mass: `mass[d, e]` = the sum over
domain d's real tokens of the combine weights on expert e's slots (each token
spreads a mass of 1). The routing fractions, expert load and I(domain; expert)
are computed from this matrix exactly as `experiments.reporting.analysis` does from
counts; every key that is soft says so (`soft_...`). MaxVio has no soft analogue:
each expert processes exactly p slots per sequence, so the compute is balanced
by construction; the report gives the imbalance of the soft load instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.reporting import analysis
from moe.soft_stats import SoftRoutingStats


def soft_layer_report(per_domain: Sequence[SoftRoutingStats], all_tokens: SoftRoutingStats,
                      domains: Sequence[str]) -> dict[str, Any]:
    """JSON-able summary of one Soft MoE layer: `per_domain[d]` from the pass over
    domain d's tokens, `all_tokens` from one pass over all of them (the dispatch
    concentration is measured on the sequences as the model runs them)."""
    if len(domains) != len(per_domain):
        raise ValueError(f"{len(domains)} domain names for {len(per_domain)} domain passes")
    mass = np.stack([np.asarray(s.combine_mass, np.float64) for s in per_domain])
    load = all_tokens.soft_load
    mean = load.mean() if load.size else 0.0
    mi = analysis.mutual_information(mass)
    return {
        "soft": True,
        "note": ("Soft MoE: no per-token expert choices. 'soft_*' quantities come from the "
                 "combine weights (each token's mass of 1 spread over the experts' slots); "
                 "dispatch_* from the dispatch weights (softmax over a sequence's tokens per "
                 "slot). Every expert processes p slots per sequence: no hard load or MaxVio."),
        "domains": list(domains),
        "soft_combine_mass": mass.tolist(),
        "soft_routing_fractions": analysis.routing_fractions(mass).tolist(),
        "soft_expert_load": load.tolist(),
        "soft_load_imbalance": float(load.max() / mean - 1.0) if mean > 0 else 0.0,
        "soft_mutual_information_nats": mi,
        "soft_mutual_information_bits": mi / np.log(2.0),
        "combine_effective_slots": all_tokens.combine_effective_slots,
        "dispatch_effective_tokens_per_slot": all_tokens.effective_tokens_per_slot.tolist(),
        "dispatch_effective_token_fraction": all_tokens.effective_token_fraction.tolist(),
        "dispatch_top_token_weight": all_tokens.top_dispatch_weight.tolist(),
        "num_tokens": float(all_tokens.num_tokens),
    }


def summary_line(layer: str, info: dict[str, Any]) -> str:
    """One console line for `scripts/analyze_routing.py`."""
    fractions = ", ".join(f"{d}: {max(row):.2f}" for d, row in
                          zip(info["domains"], info["soft_routing_fractions"]))
    eff = np.mean(info["dispatch_effective_tokens_per_slot"])
    return (f"{layer} (Soft MoE, soft assignments): I(domain; expert) = "
            f"{info['soft_mutual_information_bits']:.4f} bits, soft-load imbalance = "
            f"{info['soft_load_imbalance']:.3f}, top expert soft share per domain "
            f"({fractions}), effective tokens per slot = {eff:.2f}, effective slots per "
            f"token = {info['combine_effective_slots']:.2f}")
