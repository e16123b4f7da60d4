"""The sparse-upcycling experiment (docs/experiments/upcycling.md).

  python scripts/upcycling_sweep.py --root=workdirs/upcycling --seeds=0,1,2 \
      --json=docs/experiments/upcycling.json --plot=docs/experiments/upcycling.png

Per seed, from --sweep_gin (default gin_configs/sweeps/upcycling.gin, research scale;
upcycling_tiny.gin: the earlier tiny scale) (N = Checkpointer.save_every,
N + M = train.num_steps):
  dense     the dense model trained N + M steps (its steps N..N+M are the dense
            continuation of the checkpoint at N);
  e8_top2   checkpoint N upcycled (Komatsuzaki et al.): every other FFN -> 8
            copies, top-2 with raw softmax weights, router N(0, 0.02²), no
            weight scaling; trained to N + M;
  e8_noise  as e8_top2, each copy plus Gaussian noise (std 0.01) so the
            experts start apart;
  e8_drop   as e8_top2 with Drop-Upcycling (Nakamura et al. 2025): half of
            each expert's intermediate units re-initialised;
  e32_g4    checkpoint N upcycled (He et al.): 32 experts of d_ff/4 (G = 4),
            top-8, virtual-group router, softmax-then-top-k with the a^(1/2)
            weight scaling; trained to N + M;
  scratch   the e8_top2 architecture trained from scratch N + M steps.
Runs that finished (summary.json present) are skipped, so the command resumes.
The summary pairs every run with `dense` by seed (final validation loss,
`experiments.reporting.protocol`, verdict at 2 standard errors); `--from_json`
recomputes that from the summary's per-seed final losses alone (no runs needed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gin
import numpy as np

from experiments.convert.upcycle_checkpoint import UpcycleConfig, upcycle
from experiments.reporting import protocol
from experiments.reporting.metrics import read_jsonl
from experiments.runtime import cli, gin_utils
from experiments.train.trainer import train_unless_finished

SWEEP_GIN = Path(__file__).resolve().parent.parent / "gin_configs" / "sweeps" / "upcycling.gin"
UPCYCLED = {
    "e8_top2": (UpcycleConfig(moe_layers="every_other", num_experts=8, k=2, granularity=1,
                              router_init="normal", weight_scaling="none"),
                ["MoeLayer.dispatch = 'sort'", "MoeLayer.capacity_factor = None"]),
    "e8_noise": (UpcycleConfig(moe_layers="every_other", num_experts=8, k=2, granularity=1,
                               router_init="normal", weight_scaling="none", diversify="noise",
                               noise_std=0.01),
                 ["MoeLayer.dispatch = 'sort'", "MoeLayer.capacity_factor = None"]),
    "e8_drop": (UpcycleConfig(moe_layers="every_other", num_experts=8, k=2, granularity=1,
                              router_init="normal", weight_scaling="none",
                              diversify="drop_upcycling", diversify_ratio=0.5),
                ["MoeLayer.dispatch = 'sort'", "MoeLayer.capacity_factor = None"]),
    "e32_g4": (UpcycleConfig(moe_layers="every_other", num_experts=32, k=8, granularity=4,
                             router_init="virtual_group", weight_scaling="balanced"),
               ["MoeLayer.dispatch = 'sort'", "MoeLayer.capacity_factor = None"]),
}
RUNS = ("dense", "e8_top2", "e8_noise", "e8_drop", "e32_g4", "scratch")
THRESHOLD = 2.0  # standard errors of the paired difference (the report's verdicts)


def _curves(workdir: Path) -> dict[str, list]:
    valid = read_jsonl(workdir / "metrics.jsonl", "valid")
    train_records = read_jsonl(workdir / "metrics.jsonl", "train")
    return {"valid": [[r["step"], r["loss"]] for r in valid],
            "train": [[r["step"], r["ce"]] for r in train_records]}


def run_seed(root: Path, seed: int, extra: list[str], sweep_gin: Path = SWEEP_GIN) -> dict:
    seed_dir = root / f"seed{seed}"
    dense = seed_dir / "dense"
    train_unless_finished(dense, [str(sweep_gin)], [f"train.seed = {seed}", *extra])
    gin.clear_config()
    gin_utils.parse([str(sweep_gin)], extra)
    upcycle_step = gin.query_parameter("Checkpointer.save_every")
    out = {"dense": _curves(dense), "upcycle_step": upcycle_step}
    for name, (config, params) in UPCYCLED.items():
        workdir = seed_dir / name
        record_file = workdir / "upcycle.json"
        if not record_file.exists():
            config = UpcycleConfig(**{**config.__dict__, "seed": seed,
                                      "dense_step": upcycle_step})
            upcycle(dense, workdir, gin_params=params, config=config, verify=True,
                    verify_batches=1000)
        train_unless_finished(workdir, [str(workdir / gin_utils.CONFIG_FILE)], [])
        record = json.loads(record_file.read_text())
        curves = _curves(workdir)
        # The upcycled model before any MoE step, on the same validation batches.
        curves["valid"].insert(0, [upcycle_step, record["verify"]["moe_loss"]])
        out[name] = dict(curves, step0=record["verify"], param_count=record["moe_param_count"],
                         dense_param_count=record["dense_param_count"])
    scratch = seed_dir / "scratch"
    train_unless_finished(scratch, [str(sweep_gin)],
                          [f"train.seed = {seed}", "TransformerLM.moe_every = 2", *extra])
    out["scratch"] = _curves(scratch)
    return out


def summarize(results: dict[int, dict]) -> dict:
    """Mean/min/max over seeds of each run's validation curve, the final
    validation losses and the step-0 loss jumps."""
    seeds = sorted(results)
    summary = {"seeds": seeds, "upcycle_step": results[seeds[0]]["upcycle_step"], "runs": {}}
    for run in RUNS:
        steps = [s for s, _ in results[seeds[0]][run]["valid"]]
        losses = np.array([[loss for _, loss in results[s][run]["valid"]] for s in seeds])
        entry = {"steps": steps, "valid_mean": losses.mean(0).tolist(),
                 "valid_min": losses.min(0).tolist(), "valid_max": losses.max(0).tolist(),
                 "final_valid": losses[:, -1].tolist()}
        if run in UPCYCLED:
            jumps = [results[s][run]["step0"]["loss_diff"] for s in seeds]
            entry["step0_loss_jump"] = jumps
            entry["step0_max_abs_logit_diff"] = [
                results[s][run]["step0"]["max_abs_logit_diff"] for s in seeds]
            entry["param_count"] = results[seeds[0]][run]["param_count"]
            summary["dense_param_count"] = results[seeds[0]][run]["dense_param_count"]
        summary["runs"][run] = entry
    summary["paired_vs_dense"] = paired_vs_dense(summary)
    return summary


def paired_vs_dense(summary: dict) -> dict:
    """`{run: paired differences run - dense of the final validation loss by seed}`."""
    records = [{"variant": run, "seed": seed, "workdir": f"seed{seed}/{run}",
                "valid_loss": {"all": loss}}
               for run, entry in summary["runs"].items()
               for seed, loss in zip(summary["seeds"], entry["final_valid"])]
    out = {}
    for run in summary["runs"]:
        if run == "dense":
            continue
        paired = protocol.paired(records, run, "dense")
        out[run] = {"seeds": list(paired.seeds), "diffs": list(paired.diffs),
                    "mean": paired.mean, "se": paired.se,
                    "verdict": protocol.verdict(paired, THRESHOLD).text()}
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"dense": "dense (continued after N)", "e8_top2": "upcycled E=8 top-2 (copy)",
              "e8_noise": "upcycled E=8 top-2 (copy + noise)",
              "e8_drop": "upcycled E=8 top-2 (drop-upcycling 0.5)",
              "e32_g4": "upcycled E=32 G=4 top-8", "scratch": "MoE E=8 top-2 from scratch"}
    for run, entry in summary["runs"].items():
        ax.plot(entry["steps"], entry["valid_mean"], label=labels[run], marker=".")
        ax.fill_between(entry["steps"], entry["valid_min"], entry["valid_max"], alpha=0.2)
    ax.axvline(summary["upcycle_step"], color="gray", linestyle=":", label="upcycling point N")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"Sparse upcycling, {len(summary['seeds'])} seeds (band: min..max)")
    ax.legend()
    lows = [min(e["valid_min"][len(e["valid_min"]) // 3:]) for e in summary["runs"].values()]
    highs = [max(e["valid_max"][len(e["valid_max"]) // 3:]) for e in summary["runs"].values()]
    ax.set_ylim(min(lows) - 0.05, max(highs) + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", help="Directory for the runs' workdirs.")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sweep_gin", default=str(SWEEP_GIN.relative_to(SWEEP_GIN.parents[2])),
                        help="the runs' configuration (default: the research-scale "
                             "gin_configs/sweeps/upcycling.gin; upcycling_tiny.gin: the "
                             "earlier tiny scale)")
    parser.add_argument("--gin_param", action="append", default=[],
                        help="Extra binding for every run (e.g. 'train.num_steps = 100').")
    parser.add_argument("--json", required=True, help="Where to write the summary.")
    parser.add_argument("--plot", default=None, help="Where to write the loss-curve plot.")
    parser.add_argument("--from_json", action="store_true",
                        help="recompute the paired differences of the summary already in "
                             "--json (no runs, no plot)")
    args = parser.parse_args(argv)
    if args.from_json:
        summary = json.loads(Path(args.json).read_text(encoding="utf-8"))
        summary["paired_vs_dense"] = paired_vs_dense(summary)
    elif args.root is None:
        parser.error("--root is required (or --from_json)")
    else:
        sweep_gin = Path(args.sweep_gin)
        if not sweep_gin.is_file():
            parser.error(f"--sweep_gin: no such gin file {args.sweep_gin!r}")
        results = {}
        for i, s in enumerate(args.seeds.split(",")):
            print(f"[upcycling] seed {s}: {i} of {len(args.seeds.split(','))} seeds done "
                  f"(6 runs per seed; finished runs are skipped)", file=sys.stderr, flush=True)
            results[int(s)] = run_seed(Path(args.root), int(s), args.gin_param, sweep_gin)
        summary = summarize(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if args.plot and not args.from_json:
        plot(summary, Path(args.plot))
    for run, entry in summary["runs"].items():
        jump = entry.get("step0_loss_jump")
        print(f"{run:8s} final valid {np.mean(entry['final_valid']):.4f} "
              f"(seeds {[f'{v:.4f}' for v in entry['final_valid']]})"
              + (f"; step-0 jump {[f'{j:+.4f}' for j in jump]}" if jump else ""))
    for run, entry in summary["paired_vs_dense"].items():
        print(f"{run} vs dense: {entry['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
