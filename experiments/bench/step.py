"""Training-step section: an MoE preset against the dense preset of equal active
parameters, same batch, same process, interleaved.

Each preset (gin_configs/models/) is built with `scripts/train.py`'s pieces
(`build_model`, `make_train_step`, the default optimizer and loss weights) on a
synthetic batch; the MoE preset once per dispatch. The first call of each step
(compile + warm-up, not timed) gives its loss and gradient norm, which must
match the reference dispatch's (`einsum` in `--small`, else `sort`, the XLA
paths) before the step is timed. FLOPs per step come from the trainer's FLOP
counter (`experiments.train.flops`), MFU from `experiments.bench.peaks` (absent
where the peak is unknown, e.g. on CPU).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import gin
import jax
import numpy as np
from flax import nnx

from experiments.bench import peaks, timing
from experiments.bench.budget import error_text, past
from experiments.runtime import gin_utils
from experiments.train.flops import flop_counter
from experiments.train.optim import learning_rate_schedule, make_optimizer
from experiments.train.run_state import build_model, split_model
from experiments.train.train_step import LossWeights, make_train_step
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM


class StepPair(NamedTuple):
    name: str
    moe_preset: str  # under gin_configs/
    dense_preset: str


FULL_PAIRS = (StepPair("top2_small", "models/top2_small.gin", "models/dense_small.gin"),
              StepPair("top8of64_small", "models/top8of64_small.gin", "models/dense_small.gin"))
SMALL_PAIRS = (StepPair("top2_tiny", "models/top2_tiny.gin", "models/dense_tiny.gin"),)


class BuiltStep(NamedTuple):
    call: timing.Call
    counter: Any  # FlopCounter
    dtype: str


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """`[B, S]` arrays of one domain, no padding: inputs, targets, weights, segment_ids,
    positions, domain."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch_size, seq_len + 1)).astype(np.int32)
    ones = np.ones((batch_size, seq_len), np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": ones.astype(np.float32), "segment_ids": ones,
            "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
            "domain": np.zeros_like(ones)}


def build_model_of(preset: str, bindings: list[str], vocab: int) -> tuple[Any, str]:
    """(the `TransformerLM` of `preset` + `bindings`, its compute dtype)."""
    gin.clear_config()
    try:
        gin_utils.parse([str(gin_utils.GIN_CONFIGS_DIR / preset)], bindings)
        dtype = str(gin.query_parameter("TransformerLM.dtype"))
        return build_model(TransformerLM, vocab, seed=0), dtype
    finally:
        gin.clear_config()


def set_dispatch(model: Any, dispatch: str) -> None:
    """Every MoE layer of `model` dispatches with `dispatch` (parameters unchanged)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MoeLayer):
            module.dispatch = dispatch


def build_step(model: Any, dtype: str, batch: dict) -> BuiltStep:
    """The jitted train step of `model` (the default optimizer and loss weights) and
    its arguments."""
    b, s = batch["inputs"].shape
    counter = flop_counter(model, batch_size=b, seq_len=s)
    graphdef, params, rest = split_model(model)
    tx = make_optimizer(learning_rate_schedule(100))
    step = jax.jit(make_train_step(graphdef, rest, tx, loss_weights=LossWeights(),
                                   num_microbatches=1, num_domains=1))
    return BuiltStep((step, (params, tx.init(params), batch, jax.random.key(0))), counter, dtype)


def _agrees(metrics: dict, reference: dict, tol: float) -> dict[str, Any]:
    errors = {}
    for key in ("loss", "grad_norm"):
        got, ref = float(metrics[key]), float(reference[key])
        errors[key] = abs(got - ref) / max(abs(ref), 1e-12)
    ok = all(v <= tol for v in errors.values()) and np.isfinite(list(errors.values())).all()
    return {"ok": bool(ok), "rel_err": errors, "tolerance": tol}


def _mfu(flops: float, seconds: float, dtype: str) -> float | None:
    return peaks.mfu(flops, seconds, jax.devices()[0].device_kind, dtype, 1)


def run_pair(pair: StepPair, dispatches: tuple[str, ...], reference: str, *, batch_size: int,
             seq_len: int, vocab: int, rounds: int, tol: float, min_time: float = 0.0,
             bindings: tuple[str, ...] = (),
             deadline: float | None = None) -> list[dict[str, Any]]:
    """One record per MoE dispatch: correctness vs `reference`, then the paired ratio.
    `bindings`: gin bindings applied to both presets after them (e.g. smaller sizes)."""
    batch = synthetic_batch(batch_size, seq_len, vocab)
    base = dict(preset=pair.name, moe_preset=pair.moe_preset, dense_preset=pair.dense_preset,
                batch_size=batch_size, seq_len=seq_len, vocab=vocab, reference=reference,
                bindings=list(bindings))
    records = {d: dict(base, dispatch=d) for d in dispatches}
    calls, checks = {}, {}
    models: dict[str, tuple[Any, str]] = {}
    for name in dict.fromkeys((reference, *dispatches, "dense")):
        if past(deadline):
            records.get(name, {}).update(status="skipped", reason="time budget")
            continue
        try:
            preset = pair.dense_preset if name == "dense" else pair.moe_preset
            if preset not in models:  # one model per preset: every dispatch has its params
                models[preset] = build_model_of(preset, list(bindings), vocab)
            model, dtype = models[preset]
            if name != "dense":
                set_dispatch(model, name)
            built = build_step(model, dtype, batch)
            fn, args = built.call
            metrics = jax.device_get(fn(*args)[2])  # compile + warm-up, never timed
            flops = built.counter.step_flops(metrics.get("moe", {}),
                                             positions=batch_size * seq_len, num_microbatches=1)
            checks[name] = (metrics, flops, built.dtype)
            calls[name] = built.call
        except Exception as e:  # recorded; the others go on
            if name in records:
                records[name].update(status="error", error=error_text(e))
            elif name == "dense":
                for r in records.values():
                    r.setdefault("dense_error", error_text(e))
    _gate(records, checks, calls, reference, tol)
    _time(records, checks, calls, rounds, min_time, batch_size * seq_len)
    return list(records.values())


def _gate(records, checks, calls, reference, tol) -> None:
    for name, record in records.items():
        if name not in checks:
            continue
        if reference not in checks:
            record.update(status="error", error=f"reference dispatch {reference!r} failed")
            calls.pop(name, None)
            continue
        record["correctness"] = _agrees(checks[name][0], checks[reference][0], tol)
        if not record["correctness"]["ok"]:
            record["status"] = "wrong"
            calls.pop(name, None)
    if reference not in records:
        calls.pop(reference, None)


def _time(records, checks, calls, rounds, min_time, positions) -> None:
    timed = {n: c for n, c in calls.items() if n in records or n == "dense"}
    if "dense" not in timed or len(timed) < 2:
        return
    try:
        times, cpu = timing.interleaved_wall_cpu(timed, rounds, min_time, warmup=False)
    except Exception as e:
        for name in timed:
            if name in records:
                records[name].update(status="error", error=error_text(e))
        return
    dense_s = float(np.median(times["dense"]))
    _, dense_flops, dense_dtype = checks["dense"]
    for name in timed:
        if name == "dense":
            continue
        seconds = float(np.median(times[name]))
        _, flops, dtype = checks[name]
        records[name].update(
            status="ok", dtype=dtype, **timing.ratio_summary(times[name], times["dense"]),
            raw_s=times[name], dense_raw_s=times["dense"],
            cpu_ratio=timing.median_ratio(cpu[name], cpu["dense"]), raw_cpu_s=cpu[name],
            dense_raw_cpu_s=cpu["dense"],
            tokens_per_s=positions / seconds, dense_tokens_per_s=positions / dense_s,
            flops=flops, dense_flops=dense_flops, mfu=_mfu(flops, seconds, dtype),
            dense_mfu=_mfu(dense_flops, dense_s, dense_dtype))


def summary_line(record: dict[str, Any]) -> str:
    head = f"step {record['preset']} {record['dispatch']}: "
    if record.get("status") != "ok":
        return head + str(record.get("status")) + (f" ({record['error']})"
                                                   if "error" in record else "")
    mfu = "" if record["mfu"] is None else f", MFU {100 * record['mfu']:.1f}%"
    cpu = f", CPU {record['cpu_ratio']:.2f}x" if "cpu_ratio" in record else ""
    return head + (f"{record['ratio']:.2f}x dense ({record['ms']:.4g} ms vs "
                   f"{record['dense_ms']:.4g}){cpu}{mfu}")


def timed_out(pair: StepPair, dispatches: tuple[str, ...]) -> list[dict[str, Any]]:
    return [dict(preset=pair.name, dispatch=d, status="skipped", reason="time budget")
            for d in dispatches]
