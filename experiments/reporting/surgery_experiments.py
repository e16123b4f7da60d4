"""Reports of the checkpoint-surgery experiments of issue 19, from their records alone
(no model, no run): `efficientscale` (scale-up then scale-out vs upcycling the small model
vs the MoE from scratch; scripts/efficientscale_sweep.py) and `tomoe_pruning` (ToMoE vs
static structural pruning; scripts/tomoe_sweep.py).

A record is a dict as `experiments.reporting.protocol` reads it: `variant`, `seed`,
`workdir` (relative to the sweep root), `valid_loss` (`{"all": loss, ...}`), plus the
experiment's own fields (documented at the builders below). Claims are judged on the
final validation loss paired by seed (`protocol.verdict`, `THRESHOLD` standard errors).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.reporting import claims as claims_lib
from experiments.reporting import protocol
from experiments.runtime import gin_utils

Record = dict[str, Any]
THRESHOLD = 3.0  # standard errors of the paired difference, as in every sweep report


PRESET_GIN = "experiments/research.gin"  # under gin_configs/


def run_gin_files(sweep_gin: Path) -> list[str]:
    """The gin files of a driver's training runs: the research preset, then the driver's
    --sweep_gin on top (a gin file includes one level only, and the preset includes its
    model and data files, so the sweep file cannot include the preset)."""
    return [str(gin_utils.GIN_CONFIGS_DIR / PRESET_GIN), str(sweep_gin)]


def add_driver_flags(parser: argparse.ArgumentParser, *, sweep_gin: str, root_help: str,
                     sweep_gin_help: str | None = None, report_only_help: str) -> None:
    """The flags both drivers (scripts/tomoe_sweep.py, scripts/efficientscale_sweep.py) take."""
    parser.add_argument("--root", help=root_help)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sweep_gin", default=sweep_gin, help=sweep_gin_help)
    parser.add_argument("--docs_dir", default="docs/experiments")
    parser.add_argument("--report_only", action="store_true", help=report_only_help)
    parser.add_argument("--from_records", action="store_true",
                        help="rewrite the report and plot from --docs_dir's records alone")


def check_driver_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       repo: Path) -> tuple[list[int], Path]:
    """(seeds, sweep gin file) of `add_driver_flags`'s flags; bad values exit 2 naming the
    flag (a relative --sweep_gin is taken from the repo root)."""
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    sweep_gin = Path(args.sweep_gin)
    if not sweep_gin.is_absolute():
        sweep_gin = repo / sweep_gin
    if not sweep_gin.is_file():
        parser.error(f"--sweep_gin: no such gin file {args.sweep_gin!r}")
    if args.report_only and args.from_records:
        parser.error("--report_only and --from_records exclude each other")
    if not args.from_records and args.root is None:
        parser.error("--root is required (or --from_records)")
    return seeds, sweep_gin


def write_atomic(path: Path, text: str) -> None:
    """`text` to `path` through a temporary file in the same directory, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_records(path: Path, records: Sequence[Record]) -> None:
    for r in records:
        protocol.relative_workdir(r["workdir"])
    write_atomic(path, json.dumps(list(records), indent=1, sort_keys=True) + "\n")


def read_records(path: Path) -> list[Record]:
    return json.loads(path.read_text(encoding="utf-8"))


def reused_line(records: Sequence[Record], variant: str) -> list[str]:
    """A sentence naming the seeds of `variant` whose run was linked, not trained, here."""
    seeds = sorted(r["seed"] for r in records if r["variant"] == variant and r.get("reused"))
    if not seeds:
        return []
    return [f"The `{variant}` runs of seeds {seeds} are earlier runs of exactly this "
            "configuration (the calibration's preset runs, also used by "
            "docs/experiments/evomoe.md), linked into the sweep root instead of retrained.", ""]


def _verdict(records: Sequence[Record], variant: str, baseline: str) -> protocol.Verdict | None:
    have = {r["variant"] for r in records}
    if variant not in have or baseline not in have:
        return None
    return protocol.verdict(protocol.paired(records, variant, baseline), THRESHOLD)


def paper_sentence(v: protocol.Verdict | None, claim: str) -> str:
    """"<claim>: reproduced / contradicted / not resolved ..." from one verdict."""
    if v is None:
        return f"{claim}: not tested yet (runs missing)."
    word = {"supported": "**reproduced**", "contradicted": "**contradicted** (the opposite "
            "holds beyond the threshold)"}.get(v.outcome, "**not resolved** at this scale")
    p = v.paired
    diff = f"{p.mean:+.4f} ± {p.se:.4f}, n={p.n}" if p.n >= 2 else f"n={p.n}"
    return f"{claim}: {word} ({p.variant} - {p.baseline} = {diff})."


# ---------------------------------------------------------------------------
# efficientscale
#
# Records: variants `grown_e8` (scale-up then scale-out), `small_e8` (the small model
# upcycled directly), `scratch` (the preset MoE from scratch) and `small_dense` (the small
# dense model continued to N + M). Fields beyond the protocol's: `valid_curve`
# [[step, null, loss]] over the whole N + M steps (for the upcycled arms the small dense
# model's evaluations up to N, then the upcycled model at N, then its own),
# `flops_per_step` [[from_step, FLOPs per step]] (the phases), `param_count`, and for the
# upcycled arms `step0` (the losses at N: `small_loss`, for grown_e8 `grown_loss` and
# `grow_max_abs_logit_diff`, and `moe_loss` of the upcycled model).

ES_VARIANTS = ("grown_e8", "small_e8", "scratch", "small_dense")
ES_CLAIMS = (("grown_e8", "small_e8"), ("grown_e8", "scratch"), ("small_e8", "scratch"))
ES_LABELS = {"grown_e8": "scale-up to the preset's size, then upcycled (E=8 top-2)",
             "small_e8": "small dense upcycled directly (E=8 top-2, experts d_ff 128)",
             "scratch": "preset MoE (E=8 top-2) from scratch",
             "small_dense": "small dense, continued"}


def total_flops(record: Record, step: int | None = None) -> float:
    """Training FLOPs of the record's whole history up to `step` (default: its last)."""
    phases = record["flops_per_step"]
    end = record["steps"] if step is None else step
    total = 0.0
    for i, (start, per_step) in enumerate(phases):
        stop = phases[i + 1][0] if i + 1 < len(phases) else end
        total += max(0, min(stop, end) - start) * per_step
    return total


def efficientscale_markdown(records: Sequence[Record], planned: Sequence[tuple[str, int]],
                            *, n_steps: int, m_steps: int, command: str) -> str:
    """The report (markdown) of the efficientscale experiment."""
    lines = ["# Scale-up then scale-out (AquilaMoE's EfficientScale) vs direct upcycling vs "
             "from scratch", "",
             f"**Reproduce:** `{command}` (resumable: finished runs and conversions are "
             "skipped; writes this file, `efficientscale/records.json` and "
             "`efficientscale/loss_curves.png`). From the committed records alone: "
             "`python scripts/efficientscale_sweep.py --from_records`.", ""]
    lines += claims_lib.status_lines(planned, records)
    lines += [
        "## Set-up", "",
        f"Research preset (`gin_configs/experiments/research.gin`: byte-level, 4 layers, "
        f"16 x 128 bytes a step, AdamW, peak LR 3e-3, cosine to step {n_steps + m_steps}). "
        f"Per seed, every arm sees {n_steps + m_steps} steps of the same data order:", "",
        f"- `small_dense`: a small dense model (d_model 64, 2 heads of 32, d_ff 256, 4 layers) "
        f"trained {n_steps + m_steps} steps; its checkpoint at N = {n_steps} is the start of "
        "both upcycled arms;",
        "- `grown_e8`: scale-up (`scripts/scale_up.py`, function-preserving: `fpi` width, "
        "`zero` d_model, checked with `--verify`) of that checkpoint to the preset's dense "
        "size (d_model 128, 4 heads of 32, d_ff 512), then scale-out (`scripts/upcycle.py`: "
        "every layer 8 experts of d_ff 256 = G = 2 virtual groups of 4 copies, top-2 "
        "softmax-then-top-k as in the preset, virtual-group router, a^(1/2) weight scaling): "
        f"the preset MoE's shapes (only the norm epsilon differs: halved by the exact d_model "
        f"growth); trained from step {n_steps} to {n_steps + m_steps} (fresh AdamW moments, "
        "the schedule continues);",
        "- `small_e8`: the same checkpoint upcycled directly with the same recipe (8 experts "
        f"of d_ff 128 at d_model 64), trained to {n_steps + m_steps};",
        f"- `scratch`: the preset MoE trained from scratch {n_steps + m_steps} steps.", ""]
    lines += reused_line(records, "scratch")
    lines += [
        "Claims (final validation loss, paired by seed):", ""]
    lines += claims_lib.claim_lines(ES_CLAIMS, records, THRESHOLD)
    lines += ["## Results", ""]
    lines += protocol.variant_table(records, "scratch", THRESHOLD)
    lines += ["", "Per run (the upcycled arms' FLOPs include the small dense model's first "
              f"{n_steps} steps):", "",
              "| variant | seed | valid loss | params | training FLOPs | loss at N: small "
              "| grown (max abs logit diff) | upcycled | workdir |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s0 = r.get("step0", {})
        grown = (f"{s0['grown_loss']:.4f} ({s0['grow_max_abs_logit_diff']:.1e})"
                 if "grown_loss" in s0 else "-")
        small, moe = (f"{s0[key]:.4f}" if key in s0 else "-" for key in ("small_loss",
                                                                        "moe_loss"))
        lines.append(f"| `{r['variant']}` | {r['seed']} | {protocol.final_loss(r):.4f} | "
                     f"{_count(r.get('param_count'))} | {total_flops(r):.3g} | {small} "
                     f"| {grown} | {moe} | `{r['workdir']}` |")
    lines += ["", "![validation loss](efficientscale/loss_curves.png)", "",
              "## Against the paper", ""]
    lines.append("- AquilaMoE (as we read its abstract; we could not check its method text) "
                 "reports that initialising the larger model from a pretrained smaller one "
                 "(scale-up) transfers knowledge and trains more efficiently than from "
                 "scratch, and then upcycles the grown model (scale-out).")
    lines.append("- " + paper_sentence(
        _verdict(records, "grown_e8", "scratch"),
        "Scale-up + scale-out reaches a lower loss than the MoE from scratch at equal steps "
        "(it also spends fewer FLOPs: its first N steps are the small model's)"))
    lines.append("- " + paper_sentence(
        _verdict(records, "grown_e8", "small_e8"),
        "Scaling up before scaling out beats upcycling the small model directly"))
    lines.append("- " + paper_sentence(
        _verdict(records, "small_e8", "scratch"),
        "The small model upcycled directly reaches a lower loss than the preset MoE from "
        "scratch (not a paper claim: the direct arm is much smaller)"))
    return "\n".join(lines) + "\n"


def efficientscale_plot(records: Sequence[Record], path: Path, n_steps: int) -> None:
    """Mean validation loss over seeds vs step and vs training FLOPs, one line per arm."""
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for variant, seeds in protocol.by_variant(records).items():
        rs = list(seeds.values())
        steps = sorted(set.intersection(*({p[0] for p in r["valid_curve"]} for r in rs)))
        if not steps:
            continue
        losses = np.array([[dict((p[0], p[-1]) for p in r["valid_curve"])[s] for s in steps]
                           for r in rs])
        flops = np.mean([[total_flops(r, s) for s in steps] for r in rs], axis=0)
        label = f"{variant}: {ES_LABELS.get(variant, variant)}"
        for ax, xs in ((axes[0], steps), (axes[1], flops)):
            ax.plot(xs, losses.mean(0), marker=".", lw=1.2, label=label)
            ax.fill_between(xs, losses.min(0), losses.max(0), alpha=0.15)
    late = [p[-1] for r in records for p in r["valid_curve"] if p[0] >= n_steps]
    axes[0].axvline(n_steps, color="gray", ls=":", lw=1)
    for ax, xlabel in ((axes[0], "step"), (axes[1], "cumulative training FLOPs")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/byte)")
        if late:  # the early, steep part of the curves would flatten the comparison
            ax.set_ylim(top=max(late) + 0.1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"EfficientScale on the research preset, mean over seeds (band: min..max); "
                 f"upcycling at step {n_steps}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})


# ---------------------------------------------------------------------------
# tomoe_pruning
#
# Records: variant `dense` (the source), `static_f<pct>` (magnitude pruning to <pct>% of
# each MLP's hidden units), `tomoe_e<E>_f<pct>` (ToMoE with E experts, k = pct% of E) and
# `tomoe_e<E>_f<pct>_untrained` (the same partition, router not trained). Fields: `method`
# ("dense" / "static" / "tomoe" / "tomoe_untrained"), `fraction`, `num_experts` (ToMoE),
# `layer_errors` (ToMoE: the relative MLP error per layer after router training).


def variant_name(method: str, fraction: float, num_experts: int | None = None) -> str:
    pct = round(100 * fraction)
    if method == "dense":
        return "dense"
    if method == "static":
        return f"static_f{pct}"
    suffix = "_untrained" if method == "tomoe_untrained" else ""
    return f"tomoe_e{num_experts}_f{pct}{suffix}"


def tomoe_claims(records: Sequence[Record]) -> list[tuple[str, str]]:
    """(ToMoE variant, static variant at its fraction) for every trained ToMoE variant."""
    out = []
    for r in records:
        if r["method"] == "tomoe":
            pair = (r["variant"], variant_name("static", r["fraction"]))
            if pair not in out:
                out.append(pair)
    return out


def ablation_claims(records: Sequence[Record]) -> list[tuple[str, str]]:
    """(trained ToMoE variant, the same with the untrained router) where both ran."""
    names = {r["variant"] for r in records}
    return [(n.removesuffix("_untrained"), n) for n in sorted(names)
            if n.endswith("_untrained") and n.removesuffix("_untrained") in names]


def tomoe_markdown(records: Sequence[Record], planned: Sequence[tuple[str, int]], *,
                   config: dict[str, Any], command: str) -> str:
    """The report (markdown) of the tomoe_pruning experiment."""
    fractions = sorted({r["fraction"] for r in records if r["method"] != "dense"}, reverse=True)
    lines = ["# ToMoE vs static structural pruning (research preset, no fine-tuning)", "",
             f"**Reproduce:** `{command}` (resumable: finished conversions are skipped; the "
             "dense sources are trained when absent; writes this file, "
             "`tomoe_pruning/records.json` and `tomoe_pruning/loss.png`). From the committed "
             "records alone: `python scripts/tomoe_sweep.py --from_records`.", ""]
    lines += claims_lib.status_lines(planned, records)
    lines += [
        "## Set-up", "",
        "Source: the research preset's dense model of equal active parameters "
        "(`research.gin` + `research_dense_active.gin`: d_model 128, 4 layers, ReLU MLP of "
        "d_ff 512 in every layer, 500 steps; one per seed). No run is fine-tuned. At an "
        "active fraction f, every MLP keeps f x 512 hidden units per token:", "",
        "- `static_f<pct>`: static structural pruning, the f x 512 units of largest "
        "‖W_i[:, u]‖·‖W_o[u]‖ kept in every layer for every token (`moe.tomoe.magnitude_keep`);",
        f"- `tomoe_e<E>_f<pct>`: ToMoE (`scripts/dense_to_moe.py --method=tomoe`): the units "
        f"split into E groups by co-activation, a router per layer learned with the dynamic "
        f"structural pruning objective (straight-through top-k, active-fraction penalty), "
        f"k = f x E groups active per token, weights frozen; {config['steps']} router steps "
        f"of {config['tokens_per_step']} tokens, lr {config['learning_rate']}, "
        f"{config['data_batches']} training batches recorded (at most "
        f"{config['max_tokens']} tokens);",
        "- `tomoe_e<E>_f<pct>_untrained`: the same partition with the initial random router "
        "(0 steps): what the router training adds.", ""]
    lines += reused_line(records, "dense")
    lines += [
        f"Loss: the {config['verify_batches']} validation batches of the preset "
        "(`DataConfig.eval_batches`), nats/byte.", "",
        "Claims (ToMoE reaches a lower loss than static pruning at the same fraction):", ""]
    lines += claims_lib.claim_lines(tomoe_claims(records), records, THRESHOLD)
    if ablation_claims(records):
        lines += ["Ablation (the learned router against the same partition with its random "
                  "initial router):", ""]
        lines += claims_lib.claim_lines(ablation_claims(records), records, THRESHOLD)[2:]
    lines += ["## Results", "", "| variant | f | seeds | valid loss (mean ± SE) | minus `dense` "
              "(paired, mean ± SE) |", "|---|---|---|---|---|"]
    for variant, seeds in protocol.by_variant(records).items():
        rs = list(seeds.values())
        diff = "-"
        if variant != "dense" and "dense" in seeds_of(records):
            p = protocol.paired(records, variant, "dense")
            diff = f"{p.mean:+.4f} ± {p.se:.4f} (n={p.n})" if p.n >= 2 else f"n={p.n}"
        lines.append(f"| `{variant}` | {rs[0]['fraction']:g} | {len(rs)} | "
                     f"{protocol.format_mean_se([protocol.final_loss(r) for r in rs])} | "
                     f"{diff} |")
    lines += ["", "Per conversion:", "", "| variant | seed | valid loss | relative MLP error "
              "per layer | workdir |", "|---|---|---|---|---|"]
    for r in records:
        errors = ", ".join(f"{e:.3f}" for e in r.get("layer_errors", {}).values()) or "-"
        lines.append(f"| `{r['variant']}` | {r['seed']} | {protocol.final_loss(r):.4f} | "
                     f"{errors} | `{r['workdir']}` |")
    lines += ["", "![loss vs active fraction](tomoe_pruning/loss.png)", "",
              "## Against the paper", "",
              "ToMoE (\"Converting Dense LLMs to MoE through Dynamic Structural Pruning\") "
              "reports that its conversion beats static structural pruning at the same active "
              "parameters without fine-tuning. Here (our layer-local reading of its objective, "
              "docs/surgery.md):", ""]
    for variant, baseline in tomoe_claims(records):
        f = next(r["fraction"] for r in records if r["variant"] == variant)
        lines.append("- " + paper_sentence(_verdict(records, variant, baseline),
                                           f"`{variant}` beats `{baseline}` at f = {f:g}"))
    if not fractions:
        lines.append("- no conversion finished yet.")
    return "\n".join(lines) + "\n"


def seeds_of(records: Sequence[Record]) -> dict[str, set[int]]:
    """`{variant: seeds}` of the records."""
    out: dict[str, set[int]] = {}
    for r in records:
        out.setdefault(r["variant"], set()).add(r["seed"])
    return out


def tomoe_plot(records: Sequence[Record], path: Path) -> None:
    """Validation loss vs active fraction per method (mean over seeds, bars: min..max)."""
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    dense = [protocol.final_loss(r) for r in records if r["method"] == "dense"]
    series: dict[str, list[Record]] = {}
    for r in records:
        if r["method"] != "dense":
            key = r["method"] + (f" E={r['num_experts']}" if r.get("num_experts") else "")
            series.setdefault(key, []).append(r)
    for key, rs in sorted(series.items()):
        fs = sorted({r["fraction"] for r in rs}, reverse=True)
        vals = [[protocol.final_loss(r) for r in rs if r["fraction"] == f] for f in fs]
        mean = np.array([np.mean(v) for v in vals])
        err = np.clip(np.array([[m - min(v), max(v) - m] for m, v in zip(mean, vals)]).T, 0, None)
        ax.errorbar(fs, mean, yerr=err, marker="o", capsize=3, label=key)
    if dense:
        ax.axhline(float(np.mean(dense)), color="k", ls=":", label="dense (f = 1)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("active fraction of MLP hidden units")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("ToMoE vs static magnitude pruning, no fine-tuning (mean over seeds)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
