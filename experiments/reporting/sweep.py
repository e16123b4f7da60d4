"""Sweeps: a grid of gin bindings x seeds, one workdir per run, resumable, with a report.

A sweep file (`gin_configs/sweeps/NAME.gin`) binds only `Sweep.*`:

    Sweep.gin_files = ['gin_configs/experiments/balance_tiny.gin']
    Sweep.variants = {'sequence': {'LossWeights.lbl_scope': 'sequence'}, ...}
    Sweep.grid = {'LossWeights.lbl_weight': [0.0, 0.01]}   # optional cartesian product
    Sweep.seeds = [0, 1, 2]

Every variant (each `variants` entry, crossed with every `grid` point) runs
once per seed with `scripts/train.py` in `<root>/NAME/<variant>/seed<k>`; a run
whose `summary.json` exists is skipped, and an interrupted one resumes from
its checkpoints. With `analyze_routing`, `scripts/analyze_routing.py` runs
after training. `write_report` collects the runs into
`docs/experiments/NAME.md` (table of mean +- std over seeds, PNG plots in
`docs/experiments/NAME/`).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import numpy as np

from experiments.reporting import claims, progress, protocol
from experiments.reporting import compute as compute_lib
from experiments.reporting.metrics import read_jsonl

REPO = Path(__file__).resolve().parents[2]
# Every run gets this binding from `Sweep.seeds`, after the sweep's own bindings.
SEED_BINDING = "train.seed"
RECORDS_FILE = "records.json"  # beside the report's plots: its runs, without per-step curves


@gin.configurable
@dataclasses.dataclass
class Sweep:
    """One sweep. `name` defaults to the sweep file's stem.

    Attributes:
      gin_files: the base configuration of every run (paths from the repo root).
      variants: `{variant name: {binding: value}}`; values are Python values,
        written into gin bindings with `repr` (a string starting with '@' is a gin
        reference, written as it is).
      grid: `{binding: [values]}`, crossed with every variant.
      seeds: `train.seed` values; every variant runs once per seed.
      bindings: extra bindings common to every run.
      variant_gin_files: `{variant: [gin files]}` parsed after `gin_files` for that
        variant only (before every binding): a variant that needs gin references
        (`@PhasePlan()`), which `variants` values cannot express.
      analyze_routing: run `scripts/analyze_routing.py` after each run.
      title, description: report heading and text (what the sweep tests).
      findings: what the finished runs showed (written after reading the
        results; rendered under the table).
      smoothing: steps averaged in the curves of the report.
      claims: `[[variant, baseline], ...]`: "variant reaches a lower final validation
        loss than baseline", each judged in the report on the differences paired by
        seed at `claim_threshold` standard errors (`experiments.reporting.claims`).
      claim_threshold: standard errors a claim's paired difference must clear.
      compute_columns: the report adds each variant's parameters and training /
        realised FLOPs per step (`experiments.reporting.compute`).
    """

    gin_files: Sequence[str] = ()
    variants: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    seeds: Sequence[int] = (0,)
    bindings: Sequence[str] = ()
    variant_gin_files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    analyze_routing: bool = False
    title: str = ""
    description: str = ""
    findings: str = ""
    smoothing: int = 10
    claims: Sequence[Sequence[str]] = ()
    claim_threshold: float = 3.0
    compute_columns: bool = False
    name: str = ""

    def __post_init__(self):
        if not self.gin_files:
            raise ValueError("Sweep.gin_files must name at least one gin file")
        if not self.seeds:
            raise ValueError("Sweep.seeds must not be empty")
        for key, values in self.grid.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"Sweep.grid[{key!r}] must be a non-empty list, got {values!r}")
        keys = {"bindings": [b.split("=", 1)[0].strip() for b in self.bindings],
                "grid": list(self.grid),
                **{f"variants[{v!r}]": list(b) for v, b in self.variants.items()}}
        for where, bound in keys.items():
            if SEED_BINDING in bound:
                raise ValueError(f"Sweep.{where} binds {SEED_BINDING}, which every run takes "
                                 f"from Sweep.seeds (the binding would be overridden); "
                                 f"list the seeds in Sweep.seeds")
        names = [name for name, _ in self.runs()]
        unknown = sorted(set(self.variant_gin_files) - set(dict(self.variants) or {"base": {}}))
        if unknown:
            raise ValueError(f"Sweep.variant_gin_files names variants {unknown} that "
                             f"Sweep.variants does not have")
        for claim in self.claims:
            if len(claim) != 2 or not set(claim) <= set(names):
                raise ValueError(f"Sweep.claims entries must be [variant, baseline] pairs of "
                                 f"the sweep's variants {names}, got {list(claim)!r}")
        if not self.claim_threshold > 0:
            raise ValueError(f"Sweep.claim_threshold must be > 0, got {self.claim_threshold}")

    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        """`[(variant name, bindings)]`, variants crossed with the grid."""
        variants = dict(self.variants) or {"base": {}}
        keys = list(self.grid)
        out = []
        for name, bindings in variants.items():
            for point in itertools.product(*(self.grid[k] for k in keys)):
                extra = dict(zip(keys, point))
                suffix = ",".join(f"{k.split('.')[-1]}={v}" for k, v in extra.items())
                out.append((f"{name},{suffix}" if suffix else name, {**bindings, **extra}))
        return out


def load_sweep(path: str | Path) -> Sweep:
    """Parses a sweep file (it may bind only `Sweep.*`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(errno.ENOENT, "sweep file not found", str(path))
    gin.clear_config()
    try:
        gin.parse_config_file(str(path))
        sweep = Sweep()
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"invalid sweep file {str(path)!r}: {e}") from e
    finally:  # the Sweep holds every value: leave no bindings behind for later Sweep()s
        gin.clear_config()
    if not sweep.name:
        sweep.name = Path(path).stem
    return sweep


def run_dir(root: Path, sweep: Sweep, variant: str, seed: int) -> Path:
    return root / sweep.name / variant.replace("/", "_") / f"seed{seed}"


def train_command(sweep: Sweep, bindings: Mapping[str, Any], seed: int, workdir: Path,
                  variant: str | None = None) -> list[str]:
    """The `scripts/train.py` command of one run (`variant`: the name in `Sweep.variants`,
    for its `variant_gin_files`; a grid point's name starts with it)."""
    args = [sys.executable, str(REPO / "scripts" / "train.py"), "--quiet", f"--workdir={workdir}"]
    extra = sweep.variant_gin_files.get((variant or "").split(",")[0], [])
    args += [f"--gin_file={f}" for f in [*sweep.gin_files, *extra]]
    params = list(sweep.bindings) + [f"{k} = {gin_value(v)}" for k, v in bindings.items()]
    params.append(f"{SEED_BINDING} = {seed}")
    return args + [f"--gin_param={p}" for p in params]


def gin_value(value: Any) -> str:
    """A variant's value in a gin binding: `repr`, except that a string starting with '@'
    is a gin reference written as it is (`'@MultiTokenPrediction'`)."""
    return value if isinstance(value, str) and value.startswith("@") else repr(value)


def run_sweep(sweep: Sweep, root: Path, *, log=print, order: str = "variant"
              ) -> list[dict[str, Any]]:
    """Runs (or skips, when finished) every variant x seed in `order` (`progress.schedule`:
    'variant' or 'seed'), logging a progress line with the ETA before and after every run
    it trains; returns their records."""
    plan = progress.schedule(sweep.runs(), sweep.seeds, order)
    dirs = [run_dir(root, sweep, variant, seed) for variant, _, seed in plan]
    finished = [(d / "summary.json").exists() for d in dirs]
    earlier = [_read_float(d / "wall_seconds.txt") for d, f in zip(dirs, finished) if f]
    trained: list[float] = []
    records = []
    for (variant, bindings, seed), workdir in zip(plan, dirs):
        if not (workdir / "summary.json").exists():
            log(progress.progress_line(sweep.name, sum(finished), len(plan), trained or earlier,
                                       f"{variant} seed {seed}"))
            start = time.monotonic()
            log(f"[sweep {sweep.name}] {variant} seed {seed}: training in {workdir}")
            with LoadSampler() as load:
                result = run_child(train_command(sweep, bindings, seed, workdir, variant), cwd=REPO,
                                   name=f"{variant} seed {seed}")
            if workdir.is_dir():  # not created when the run refused its configuration
                (workdir / "train.log").write_text(result.stdout + result.stderr)
            if result.returncode != 0:
                raise SweepRunError(f"{variant} seed {seed}", result, workdir)
            trained.append(time.monotonic() - start)
            (workdir / "wall_seconds.txt").write_text(f"{trained[-1]:.1f}\n")
            (workdir / "load_average.txt").write_text(f"{load.mean():.2f}\n")
            finished[len(records)] = True
            log(progress.progress_line(sweep.name, sum(finished), len(plan), trained))
        if sweep.analyze_routing and not (workdir / "analysis" / "routing.json").exists():
            result = subprocess.run(
                [sys.executable, str(REPO / "scripts" / "analyze_routing.py"),
                 f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True,
                check=False)
            if result.returncode != 0:
                raise RuntimeError(f"routing analysis of {workdir} failed:\n"
                                   f"{result.stderr[-3000:]}")
        records.append(collect_run(workdir, variant, seed, root=root))
    return records


class LoadSampler:
    """The 1-minute load average sampled every `interval` seconds while in the `with`
    block (the machine may be shared: contention inflates a run's wall time)."""

    def __init__(self, interval: float = 10.0):
        self.interval, self.samples = interval, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def mean(self) -> float:
        return float(np.mean(self.samples))


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the run was left to save its checkpoint first."""

    exit_code = 130  # experiments.runtime.cli

    def __init__(self, name: str, child: subprocess.CompletedProcess):
        detail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        super().__init__(f"sweep interrupted during run {name} ({detail}); run the same "
                         f"command to resume")


def run_child(command: Sequence[str], *, cwd: Path, name: str) -> subprocess.CompletedProcess:
    """Runs `command`, capturing its output. On Ctrl-C the terminal signals the
    child too (one process group): it finishes its step and saves its checkpoint,
    so this waits for it instead of killing it, then raises `SweepInterrupted`."""
    child = subprocess.Popen(list(command), cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate()
    except KeyboardInterrupt:
        stdout, stderr = child.communicate()  # a second Ctrl-C aborts the child too
        raise SweepInterrupted(name, subprocess.CompletedProcess(
            command, child.returncode, stdout, stderr)) from None
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)


class SweepRunError(RuntimeError):
    """A run of the sweep failed; the message is the run's last error line."""

    def __init__(self, run: str, result: subprocess.CompletedProcess, workdir: Path):
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["no output"]
        log = f"; log: {workdir / 'train.log'}" if workdir.is_dir() else ""
        last = lines[-1].removeprefix("error: ")
        super().__init__(f"run {run} failed (exit {result.returncode}): {last}{log}")
        # A configuration the run refused is the sweep's configuration error.
        self.exit_code = 2 if result.returncode == 2 else 1


def collect_run(workdir: Path, variant: str, seed: int, *, root: Path,
                compute: bool = False) -> dict[str, Any]:
    """Final numbers and curves of one finished run; its `workdir` is given relative
    to the sweep root `root` (reports name no path of the machine they ran on).
    `compute`: with its parameters and FLOPs per step (`compute.run_compute`)."""
    summary = json.loads((workdir / "summary.json").read_text())
    metrics = workdir / "metrics.jsonl"
    train = read_jsonl(metrics, "train")
    valid = read_jsonl(metrics, "valid")
    last = train[-50:]
    cum_flops = dict(zip([r["step"] for r in train],
                         np.cumsum([r.get("flops", math.nan) for r in train]).tolist()))
    record = {
        "variant": variant, "seed": seed, "workdir": str(workdir.relative_to(root)),
        "valid_loss": summary["valid_loss"],
        "valid_max_violation": valid[-1].get("max_violation") if valid else None,
        "train_batch_max_violation": _mean(r.get("batch_max_violation") for r in last),
        "train_sequence_max_violation": _mean(r.get("sequence_max_violation") for r in last),
        "curves": {key: [(r["step"], r[key]) for r in train if key in r]
                   for key in ("ce", "lbl", "batch_max_violation", "sequence_max_violation")},
        "valid_curve": [(r["step"], r.get("max_violation"), r["loss"]) for r in valid],
        "wall_seconds": _read_float(workdir / "wall_seconds.txt"),
        # Training only (no start-up, compilation included), from the trainer's summary.
        "steps": summary.get("step"),
        "steps_per_second": (summary["steps_this_run"] / summary["wall_time_s"]
                             if summary.get("wall_time_s") else None),
        "load_average": _read_float(workdir / "load_average.txt"),
    }
    if valid and all(r["step"] in cum_flops for r in valid):
        record["valid_flops"] = [cum_flops[r["step"]] for r in valid]
    if compute:
        record.update(compute_lib.run_compute(workdir))
    analysis = workdir / "analysis" / "routing.json"
    if analysis.exists():
        layers = json.loads(analysis.read_text())["layers"]
        record["routing"] = {layer: {"mi_bits": info["mutual_information_bits"],
                                     "domains": info["domains"],
                                     "fractions": info["routing_fractions"],
                                     "max_violation": info["max_violation"],
                                     "max_violation_per_domain": info["max_violation_per_domain"]}
                             for layer, info in layers.items()}
    return record


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _read_float(path: Path) -> float | None:
    return float(path.read_text()) if path.exists() else None


mean_std = protocol.mean_std  # the report's `mean ± std` cells


def _smooth(points: Sequence[tuple[int, float]], window: int) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([p[0] for p in points], np.float64)
    values = np.array([p[1] for p in points], np.float64)
    if window > 1 and len(values) >= window:
        kernel = np.ones(window) / window
        values = np.convolve(values, kernel, mode="valid")
        steps = steps[window - 1:]
    return steps, values


def _by_variant(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["variant"], []).append(r)
    return out


def plot_curves(records, key: str, ylabel: str, path: Path, window: int,
                log_scale: bool = False) -> None:
    """Mean over seeds of a smoothed train curve, one line per variant."""
    # A bare Figure (no pyplot): saving needs no backend, and the caller's (a Jupyter
    # kernel's inline one) is left alone.
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    for variant, runs in _by_variant(records).items():
        curves = [_smooth(r["curves"][key], window) for r in runs if r["curves"].get(key)]
        if not curves:
            continue
        n = min(len(c[1]) for c in curves)
        ax.plot(curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0), lw=1.2,
                label=variant)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_heatmaps(records, path: Path) -> None:
    """Domain x expert routing fractions (first seed of every variant), variants x layers."""
    # A bare Figure (no pyplot): saving needs no backend, and the caller's (a Jupyter
    # kernel's inline one) is left alone.
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    variants = {v: runs[0] for v, runs in _by_variant(records).items() if "routing" in runs[0]}
    if not variants:
        return
    layers = list(next(iter(variants.values()))["routing"])
    vmax = max(float(np.max(run["routing"][layer]["fractions"]))
               for run in variants.values() for layer in layers)
    fig = Figure(figsize=(3.6 * len(layers), 1.3 * len(variants) + 0.6))
    axes = fig.subplots(len(variants), len(layers), squeeze=False)
    for i, (variant, run) in enumerate(variants.items()):
        for j, layer in enumerate(layers):
            info = run["routing"][layer]
            ax = axes[i][j]
            image = ax.imshow(np.asarray(info["fractions"]), aspect="auto", cmap="viridis",
                              vmin=0.0, vmax=vmax)
            ax.set_yticks(range(len(info["domains"])), labels=info["domains"], fontsize=7)
            ax.set_xticks(range(len(info["fractions"][0])))
            ax.tick_params(axis="x", labelsize=6)
            ax.set_title(f"{variant} {layer}: MI {info['mi_bits']:.3f} b", fontsize=7)
    fig.tight_layout()
    fig.colorbar(image, ax=axes, shrink=0.6, label="fraction of the domain's assignments")
    fig.savefig(path, dpi=110)


def configuration_lines(sweep: Sweep) -> list[str]:
    """The report's configuration section: base gin files, bindings, seeds, variants."""
    lines = ["## Configuration", "",
             f"- base gin files: {', '.join(f'`{f}`' for f in sweep.gin_files)}",
             f"- common bindings: {', '.join(f'`{b}`' for b in sweep.bindings) or 'none'}",
             f"- seeds: {list(sweep.seeds)} (`train.seed`: init, data order, router keys)",
             "- variants:"]
    for variant, bindings in sweep.runs():
        text = ", ".join([f"`{f}`" for f in sweep.variant_gin_files.get(variant.split(",")[0], [])]
                         + [f"`{k} = {v!r}`" for k, v in bindings.items()]) or "(base)"
        lines.append(f"  - `{variant}`: {text}")
    return lines


def write_report(sweep: Sweep, records: Sequence[dict[str, Any]], sweep_file: str,
                 docs_dir: Path, *, plots: bool = True) -> Path:
    """`docs_dir/NAME.md` with the table, the configuration and plots in `docs_dir/NAME/`
    (`plots=False`: the plots already there are kept, as when the records come from
    `records.json`, which holds no per-step curves)."""
    figures = docs_dir / sweep.name
    figures.mkdir(parents=True, exist_ok=True)
    groups = _by_variant(records)
    domains = sorted({d for r in records for d in r["valid_loss"] if d != "all"})
    layers = sorted({layer for r in records for layer in r.get("routing", {})})
    header = (["variant", "valid loss"] + [f"valid {d}" for d in domains]
              + ["valid MaxVio", "batch MaxVio (train, last 50)", "seq MaxVio (train, last 50)"]
              + [f"MI {layer} (bits)" for layer in layers] + compute_lib.header(records)
              + ["wall s / run"])
    rows = []
    for variant, runs in groups.items():
        row = [f"`{variant}`", mean_std([r["valid_loss"].get("all") for r in runs])]
        row += [mean_std([r["valid_loss"].get(d) for r in runs]) for d in domains]
        row += [mean_std([r["valid_max_violation"] for r in runs]),
                mean_std([r["train_batch_max_violation"] for r in runs]),
                mean_std([r["train_sequence_max_violation"] for r in runs])]
        row += [mean_std([r.get("routing", {}).get(layer, {}).get("mi_bits") for r in runs])
                for layer in layers]
        row += compute_lib.cells(runs, records)
        row.append(mean_std([r["wall_seconds"] for r in runs]))
        rows.append(row)

    if plots and records:
        plot_curves(records, "batch_max_violation", "MaxVio of the step's batch (smoothed)",
                    figures / "maxvio_curves.png", sweep.smoothing, log_scale=True)
        plot_curves(records, "sequence_max_violation", "mean per-sequence MaxVio (smoothed)",
                    figures / "seq_maxvio_curves.png", sweep.smoothing, log_scale=True)
        plot_curves(records, "ce", "train CE (nats/byte, smoothed)", figures / "train_ce.png",
                    sweep.smoothing)
        plot_heatmaps(records, figures / "heatmaps.png")
        protocol.plot_loss_curves(records, figures / "loss_curves.png",
                                  title=f"{sweep.name}, mean over seeds")
    # The compute columns alone (no curves): drawn from records.json too.
    compute_lib.plot_loss_vs_realised_flops(records, figures / compute_lib.REALISED_PLOT)

    lines = [f"# {sweep.title or sweep.name}", ""] + reproduce_lines(sweep.name, sweep_file)
    if sweep.description:
        lines += [sweep.description.strip(), ""]
    lines += configuration_lines(sweep)
    planned = [(variant, seed) for variant, _ in sweep.runs() for seed in sweep.seeds]
    lines += [""] + claims.status_lines(planned, records)
    lines += ["## Results (mean ± std over seeds)", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Losses are validation cross-entropy in nats per byte at the last step. "
              "Valid MaxVio: over the whole validation pass, mean over MoE layers. Batch/seq "
              "MaxVio: the step's global counts / the mean over its sequences, mean over layers "
              "and over the last 50 training steps. MI: I(domain; expert) on the validation "
              "data (`scripts/analyze_routing.py`)." + compute_lib.NOTE * bool(
                  compute_lib.header(records)), ""]
    if sweep.claims:
        lines += ["## The paper's claims", ""]
        lines += claims.claim_lines(sweep.claims, records, sweep.claim_threshold)
    if sweep.findings:
        lines += ["## Findings", "", sweep.findings.strip(), ""]
    figure_links = [("validation loss vs steps and FLOPs", "loss_curves.png"),
                    ("final validation loss vs realised FLOPs per step, mean ± SE over seeds",
                     compute_lib.REALISED_PLOT),
                    ("batch MaxVio", "maxvio_curves.png"),
                    ("sequence MaxVio", "seq_maxvio_curves.png"), ("train CE", "train_ce.png"),
                    (f"domain x expert heat maps (seed {sweep.seeds[0]})", "heatmaps.png")]
    lines += ["## Plots", ""]
    for alt, file in figure_links:
        if (figures / file).exists():
            lines += [f"![{alt}]({sweep.name}/{file})", ""]
    if not records:
        lines += ["(None yet: no run has finished.)", ""]
    lines += ["## Runs", "", "Workdirs relative to the sweep root (`scripts/sweep.py --root`); "
              "steps/s of the training loop, load: mean 1-minute load average during the run "
              "(`-`: not recorded).", ""]
    lines += protocol.run_table(records)
    out = docs_dir / f"{sweep.name}.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (figures / RECORDS_FILE).write_text(json.dumps(
        [{k: v for k, v in r.items() if k not in ("curves",)} for r in records], indent=1))
    return out


def reproduce_lines(name: str, sweep_file: str, *, from_records: bool = True) -> list[str]:
    """The header every experiment report opens with: the one command that reproduces it
    (`from_records`: the report can be rewritten from its committed records alone)."""
    text = (f"**Reproduce:** `make experiment NAME={name}` (`scripts/experiment.py {name}`: "
            f"trains the runs of `{sweep_file}` one at a time, seed by seed, then writes this "
            "report). Resumable: finished runs are skipped and an interrupted one resumes from "
            "its checkpoint; a progress line gives the runs done of the whole sweep and the ETA. "
            f"`make experiment NAME={name} EXPERIMENT_ARGS=--report_only` rewrites this file "
            "from the finished runs")
    if from_records:
        text += (", `EXPERIMENT_ARGS=--from_records` from the records committed beside it "
                 f"(`{name}/{RECORDS_FILE}`), with no runs at all")
    return [text + ".", ""]


def read_records(docs_dir: Path, name: str) -> list[dict[str, Any]]:
    """The records a report was written from (`docs_dir/NAME/records.json`, no curves)."""
    path = docs_dir / name / RECORDS_FILE
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no records of a written report", str(path))
    return json.loads(path.read_text())
