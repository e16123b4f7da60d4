"""Learning to Skip on trained checkpoints: inference forward time against the skip rate.

`bench(full, others)` restores each workdir (`experiments.inference.restore`: its
config, latest intact checkpoint, dropless MoE, read-only) and runs its jitted
deterministic forward on the validation batches of its run's config (all of them,
or `max_batches` evenly spaced ones; every workdir must validate on the same
batches). A model with `SkipBlock`s runs it twice:

  * `route_out` (`SkipBlock.inference`, docs/conditional_compute.md): skipped tokens
    are taken out of the attention queries, dense FFN rows and MoE expert rows; what
    is timed;
  * `mask`: every token computed, skipped ones zeroed: the reference. Before any
    timing, every batch's `route_out` logits must equal `mask`'s within `atol`, with
    the same skipped-token counts per layer, or `RouteOutMismatch` is raised: a fast
    wrong path reports no number.

Reported per workdir: the realised skip rate per layer (skipped real tokens /
real tokens, attention and FFN) and overall (the mean over layers and modules),
the validation loss of the `route_out` logits (mean cross-entropy per real token;
equal to the run's own validation loss on the same batches), and the forward time
per batch: medians over `rounds` interleaved rounds of all candidates (every
workdir's `route_out`, every skip model's `mask`; `experiments.bench.timing`), on
wall time and on this process's CPU time, with the ratios to the full model's
forward (medians of per-round ratios).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench import timing
from experiments.data.config import DataConfig
from experiments.inference.restore import RestoredModel, restore_model
from layers.skip import MODULES, SkipBlock

Batch = dict[str, jax.Array]
# (params, rest, batch) -> (logits [B, S, V] float32, {layer: {module: skipped real tokens}})
Forward = Callable[[Any, Any, Batch], tuple[jax.Array, dict[str, dict[str, jax.Array]]]]
BATCH_KEYS = ("inputs", "segment_ids", "positions")


class RouteOutMismatch(RuntimeError):
    """The routed-out forward disagrees with the masked one: no time is reported."""

    exit_code = 1  # experiments.runtime.cli: one line, exit status 1


@dataclasses.dataclass
class Loaded:
    """A restored workdir, one forward per inference mode (`route_out` only without
    `SkipBlock`s), and its validation batches."""

    label: str
    restored: RestoredModel
    forwards: dict[str, Forward]  # {mode: its jitted forward}
    batches: list[Batch]
    targets: list[np.ndarray]
    unit: str | None
    target_skip_rate: float | None


def load(workdir: Path, label: str, max_batches: int | None) -> Loaded:
    """Restores `workdir` and its validation batches and compiles its forwards, under its
    run's config (gin is cleared before and after)."""
    try:
        return _load(workdir, label, max_batches)
    finally:
        gin.clear_config()


def _load(workdir: Path, label: str, max_batches: int | None) -> Loaded:
    restored = restore_model(workdir)
    data = DataConfig()  # the run's, parsed by restore_model
    if max_batches is not None:
        data = dataclasses.replace(data, eval_max_batches=(
            max_batches if data.eval_max_batches is None
            else min(max_batches, data.eval_max_batches)))
    raw = data.eval_batches()
    model = restored.model()
    blocks = [m for _, m in nnx.iter_modules(model) if isinstance(m, SkipBlock)]
    router_state = restored.router_state if restored.router_state.layers else None
    forwards = {}
    for mode in ("route_out", "mask") if blocks else ("route_out",):
        for block in blocks:
            block.inference = mode
        forwards[mode] = _forward(nnx.split(model, nnx.Param, ...)[0], router_state)
    batches = [{k: jnp.asarray(b[k]) for k in BATCH_KEYS if k in b} for b in raw]
    if not batches:
        raise ValueError(f"{label}: its run's config gives no validation batches")
    shapes = {b["inputs"].shape: b for b in batches}  # one batch of every shape
    with restored.context():  # compiled now, while gin holds this run's config
        for forward in forwards.values():
            for batch in shapes.values():
                jax.block_until_ready(forward(restored.params, restored.rest, batch))
    return Loaded(label=label, restored=restored, forwards=forwards, batches=batches,
                  targets=[np.asarray(b["targets"]) for b in raw],
                  unit=blocks[0].unit if blocks else None,
                  target_skip_rate=blocks[0].target_skip_rate if blocks else None)


def _forward(graphdef: nnx.GraphDef, router_state: Any) -> Forward:
    @jax.jit
    def forward(params, rest, batch: Batch):
        """-> (logits `[B, S, V] float32`, `{layer: {module: skipped real tokens []}}`)."""
        model = nnx.merge(graphdef, params, rest)
        logits, aux = model(batch["inputs"], segment_ids=batch.get("segment_ids"),
                            positions=batch.get("positions"), deterministic=True,
                            router_state=router_state)
        skipped = {layer: {m: getattr(a, f"{m}_skipped") for m in MODULES
                           if getattr(a, f"{m}_skipped", None) is not None}
                   for layer, a in aux.items()}
        return logits, {layer: s for layer, s in skipped.items() if s}

    return forward


def run_all(forward: Forward, params: Any, rest: Any, batches: Sequence[Batch]) -> list[Any]:
    """One forward per batch (what one timed call does)."""
    return [forward(params, rest, b) for b in batches]


def check_same_batches(full: Loaded, other: Loaded) -> None:
    """Refuses a workdir whose validation batches differ from the full model's."""
    same = len(full.batches) == len(other.batches) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        for a, b in zip(full.batches, other.batches))
    if not same:
        raise ValueError(f"{other.label}: its run validates on other batches than the full "
                         f"model {full.label} (DataConfig differs); compare runs of one preset")


def check_route_out(loaded: Loaded, atol: float) -> tuple[float, dict[str, dict[str, float]]]:
    """Every batch's `route_out` forward against `mask`'s (the same skipped counts per
    layer and module, logits within `atol`). -> (max |route_out - mask| over the logits,
    NaN without skip routers; the realised skip rate `{layer: {module: rate}}`)."""
    restored = loaded.restored
    max_diff, totals, real = math.nan, {}, 0.0
    with restored.context():
        for i, batch in enumerate(loaded.batches):
            logits, skipped = jax.device_get(
                loaded.forwards["route_out"](restored.params, restored.rest, batch))
            real += float(np.sum(_real(batch)))
            for layer, counts in skipped.items():
                for module, n in counts.items():
                    totals.setdefault(layer, {}).setdefault(module, 0.0)
                    totals[layer][module] += float(n)
            if "mask" not in loaded.forwards:
                if skipped:
                    raise RouteOutMismatch(f"{loaded.label}: the model reports skipped tokens "
                                           f"but has no SkipBlock to compute the reference")
                continue
            ref_logits, ref_skipped = jax.device_get(
                loaded.forwards["mask"](restored.params, restored.rest, batch))
            if ref_skipped != skipped:
                raise RouteOutMismatch(f"{loaded.label}: batch {i}: route_out skips "
                                       f"{skipped}, mask {ref_skipped}")
            diff = float(np.max(np.abs(logits - ref_logits)))
            if not diff <= atol:
                raise RouteOutMismatch(f"{loaded.label}: batch {i}: route_out logits differ "
                                       f"from mask's by up to {diff:.3g} > --atol={atol:g}")
            max_diff = diff if math.isnan(max_diff) else max(max_diff, diff)
    return max_diff, {layer: {m: n / real for m, n in counts.items()}
                      for layer, counts in totals.items()}


def _real(batch: Batch) -> np.ndarray:
    """`[B, S] bool`: the real tokens (segment id > 0; all without segment ids)."""
    if "segment_ids" in batch:
        return np.asarray(batch["segment_ids"]) > 0
    return np.ones(batch["inputs"].shape, bool)


def valid_loss(loaded: Loaded) -> float:
    """Mean cross-entropy per real token of the `route_out` logits (nats)."""
    total, count = 0.0, 0.0
    restored = loaded.restored
    with restored.context():
        for batch, targets in zip(loaded.batches, loaded.targets):
            logits, _ = loaded.forwards["route_out"](restored.params, restored.rest, batch)
            logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
            nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            real = _real(batch)
            total, count = total + float(np.sum(nll * real)), count + float(np.sum(real))
    return total / count


def time_all(loaded: Sequence[Loaded], rounds: int, min_time: float,
             ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per batch `{candidate: [one per round]}`, all candidates
    interleaved; candidates: `<label>` (route_out) and `<label>:mask`."""
    calls = {}
    for item in loaded:
        for mode, forward in item.forwards.items():
            name = item.label if mode == "route_out" else f"{item.label}:{mode}"
            calls[name] = (_bound(item, forward), ())
    wall, cpu = timing.interleaved_wall_cpu(calls, rounds, min_time)
    per_batch = {item.label: len(item.batches) for item in loaded}
    scale = lambda t: {n: [s / per_batch[n.split(":")[0]] for s in v] for n, v in t.items()}
    return scale(wall), scale(cpu)


def _bound(item: Loaded, forward: Forward) -> Callable[[], list[Any]]:
    restored = item.restored

    def call():
        with restored.context():
            return run_all(forward, restored.params, restored.rest, item.batches)

    return call


def bench(full: Loaded, others: Sequence[Loaded], *, rounds: int, min_time: float,
          atol: float) -> dict[str, Any]:
    """The rows of every workdir (the full model first), checked, then timed."""
    items = [full, *others]
    for other in others:
        check_same_batches(full, other)
    checks = {item.label: check_route_out(item, atol) for item in items}
    losses = {item.label: valid_loss(item) for item in items}
    load_start = timing.load_average()
    wall, cpu = time_all(items, rounds, min_time)
    rows = [_row(item, checks[item.label], losses[item.label], wall, cpu, full.label)
            for item in items]
    first = full.batches[0]["inputs"].shape
    return {"device": _device(), "load_average_start": load_start,
            "load_average_end": timing.load_average(), "rounds": rounds, "min_time": min_time,
            "atol": atol, "batches": len(full.batches), "batch_shape": list(first),
            "rows": rows}


def _row(item: Loaded, check, loss: float, wall: Mapping[str, list[float]],
         cpu: Mapping[str, list[float]], full: str) -> dict[str, Any]:
    max_diff, rates = check
    values = [r for layer in rates.values() for r in layer.values()]
    row = {"label": item.label, "step": item.restored.step, "unit": item.unit,
           "target_skip_rate": item.target_skip_rate,
           "skip_rate": {layer: {m: round(r, 4) for m, r in v.items()} for layer, v in rates.items()},
           "skip_rate_overall": round(float(np.mean(values)), 4) if values else 0.0,
           "valid_loss": round(loss, 5),
           "max_abs_logit_diff": None if math.isnan(max_diff) else max_diff}
    for mode in item.forwards:
        name, key = ((item.label, "route_out") if mode == "route_out"
                     else (f"{item.label}:{mode}", mode))
        for clock, times in (("wall", wall), ("cpu", cpu)):
            row[f"{key}_{clock}_ms"] = round(1e3 * float(np.median(times[name])), 3)
            row[f"{key}_vs_full_{clock}"] = round(timing.median_ratio(times[name], times[full]), 4)
    return row


def _device() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"platform": device.platform, "kind": device.device_kind,
            "devices": jax.device_count(), "cpus": os.cpu_count()}


def markdown(result: Mapping[str, Any]) -> list[str]:
    """The table of `bench`'s rows (one per workdir)."""
    rows = result["rows"]
    layers = sorted({layer for r in rows for layer in r["skip_rate"]},
                    key=lambda n: int(n.rsplit("_", 1)[-1]) if n[-1].isdigit() else n)
    lines = ["| run | step | target ρ | skipped per layer (" + ", ".join(layers) + ") | "
             "skipped overall | valid loss | route_out ms / batch (wall) | / full (wall) | "
             "/ full (CPU) | mask / full (CPU) | max abs Δlogit vs mask |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_layer = ", ".join(f"{np.mean(list(r['skip_rate'][n].values())):.3f}"
                              if n in r["skip_rate"] else "-" for n in layers)
        diff, mask = r["max_abs_logit_diff"], r.get("mask_vs_full_cpu")
        lines.append(
            f"| `{r['label']}` | {r['step']} | "
            f"{'-' if r['target_skip_rate'] is None else r['target_skip_rate']} | "
            f"{per_layer if r['skip_rate'] else '-'} | {r['skip_rate_overall']:.3f} | "
            f"{r['valid_loss']:.4f} | {r['route_out_wall_ms']:.2f} | "
            f"{r['route_out_vs_full_wall']:.3f} | {r['route_out_vs_full_cpu']:.3f} | "
            f"{'-' if mask is None else f'{mask:.3f}'} | {'-' if diff is None else f'{diff:.1e}'} |")
    return lines
