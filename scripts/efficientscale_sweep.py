"""Scale-up then scale-out (AquilaMoE's EfficientScale) vs upcycling the small model directly
vs the MoE from scratch, at equal steps (docs/experiments/efficientscale.md).

  python scripts/efficientscale_sweep.py --root=workdirs/sweeps/efficientscale --seeds=0,1,2
  python scripts/efficientscale_sweep.py --root=workdirs/sweeps/efficientscale --report_only
  python scripts/efficientscale_sweep.py --from_records      # from the committed records

(`make experiment NAME=efficientscale` runs the first.) Per seed s, under <root>/seed<s>/,
from --sweep_gin (the research preset MoE; N = Checkpointer.save_every = 250,
N + M = train.num_steps = 500):
  small_dense   the small dense model (SMALL below) trained N + M steps, checkpoint N kept;
  grown_dense   its checkpoint N grown to the preset's dense size (scale_up: fpi width,
                zero d_model; verified function-preserving), not trained;
  grown_e8      grown_dense upcycled (UPCYCLE: every layer E=8 of d_ff/2, top-2) and
                trained to N + M;
  small_e8      small_dense's checkpoint N upcycled the same way, trained to N + M;
  scratch       the preset MoE trained from scratch N + M steps.
A step that finished (summary.json, scale_up.json, upcycle.json) is skipped, so the
command resumes; training runs one at a time, every arm of a seed before the next seed.
The report, its records (docs/experiments/efficientscale/records.json: workdirs relative
to --root) and the plot are written after every seed and at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gin

from experiments.convert.scale_up import SCALE_UP_FILE, ScaleUpConfig, scale_up
from experiments.convert.upcycle_checkpoint import UPCYCLE_FILE, UpcycleConfig, upcycle
from experiments.reporting import surgery_experiments as se
from experiments.reporting.metrics import read_jsonl
from experiments.reporting.sweep import collect_run
from experiments.runtime import cli, gin_utils
from experiments.train.trainer import train_unless_finished

REPO = Path(__file__).resolve().parents[1]
NAME = "efficientscale"
SWEEP_GIN = Path("gin_configs/sweeps") / f"{NAME}.gin"
COMMAND = f"python scripts/experiment.py {NAME}"
# The small dense model: half the preset's width (head_dim 32 as in the preset), no MoE.
SMALL = ["TransformerLM.moe_every = 0", "TransformerLM.d_model = 64",
         "TransformerLM.num_heads = 2", "TransformerLM.d_ff = 256"]
GROW = ScaleUpConfig(d_model=128, d_ff=512, num_heads=4)  # the preset's dense size
UPCYCLE = UpcycleConfig(moe_layers="all", num_experts=8, k=2, granularity=2,
                        router_init="virtual_group", weight_scaling="balanced")
UPCYCLE_GIN = ["MoeLayer.dispatch = 'sort'", "MoeLayer.capacity_factor = None"]
VERIFY_BATCHES = 16  # the preset's validation set (DataConfig.eval_max_batches)


def schedule(sweep_gin: Path) -> tuple[int, int]:
    """(N, N + M) of the sweep config."""
    gin.clear_config()
    gin_utils.parse(se.run_gin_files(sweep_gin), [])
    n, total = gin.query_parameter("Checkpointer.save_every"), gin.query_parameter(
        "train.num_steps")
    gin.clear_config()
    if not 0 < n < total:
        raise ValueError(f"{sweep_gin}: Checkpointer.save_every={n} must lie inside "
                         f"(0, train.num_steps={total}): it is the upcycling step N")
    return n, total


def _upcycle(source: Path, out: Path, seed: int, step: int) -> None:
    if (out / UPCYCLE_FILE).exists():
        return
    config = UpcycleConfig(**{**UPCYCLE.__dict__, "seed": seed, "dense_step": step})
    upcycle(source, out, gin_params=UPCYCLE_GIN, config=config, verify=True,
            verify_batches=VERIFY_BATCHES)


def run_seed(root: Path, seed: int, sweep_gin: Path, log=print) -> None:
    """Trains and converts what is missing of one seed (module docstring)."""
    n, _ = schedule(sweep_gin)
    d = root / f"seed{seed}"
    log(f"[{NAME}] seed {seed}: small_dense")
    train_unless_finished(d / "small_dense", se.run_gin_files(sweep_gin),
                          [f"train.seed = {seed}", *SMALL])
    if not (d / "grown_dense" / SCALE_UP_FILE).exists():
        result = scale_up(d / "small_dense", d / "grown_dense",
                          ScaleUpConfig(**{**GROW.__dict__, "step": n}), verify=True,
                          verify_batches=VERIFY_BATCHES)
        if result.violations or not result.verify.ok:
            raise RuntimeError(f"scale-up of seed {seed} is not function-preserving: "
                               f"{result.violations or result.verify.render()}")
    for arm, source in (("grown_e8", d / "grown_dense"), ("small_e8", d / "small_dense")):
        log(f"[{NAME}] seed {seed}: {arm}")
        _upcycle(source, d / arm, seed, n)
        train_unless_finished(d / arm, [str(d / arm / gin_utils.CONFIG_FILE)], [])
    log(f"[{NAME}] seed {seed}: scratch")
    train_unless_finished(d / "scratch", se.run_gin_files(sweep_gin), [f"train.seed = {seed}"])


def _flops_per_step(workdir: Path) -> float:
    return next(r["flops"] for r in read_jsonl(workdir / "metrics.jsonl", "train")
                if "flops" in r)


def _record(workdir: Path, variant: str, seed: int, root: Path) -> dict:
    full = collect_run(workdir, variant, seed, root=root)
    summary = json.loads((workdir / "summary.json").read_text())
    return {"variant": variant, "seed": seed, "workdir": full["workdir"],
            "valid_loss": full["valid_loss"], "steps": full["steps"],
            "valid_curve": [list(p) for p in full["valid_curve"]],
            "wall_seconds": summary.get("wall_time_s"),
            "flops_per_step": [[0, _flops_per_step(workdir)]]}


def collect(root: Path, seeds: list[int], n: int) -> list[dict]:
    """Records of the finished runs (surgery_experiments' efficientscale fields)."""
    records = []
    for seed in seeds:
        d = root / f"seed{seed}"
        small = d / "small_dense"
        if not (small / "summary.json").exists():
            continue
        base = _record(small, "small_dense", seed, root)
        for arm in ("grown_e8", "small_e8"):
            if not (d / arm / "summary.json").exists():
                continue
            up = json.loads((d / arm / UPCYCLE_FILE).read_text())
            r = _record(d / arm, arm, seed, root)
            r["valid_curve"] = ([p for p in base["valid_curve"] if p[0] < n]
                                + [[n, None, up["verify"]["moe_loss"]]]
                                + [p for p in r["valid_curve"] if p[0] > n])
            r["flops_per_step"] = [[0, base["flops_per_step"][0][1]],
                                   [n, r["flops_per_step"][0][1]]]
            r["param_count"] = up["moe_param_count"]
            r["step0"] = {"small_loss": up["verify"]["dense_loss"],
                          "moe_loss": up["verify"]["moe_loss"]}
            if arm == "grown_e8":
                grow = json.loads((d / "grown_dense" / SCALE_UP_FILE).read_text())
                r["step0"].update(small_loss=grow["verify"]["source_loss"],
                                  grown_loss=grow["verify"]["grown_loss"],
                                  grow_max_abs_logit_diff=grow["verify"]["max_abs_logit_diff"])
            else:
                base["param_count"] = up["dense_param_count"]
            records.append(r)
        records.append(base)
        if (d / "scratch" / "summary.json").exists():
            records.append(dict(_record(d / "scratch", "scratch", seed, root),
                                reused=(d / "scratch").is_symlink()))
    order = {v: i for i, v in enumerate(se.ES_VARIANTS)}
    return sorted(records, key=lambda r: (order[r["variant"]], r["seed"]))


def write_report(records: list[dict], seeds: list[int], docs: Path, n: int, total: int) -> None:
    planned = [(v, s) for v in se.ES_VARIANTS for s in seeds]
    se.write_records(docs / NAME / "records.json", records)
    if records:
        se.efficientscale_plot(records, docs / NAME / "loss_curves.png", n)
    se.write_atomic(docs / f"{NAME}.md", se.efficientscale_markdown(
        records, planned, n_steps=n, m_steps=total - n, command=COMMAND))


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    se.add_driver_flags(
        parser, sweep_gin=str(SWEEP_GIN), root_help="Directory of the runs (<root>/seed<s>/<arm>).",
        sweep_gin_help=None,
        report_only_help="train and convert nothing; report the finished runs")
    args = parser.parse_args(argv)
    seeds, sweep_gin = se.check_driver_flags(parser, args, REPO)
    docs = Path(args.docs_dir)
    n, total = schedule(sweep_gin)
    if args.from_records:
        records = se.read_records(docs / NAME / "records.json")
    else:
        root = Path(args.root).absolute()
        if not args.report_only:
            for seed in seeds:
                run_seed(root, seed, sweep_gin, log=lambda m: print(m, file=sys.stderr,
                                                                     flush=True))
                write_report(collect(root, seeds, n), seeds, docs, n, total)
        records = collect(root, seeds, n)
    write_report(records, seeds, docs, n, total)
    for r in records:
        print(f"{r['variant']:12s} seed {r['seed']}: valid {r['valid_loss']['all']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
