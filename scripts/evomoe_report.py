"""Report of the EvoMoE sweep: loss at equal steps and at equal FLOPs, active experts.

  python scripts/sweep.py gin_configs/sweeps/evomoe.gin          # trains (resumable)
  python scripts/evomoe_report.py gin_configs/sweeps/evomoe.gin  # docs/experiments/evomoe.md

Reads every finished run's `metrics.jsonl` and `summary.json` (train CE, the
per-step `flops`, `active_experts`, `phase`, validation losses) and writes the
report with plots in `docs/experiments/evomoe/`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from experiments.reporting import claims, protocol
from experiments.reporting import sweep as sweep_lib
from experiments.reporting.metrics import read_jsonl
from experiments.runtime import cli


def load_runs(sweep: sweep_lib.Sweep, root: Path) -> dict[str, list[dict]]:
    """`{variant: [run]}` for finished runs: the sweep record (`collect_run`) plus the
    train curves as arrays."""
    out: dict[str, list[dict]] = {}
    for variant, _ in sweep.runs():
        for seed in sweep.seeds:
            workdir = sweep_lib.run_dir(root, sweep, variant, seed)
            if not (workdir / "summary.json").exists():
                continue
            record = sweep_lib.collect_run(workdir, variant, seed, root=root)
            train = read_jsonl(workdir / "metrics.jsonl", "train")
            steps = np.array([r["step"] for r in train])
            cum_flops = np.cumsum([r["flops"] for r in train])
            out.setdefault(variant, []).append(dict(
                record, train_steps=steps, ce=np.array([r["ce"] for r in train]), cum_flops=cum_flops,
                active=np.array([r.get("active_experts", np.nan) for r in train]),
                valid_steps=np.array([point[0] for point in record["valid_curve"]]),
                valid=np.array([point[-1] for point in record["valid_curve"]])))
    return out


smooth = protocol.trailing_mean
# The paper's claim is judged at 2 standard errors (as when this report was first written).
THRESHOLD = 2.0


def plot(runs: dict[str, list[dict]], figures: Path, window: int) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, rs in runs.items():
        ce = np.mean([smooth(r["ce"], window) for r in rs], axis=0)
        axes[0].plot(rs[0]["train_steps"], ce, lw=1.2, label=variant)
        flops = np.mean([r["cum_flops"] for r in rs], axis=0)
        axes[1].plot(flops, ce, lw=1.2, label=variant)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("cumulative training FLOPs")
    for ax in axes:
        ax.set_ylabel(f"train CE (nats/byte, mean of {window} steps)")
        ax.set_ylim(top=3.3)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "loss_curves.png", dpi=110)
    plt.close(fig)

    _plot_seed_mean(runs, "active", "active experts per token (mean of MoE layers)",
                    figures / "active_experts.png")
    _plot_seed_mean(runs, "cum_flops", "cumulative training FLOPs", figures / "flops.png")


def _plot_seed_mean(runs: dict[str, list[dict]], key: str, ylabel: str, path: Path) -> None:
    """One curve per variant: `key` against step, averaged over seeds."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for variant, rs in runs.items():
        ax.plot(rs[0]["train_steps"], np.mean([r[key] for r in rs], axis=0), lw=1.2, label=variant)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_records(runs: dict[str, list[dict]], budget: float) -> list[dict]:
    """One record per run whose `valid_loss` is its validation curve linearly
    interpolated at `budget` training FLOPs (the protocol's paired verdicts then judge
    the claims at equal FLOPs instead of equal steps)."""
    return [{"variant": r["variant"], "seed": r["seed"], "workdir": r.get("workdir"),
             "valid_loss": {"all": float(np.interp(budget, np.asarray(r["valid_flops"]),
                                                   r["valid"]))}}
            for rs in runs.values() for r in rs]


def write_report(sweep: sweep_lib.Sweep, runs: dict[str, list[dict]], sweep_file: str,
                 docs_dir: Path, window: int) -> Path:
    figures = docs_dir / sweep.name
    figures.mkdir(parents=True, exist_ok=True)
    plot(runs, figures, window)
    budget = min(float(np.mean([r["cum_flops"][-1] for r in rs])) for rs in runs.values())
    last = max(int(r["train_steps"][-1]) for rs in runs.values() for r in rs)
    rows = []
    for variant, rs in runs.items():
        at_budget_train = [float(np.interp(budget, r["cum_flops"], smooth(r["ce"], window)))
                           for r in rs]
        at_budget_valid = [b["valid_loss"]["all"] for b in budget_records({variant: rs}, budget)]
        rows.append([f"`{variant}`", str(len(rs)),
                     protocol.mean_std([protocol.final_loss(r) for r in rs]),
                     protocol.mean_std([float(smooth(r["ce"], window)[-1]) for r in rs]),
                     protocol.mean_std([r["cum_flops"][-1] / 1e9 for r in rs]),
                     protocol.mean_std(at_budget_valid), protocol.mean_std(at_budget_train),
                     protocol.mean_std([float(np.mean(r["active"][np.isfinite(r["active"])]))
                          for r in rs if np.isfinite(r["active"]).any()]),
                     protocol.mean_std([r["wall_seconds"] for r in rs])])
    lines = [f"# {sweep.title}", ""] + sweep_lib.reproduce_lines(
        sweep.name, sweep_file, from_records=False) + [
             f"(The report itself is written by `scripts/evomoe_report.py {sweep_file}` from "
             "the runs' `metrics.jsonl` and `summary.json`.)", "",
             sweep.description.strip(), "",
             "## Results (mean ± std over seeds)", "",
             f"Equal-FLOPs budget: {budget / 1e9:.1f} GFLOPs, the smallest variant's total "
             "(training FLOPs as counted by `experiments.train.flops`: 3 x forward matmul FLOPs, "
             "experts per row actually processed).", "",
             f"| variant | seeds | valid loss @ step {last} | train CE @ {last} (last "
             f"{window}) | GFLOPs @ {last} | valid loss @ budget | train CE @ budget | "
             "mean active experts (MoE steps) | wall s / run |",
             "|" + "---|" * 9]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    records = [r for rs in runs.values() for r in rs]
    planned = [(variant, seed) for variant, _ in sweep.runs() for seed in sweep.seeds]
    lines[4:4] = claims.status_lines(planned, records)
    if sweep.claims:
        lines += ["", "## The paper's claims", ""]
        lines += ["### At equal steps (the final validation loss, step "
                  f"{last})", ""]
        lines += claims.claim_lines(sweep.claims, records, sweep.claim_threshold)
        lines += [f"### At equal training FLOPs (the validation loss at {budget / 1e9:.1f} "
                  "GFLOPs, interpolated on each run's curve)", ""]
        lines += claims.claim_lines(sweep.claims, budget_records(runs, budget),
                                    sweep.claim_threshold)
    elif "evomoe" in runs and "switch_top1" in runs:
        paired = protocol.paired(records, "evomoe", "switch_top1")
        lines += ["", f"EvoMoE minus Switch, final validation loss, paired by seed: "
                  f"{', '.join(f'{d:+.4f}' for d in paired.diffs)} (mean {paired.mean:+.4f}).",
                  "", f"**Paper's claim (better than Switch at equal steps):** "
                  f"{protocol.verdict(paired, THRESHOLD).text()}"]
    if sweep.findings:
        lines += ["", "## Findings", "", sweep.findings.strip()]
    lines += ["", "Losses in nats per byte. Valid loss @ budget: the validation curve "
              "(at every evaluation) linearly interpolated at the FLOPs budget; train CE @ budget: "
              f"the {window}-step trailing mean of the train CE at that budget.", "",
              f"![loss curves]({sweep.name}/loss_curves.png)", "",
              f"![active experts per token]({sweep.name}/active_experts.png)", "",
              f"![cumulative FLOPs]({sweep.name}/flops.png)", "",
              "## Runs", "", "Workdirs relative to the sweep root (`scripts/sweep.py --root`).", ""]
    lines += protocol.run_table(records)
    out = docs_dir / f"{sweep.name}.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (figures / sweep_lib.RECORDS_FILE).write_text(json.dumps(
        [{k: v for k, v in r.items() if not isinstance(v, np.ndarray) and k != "curves"}
         for r in records], indent=1))
    return out


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("sweep_file", help="gin_configs/sweeps/evomoe.gin")
    parser.add_argument("--root", default="workdirs/sweeps", help="where the run workdirs are")
    parser.add_argument("--docs_dir", default="docs/experiments", help="where the report goes")
    parser.add_argument("--window", type=int, default=10, help="smoothing window (steps)")
    args = parser.parse_args(argv)
    sweep = sweep_lib.load_sweep(args.sweep_file)
    runs = load_runs(sweep, Path(args.root).absolute())
    if not runs:
        print(f"no finished runs under {args.root}", file=sys.stderr)
        return 1
    report = write_report(sweep, runs, args.sweep_file, Path(args.docs_dir), args.window)
    print(f"wrote {report} ({sum(len(r) for r in runs.values())} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
