"""The parts of a sweep report that judge a paper's claims (`Sweep.claims`) and say how far
the sweep got, from the protocol's paired differences (`experiments.reporting.protocol`).

A claim `(variant, baseline)` reads "`variant` reaches a lower final validation loss than
`baseline`"; it is judged on the differences paired by seed at `threshold` standard
errors. Where the runs have routing analyses, the same pairs are compared on
I(domain; expert) of every MoE layer ("`variant` has more specialised experts").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from experiments.reporting import protocol

Record = dict[str, Any]


def status_lines(planned: Sequence[tuple[str, int]], records: Sequence[Record]) -> list[str]:
    """How far the sweep got: runs finished of `planned` `[(variant, seed)]`, and which
    of each variant's seeds are missing."""
    done = {(r["variant"], r["seed"]) for r in records}
    missing: dict[str, list[int]] = {}
    for variant, seed in planned:
        if (variant, seed) not in done:
            missing.setdefault(variant, []).append(seed)
    finished = sum(1 for run in planned if run in done)
    if not missing:
        return [f"**Runs finished: {finished} of {len(planned)} planned** (the sweep is complete).",
                ""]
    text = "; ".join(f"`{v}` seeds {seeds}" for v, seeds in missing.items())
    return [f"**Runs finished: {finished} of {len(planned)} planned.** Not run yet: {text}. "
            "Every number below comes from the finished runs only; the paired comparisons "
            "use the seeds both sides finished.", ""]


def _mi_records(records: Sequence[Record], layer: str) -> list[Record]:
    """Pseudo-records whose 'loss' is minus the layer's MI, so that `protocol.verdict`'s
    "lower" reads "more specialised"."""
    out = []
    for r in records:
        mi = r.get("routing", {}).get(layer, {}).get("mi_bits")
        if mi is not None and math.isfinite(mi):
            out.append({"variant": r["variant"], "seed": r["seed"], "workdir": r["workdir"],
                        "valid_loss": {"all": -float(mi)}})
    return out


def claim_lines(claims: Sequence[Sequence[str]], records: Sequence[Record],
                threshold: float) -> list[str]:
    """Markdown: one verdict per claim on the final validation loss, then (with routing
    analyses) the paired differences of I(domain; expert) per MoE layer."""
    variants = {r["variant"] for r in records}
    lines = [f"Paired by seed, mean ± standard error, judged at {threshold:g} standard errors "
             "(`experiments.reporting.protocol`).", ""]
    for variant, baseline in claims:
        claim = f"`{variant}` reaches a lower validation loss than `{baseline}`"
        if variant not in variants or baseline not in variants:
            lines.append(f"- {claim}: no runs of `{variant if variant not in variants else baseline}` "
                         "finished yet.")
            continue
        v = protocol.verdict(protocol.paired(records, variant, baseline), threshold)
        lines.append(f"- {claim}: {v.text()}")
    layers = sorted({layer for r in records for layer in r.get("routing", {})})
    if not layers:
        return lines + [""]
    lines += ["", "I(domain; expert) in bits, paired differences `variant - baseline` by seed "
              f"(mean ± SE; verdict at {threshold:g} SE on \"`variant` is more specialised\"):",
              "", "| variant - baseline | " + " | ".join(layers) + " |",
              "|---|" + "---|" * len(layers)]
    for variant, baseline in claims:
        cells = []
        for layer in layers:
            mi = _mi_records(records, layer)
            if not {variant, baseline} <= {r["variant"] for r in mi}:
                cells.append("-")
                continue
            p = protocol.paired(mi, variant, baseline)
            if p.n < 2:
                cells.append(f"{-p.mean:+.4f} (n={p.n})" if p.n else "n=0")
                continue
            outcome = protocol.verdict(p, threshold).outcome
            word = {"supported": "higher", "contradicted": "lower"}.get(outcome, "inconclusive")
            cells.append(f"{-p.mean:+.4f} ± {p.se:.4f} (n={p.n}, {word})")
        lines.append(f"| `{variant}` - `{baseline}` | " + " | ".join(cells) + " |")
    return lines + [""]
