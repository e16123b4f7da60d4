"""The experiment protocol: variants x seeds from sweep records, paired by seed.

Every experiment report compares variants trained with the same seeds (the seed
fixes the initialisation, the data order and the router keys), so the natural
statistic is the *paired* difference by seed:

    d_s = loss(variant, seed s) - loss(baseline, seed s),   s in the seeds both ran
    mean = (1/n) sum_s d_s,   SE = std(d, ddof=1) / sqrt(n)

and a claim "variant has lower loss than baseline" is

    supported       when mean + threshold * SE < 0,
    contradicted    when mean - threshold * SE > 0 (the variant is worse),
    inconclusive    otherwise, or with fewer than two pairs ("at this scale").

The records are those of `experiments.reporting.sweep.collect_run` (dicts with
`variant`, `seed`, `workdir` relative to the sweep root, `valid_loss`,
`valid_curve`, optionally `valid_flops`, `wall_seconds`, `load_average`). A run
whose final loss is not finite (a diverged run) is never paired: it is listed
in `Paired.diverged` and in the verdict's text; a seed that only one side ran
is listed in `Paired.missing`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

Record = Mapping[str, Any]
VERDICTS = ("supported", "contradicted", "inconclusive at this scale")


def finite(values: Iterable[float | None]) -> list[float]:
    """The finite values of `values` (None, NaN and inf dropped)."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean = sample std / sqrt(n)); SE is NaN for n < 2."""
    if not values:
        raise ValueError("mean_se needs at least one value")
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan
    return mean, float(np.std(values, ddof=1) / math.sqrt(len(values)))


def mean_std(values: Sequence[float | None], digits: int = 4) -> str:
    """`mean ± sample std` of the finite values (one value alone; `-` for none)."""
    values = finite(values)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def format_mean_se(values: Sequence[float | None], digits: int = 4) -> str:
    """`mean ± SE (n)` of the finite values."""
    values = finite(values)
    if not values:
        return "-"
    mean, se = mean_se(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {se:.{digits}f} (n={len(values)})"


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """`[T]` -> `[T]`: the mean of the last `window` values at each step (fewer at the start)."""
    cumsum = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def final_loss(record: Record, domain: str = "all") -> float:
    """The run's final validation loss on `domain` (NaN when absent or not finite)."""
    value = record.get("valid_loss", {}).get(domain)
    return float(value) if value is not None and math.isfinite(value) else math.nan


def by_variant(records: Iterable[Record]) -> dict[str, dict[int, Record]]:
    """`{variant: {seed: record}}` in first-seen order; a repeated (variant, seed) is refused."""
    out: dict[str, dict[int, Record]] = {}
    for r in records:
        seeds = out.setdefault(r["variant"], {})
        if r["seed"] in seeds:
            raise ValueError(f"two records for variant {r['variant']!r} seed {r['seed']}")
        seeds[r["seed"]] = r
    return out


@dataclasses.dataclass(frozen=True)
class Paired:
    """Paired differences `variant - baseline` of the final validation loss by seed."""

    variant: str
    baseline: str
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    missing: tuple[int, ...] = ()  # seeds that only one of the two ran
    diverged: tuple[str, ...] = ()  # "variant seed s" of the runs with a non-finite loss

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return mean_se(self.diffs)[0] if self.diffs else math.nan

    @property
    def se(self) -> float:
        return mean_se(self.diffs)[1] if self.diffs else math.nan


def paired(records: Iterable[Record], variant: str, baseline: str,
           domain: str = "all") -> Paired:
    """Pairs the runs of `variant` and `baseline` by seed (see the module docstring)."""
    runs = by_variant(records)
    for name in (variant, baseline):
        if name not in runs:
            raise ValueError(f"no runs of variant {name!r}; have {sorted(runs)}")
    a, b = runs[variant], runs[baseline]
    missing = tuple(sorted(set(a) ^ set(b)))
    seeds, diffs, diverged = [], [], []
    for seed in sorted(set(a) & set(b)):
        la, lb = final_loss(a[seed], domain), final_loss(b[seed], domain)
        bad = [f"{name} seed {seed}" for name, loss in ((variant, la), (baseline, lb))
               if math.isnan(loss)]
        if bad:
            diverged += bad
            continue
        seeds.append(seed)
        diffs.append(la - lb)
    return Paired(variant, baseline, tuple(seeds), tuple(diffs), missing, tuple(diverged))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A claim "`variant` has lower loss than `baseline`" judged on paired differences."""

    outcome: str  # one of VERDICTS
    paired: Paired
    threshold: float  # in standard errors

    def text(self) -> str:
        """One sentence: the outcome, the numbers and the threshold used."""
        p = self.paired
        notes = []
        if p.missing:
            notes.append(f"seeds run by only one side, not paired: {list(p.missing)}")
        if p.diverged:
            notes.append(f"diverged (non-finite loss), not paired: {', '.join(p.diverged)}")
        tail = f" ({'; '.join(notes)})" if notes else ""
        if p.n < 2:
            return (f"{self.outcome}: {p.n} paired seed(s), fewer than the two a standard "
                    f"error needs (threshold {self.threshold:g} SE{''.join('; ' + n for n in notes)}).")
        bound = f"{self.threshold:g} SE ({self.threshold * p.se:.4f})"
        rule = {"supported": f"more than {bound} below zero",
                "contradicted": f"more than {bound} above zero",
                "inconclusive at this scale": f"within {bound} of zero"}[self.outcome]
        return (f"{self.outcome}: {p.variant} - {p.baseline} = {p.mean:+.4f} ± {p.se:.4f} "
                f"(mean ± SE of {p.n} paired seeds), {rule}{tail}.")


def verdict(p: Paired, threshold: float = 3.0) -> Verdict:
    """Judges "p.variant has lower loss than p.baseline" at `threshold` standard errors."""
    if not threshold > 0:
        raise ValueError(f"verdict threshold must be > 0 standard errors, got {threshold}")
    if p.n < 2:
        return Verdict(VERDICTS[2], p, threshold)
    if p.mean + threshold * p.se < 0:
        return Verdict(VERDICTS[0], p, threshold)
    if p.mean - threshold * p.se > 0:
        return Verdict(VERDICTS[1], p, threshold)
    return Verdict(VERDICTS[2], p, threshold)


def relative_workdir(workdir: str) -> str:
    """`workdir` as committed reports give it; an absolute path is refused."""
    if PurePosixPath(workdir).is_absolute() or PureWindowsPath(workdir).is_absolute():
        raise ValueError(f"run workdir {workdir!r} is absolute; reports give workdirs relative "
                         f"to the sweep root (collect_run(root=))")
    return workdir


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def run_table(records: Sequence[Record]) -> list[str]:
    """Markdown rows: every run with its final loss, steps/s, wall time, load and workdir."""
    lines = ["| variant | seed | valid loss | steps | steps/s | wall s | load avg | workdir |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        loss = final_loss(r)
        lines.append(
            f"| `{r['variant']}` | {r['seed']} | "
            f"{'diverged' if math.isnan(loss) else f'{loss:.4f}'} | "
            f"{'-' if r.get('steps') is None else r['steps']} | "
            f"{_cell(r.get('steps_per_second'), '.2f')} | {_cell(r.get('wall_seconds'), '.0f')} | "
            f"{_cell(r.get('load_average'), '.1f')} | `{relative_workdir(r['workdir'])}` |")
    return lines


def variant_table(records: Sequence[Record], baseline: str | None = None,
                  threshold: float = 3.0) -> list[str]:
    """Markdown rows per variant: seeds, final loss mean ± SE, and (with `baseline`) the
    paired difference to it with its verdict."""
    runs = by_variant(records)
    header = "| variant | seeds | valid loss (mean ± SE) | wall s / run |"
    rule = "|---|---|---|---|"
    if baseline is not None:
        header += f" minus `{baseline}` (paired, mean ± SE) | verdict ({threshold:g} SE) |"
        rule += "---|---|"
    lines = [header, rule]
    for variant, seeds in runs.items():
        rs = list(seeds.values())
        row = (f"| `{variant}` | {len(rs)} | {format_mean_se([final_loss(r) for r in rs])} | "
               f"{mean_std([r.get('wall_seconds') for r in rs], 0)} |")
        if baseline is not None:
            if variant == baseline:
                row += " - | - |"
            else:
                p = paired(records, variant, baseline)
                diff = f"{p.mean:+.4f} ± {p.se:.4f} (n={p.n})" if p.n >= 2 else f"n={p.n}"
                row += f" {diff} | {verdict(p, threshold).outcome} |"
        lines.append(row)
    return lines


def curves(records: Sequence[Record], x: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{variant: (x, mean validation loss over seeds)}`; `x` is 'step' or 'flops'
    (cumulative training FLOPs at each evaluation, from `valid_flops`). Only the
    evaluation steps every finite run of the variant has are kept."""
    if x not in ("step", "flops"):
        raise ValueError(f"curves x must be 'step' or 'flops', got {x!r}")
    out = {}
    for variant, seeds in by_variant(records).items():
        rs = [r for r in seeds.values() if not math.isnan(final_loss(r))]
        tables = []
        for r in rs:
            steps = [point[0] for point in r.get("valid_curve", [])]
            losses = [point[-1] for point in r.get("valid_curve", [])]
            xs = steps if x == "step" else r.get("valid_flops") or []
            if len(xs) != len(steps):
                break
            tables.append(dict(zip(steps, zip(xs, losses))))
        else:
            common = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
            if common:
                out[variant] = (np.array([np.mean([t[s][0] for t in tables]) for s in common]),
                                np.array([np.mean([t[s][1] for t in tables]) for s in common]))
    return out


def plot_loss_curves(records: Sequence[Record], path: Path, *, title: str = "",
                     ylabel: str = "validation loss (nats/byte)") -> None:
    """Two panels, mean over seeds per variant: loss vs step and loss vs training FLOPs."""
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, x, label in ((axes[0], "step", "step"),
                         (axes[1], "flops", "cumulative training FLOPs")):
        for variant, (xs, ys) in curves(records, x).items():
            ax.plot(xs, ys, marker=".", lw=1.2, label=variant)
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
