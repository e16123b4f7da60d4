"""The expert-pruning experiment (UNCURL's threshold; merging vs pruning): runs and report.

  python scripts/pruning_sweep.py --root=workdirs/sweeps/pruning \
      --json=docs/experiments/pruning.json --report=docs/experiments/pruning.md \
      --plot=docs/experiments/pruning.png
  python scripts/pruning_sweep.py --from_records --json=docs/experiments/pruning.json \
      --report=docs/experiments/pruning.md --plot=docs/experiments/pruning.png

Layout under --root (every workdir in the records is relative to it):
  sources/e<E>/seed<s>   the research-preset MoE with E experts, top-2 (`--source_root`
                         overrides where they are; a missing one is trained first);
  surgery/e<E>/seed<s>/<domain>/<method>_keep<E'>/eval.json
                         the source pruned (uncurl, frequency, random) or merged (merge:
                         UNCURL's spectral clusters, frequency-weighted) for one domain of the
                         embedded corpus, in memory: that domain's validation loss and the
                         kept experts / groups per layer (no checkpoint);
  recovered/...          the same surgery written as a workdir (scripts/prune_experts.py's
                         code), fine-tuned `--recovery_steps` more steps (train.num_steps
                         extended, optimizer state carried);
  scratch/e<E'>/seed<s>  an MoE of E' experts trained from scratch for the source's steps +
                         the recovery steps (the same training compute: top-2 either way).
Every stage skips what is finished and a training run resumes from its checkpoint, so
rerunning the command continues. `--stages` and the filters (`--experts`, `--seeds`, ...)
select a part (the experiment queue runs it in parts); the report lists what is missing.
--from_records rewrites the report and plot from the committed JSON alone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from experiments.convert import expert_surgery as ex
from experiments.convert.surgery_eval import SurgeryEvaluator
from experiments.reporting import pruning_report as pr
from experiments.runtime import cli, gin_utils

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "gin_configs" / "experiments" / "research.gin"
STAGES = ("sources", "surgery", "scratch", "recover", "report")
EVAL_FILE = "eval.json"


def log(message: str) -> None:
    print(f"[pruning {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def kept(e: int, fraction: float) -> int:
    return max(1, round(fraction * e))


def _train(workdir: Path, gin_files: list[str], params: list[str]) -> dict[str, Any]:
    """Trains (or resumes) unless summary.json exists; -> the summary."""
    from experiments.train.trainer import train_unless_finished  # pylint: disable=g-import-not-at-top

    if not (workdir / "summary.json").exists():
        log(f"training {workdir}")
    train_unless_finished(workdir, gin_files, params)
    return json.loads((workdir / "summary.json").read_text())


class Sweep:
    """The experiment's grid and its directories (see the module docstring)."""

    def __init__(self, args: Any):
        self.root = Path(args.root).absolute()
        self._evaluators: dict[tuple[int, int], SurgeryEvaluator] = {}
        self._steps: dict[int, dict] = {}
        self.preset = str(REPO / args.preset)
        self.source_root = Path(args.source_root or self.root / "sources").absolute()
        self.experts = [int(v) for v in args.experts.split(",")]
        self.seeds = [int(v) for v in args.seeds.split(",")]
        self.domains = args.domains.split(",")
        self.fractions = [float(v) for v in args.fractions.split(",")]
        self.methods = args.methods.split(",")
        self.recover_methods = [m for m in args.recover_methods.split(",") if m]
        self.recover_domains = [d for d in args.recover_domains.split(",") if d]
        self.recovery_steps = args.recovery_steps
        self.source_steps = args.source_steps
        self.eval_batches = args.eval_batches
        self.task_batches = args.task_batches
        sizes = sorted({kept(e, f) for e in self.experts for f in self.fractions})
        self.scratch_experts = (sizes if args.scratch_experts == "pruned"
                                else [int(v) for v in args.scratch_experts.split(",") if v])
        for name, values, allowed in (("--methods", self.methods, pr.METHODS),
                                      ("--recover_methods", self.recover_methods, pr.METHODS),
                                      ("--stages", args.stages.split(","), STAGES)):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{name}: {bad} not in {list(allowed)}")
        if any(not 0 < f < 1 for f in self.fractions):
            raise ValueError(f"--fractions must lie in (0, 1), got {self.fractions}")

    # Directories.
    def source(self, e: int, seed: int) -> Path:
        return self.source_root / f"e{e}" / f"seed{seed}"

    def unit(self, kind: str, e: int, seed: int, domain: str, method: str, f: float) -> Path:
        return self.root / kind / f"e{e}" / f"seed{seed}" / domain / f"{method}_keep{kept(e, f)}"

    def scratch(self, e: int, seed: int) -> Path:
        return self.root / "scratch" / f"e{e}" / f"seed{seed}"

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return f"<source_root>/{path.relative_to(self.source_root)}"

    def plan(self) -> dict[str, int]:
        n = len(self.seeds)
        return {"sources": len(self.experts) * n,
                "surgeries": len(self.experts) * n * len(self.domains) * len(self.fractions)
                * len(self.methods),
                "recovery fine-tunes": len(self.experts) * n * len(self.recover_domains)
                * len(self.fractions) * len(self.recover_methods),
                "from-scratch MoEs": len(self.scratch_experts) * n}

    # Stages.
    def train_source(self, e: int, seed: int) -> None:
        _train(self.source(e, seed), [self.preset],
               [f"train.seed = {seed}", f"MoeLayer.num_experts = {e}",
                f"train.num_steps = {self.source_steps}"])

    def source_loss(self, e: int, seed: int) -> dict[str, float]:
        """All domains' validation loss of the source (cached under the sweep root)."""
        cache = self.root / "evals" / f"source_e{e}_seed{seed}.json"
        if not cache.exists():
            result = ex.evaluate_workdir(self.source(e, seed), ex.TaskSpec(), self.eval_batches)
            _write_json(cache, result["domain_loss"])
        return json.loads(cache.read_text())

    def _task_config(self, e: int, seed: int, domain: str, method: str, f: float,
                     ) -> tuple[ex.TaskSpec, ex.SurgeryConfig]:
        task = ex.TaskSpec(domain=domain, split="train", batches=self.task_batches, seed=seed)
        config = ex.SurgeryConfig(keep=kept(e, f), seed=seed, grouping="spectral",
                                  method="frequency_weighted" if method == "merge" else method)
        return task, config

    def evaluator(self, e: int, seed: int) -> SurgeryEvaluator:
        """The source's in-memory surgery evaluator (kept; compiled steps shared by the
        seeds of one E)."""
        if (e, seed) not in self._evaluators:
            self._evaluators[(e, seed)] = SurgeryEvaluator(
                self.source(e, seed), self.eval_batches, steps=self._steps.setdefault(e, {}))
        return self._evaluators[(e, seed)]

    def surgery(self, e: int, seed: int, domain: str, method: str, f: float) -> None:
        """Prunes/merges in memory and writes the domain's loss to the unit's eval.json
        (`experiments.convert.surgery_eval`: the same plans as scripts/prune_experts.py)."""
        out = self.unit("surgery", e, seed, domain, method, f)
        if (out / EVAL_FILE).exists():
            return
        log(f"surgery {self.rel(out)}")
        task, config = self._task_config(e, seed, domain, method, f)
        result = self.evaluator(e, seed).run("merge" if method == "merge" else "prune",
                                             config, task)
        _write_json(out / EVAL_FILE, result)

    def recover(self, e: int, seed: int, domain: str, method: str, f: float) -> None:
        """The surgery written as a workdir (`prune_experts` / `merge_experts`) and
        fine-tuned `recovery_steps` more steps."""
        out = self.unit("recovered", e, seed, domain, method, f)
        if not out.exists():
            log(f"surgery for recovery {self.rel(out)}")
            task, config = self._task_config(e, seed, domain, method, f)
            operation = ex.merge_experts if method == "merge" else ex.prune_experts
            operation(self.source(e, seed), out, config, task)
        _train(out, [str(out / gin_utils.CONFIG_FILE)],
               [f"train.num_steps = {self.source_steps + self.recovery_steps}"])

    def train_scratch(self, e: int, seed: int) -> None:
        _train(self.scratch(e, seed), [self.preset],
               [f"train.seed = {seed}", f"MoeLayer.num_experts = {e}",
                f"train.num_steps = {self.source_steps + self.recovery_steps}"])

    def run(self, stages: list[str]) -> None:
        """The stages in order; each goes seed by seed (an interrupted sweep leaves paired
        results), the surgeries domain by domain."""
        if "sources" in stages:
            for seed in self.seeds:
                for e in self.experts:
                    self.train_source(e, seed)
        if "surgery" in stages:
            for d in self.domains:
                for seed in self.seeds:
                    for e in self.experts:
                        if not (self.source(e, seed) / "summary.json").exists():
                            log(f"surgery: no source e{e} seed{seed} yet; skipped")
                            continue
                        self.source_loss(e, seed)
                        for f in self.fractions:
                            for m in self.methods:
                                self.surgery(e, seed, d, m, f)
        if "scratch" in stages:
            for seed in self.seeds:
                for e in self.scratch_experts:
                    self.train_scratch(e, seed)
        if "recover" in stages:
            for seed in self.seeds:
                for e in self.experts:
                    if not (self.source(e, seed) / "summary.json").exists():
                        log(f"recover: no source e{e} seed{seed} yet; skipped")
                        continue
                    for d in self.recover_domains:
                        for f in self.fractions:
                            for m in self.recover_methods:
                                self.recover(e, seed, d, m, f)

    def records(self) -> list[dict[str, Any]]:
        """The finished runs of the plan as report records (`pruning_report`)."""
        out = []
        for e in self.experts:
            for seed in self.seeds:
                cache = self.root / "evals" / f"source_e{e}_seed{seed}.json"
                if cache.exists():
                    out.append({"kind": "source", "E": e, "seed": seed,
                                "workdir": self.rel(self.source(e, seed)),
                                "loss": json.loads(cache.read_text())})
                for d in self.domains:
                    for m in self.methods:
                        for f in self.fractions:
                            rec = self._surgery_record(e, seed, d, m, f)
                            if rec is not None:
                                out.append(rec)
        for e in self.scratch_experts:
            for seed in self.seeds:
                summary = self.scratch(e, seed) / "summary.json"
                if summary.exists():
                    s = json.loads(summary.read_text())
                    out.append({"kind": "scratch", "E": e, "seed": seed, "steps": s["step"],
                                "workdir": self.rel(self.scratch(e, seed)),
                                "loss": s["valid_loss"]})
        return out

    def _surgery_record(self, e: int, seed: int, d: str, m: str, f: float) -> dict | None:
        unit = self.unit("surgery", e, seed, d, m, f)
        if not (unit / EVAL_FILE).exists():
            return None
        rec = {"kind": "surgery", "E": e, "seed": seed, "domain": d, "method": m,
               "fraction": f, "kept": kept(e, f), "workdir": self.rel(unit),
               "loss": json.loads((unit / EVAL_FILE).read_text())["loss"], "recovered": None}
        summary = self.unit("recovered", e, seed, d, m, f) / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            rec.update(recovered=s["valid_loss"][d], recovery_steps=self.recovery_steps,
                       recovered_workdir=self.rel(summary.parent))
        return rec


def _write_json(path: Path, value: Any) -> None:
    """Atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    tmp.rename(path)


def write_outputs(data: dict[str, Any], json_path: Path, report: Path | None,
                  plot: Path | None) -> None:
    _write_json(json_path, data)
    res = pr.Results(data["records"])
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(pr.render(data), encoding="utf-8")
    if plot is not None and res.surgery:
        pr.plot(res, plot)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", help="the sweep directory (run workdirs)")
    parser.add_argument("--source_root", default=None,
                        help="where the trained MoEs are, as e<E>/seed<s> (default "
                             "<root>/sources); a missing one is trained there")
    parser.add_argument("--preset", default=str(PRESET.relative_to(REPO)),
                        help="gin file (from the repo root) of the sources and the "
                             "from-scratch MoEs (default: the research preset)")
    parser.add_argument("--experts", default="8,16", help="E of the trained MoEs (top-2)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--domains", default="code,prose", help="embedded-corpus domains")
    parser.add_argument("--fractions", default="0.75,0.5,0.25", help="keep fractions E'/E")
    parser.add_argument("--methods", default=",".join(pr.METHODS),
                        help=f"surgeries, of {list(pr.METHODS)}")
    parser.add_argument("--recover_methods", default="uncurl,frequency,random",
                        help="surgeries that get the recovery fine-tune ('' = none)")
    parser.add_argument("--recover_domains", default="code,prose",
                        help="domains whose surgeries get the recovery fine-tune")
    parser.add_argument("--recovery_steps", type=int, default=50)
    parser.add_argument("--source_steps", type=int, default=500,
                        help="training steps of the sources (the preset's train.num_steps)")
    parser.add_argument("--scratch_experts", default="pruned",
                        help="E' of the from-scratch MoEs: 'pruned' = every pruned size, "
                             "or a list ('' = none)")
    parser.add_argument("--eval_batches", type=int, default=16,
                        help="validation batches (the preset's DataConfig.eval_max_batches)")
    parser.add_argument("--task_batches", type=int, default=8,
                        help="training batches of the routing-statistics pass")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"of {list(STAGES)}")
    parser.add_argument("--json", required=True, help="the records (committed beside the report)")
    parser.add_argument("--report", default=None, help="the markdown report to write")
    parser.add_argument("--plot", default=None, help="the figure to write")
    parser.add_argument("--from_records", action="store_true",
                        help="no runs: rewrite --report and --plot from --json alone")
    args = parser.parse_args(argv)
    json_path = Path(args.json)
    if args.from_records:
        if not json_path.is_file():
            parser.error(f"--json: no records file {args.json!r} to rewrite the report from")
        data = json.loads(json_path.read_text(encoding="utf-8"))
        write_outputs(data, json_path, args.report and Path(args.report),
                      args.plot and Path(args.plot))
        return 0
    if args.root is None:
        parser.error("--root is required (or --from_records)")
    if not (REPO / args.preset).is_file():
        parser.error(f"--preset: no gin file {args.preset!r} under the repo root")
    for flag in ("recovery_steps", "source_steps", "eval_batches", "task_batches"):
        if getattr(args, flag) < (0 if flag == "recovery_steps" else 1):
            parser.error(f"--{flag} must be >= {0 if flag == 'recovery_steps' else 1}, "
                         f"got {getattr(args, flag)}")
    try:
        sweep = Sweep(args)
    except ValueError as e:
        parser.error(str(e))
    stages = args.stages.split(",")
    sweep.run(stages)
    if "report" in stages:
        data = {"settings": {k: getattr(sweep, k) for k in (
                    "experts", "seeds", "domains", "fractions", "methods", "recover_methods",
                    "recover_domains", "recovery_steps", "source_steps", "scratch_experts",
                    "eval_batches", "task_batches")}
                | {"preset": args.preset},
                "plan": sweep.plan(), "records": sweep.records()}
        write_outputs(data, json_path, args.report and Path(args.report),
                      args.plot and Path(args.plot))
        log(f"{len(data['records'])} records -> {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
