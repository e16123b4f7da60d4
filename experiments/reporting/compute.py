"""Compute and parameter columns of a sweep report (`Sweep.compute_columns`).

For experiments that compare loss against parameters or FLOPs (issue 20's: WideNet
vs trainable parameters, Learning to Skip and zero-computation experts vs realised
FLOPs), each finished run gets, read from its workdir:

  * `params`, `active_params`: `TransformerLM.param_count()` (shared parameters
    counted once) and `active_param_count()` of the model its saved `config.gin`
    builds (abstractly: nothing initialised);
  * `train_flops_per_step`: the mean of the logged `flops` of its training steps
    (the counter of `experiments/train/flops.py`: every token computed in training);
  * `realised_flops_per_step`: the mean of the logged `realised_flops` (Learning to
    Skip: the step's FLOPs less what skipped tokens did not need), or the training
    FLOPs when the run logs none (nothing skippable).

Means are over the logged training steps of the second half of the run (the
routing of the first steps is not the trained one).

`plot_loss_vs_realised_flops` draws the report's loss-vs-compute view from these
columns alone (no curves, so it is drawn from `records.json` too): per variant,
the final validation loss against the realised FLOPs per step, mean ± SE over
seeds on both axes, dense variants (`is_dense`) with their own marker.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gin
import numpy as np

from experiments.reporting import protocol
from experiments.reporting.metrics import read_jsonl

NOTE = (" Params: total (shared parameters once) and active per token; FLOPs per step: "
        "training (every token computed) and realised (less what skipped tokens did not "
        "need), means over the logged steps of the run's second half "
        "(`experiments/reporting/compute.py`).")
REALISED_PLOT = "loss_vs_realised_flops.png"  # beside the report's other plots
COLUMNS = (("params", "params"), ("active_params", "active params / token"),
           ("train_flops_per_step", "train FLOPs / step"),
           ("realised_flops_per_step", "realised FLOPs / step"))


def run_compute(workdir: Path) -> dict[str, float]:
    """The compute columns of one finished run (see the module docstring). Clears gin."""
    # Lazily: the sweep runner imports this module and must start fast (no jax).
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from experiments.inference import restore  # pylint: disable=g-import-not-at-top

    try:
        restore.parse_run_config(workdir)
        vocab = restore.model_vocab_size()
        cls = restore.model_cls()
        model = nnx.eval_shape(lambda: cls(vocab_size=vocab, rngs=nnx.Rngs(params=0)))
        params = int(model.param_count())
        active = int(model.active_param_count())
    finally:
        gin.clear_config()
    train = read_jsonl(workdir / "metrics.jsonl", "train")
    last_step = max((r["step"] for r in train), default=0)
    late = [r for r in train if r["step"] > last_step / 2] or train
    flops = _mean([r.get("flops") for r in late])
    realised = _mean([r.get("realised_flops") for r in late])
    return {"params": params, "active_params": active, "train_flops_per_step": flops,
            "realised_flops_per_step": flops if math.isnan(realised) else realised}


def _mean(values: list[Any]) -> float:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else math.nan


def header(records: list[dict[str, Any]]) -> list[str]:
    """The column titles when any record has the compute columns, else none."""
    return [title for _, title in COLUMNS] if any("params" in r for r in records) else []


def cells(runs: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    """A variant's compute cells: the mean over its seeds (4 significant digits), or `-`."""
    if not header(records):
        return []
    out = []
    for key, _ in COLUMNS:
        values = [float(r[key]) for r in runs if r.get(key) is not None
                  and math.isfinite(float(r[key]))]
        out.append(f"{np.mean(values):.4g}" if values else "-")
    return out


def is_dense(record: dict[str, Any]) -> bool:
    """Nothing conditional: every parameter active per token and nothing skipped
    (realised = training FLOPs)."""
    return (record.get("params") == record.get("active_params")
            and record.get("realised_flops_per_step") == record.get("train_flops_per_step"))


def realised_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant with compute columns (first-seen order): `{variant, dense, n, flops,
    flops_se, loss, loss_se}`, means and standard errors over its seeds of the realised
    FLOPs per step and the final validation loss (runs with a non-finite value left
    out; SE NaN for one seed). A variant is dense when all its runs are (`is_dense`)."""
    points = []
    for variant, seeds in protocol.by_variant(records).items():
        runs = [r for r in seeds.values() if r.get("realised_flops_per_step") is not None
                and math.isfinite(float(r["realised_flops_per_step"]))
                and math.isfinite(protocol.final_loss(r))]
        if not runs:
            continue
        flops, flops_se = protocol.mean_se([float(r["realised_flops_per_step"]) for r in runs])
        loss, loss_se = protocol.mean_se([protocol.final_loss(r) for r in runs])
        points.append({"variant": variant, "dense": all(is_dense(r) for r in runs),
                       "n": len(runs), "flops": flops, "flops_se": flops_se, "loss": loss,
                       "loss_se": loss_se})
    return points


def plot_loss_vs_realised_flops(records: list[dict[str, Any]], path: Path, *,
                                title: str = "") -> bool:
    """Writes the plot of `realised_points` to `path` (PNG); False (nothing written)
    when no record has the compute columns."""
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    points = realised_points(records)
    if not points:
        return False
    fig = Figure(figsize=(7.5, 4.6))
    ax = fig.subplots()
    for p in points:
        bars = {k: None if math.isnan(p[f"{k}_se"]) else p[f"{k}_se"] for k in ("flops", "loss")}
        ax.errorbar(p["flops"], p["loss"], xerr=bars["flops"], yerr=bars["loss"],
                    marker="s" if p["dense"] else "o", ms=6, capsize=3, ls="none",
                    mfc="none" if p["dense"] else None,
                    label=f"{p['variant']} ({'dense, ' if p['dense'] else ''}n={p['n']})")
    ax.set_xlabel("realised FLOPs per training step (mean over the run's second half)")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title(title or "mean ± SE over seeds; squares: dense models", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return True
