"""The c-BTM experiment's report from its finished runs (rerunnable at any time).

Reads `<root>/k<k>/seed<s>/ensemble.json`, `<root>/seed_eval/seed<s>.json` and
`<root>/clusters/k<k>_seed<s>/clusters.json` of whatever has finished, writes
`cbtm.json` (the records, workdirs relative to the root) and `cbtm.md` (tables; the
prose of docs/experiments/cbtm.md lives in that file's hand-written part, kept
between the markers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from experiments.cbtm.experiment import Plan
from experiments.data.files import write_atomically
from experiments.reporting import protocol

BEGIN, END = "<!-- cbtm report: begin -->", "<!-- cbtm report: end -->"
DOMAINS = ("code", "prose", "all")
BASELINE = "k1 (dense)"


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def collect(plan: Plan) -> dict[str, Any]:
    """The records: one per (arm, top_k, seed) with its loss per domain, and the
    clusterings' agreement with the domains."""
    records, agreement = [], []
    for seed in plan.seeds:
        seed_eval = _read(plan.root / "seed_eval" / f"seed{seed}.json")
        if seed_eval:
            records.append({"variant": "seed checkpoint", "seed": seed,
                            "valid_loss": seed_eval["ensemble_loss"]["top1"]})
        for k in plan.clusters:
            result = _read(plan.arm(k, seed) / "ensemble.json")
            meta = _read(plan.clustering(k, seed) / "clusters.json")
            if meta:
                agreement.append({"k": k, "seed": seed, **{
                    f"{split}_{m}": meta["agreement"][split][m]
                    for split in ("train", "validation") if split in meta["agreement"]
                    for m in ("adjusted_mutual_information", "purity", "byte_purity",
                              "byte_normalized_mutual_information")},
                    "train_sizes": meta["sizes"]["train"]})
            if not result:
                continue
            _check_same_tokens(seed_eval, result, plan.arm(k, seed) / "ensemble.json")
            for name, loss in result["ensemble_loss"].items():
                variant = BASELINE if k == 1 else f"k{k} {name}"
                records.append({"variant": variant, "seed": seed, "valid_loss": loss,
                                "workdir": f"k{k}/seed{seed}"})
            if k > 1:
                records.append({"variant": f"k{k} one branch alone (mean over branches)", "seed": seed,
                                "valid_loss": _mean_branch(result["branch_loss"])})
    return {"records": records, "agreement": agreement, "settings": {
        "seeds": list(plan.seeds), "clusters": list(plan.clusters), "budget": plan.budget,
        "learning_rate": plan.learning_rate, "prefix_tokens": plan.prefix_tokens,
        "temperature": plan.temperature}}


def _check_same_tokens(seed_eval: dict[str, Any] | None, result: dict[str, Any],
                       where: Path) -> None:
    """Every arm must be scored on the seed checkpoint's tokens, or the table pairs losses
    over different validation subsets."""
    if not seed_eval:
        return
    ours = (result.get("batches"), result.get("scored_tokens"))
    theirs = (seed_eval.get("batches"), seed_eval.get("scored_tokens"))
    if ours != theirs:
        raise ValueError(f"{where}: scored on {ours[0]} validation batches {ours[1]}, the seed "
                         f"checkpoint's evaluation on {theirs[0]} {theirs[1]}; delete it and "
                         f"rerun the driver to evaluate it on the same tokens")


def _mean_branch(losses: list[dict[str, float]]) -> dict[str, float]:
    return {d: sum(loss[d] for loss in losses) / len(losses) for d in losses[0]}


def _loss_table(records: list[dict[str, Any]]) -> list[str]:
    runs = protocol.by_variant(records)
    lines = ["| arm | code | prose | all | seeds |", "|---|---|---|---|---|"]
    for variant, seeds in runs.items():
        cells = [protocol.format_mean_se([protocol.final_loss(r, d) for r in seeds.values()])
                 for d in DOMAINS]
        lines.append(f"| {variant} | {' | '.join(cells)} | {sorted(seeds)} |")
    return lines


def _verdicts(records: list[dict[str, Any]]) -> list[str]:
    runs = protocol.by_variant(records)
    if BASELINE not in runs:
        return ["(no finished dense baseline yet)"]
    lines = ["| claim: lower loss than k1 (dense) | code | prose | all |", "|---|---|---|---|"]
    for variant in runs:
        if not variant.startswith("k") or variant == BASELINE or "branches" in variant:
            continue
        cells = []
        for d in DOMAINS:
            p = protocol.paired(records, variant, BASELINE, domain=d)
            v = protocol.verdict(p)
            cells.append(f"{p.mean:+.4f} ± {p.se:.4f} ({v.outcome})" if p.n
                         else "-")
        lines.append(f"| {variant} | {' | '.join(cells)} |")
    return lines


def _agreement_table(agreement: list[dict[str, Any]]) -> list[str]:
    lines = ["| k | AMI (train docs) | purity (train docs) | byte purity (train) | byte NMI "
             "(train) | AMI (validation docs) | purity (validation docs) | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for k in sorted({a["k"] for a in agreement}):
        rows = [a for a in agreement if a["k"] == k]
        cells = [protocol.format_mean_se([r.get(m, math.nan) for r in rows])
                 for m in ("train_adjusted_mutual_information", "train_purity",
                           "train_byte_purity", "train_byte_normalized_mutual_information",
                           "validation_adjusted_mutual_information", "validation_purity")]
        lines.append(f"| {k} | {' | '.join(cells)} | {sorted(r['seed'] for r in rows)} |")
    return lines


def render(data: dict[str, Any]) -> str:
    s = data["settings"]
    return "\n".join([
        BEGIN,
        f"Settings: seeds {s['seeds']}, clusters {s['clusters']}, branch-phase budget "
        f"{s['budget']} steps per k (k branches of {s['budget']}/k steps), constant learning "
        f"rate {s['learning_rate']}, ensemble prefix {s['prefix_tokens']} tokens, "
        f"temperature {s['temperature']}. Losses in nats per byte on the scored validation "
        f"tokens (after each segment's prefix), mean ± SE over the finished seeds.",
        "", "Validation loss per domain:", "", *_loss_table(data["records"]),
        "", "Paired by seed against the dense baseline (variant - k1; verdict at 3 SE):", "",
        *_verdicts(data["records"]),
        "", "Cluster ↔ domain agreement: adjusted mutual information and purity over "
        "documents; purity and normalised mutual information over bytes (what the branches "
        "train on):", "",
        *_agreement_table(data["agreement"]), END])


def write_report(plan: Plan, docs_dir: Path) -> Path:
    """Writes `cbtm.json` and the tables of `cbtm.md` (between the markers; a new page
    when there is none) into `docs_dir`."""
    data = collect(plan)
    write_atomically(docs_dir / "cbtm.json", (json.dumps(data, indent=2) + "\n").encode())
    page = docs_dir / "cbtm.md"
    tables = render(data)
    text = page.read_text(encoding="utf-8") if page.is_file() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + tables + text[text.index(END) + len(END):]
    else:
        text = f"# c-BTM experiment\n\n{tables}\n"
    write_atomically(page, text.encode("utf-8"))
    return page
