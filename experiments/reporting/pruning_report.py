"""The expert-pruning experiment's report (docs/experiments/pruning.md) from its records alone.

Records (dicts, as `scripts/pruning_sweep.py` collects them; workdirs relative to the sweep
root):

  {"kind": "source", "E": 8, "seed": 0, "workdir": ..., "loss": {"code": .., "prose": ..}}
      the trained MoE of E experts, top-2 (validation loss per domain);
  {"kind": "surgery", "E": 8, "seed": 0, "domain": "code", "method": "uncurl", "fraction": 0.5,
   "kept": 4, "workdir": ..., "loss": .., "recovered": .. or None, "recovery_steps": 50}
      the source pruned (method uncurl | frequency | random) or merged (method merge) for one
      domain to E' = kept experts; loss: that domain's validation loss right after the
      surgery; recovered: after the recovery fine-tune (None: not run);
  {"kind": "scratch", "E": 4, "seed": 0, "steps": 550, "workdir": ..., "loss": {...}}
      an MoE of E experts, top-2, trained from scratch.

Every comparison is a paired difference by seed (`experiments.reporting.protocol`), judged
at `THRESHOLD` standard errors. A pruned model *degrades* when its loss is above the
unpruned source's by more than `THRESHOLD` SE and by more than `TOLERANCE` (relative) of the
source's loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from experiments.reporting import protocol

Record = Mapping[str, Any]
THRESHOLD = 2.0  # standard errors of a paired difference
TOLERANCE = 0.01  # a degradation must also exceed 1% of the unpruned loss
PRUNE_METHODS = ("uncurl", "frequency", "random")
METHODS = (*PRUNE_METHODS, "merge")


def frac_text(fraction: float) -> str:
    return str(Fraction(fraction).limit_denominator(16))


def _pseudo(values: Mapping[int, float], name: str) -> list[dict[str, Any]]:
    """Protocol records `{variant: name, seed, valid_loss: {all: value}}`."""
    return [{"variant": name, "seed": s, "workdir": "-", "valid_loss": {"all": v}}
            for s, v in values.items() if v is not None]


def compare(a: Mapping[int, float], b: Mapping[int, float]) -> protocol.Paired | None:
    """Paired a - b by seed (None when either side has no value)."""
    ra, rb = _pseudo(a, "a"), _pseudo(b, "b")
    if not ra or not rb:
        return None
    return protocol.paired(ra + rb, "a", "b")


def cell(p: protocol.Paired | None, lower: str = "lower", higher: str = "higher") -> str:
    """`+0.0123 ± 0.0040 (n=3, higher)`: the paired mean ± SE and which way it is judged."""
    if p is None or p.n == 0:
        return "-"
    if p.n < 2:
        return f"{p.mean:+.4f} (n=1)"
    outcome = protocol.verdict(p, THRESHOLD).outcome
    word = {"supported": lower, "contradicted": higher}.get(outcome, "inconclusive")
    return f"{p.mean:+.4f} ± {p.se:.4f} (n={p.n}, {word})"


class Results:
    """Lookup of losses by (E, domain, method, fraction), seed -> loss."""

    def __init__(self, records: Iterable[Record]):
        self.records = list(records)
        self.sources = [r for r in self.records if r["kind"] == "source"]
        self.surgery = [r for r in self.records if r["kind"] == "surgery"]
        self.scratch = [r for r in self.records if r["kind"] == "scratch"]
        self.experts = sorted({r["E"] for r in self.sources + self.surgery})
        self.domains = sorted({r["domain"] for r in self.surgery})
        self.fractions = sorted({r["fraction"] for r in self.surgery}, reverse=True)
        self.methods = [m for m in METHODS if any(r["method"] == m for r in self.surgery)]

    def source(self, e: int, domain: str) -> dict[int, float]:
        return {r["seed"]: r["loss"].get(domain) for r in self.sources if r["E"] == e}

    def pruned(self, e: int, domain: str, method: str, fraction: float,
               recovered: bool = False) -> dict[int, float]:
        key = "recovered" if recovered else "loss"
        return {r["seed"]: r[key] for r in self.surgery
                if (r["E"], r["domain"], r["method"]) == (e, domain, method)
                and math.isclose(r["fraction"], fraction) and r.get(key) is not None}

    def kept(self, e: int, fraction: float) -> int | None:
        return next((r["kept"] for r in self.surgery
                     if r["E"] == e and math.isclose(r["fraction"], fraction)), None)

    def scratch_loss(self, e: int, domain: str) -> dict[int, float]:
        return {r["seed"]: r["loss"].get(domain) for r in self.scratch if r["E"] == e}

    def scratch_steps(self, e: int) -> int | None:
        return next((r["steps"] for r in self.scratch if r["E"] == e), None)

    def recovery_steps(self) -> int | None:
        return next((r["recovery_steps"] for r in self.surgery if r.get("recovered") is not None),
                    None)


def degraded(p: protocol.Paired | None, base: Mapping[int, float]) -> bool | None:
    """True when the pruned loss is above the source's by > THRESHOLD SE and > TOLERANCE
    of the source's mean loss; None when it cannot be judged (fewer than 2 pairs)."""
    if p is None or p.n < 2:
        return None
    worse = protocol.verdict(p, THRESHOLD).outcome == "contradicted"
    scale = sum(v for v in base.values() if v is not None) / max(1, len(base))
    return worse and p.mean > TOLERANCE * scale


def threshold_fraction(res: Results, e: int, domain: str, method: str,
                       recovered: bool) -> tuple[str, list[str]]:
    """(where the degradation starts, the per-fraction judgements), fractions from mild to
    strong pruning: the largest keep fraction judged degraded, or a sentence saying none."""
    base = res.source(e, domain)
    marks, first = [], None
    for f in res.fractions:
        p = compare(res.pruned(e, domain, method, f, recovered), base)
        d = degraded(p, base)
        marks.append(f"{frac_text(f)}: {'-' if d is None else ('degraded' if d else 'ok')}")
        if d and first is None:
            first = f
    if first is None:
        judged = any(m.endswith(("ok", "degraded")) for m in marks)
        return ("no degradation at any tested fraction" if judged else "not judged (n<2)"), marks
    return f"from keep {frac_text(first)}", marks


# ---------------------------------------------------------------------------
# Markdown.


def _mean_cell(values: Mapping[int, float]) -> str:
    return protocol.format_mean_se(list(values.values()))


def loss_table(res: Results, domain: str) -> list[str]:
    """Rows (E, method, fine-tune): the domain's validation loss per keep fraction."""
    fr = res.fractions
    lines = ["| E | method | recovery | keep 1 (unpruned) | "
             + " | ".join(f"keep {frac_text(f)}" for f in fr) + " |",
             "|---|---|---|---|" + "---|" * len(fr)]
    for e in res.experts:
        base = _mean_cell(res.source(e, domain))
        for method in res.methods:
            for rec in (False, True):
                cells = [_mean_cell(res.pruned(e, domain, method, f, rec)) for f in fr]
                if rec and all(c == "-" for c in cells):
                    continue
                kept = [f"{_c} (E'={res.kept(e, f)})" if _c != "-" else "-"
                        for _c, f in zip(cells, fr)] if not rec else cells
                lines.append(f"| {e} | {method} | {'fine-tuned' if rec else 'none'} | {base} | "
                             + " | ".join(kept) + " |")
    return lines + [""]


def degradation_table(res: Results, domain: str) -> list[str]:
    """Rows (E, method, fine-tune): pruned - unpruned per fraction, and where it degrades."""
    fr = res.fractions
    lines = ["| E | method | recovery | " + " | ".join(f"keep {frac_text(f)}" for f in fr)
             + " | degradation starts |", "|---|---|---|" + "---|" * len(fr) + "---|"]
    for e in res.experts:
        base = res.source(e, domain)
        for method in res.methods:
            for rec in (False, True):
                ps = [compare(res.pruned(e, domain, method, f, rec), base) for f in fr]
                if all(p is None for p in ps):
                    continue
                start, _ = threshold_fraction(res, e, domain, method, rec)
                lines.append(f"| {e} | {method} | {'fine-tuned' if rec else 'none'} | "
                             + " | ".join(cell(p, "better", "worse") for p in ps)
                             + f" | {start} |")
    return lines + [""]


def _increase(res: Results, e: int, domain: str, method: str, f: float,
              rec: bool) -> dict[int, float]:
    """Per seed: pruned loss - unpruned loss."""
    base = res.source(e, domain)
    return {s: v - base[s] for s, v in res.pruned(e, domain, method, f, rec).items()
            if base.get(s) is not None}


def e_comparison_table(res: Results, domain: str) -> list[str]:
    """The largest E's degradation minus the smallest E's, at the same keep fraction and
    at the same kept E' (paired by seed)."""
    if len(res.experts) < 2:
        return ["(one E only: nothing to compare yet)", ""]
    small, large = res.experts[0], res.experts[-1]
    fr = res.fractions
    lines = ["| method | recovery | " + " | ".join(f"keep {frac_text(f)}" for f in fr) + " |",
             "|---|---|" + "---|" * len(fr)]
    for method in res.methods:
        for rec in (False, True):
            ps = [compare(_increase(res, large, domain, method, f, rec),
                          _increase(res, small, domain, method, f, rec)) for f in fr]
            if all(p is None for p in ps):
                continue
            lines.append(f"| {method} | {'fine-tuned' if rec else 'none'} | "
                         + " | ".join(cell(p, f"E={large} degrades less",
                                           f"E={large} degrades more") for p in ps) + " |")
    return lines + [""]


def scratch_table(res: Results, domain: str) -> list[str]:
    """Pruned (+ fine-tune) - the E' MoE from scratch, per (E, fraction, method)."""
    lines = ["| E | keep | E' | method | pruned, no recovery − scratch | pruned + recovery − "
             "scratch |", "|---|---|---|---|---|---|"]
    rows = 0
    for e in res.experts:
        for f in res.fractions:
            kept = res.kept(e, f)
            scratch = res.scratch_loss(kept, domain) if kept else {}
            if not scratch:
                continue
            for method in res.methods:
                a = compare(res.pruned(e, domain, method, f), scratch)
                b = compare(res.pruned(e, domain, method, f, True), scratch)
                if a is None and b is None:
                    continue
                rows += 1
                lines.append(f"| {e} | {frac_text(f)} | {kept} | {method} | "
                             f"{cell(a, 'pruned better', 'scratch better')} | "
                             f"{cell(b, 'pruned better', 'scratch better')} |")
    return (lines if rows else ["(no from-scratch MoE of a pruned size has finished yet)"]) + [""]


def versus_table(res: Results, domain: str, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """`a - b` at the same (E, fraction) for each method pair (no recovery; with recovery
    where both sides have it)."""
    fr = res.fractions
    lines = ["| E | a − b | recovery | " + " | ".join(f"keep {frac_text(f)}" for f in fr) + " |",
             "|---|---|---|" + "---|" * len(fr)]
    for e in res.experts:
        for a, b in pairs:
            if a not in res.methods or b not in res.methods:
                continue
            for rec in (False, True):
                ps = [compare(res.pruned(e, domain, a, f, rec), res.pruned(e, domain, b, f, rec))
                      for f in fr]
                if all(p is None for p in ps):
                    continue
                lines.append(f"| {e} | {a} − {b} | {'fine-tuned' if rec else 'none'} | "
                             + " | ".join(cell(p, f"{a} better", f"{b} better") for p in ps)
                             + " |")
    return (lines if len(lines) > 2 else ["(no two of these methods have finished runs)"]) + [""]


def status_lines(plan: Mapping[str, int], res: Results) -> list[str]:
    """How many of the planned runs of each kind have records."""
    done = {"sources": len(res.sources), "surgeries": len(res.surgery),
            "recovery fine-tunes": sum(r.get("recovered") is not None for r in res.surgery),
            "from-scratch MoEs": len(res.scratch)}
    parts = [f"{kind} {done[kind]} of {plan.get(kind, '?')}" for kind in done]
    complete = all(done[k] >= plan.get(k, 0) for k in done)
    head = "**Complete**" if complete else "**Partial: every number below comes from the " \
        "finished runs only; paired comparisons use the seeds both sides have**"
    return [f"{head}. Finished: {'; '.join(parts)}.", ""]


def findings(res: Results) -> list[str]:
    """One line per (domain, E, method) on where the degradation starts (uncurl first)."""
    lines = []
    for domain in res.domains:
        for method in res.methods:
            for rec in (False, True):
                parts = []
                for e in res.experts:
                    if not any(res.pruned(e, domain, method, f, rec) for f in res.fractions):
                        continue
                    start, _ = threshold_fraction(res, e, domain, method, rec)
                    parts.append(f"E={e}: {start}")
                if parts:
                    lines.append(f"- {domain}, {method}, "
                                 f"{'after recovery' if rec else 'no recovery'}: "
                                 + "; ".join(parts) + ".")
    return lines + [""]


def same_kept_table(res: Results, domain: str) -> list[str]:
    """Pruned loss of the largest E minus the smallest E's where both keep the same E'
    (e.g. E = 16 at 1/4 and E = 8 at 1/2 both keep 4): the absolute losses, paired by seed."""
    if len(res.experts) < 2:
        return []
    small, large = res.experts[0], res.experts[-1]
    lines = [f"| E' | E={large} keep | E={small} keep | method | recovery | "
             f"E={large} pruned − E={small} pruned |", "|---|---|---|---|---|---|"]
    for fl in res.fractions:
        for fs in res.fractions:
            if res.kept(large, fl) is None or res.kept(large, fl) != res.kept(small, fs):
                continue
            for method in res.methods:
                for rec in (False, True):
                    p = compare(res.pruned(large, domain, method, fl, rec),
                                res.pruned(small, domain, method, fs, rec))
                    if p is not None:
                        lines.append(f"| {res.kept(large, fl)} | {frac_text(fl)} | "
                                     f"{frac_text(fs)} | {method} | "
                                     f"{'fine-tuned' if rec else 'none'} | "
                                     f"{cell(p, f'E={large} better', f'E={small} better')} |")
    return (lines + [""]) if len(lines) > 2 else []


def report_sections(res: Results, plan: Mapping[str, int], scratch_steps: int) -> list[str]:
    """The generated part of the report (status, findings, tables per domain)."""
    lines = ["## Status", "", *status_lines(plan, res),
             "## Where the degradation starts (generated)", "",
             f"Degraded = the pruned model's loss on the domain is above the unpruned "
             f"source's by more than {THRESHOLD:g} standard errors of the paired (by seed) "
             f"difference and by more than {TOLERANCE:.0%} of the source's loss. "
             "Keep fractions from mild to strong; \"from keep f\" = the mildest pruning "
             "judged degraded.", "", *findings(res)]
    for domain in res.domains:
        lines += [f"## Domain `{domain}`", "",
                  f"### Validation loss on `{domain}` (nats/byte, mean ± SE over seeds)", "",
                  *loss_table(res, domain),
                  "### Pruned − unpruned (paired by seed)", "", *degradation_table(res, domain),
                  "### Does the threshold move with E? (increase over the unpruned model "
                  "of the largest E − that of the smallest, same keep fraction; then the two "
                  "at the same kept E')", "",
                  *e_comparison_table(res, domain), *same_kept_table(res, domain),
                  "### Pruned − a smaller MoE of E' experts trained from scratch "
                  f"({scratch_steps} steps: "
                  "the same training compute as source + recovery)", "",
                  *scratch_table(res, domain),
                  "### Merging vs pruning at the same E'", "",
                  *versus_table(res, domain, [("merge", "uncurl"), ("merge", "frequency")]),
                  "### Pruning criteria", "",
                  *versus_table(res, domain, [("uncurl", "frequency"), ("uncurl", "random"),
                                              ("frequency", "random")])]
    return lines


def plot(res: Results, path: Path) -> None:
    """Panels (domain x E): loss vs keep fraction per method, no recovery (solid) and after
    recovery (dashed); the unpruned loss at keep 1; from-scratch E' MoEs as crosses."""
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    rows, cols = max(1, len(res.domains)), max(1, len(res.experts))
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = dict(zip(METHODS, ("C0", "C1", "C2", "C3")))
    for i, domain in enumerate(res.domains):
        for j, e in enumerate(res.experts):
            ax = axes[i][j]
            base = list(res.source(e, domain).values())
            mean_base = sum(base) / len(base) if base else math.nan
            for method in res.methods:
                for rec, style in ((False, "-"), (True, "--")):
                    xs, ys = [], []
                    for f in res.fractions:
                        vals = list(res.pruned(e, domain, method, f, rec).values())
                        if vals:
                            xs.append(f)
                            ys.append(sum(vals) / len(vals))
                    if xs:
                        ax.plot([1.0, *xs], [mean_base, *ys], style, marker=".",
                                color=colors[method],
                                label=f"{method}{' + recovery' if rec else ''}")
            label = "E' from scratch"
            for f in res.fractions:
                kept = res.kept(e, f)
                vals = list(res.scratch_loss(kept, domain).values()) if kept else []
                if vals:
                    ax.plot([f], [sum(vals) / len(vals)], "kx", markersize=8, label=label)
                    label = None
            ax.set_title(f"{domain}, E={e} top-2", fontsize=9)
            ax.set_xlabel("keep fraction E'/E")
            ax.set_ylabel("validation loss (nats/byte)")
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})


HEADER = """# Expert pruning on the research preset: UNCURL's threshold, merging vs pruning

Issue 19's experiments (a) and (b). Generated by `scripts/pruning_sweep.py` from its records
(`pruning.json` beside this file); do not edit by hand: rerun

```
python scripts/pruning_sweep.py --root=workdirs/sweeps/pruning \\
    --json=docs/experiments/pruning.json --report=docs/experiments/pruning.md \\
    --plot=docs/experiments/pruning.png      # runs what is missing (resumable), then this report
python scripts/pruning_sweep.py --from_records --json=docs/experiments/pruning.json \\
    --report=docs/experiments/pruning.md --plot=docs/experiments/pruning.png   # records only
```

## Set-up

- **Sources**: `{preset}` (the research preset, docs/experiments/calibration.md:
  byte-level decoder, d_model 128, 4 layers, a top-2 MoE FFN in every layer: experts of
  d_ff 256, softmax router whose top-2 weights are *not* renormalised, dropless),
  {source_steps} steps of 16 x 128 bytes, seeds {seeds}; E = {experts} experts
  (`MoeLayer.num_experts`; E = 8 is the preset itself, the calibration's `every_moe`).
  Without renormalisation, removing experts also scales every kept weight by Z/Z' (the
  softmax denominator loses the pruned experts' terms; docs/surgery.md, "When pruning is
  exact"), so even tokens whose experts were all kept see a changed layer.
- **Surgery per domain** of the embedded corpus ({domains}): routing statistics of the
  source on {task_batches} *training* batches (seed = the run's seed), only that domain's
  tokens counted; then, per MoE layer, E' = round(f E) experts kept for keep fractions
  f = {fractions}: `uncurl` (spectral clustering of the experts by router-logit
  similarity on the domain, the most-used member of each cluster kept), `frequency` (the E'
  most-used), `random`; `merge`: the same spectral clusters merged (weights averaged by
  routing frequency, router columns combined; `scripts/merge_experts.py
  --grouping=spectral --method=frequency_weighted`). docs/surgery.md defines each method.
- **Loss**: the validation loss (nats/byte) on that domain's tokens of the preset's
  {eval_batches} validation batches (evenly spaced over the split; dropless), before and
  after the surgery.
- **Recovery fine-tune** ({recover_methods} on {recover_domains}): the pruned workdir
  trained {recovery_steps} more steps (`train.num_steps` extended, so the cosine schedule
  ends at the new last step: a low learning rate; AdamW moments carried, pruned like the
  weights) on the run's own training stream (both domains: the trainer has no
  single-domain filter; the loss is still read on the pruned-for domain).
- **From scratch**: an MoE of E' experts (top-2, the preset otherwise) trained
  {scratch_steps} steps = the source's steps + the recovery steps. Every model here is top-2
  with experts of the same size, so its training FLOPs per token are the same: the
  from-scratch model has the same total training compute as the pruned + recovered one.
- **Verdicts**: differences paired by seed, mean ± standard error, judged at {threshold:g}
  SE (`experiments.reporting.protocol`).

Workdirs (relative to the sweep directory): `sources/e<E>/seed<s>`;
`surgery/e<E>/seed<s>/<domain>/<method>_keep<E'>/eval.json` (the surgery evaluated in
memory, `experiments/convert/surgery_eval.py`: the same plans as `scripts/prune_experts.py`
and `merge_experts.py`, tested equal to the written workdir's loss; the kept experts /
groups per layer); `recovered/...` (same names: the surgery written as a workdir, then
fine-tuned); `scratch/e<E'>/seed<s>`.
"""

CAVEATS = """## Against the paper, and what limits this

UNCURL (as issue 19 summarises it) finds a threshold pruning factor, depending on the
number of pretraining experts, above which task-specific pruning degrades quality (below
it, pruning costs little), and compares pruned models with smaller MoEs trained from
scratch. Read the tables above against that claim with this scale in mind:
~{params_e8:.1f}M (E = 8) and ~{params_e16:.1f}M (E = 16) parameters trained on
{tokens:.2f}M bytes, i.e. well under one token per parameter, where the paper's models
are pretrained far longer; experts this under-trained are weakly specialised (the E = 8
sources' loads are near uniform), so a task-aware choice has little to choose from, and
a 2-domain byte corpus is a much coarser "task" than the paper's downstream tasks. The
recovery fine-tune is short (a few percent of the pretraining steps, at the end of the
cosine schedule) and sees both domains. Where the tables show degradation already at the
mildest pruning (no threshold inside the tested range), or no difference between E = 8
and E = 16, that contradicts the paper *at this scale* and says nothing about its scale.
"""


def _param_counts() -> tuple[float, float]:
    """Parameters (millions) of the preset at E = 8 and 16: 4 layers of attention (4 d^2)
    and E experts (2 d d_ff) plus a router (d E), byte embeddings in and out."""
    d, d_ff, layers, vocab = 128, 256, 4, 259
    def count(e: int) -> float:
        return (layers * (4 * d * d + e * 2 * d * d_ff + d * e) + 2 * vocab * d) / 1e6
    return count(8), count(16)


def render(data: Mapping[str, Any]) -> str:
    """The whole report from the records file's contents (settings, plan, records)."""
    s = data["settings"]
    res = Results(data["records"])
    fmt = {**s, "threshold": THRESHOLD, "preset": s.get("preset", "?"),
           "seeds": ", ".join(map(str, s["seeds"])), "experts": " and ".join(map(str, s["experts"])),
           "domains": ", ".join(s["domains"]),
           "fractions": ", ".join(frac_text(f) for f in s["fractions"]),
           "recover_methods": ", ".join(s["recover_methods"]) or "none",
           "recover_domains": ", ".join(s["recover_domains"]) or "none",
           "scratch_steps": s["source_steps"] + s["recovery_steps"]}
    params_e8, params_e16 = _param_counts()
    tokens = s["source_steps"] * 16 * 128 / 1e6
    return "\n".join([HEADER.format(**fmt),
                      *report_sections(res, data["plan"], fmt["scratch_steps"]),
                      CAVEATS.format(params_e8=params_e8, params_e16=params_e16,
                                     tokens=tokens)]).rstrip() + "\n"
