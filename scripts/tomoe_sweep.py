"""ToMoE vs static structural pruning at equal active hidden units, no fine-tuning
(docs/experiments/tomoe_pruning.md).

  python scripts/tomoe_sweep.py --root=workdirs/sweeps/tomoe_pruning --seeds=0,1,2
  python scripts/tomoe_sweep.py --root=workdirs/sweeps/tomoe_pruning --report_only
  python scripts/tomoe_sweep.py --from_records      # from the committed records

(`make experiment NAME=tomoe_pruning` runs the first.) Per seed s, under <root>/seed<s>/:
  dense                           the dense source (--sweep_gin, train.seed = s), trained
                                  when its summary.json is absent (a workdir already there,
                                  e.g. a link to an earlier run of the same config, is used);
  tomoe_e<E>_f<pct>[_untrained]   `scripts/dense_to_moe.py --method=tomoe` of its last
                                  checkpoint with E experts and active fraction pct/100
                                  (_untrained: 0 router steps), verified on the preset's
                                  validation batches; the conversion also reports the
                                  static (magnitude) pruning loss at the same fraction.
A conversion that finished (tomoe.json) is skipped, so the command resumes; each
conversion runs at every seed before the next one. The report, its records
(docs/experiments/tomoe_pruning/records.json: workdirs relative to --root) and the plot
are written after every conversion and at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

from experiments.convert.tomoe import TOMOE_FILE, ToMoEConfig, tomoe
from experiments.reporting import surgery_experiments as se
from experiments.runtime import cli
from experiments.train.trainer import train_unless_finished

REPO = Path(__file__).resolve().parents[1]
NAME = "tomoe_pruning"
SWEEP_GIN = Path("gin_configs/sweeps") / f"{NAME}.gin"
COMMAND = f"python scripts/experiment.py {NAME}"
FRACTIONS = (0.5, 0.25)
EXPERTS = (8, 16)
UNTRAINED_EXPERTS = (8,)  # the router-training ablation
ROUTER = ToMoEConfig(num_experts=8, k=8)  # the tool's defaults for everything else
VERIFY_BATCHES = 16  # the preset's validation set (DataConfig.eval_max_batches)


def conversions() -> list[tuple[str, int, float, int]]:
    """(directory name, E, fraction, router steps) of every conversion of a seed, in the
    order they run: the trained ToMoE variants first, the untrained ablation last."""
    out = [(se.variant_name("tomoe", f, e), e, f, ROUTER.steps)
           for e in EXPERTS for f in FRACTIONS]
    return out + [(se.variant_name("tomoe_untrained", f, e), e, f, 0)
                  for e in UNTRAINED_EXPERTS for f in FRACTIONS]


def run(root: Path, seeds: list[int], sweep_gin: Path, log=print,
        after_each=lambda: None) -> None:
    """Trains the dense sources that are absent, then converts what is missing: one
    conversion at every seed before the next conversion (an interrupted sweep leaves
    paired results), `after_each()` after each conversion."""
    for seed in seeds:
        dense = root / f"seed{seed}" / "dense"
        if not (dense / "summary.json").exists():
            log(f"[{NAME}] seed {seed}: training the dense source")
        train_unless_finished(dense, se.run_gin_files(sweep_gin), [f"train.seed = {seed}"])
    for name, e, f, steps in conversions():
        for seed in seeds:
            out = root / f"seed{seed}" / name
            if (out / TOMOE_FILE).exists():
                continue
            log(f"[{NAME}] seed {seed}: {name}")
            config = dataclasses.replace(ROUTER, num_experts=e, k=None, active_fraction=f,
                                         steps=steps, seed=seed)
            tomoe(root / f"seed{seed}" / "dense", out, config, verify=True,
                  verify_batches=VERIFY_BATCHES)
            after_each()


def collect(root: Path, seeds: list[int]) -> list[dict]:
    """Records of the finished conversions (surgery_experiments' tomoe_pruning fields)."""
    records: dict[tuple[str, int], dict] = {}
    for seed in seeds:
        for name, e, f, steps in conversions():
            path = root / f"seed{seed}" / name / TOMOE_FILE
            if not path.exists():
                continue
            rec = json.loads(path.read_text())
            v = rec["verify"]
            workdir = f"seed{seed}/{name}"
            records.setdefault(("dense", seed), {
                "variant": "dense", "seed": seed, "workdir": f"seed{seed}/dense",
                "method": "dense", "fraction": 1.0, "valid_loss": {"all": v["dense_loss"]},
                "reused": (root / f"seed{seed}" / "dense").is_symlink()})
            static = se.variant_name("static", f)
            if (static, seed) not in records:
                records[(static, seed)] = {
                    "variant": static, "seed": seed, "workdir": workdir, "method": "static",
                    "fraction": f, "valid_loss": {"all": v["static_pruning_loss"]}}
            elif not math.isclose(records[(static, seed)]["valid_loss"]["all"],
                                  v["static_pruning_loss"], rel_tol=1e-5):
                raise ValueError(f"{workdir}: static pruning loss {v['static_pruning_loss']} "
                                 f"differs from {records[(static, seed)]['workdir']}'s")
            records[(name, seed)] = {
                "variant": name, "seed": seed, "workdir": workdir,
                "method": "tomoe" if steps else "tomoe_untrained", "fraction": f,
                "num_experts": e, "valid_loss": {"all": v["moe_loss"]},
                "layer_errors": {n: m["error"] for n, m in rec["layers"].items()}}
    return sorted(records.values(), key=lambda r: (-r["fraction"], r["method"],
                                                   r.get("num_experts", 0), r["seed"]))


def planned(seeds: list[int]) -> list[tuple[str, int]]:
    names = ["dense"]
    for f in FRACTIONS:
        names.append(se.variant_name("static", f))
        names += [n for n, _, ff, _ in conversions() if ff == f]
    return [(n, s) for n in names for s in seeds]


def write_report(records: list[dict], seeds: list[int], docs: Path) -> None:
    config = {**dataclasses.asdict(ROUTER), "verify_batches": VERIFY_BATCHES}
    se.write_records(docs / NAME / "records.json", records)
    if records:
        se.tomoe_plot(records, docs / NAME / "loss.png")
    se.write_atomic(docs / f"{NAME}.md", se.tomoe_markdown(
        records, planned(seeds), config=config, command=COMMAND))


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    se.add_driver_flags(
        parser, sweep_gin=str(SWEEP_GIN), root_help="Directory of the runs (<root>/seed<s>/...).",
        sweep_gin_help="the dense source's config (trained when absent)",
        report_only_help="train and convert nothing; report the finished conversions")
    args = parser.parse_args(argv)
    seeds, sweep_gin = se.check_driver_flags(parser, args, REPO)
    docs = Path(args.docs_dir)
    if args.from_records:
        records = se.read_records(docs / NAME / "records.json")
    else:
        root = Path(args.root).absolute()
        if not args.report_only:
            run(root, seeds, sweep_gin, log=lambda m: print(m, file=sys.stderr, flush=True),
                after_each=lambda: write_report(collect(root, seeds), seeds, docs))
        records = collect(root, seeds)
    write_report(records, seeds, docs)
    for r in records:
        print(f"{r['variant']:24s} seed {r['seed']}: valid {r['valid_loss']['all']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
