"""Report of the research preset's calibration (docs/experiments/calibration.md).

  python scripts/sweep.py gin_configs/sweeps/calibration.gin   # trains (resumable)
  python scripts/calibration_report.py                         # from the runs under --root
  python scripts/calibration_report.py --from_records          # from the committed records

Collects the finished runs of the calibration sweep (`experiments.reporting.sweep.
collect_run`, plus parameter counts and each run's config.gin), writes them (no per-step
curves) to docs/experiments/calibration/records.json and writes the report: every MoE
candidate paired by seed with the dense model of equal active parameters and with its
dense model of equal total parameters, judged by `experiments.reporting.protocol` at 3
standard errors. With `--from_records` nothing else is read and the report comes out
identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from experiments.reporting import protocol
from experiments.reporting import sweep as sweep_lib
from experiments.runtime import cli

SWEEP = "gin_configs/sweeps/calibration.gin"
PRESET = "gin_configs/experiments/research.gin"
DOCS = Path("docs/experiments")
NAME = "calibration"
THRESHOLD = 3.0  # standard errors of the paired difference (issue 17's calibration target)
ACTIVE = "dense_active"  # one model for every candidate (see the sweep file)
# Candidate c has variants `c_moe` and `c_dense_total`.
MOE_SUFFIX, TOTAL_SUFFIX = "_moe", "_dense_total"


def collect(root: Path) -> list[dict[str, Any]]:
    """Records of the sweep's finished runs, with parameter counts and config.gin."""
    sweep = sweep_lib.load_sweep(SWEEP)
    records = []
    for variant, _ in sweep.runs():
        for seed in sweep.seeds:
            workdir = sweep_lib.run_dir(root, sweep, variant, seed)
            if (workdir / "summary.json").exists():
                record = sweep_lib.collect_run(workdir, variant, seed, root=root)
                record.pop("curves")
                record.update(param_counts(workdir))
                # Every binding of the run: a test checks the preset is the calibrated one.
                record["config"] = (workdir / "config.gin").read_text()
                records.append(record)
    return records


def _parse(gin_files: list[str], params: list[str]):
    # pylint: disable=g-import-not-at-top
    import gin

    from experiments.runtime import gin_utils
    from experiments.train import trainer  # noqa: F401  registers the configurables

    gin.clear_config()
    gin_utils.parse(gin_files, params)
    return gin


def param_counts(workdir: Path) -> dict[str, int]:
    """`{'params': total, 'active_params': per token}` of the run's model (shapes only)."""
    # pylint: disable=g-import-not-at-top
    from flax import nnx

    from experiments.data.config import DataConfig
    from layers.transformer import TransformerLM

    gin = _parse([str(workdir / "config.gin")], [])
    vocab_size = DataConfig().vocab_size()
    model = nnx.eval_shape(lambda: TransformerLM(vocab_size=vocab_size, rngs=nnx.Rngs(0)))
    gin.clear_config()
    return {"params": int(model.param_count()), "active_params": int(model.active_param_count())}


def preset_config(seed: int) -> str:
    """config.gin of a run of the preset as committed, with `train.seed = seed`."""
    gin = _parse([PRESET], [f"train.seed = {seed}"])
    text = gin.config_str()
    gin.clear_config()
    return text


def preset_candidate(records: list[dict[str, Any]]) -> str | None:
    """The candidate whose MoE runs are the committed preset (None: none of them)."""
    for r in records:
        if r["variant"].endswith(MOE_SUFFIX) and r["config"] == preset_config(r["seed"]):
            return r["variant"].removesuffix(MOE_SUFFIX)
    return None


def candidates(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["variant"].removesuffix(MOE_SUFFIX) for r in records
                              if r["variant"].endswith(MOE_SUFFIX)))


def _gap(records, variant: str, baseline: str) -> tuple[str, str]:
    """(`mean ± SE (n)` of variant - baseline paired by seed, the verdict's outcome)."""
    if not {variant, baseline} <= {r["variant"] for r in records}:
        return "not run", "-"
    p = protocol.paired(records, variant, baseline)
    if p.n < 2:
        return f"{p.mean:+.4f} (n={p.n})" if p.n else "n=0", protocol.verdict(p, THRESHOLD).outcome
    return f"{p.mean:+.4f} ± {p.se:.4f} (n={p.n})", protocol.verdict(p, THRESHOLD).outcome


def candidate_table(records: list[dict[str, Any]], preset: str | None) -> list[str]:
    runs = protocol.by_variant(records)
    lines = ["| candidate | params (active) | MoE valid loss | MoE - dense_active | verdict "
             f"({THRESHOLD:g} SE) | MoE - dense_total | MoE wall s / run | steps/s | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in candidates(records):
        moe = list(runs[c + MOE_SUFFIX].values())
        active_gap, outcome = _gap(records, c + MOE_SUFFIX, ACTIVE)
        total_gap, _ = _gap(records, c + MOE_SUFFIX, c + TOTAL_SUFFIX)
        name = f"`{c}`" + (" (the preset)" if c == preset else "")
        lines.append(
            f"| {name} | {moe[0]['params']:,} ({moe[0]['active_params']:,}) | "
            f"{protocol.format_mean_se([protocol.final_loss(r) for r in moe])} | {active_gap} | "
            f"{outcome} | {total_gap} | {protocol.mean_std([r['wall_seconds'] for r in moe], 0)} | "
            f"{protocol.mean_std([r['steps_per_second'] for r in moe], 2)} | "
            f"{protocol.mean_std([r['load_average'] for r in moe], 1)} |")
    return lines


def render(records: list[dict[str, Any]], sweep: sweep_lib.Sweep) -> str:
    """The report's markdown (the sweep's description and findings as its text)."""
    preset = preset_candidate(records)
    lines = [f"# {sweep.title}", ""] + sweep_lib.reproduce_lines(NAME, SWEEP) + [
        "(The report itself is written by `scripts/calibration_report.py`.)", "",
        sweep.description.strip(), ""]
    if sweep.findings:
        lines += ["## Findings", "", sweep.findings.strip(), ""]
    lines += ["## Candidates", "",
              "Paired differences of the final validation loss (nats/byte) by seed, mean ± "
              "standard error; the verdict judges \"the MoE has lower loss than the dense model "
              f"of equal active parameters\" at {THRESHOLD:g} SE. Wall seconds include start-up "
              "and compilation; steps/s is the training loop's; load is the mean 1-minute load "
              "average of this 2-core machine during the run (shared with other jobs, which "
              "inflates the times).", ""]
    lines += candidate_table(records, preset) + [""]
    for c in candidates(records):
        for baseline in (ACTIVE, c + TOTAL_SUFFIX):
            if baseline in {r["variant"] for r in records}:
                v = protocol.verdict(protocol.paired(records, c + MOE_SUFFIX, baseline),
                                     THRESHOLD)
                lines += [f"- **`{c}{MOE_SUFFIX}` has lower validation loss than "
                          f"`{baseline}`** — {v.text()}"]
    lines += ["", "## Every variant", ""]
    lines += protocol.variant_table(records, baseline=ACTIVE, threshold=THRESHOLD) + [""]
    lines += [f"![validation loss vs steps and FLOPs]({NAME}/loss_curves.png)", "",
              "## Runs", "", "Workdirs relative to the sweep root (`scripts/sweep.py --root`).",
              ""]
    lines += protocol.run_table(records)
    return "\n".join(lines) + "\n"


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="workdirs/sweeps", help="where the run workdirs are")
    parser.add_argument("--from_records", action="store_true",
                        help=f"read only {DOCS}/{NAME}/{sweep_lib.RECORDS_FILE}")
    args = parser.parse_args(argv)
    records_file = DOCS / NAME / sweep_lib.RECORDS_FILE
    if args.from_records:
        records = json.loads(records_file.read_text())
    else:
        records = collect(Path(args.root).absolute())
        if not records:
            print(f"no finished runs under {args.root}", file=sys.stderr)
            return 1
        records_file.parent.mkdir(parents=True, exist_ok=True)
        records_file.write_text(json.dumps(records, indent=1) + "\n")
    protocol.plot_loss_curves(records, DOCS / NAME / "loss_curves.png",
                              title="calibration sweep, mean over seeds")
    out = DOCS / f"{NAME}.md"
    out.write_text(render(records, sweep_lib.load_sweep(SWEEP)), encoding="utf-8")
    print(f"wrote {out} ({len(records)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
