"""Learning to Skip at inference: forward time against the skip rate.

  python scripts/bench_skip.py --skip_rates=0,0.25,0.5,0.75,0.9 --unit=ffn

A model of `--layers` layers whose FFNs (`--moe`: MoE blocks, dropless top-2 of 8), or
whole layers (`--unit=layer`), a token may skip, its routers set so that a fraction s of the tokens
skips at every layer of this batch (each router's bias is the s-quantile of its
logits, layer by layer). For each s, the jitted deterministic forward of three
models is timed, interleaved (`experiments.bench.timing`): `route_out` (skipped
tokens take no FFN rows nor attention queries), `mask` (every token computed,
skipped ones zeroed) and
`base` (a `TransformerLM` without skip routers), on two clocks: wall time and this
process's CPU time (the work done; less disturbed by other jobs on a shared
machine). Prints one JSON row per rate with the median ms and the median per-round
ratios to `base`, and the host's load average. `--json PATH` also writes the rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench import report, timing
from experiments.runtime import cli
from layers.moe_layer import MoeLayer
from layers.skip import SkipBlock
from layers.transformer import TransformerLM


@dataclasses.dataclass(frozen=True)
class Size:
    d_model: int = 256
    num_heads: int = 4
    d_ff: int = 1024
    layers: int = 4
    vocab: int = 256
    batch: int = 8
    seq: int = 256


def _model(size: Size, *, unit: str | None, inference: str = "route_out",
           moe: bool) -> TransformerLM:
    block = (None if unit is None else
             functools.partial(SkipBlock, unit=unit, inference=inference, init_bias=0.0))
    moe_block = functools.partial(MoeLayer, num_experts=8, k=2, d_ff=size.d_ff // 2,
                                  capacity_factor=None, eval_capacity_factor=None)
    return TransformerLM(vocab_size=size.vocab, d_model=size.d_model, num_layers=size.layers,
                         num_heads=size.num_heads, d_ff=size.d_ff, moe_every=1 if moe else 0,
                         moe_block=moe_block, dtype="float32", rngs=nnx.Rngs(params=0),
                         **({} if block is None else {"block": block}))


def set_skip_rate(model: TransformerLM, inputs: jax.Array, rate: float) -> None:
    """Sets every router's bias (layer by layer) so that a fraction `rate` of the
    tokens of `inputs [B, S]` skips it."""
    batch, seq = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    x = model.embedding[...][inputs].astype(model.dtype)
    for _, block in model.unrolled_blocks():
        if block.layer_router is not None:
            router, h = block.layer_router, block.attention_norm(x)
        else:
            router = block.ffn_router
            h = block.ffn_norm(x + block.attention(block.attention_norm(x), positions=positions,
                                                    mask=None, causal=True))
        router.bias[...] = jnp.zeros_like(router.bias[...])
        logits = np.asarray(router(h)).ravel()
        router.bias[...] = jnp.asarray(-np.quantile(logits, rate), router.bias[...].dtype)
        x, _ = block(x, positions=positions, mask=None, token_mask=None, deterministic=True,
                     rng=None)


def _forward(model: TransformerLM):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, inputs):
        logits, aux = nnx.merge(graphdef, state)(inputs)
        return logits, {k: a.ffn_skip_rate for k, a in aux.items() if a.ffn_skip_rate is not None}

    return fn, state


def bench(size: Size, rates: list[float], *, unit: str, moe: bool, rounds: int,
          min_time: float) -> list[dict[str, Any]]:
    inputs = jax.random.randint(jax.random.key(0), (size.batch, size.seq), 0, size.vocab)
    base_fn, base_state = _forward(_model(size, unit=None, moe=moe))
    models = {mode: _model(size, unit=unit, inference=mode, moe=moe)
              for mode in ("route_out", "mask")}
    rows = []
    for rate in rates:
        calls, measured = {"base": (base_fn, (base_state, inputs))}, None
        for mode, model in models.items():
            set_skip_rate(model, inputs, rate)
            fn, state = _forward(model)
            calls[mode] = (fn, (state, inputs))
            measured = jax.device_get(fn(state, inputs)[1])
        wall, cpu = _interleaved(calls, rounds, min_time)
        row = dict(unit=unit, moe=moe, target_skip_rate=rate,
                   ffn_skip_rate=round(float(np.mean(list(measured.values()))), 3))
        for clock, times in (("wall", wall), ("cpu", cpu)):
            row.update({f"{name}_{clock}_ms": round(1e3 * float(np.median(t)), 2)
                        for name, t in times.items()})
            for name in ("route_out", "mask"):
                row[f"{name}_vs_base_{clock}"] = round(
                    timing.median_ratio(times[name], times["base"]), 3)
        rows.append(dict(row, load_average=timing.load_average()))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _interleaved(calls: dict[str, Any], rounds: int, min_time: float,
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """`timing.interleaved` on two clocks: wall seconds per call, and this process's
    CPU seconds per call (all its threads; less disturbed by other jobs on a shared
    machine, and the work that skipping saves)."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    iters = {name: timing.calibrate(fn, args, min_time) for name, (fn, args) in calls.items()}
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, args = calls[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(iters[name]):
                result = fn(*args)
            jax.block_until_ready(result)
            wall[name].append((time.perf_counter() - start) / iters[name])
            cpu[name].append((time.process_time() - start_cpu) / iters[name])
    return wall, cpu


def _rates(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--skip_rates must be comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v < 1.0 for v in values):
        raise ValueError(f"--skip_rates values must be in [0, 1), got {text!r}")
    return values


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--skip_rates", default="0,0.25,0.5,0.75,0.9")
    parser.add_argument("--unit", choices=("ffn", "layer"), default="ffn",
                        help="SkipBlock.unit ('layer': one router per layer; its attention "
                             "queries are routed out too)")
    parser.add_argument("--moe", action="store_true", help="MoE FFNs (E=8, top-2, dropless)")
    for field in dataclasses.fields(Size):
        parser.add_argument(f"--{field.name}", type=int, default=field.default)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min_time", type=float, default=0.2,
                        help="seconds per measurement (calls are repeated to fill it)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    try:
        rates = _rates(args.skip_rates)
    except ValueError as e:
        parser.error(str(e))
    size = Size(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Size)})
    if min(dataclasses.astuple(size)) < 1:
        parser.error(f"sizes must be >= 1, got {size}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    rows = bench(size, rates, unit=args.unit, moe=args.moe, rounds=args.rounds,
                 min_time=args.min_time)
    if args.json:
        report.write_json(Path(args.json), {"command": " ".join(sys.argv), "size":
                                            dataclasses.asdict(size), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
