"""Scanned layers and remat policies: train-step compile time vs depth, memory vs policy.

  python scripts/bench_scan.py compile --layers=4,16,48
  python scripts/bench_scan.py remat --steps=10

`compile`: for each depth, the jitted train step (AdamW, one micro-batch) of a
small MoE model (MoE every other layer) is lowered and compiled from shapes
only, scanned (`TransformerLM.scan_layers = True`) and unscanned; prints the
lower and compile seconds. `remat`: a small scanned model's train step per
`TransformerLM.remat_policy`: the compiled step's temporary memory
(`compiled.memory_analysis().temp_size_in_bytes`) and the step time, paired and
interleaved across policies (`experiments.bench.timing`), as a median ratio to `none`.
Compile rows carry CPU seconds beside wall seconds, and every row the load average.
Model sizes are flags; nothing is read from gin. `--json PATH` also writes the rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from experiments.bench import timing
from experiments.runtime import cli
from experiments.train.optim import make_optimizer
from experiments.train.train_step import LossWeights, make_train_step
from experiments.train.trainer import split_model
from layers.moe_layer import MoeLayer
from layers.remat import REMAT_POLICIES
from layers.transformer import TransformerLM


@dataclasses.dataclass(frozen=True)
class Size:
    d_model: int = 64
    num_heads: int = 4
    d_ff: int = 128
    num_experts: int = 8
    k: int = 2
    vocab: int = 256
    batch: int = 8
    seq: int = 64


def _model(size: Size, num_layers: int, *, scan: bool, remat: str = "none") -> TransformerLM:
    return TransformerLM(
        vocab_size=size.vocab, d_model=size.d_model, num_layers=num_layers,
        num_heads=size.num_heads, d_ff=size.d_ff, moe_every=2,
        moe_block=functools.partial(MoeLayer, num_experts=size.num_experts, k=size.k,
                                    d_ff=size.d_ff, capacity_factor=1.25),
        dtype="float32", scan_layers=scan, remat_policy=remat, rngs=nnx.Rngs(params=0))


def _batch(size: Size) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (size.batch, size.seq)
    ones = np.ones(shape, np.int32)
    return {"inputs": rng.integers(0, size.vocab, shape).astype(np.int32),
            "targets": rng.integers(0, size.vocab, shape).astype(np.int32),
            "weights": ones.astype(np.float32), "segment_ids": ones,
            "positions": np.tile(np.arange(size.seq, dtype=np.int32), (size.batch, 1)),
            "domain": np.zeros(shape, np.int32)}


def _step(model_fn) -> tuple[Any, Any, Any, Any]:
    """(jitted step, abstract params, abstract opt state, tx) of a model built from shapes."""
    model = nnx.eval_shape(model_fn)
    graphdef, params, rest = split_model(model)
    tx = make_optimizer(optax.constant_schedule(1e-3))
    step = jax.jit(make_train_step(graphdef, rest, tx, loss_weights=LossWeights(),
                                   num_microbatches=1, num_domains=1))
    return step, params, jax.eval_shape(tx.init, params), tx


def bench_compile(size: Size, depths: list[int],
                  layouts: tuple[bool, ...] = (True, False)) -> list[dict[str, Any]]:
    """Per depth and layout: wall seconds to lower and to compile, and the CPU
    seconds of each (all threads of this process: far less sensitive to other
    load on a shared machine than wall time), the host load average, temporary memory."""
    rows = []
    batch = jax.eval_shape(lambda: _batch(size))
    for layers in depths:
        for scan in layouts:
            step, params, opt_state, _ = _step(functools.partial(_model, size, layers, scan=scan))
            start, cpu_start = time.perf_counter(), time.process_time()
            lowered = step.lower(params, opt_state, batch, jax.random.key(0))
            lowered_at, cpu_at = time.perf_counter(), time.process_time()
            compiled = lowered.compile()
            done, cpu_done = time.perf_counter(), time.process_time()
            rows.append(dict(layers=layers, scanned=scan, lower_s=round(lowered_at - start, 2),
                             compile_s=round(done - lowered_at, 2),
                             lower_cpu_s=round(cpu_at - cpu_start, 2),
                             compile_cpu_s=round(cpu_done - cpu_at, 2),
                             load=timing.load_average(),
                             temp_mib=round(_temp_bytes(compiled) / 2**20, 1)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _temp_bytes(compiled: Any) -> int:
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else 0


def bench_remat(size: Size, num_layers: int, rounds: int) -> list[dict[str, Any]]:
    """Per policy: the compiled step's temporary memory and its step time, timed
    with the paired interleaved harness (`experiments.bench.timing`: every
    round times each policy once, order reversed every other round); `vs_none`
    is the median over rounds of the per-round ratio to `none`."""
    batch = _batch(size)
    policies = [p for p in REMAT_POLICIES
                if not (p == "offload_dots" and jax.default_backend() == "cpu")]
    calls, temps = {}, {}
    for policy in policies:
        model_fn = functools.partial(_model, size, num_layers, scan=True, remat=policy)
        step, abstract, _, tx = _step(model_fn)
        params = nnx.state(nnx.jit(model_fn)(), nnx.Param).to_pure_dict()
        compiled = step.lower(abstract, jax.eval_shape(tx.init, abstract), batch,
                              jax.random.key(0)).compile()
        temps[policy] = _temp_bytes(compiled)
        calls[policy] = (compiled, (params, tx.init(params), batch, jax.random.key(1)))
    times = timing.interleaved(calls, rounds)
    rows = []
    for policy in policies:
        summary = timing.ratio_summary(times[policy], times["none"])
        rows.append(dict(policy=policy, layers=num_layers,
                         temp_mib=round(temps[policy] / 2**20, 2),
                         step_ms=round(summary["ms"], 1), vs_none=round(summary["ratio"], 3),
                         vs_none_min=round(summary["ratio_min"], 3),
                         vs_none_max=round(summary["ratio_max"], 3), rounds=rounds,
                         load=timing.load_average()))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 2:
        raise ValueError(f"--layers values must be >= 2, got {text!r}")
    return values


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("what", choices=("compile", "remat"))
    parser.add_argument("--layers", default="4,16,48",
                        help="compile: depths (comma-separated); remat: the first is used")
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10,
                        help="remat: timed rounds (each policy one step per round, interleaved)")
    parser.add_argument("--layouts", default="scanned,unscanned",
                        help="compile: which layouts, comma-separated (scanned, unscanned)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    try:
        depths = _ints(args.layers)
    except ValueError as e:
        parser.error(str(e))
    layouts = tuple(dict.fromkeys(args.layouts.split(",")))
    if not layouts or set(layouts) - {"scanned", "unscanned"}:
        parser.error(f"--layouts must name scanned and/or unscanned, got {args.layouts!r}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    size = Size(d_model=args.d_model, d_ff=2 * args.d_model, batch=args.batch, seq=args.seq)
    print(f"{jax.devices()[0].platform}, {size}", flush=True)
    rows = (bench_compile(size, depths, tuple(v == "scanned" for v in layouts))
            if args.what == "compile"
            else bench_remat(size, depths[0], args.steps))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"what": args.what, "size": dataclasses.asdict(size),
                       "platform": jax.devices()[0].platform, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
