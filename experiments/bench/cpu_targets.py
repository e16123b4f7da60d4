"""The CPU targets of issue 21 as measurements (`scripts/bench_cpu_targets.py`).

Sections (each returns JSON-able records with raw per-round times and the load):

  harness  why two harnesses disagreed: the MoE layer's forward+backward against the
           dense FFN written three ways, interleaved in one process: `[T, d]` (the
           project's `experiments.bench.layer.dense_ffn`), `[B, S, d]` with plain
           `x @ w` (how an independent script writes it: its weight gradient
           contracts two dimensions), and `layers.DenseMLP` on `[B, S, d]`;
  layer    the four layer configurations (E=8 k=2 d_ff=1024; E=64 k=8 d_ff=256;
           capacity factor 1.25 and dropless), each cut into parts
           (`experiments.bench.breakdown`);
  memory   `compiled.memory_analysis()` of the MoE layer's forward+backward and the
           dense FFN's;
  step     a training step of the small MoE preset against the dense preset of
           equal active parameters (`experiments.bench.step.run_pair`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.bench import breakdown, step, timing
from experiments.bench.layer import compile_pair, dense_ffn, moe_layer
from layers import DenseMLP

# (name, E, k, d_ff per expert, capacity factor or None = dropless)
LAYERS = (("E8_k2_cf1.25", 8, 2, 1024, 1.25), ("E8_k2_dropless", 8, 2, 1024, None),
          ("E64_k8_cf1.25", 64, 8, 256, 1.25), ("E64_k8_dropless", 64, 8, 256, None))


def _dense_3d(d_model: int, d_ff: int, batch: int):
    params, _ = dense_ffn(d_model, d_ff, jax.random.key(1))

    def apply(params, x):  # [T, d] in, [B, S, d] matmuls (no flattening)
        x3 = x.reshape(batch, -1, d_model)
        return (jax.nn.relu(x3 @ params["wi"]) @ params["wo"]).reshape(x.shape)

    return params, apply


def _dense_mlp(d_model: int, d_ff: int, batch: int):
    graphdef, params = nnx.split(DenseMLP(d_model, d_ff, rngs=nnx.Rngs(1)), nnx.Param)

    def apply(params, x):
        return nnx.merge(graphdef, params)(x.reshape(batch, -1, d_model)).reshape(x.shape)

    return params, apply


def harness(*, tokens: int, d_model: int, batch: int, rounds: int) -> list[dict[str, Any]]:
    """E=8, k=2: MoE (cf 1.25 and dropless) and the three dense baselines, interleaved."""
    x = jax.random.normal(jax.random.key(0), (tokens, d_model), jnp.float32)
    calls: dict[str, timing.Call] = {}
    for name, builder in (("dense_2d", lambda: dense_ffn(d_model, 2048, jax.random.key(1))),
                          ("dense_3d_matmul", lambda: _dense_3d(d_model, 2048, batch)),
                          ("dense_mlp_3d", lambda: _dense_mlp(d_model, 2048, batch))):
        params, apply = builder()
        calls[name] = (compile_pair(apply, params, x, with_aux=False)[1], (params, x))
    for cf in (1.25, None):
        params, apply = moe_layer(d_model, 1024, 8, 2, "sort", cf)
        calls[f"moe_cf{cf}"] = (compile_pair(apply, params, x, with_aux=True)[1], (params, x))
    load = timing.load_average()
    wall, cpu = timing.interleaved_wall_cpu(calls, rounds)
    records = []
    for moe in ("moe_cf1.25", "moe_cfNone"):
        for dense in ("dense_2d", "dense_3d_matmul", "dense_mlp_3d"):
            records.append(dict(moe=moe, dense=dense, **timing.ratio_summary(wall[moe], wall[dense]),
                                cpu_ratio=timing.median_ratio(cpu[moe], cpu[dense])))
    return [dict(tokens=tokens, d_model=d_model, batch=batch, rounds=rounds,
                 load_average=[load, timing.load_average()], pairs=records,
                 raw_wall_s=wall, raw_cpu_s=cpu)]


def layers(*, tokens: int, d_model: int, rounds: int, dispatch: str = "sort",
           names: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Each of `LAYERS` (or `names`) cut into parts, beside (`compared`) `sort` through the
    tile-loop grouped matmul (`breakdown.TILE_LOOP`, what `sort` ran on CPU before the
    padded layout) and, with a capacity factor, the `pallas` dispatch's layer, which on
    CPU is the `[E, C, d]` buffers path that `sort` ran before it computed only the kept
    rows there."""
    records = []
    for name, num_experts, k, d_ff, cf in LAYERS:
        if names and name not in names:
            continue
        record = breakdown.layer_breakdown(tokens=tokens, d_model=d_model, d_ff=d_ff,
                                           num_experts=num_experts, k=k, dispatch=dispatch,
                                           capacity_factor=cf, rounds=rounds,
                                           compare=(breakdown.TILE_LOOP,)
                                           + (("pallas",) if cf is not None else ()))
        records.append(dict(name=name, **record))
        print(f"layer {name}: {record['ratio']['ratio']:.2f}x dense (wall), "
              f"{record['cpu_ratio']['ratio']:.2f}x (CPU); parts/dense (CPU): "
              + ", ".join(f"{k} {v:.2f}" for k, v in record["cpu_over_dense"].items())
              + "".join(f"; {d}: {c['ratio']:.2f}x (CPU {c['cpu_ratio']:.2f}x)"
                        for d, c in record["compared"].items()), flush=True)
    return records


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    out = {f: int(getattr(stats, f)) for f in fields}
    out["peak_bytes"] = (out["temp_size_in_bytes"] + out["argument_size_in_bytes"]
                         + out["output_size_in_bytes"] - out["alias_size_in_bytes"])
    return out


def memory(*, tokens: int, d_model: int, dispatch: str = "sort") -> list[dict[str, Any]]:
    """Compiled forward+backward memory of each layer configuration and its dense FFN.
    peak = temp + arguments + outputs - aliased (XLA's buffer assignment, not RSS)."""
    x = jax.random.normal(jax.random.key(0), (tokens, d_model), jnp.float32)
    records = []
    for name, num_experts, k, d_ff, cf in LAYERS:
        params, apply = moe_layer(d_model, d_ff, num_experts, k, dispatch, cf)
        moe = _memory(compile_pair(apply, params, x, with_aux=True)[1])
        dense_params, dense_apply = dense_ffn(d_model, k * d_ff, jax.random.key(1))
        dense = _memory(compile_pair(dense_apply, dense_params, x, with_aux=False)[1])
        records.append(dict(name=name, tokens=tokens, d_model=d_model, moe=moe, dense=dense,
                            peak_ratio=moe["peak_bytes"] / dense["peak_bytes"],
                            temp_ratio=moe["temp_size_in_bytes"] / dense["temp_size_in_bytes"]))
        print(f"memory {name}: peak {moe['peak_bytes'] / 2**20:.0f} MiB vs dense "
              f"{dense['peak_bytes'] / 2**20:.0f} MiB = {records[-1]['peak_ratio']:.2f}x",
              flush=True)
    return records


def training_step(*, batch_size: int, seq_len: int, rounds: int, dtypes: tuple[str, ...],
                  vocab: int = 259, on_record=None) -> list[dict[str, Any]]:
    """top2_small vs dense_small (gin_configs/models/), dispatch `sort`, per compute dtype
    (the presets compute in bfloat16; 'float32' binds TransformerLM.dtype).
    `on_record(records)` is called after each dtype (the script saves its JSON there)."""
    pair = step.FULL_PAIRS[0]
    records = []
    for dtype in dtypes:
        bindings = () if dtype == "bfloat16" else (f"TransformerLM.dtype = '{dtype}'",)
        load = timing.load_average()
        for record in step.run_pair(pair, ("sort",), "sort", batch_size=batch_size,
                                    seq_len=seq_len, vocab=vocab, rounds=rounds, tol=1e-3,
                                    bindings=bindings):
            record.update(compute_dtype=dtype, load_average=[load, timing.load_average()])
            records.append(record)
            print(step.summary_line(record) + f" [{dtype}]", flush=True)
        if on_record is not None:
            on_record(records)
    return records
