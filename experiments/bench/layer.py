"""`MoeLayer` against a dense FFN of equal active FLOPs (shared by
`scripts/bench_moe_layer.py` and the accelerator benchmark).

The dense baseline has `d_ff = k * d_ff_expert`, so its FLOPs equal the MoE's
active expert FLOPs; the MoE side includes the router, top-k, auxiliary losses
and metrics, and its loss adds `0.01 * lbl` (kept alive as in training).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench import timing
from experiments.bench.budget import error_text
from layers import MoeLayer


class LayerConfig(NamedTuple):
    name: str
    num_experts: int
    k: int
    d_ff: int  # per expert


def dense_ffn(d_model: int, d_ff: int, key: jax.Array, dtype=jnp.float32):
    """`(params, apply(params, x [T, d]) -> [T, d])`: ReLU FFN, f32 params, `dtype` compute."""
    k1, k2 = jax.random.split(key)
    params = {"wi": jax.random.normal(k1, (d_model, d_ff)) * d_model**-0.5,
              "wo": jax.random.normal(k2, (d_ff, d_model)) * d_ff**-0.5}

    def apply(params, x):
        wi, wo = params["wi"].astype(dtype), params["wo"].astype(dtype)
        return jax.nn.relu(x.astype(dtype) @ wi) @ wo

    return params, apply


def moe_layer(d_model: int, d_ff: int, num_experts: int, k: int, dispatch: str,
              capacity_factor: float | None, dtype=jnp.float32, seed: int = 0):
    """`(params, apply(params, x [T, d]) -> (y [T, d], MoeAux))`, parameters float32."""
    layer = MoeLayer(d_model, d_ff, num_experts, k, dispatch=dispatch,
                     capacity_factor=capacity_factor, dtype=dtype, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(layer, nnx.Param)

    def apply(params, x):
        y, aux = nnx.merge(graphdef, params)(x[None])
        return y[0], aux

    return params, apply


def loss_fn(apply, with_aux: bool):
    """`loss(params, x)`: mean(y^2), plus 0.01 * lbl for the MoE layer."""

    def loss(params, x):
        out = apply(params, x)
        y, extra = (out[0], 0.01 * out[1].lbl) if with_aux else (out, 0.0)
        return jnp.mean(y.astype(jnp.float32) ** 2) + extra

    return loss


def compile_pair(apply, params, x, with_aux: bool):
    """The compiled forward and forward+backward (gradients of params and x)."""

    def forward(params, x):
        out = apply(params, x)
        return out[0] if with_aux else out

    fwd = jax.jit(forward).lower(params, x).compile()
    grad = jax.jit(jax.grad(loss_fn(apply, with_aux), argnums=(0, 1)))
    return fwd, grad.lower(params, x).compile()


# --------------------------------------------------------------------------- correctness

def tree_errors(got: Any, ref: Any) -> float:
    """Largest relative Frobenius error over the leaves of two matching pytrees."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
        worst = err if np.isnan(err) else max(worst, err)
        if np.isnan(worst):
            break
    return worst


def reference_outputs(config: LayerConfig, x: jax.Array, capacity_factor, *,
                      max_einsum_bytes: float = 2**31) -> tuple[str, Any]:
    """(reference dispatch, (y, (d params, d x))) in float32, HIGHEST precision:
    the GShard `einsum` dispatch when its `[T, E, d_ff]` tensors fit, else `sort`."""
    tokens, d_model = x.shape
    size = 4.0 * tokens * config.num_experts * max(d_model, config.d_ff)
    dispatch = "einsum" if size <= max_einsum_bytes else "sort"
    params, apply = moe_layer(d_model, config.d_ff, config.num_experts, config.k, dispatch,
                              capacity_factor, jnp.float32)
    with jax.default_matmul_precision("highest"):
        y = jax.jit(lambda p, x: apply(p, x)[0])(params, x.astype(jnp.float32))
        grads = jax.jit(jax.grad(loss_fn(apply, True), argnums=(0, 1)))(
            params, x.astype(jnp.float32))
    return dispatch, (y, grads)


def check(fwd, fwd_bwd, params, x, reference, tol: float) -> dict[str, Any]:
    """The compiled layer's y and gradients against the reference's."""
    y_ref, grads_ref = reference
    y = fwd(params, x)
    grads = fwd_bwd(params, x)
    errors = {"y": tree_errors(y, y_ref), "grads": tree_errors(grads, grads_ref)}
    ok = all(v <= tol for v in errors.values())  # NaN fails
    return {"ok": bool(ok), "rel_fro_err": errors, "tolerance": tol}


def dense_baseline(config: LayerConfig, x: jax.Array, dtype: str):
    """`(params, compiled fwd+bwd)` of the dense FFN with `d_ff = k * d_ff_expert`."""
    params, apply = dense_ffn(x.shape[1], config.k * config.d_ff, jax.random.key(1),
                              jnp.dtype(dtype))
    return params, compile_pair(apply, params, x, with_aux=False)[1]


def run_config(config: LayerConfig, dispatch: str, capacity_factor: float | None, *,
               x: jax.Array, dtype: str, rounds: int, tol: float, min_time: float = 0.0,
               reference: tuple[str, Any], dense: tuple[Any, Any]) -> dict[str, Any]:
    """One (config, dispatch, capacity factor) on tokens `x [T, d]`: correctness against
    `reference` (`reference_outputs`), then the paired fwd+bwd ratio against `dense`
    (`dense_baseline`)."""
    start = time.monotonic()
    tokens, d_model = x.shape
    record: dict[str, Any] = dict(
        config=config.name, num_experts=config.num_experts, k=config.k, d_ff=config.d_ff,
        dense_d_ff=config.k * config.d_ff, tokens=tokens, d_model=d_model, dtype=dtype,
        dispatch=dispatch, capacity_factor=capacity_factor, reference=reference[0])
    try:
        params, apply = moe_layer(d_model, config.d_ff, config.num_experts, config.k,
                                  dispatch, capacity_factor, jnp.dtype(dtype))
        fwd, fwd_bwd = compile_pair(apply, params, x, with_aux=True)
        record["correctness"] = check(fwd, fwd_bwd, params, x, reference[1], tol)
        if not record["correctness"]["ok"]:
            record["status"] = "wrong"
        else:
            dense_params, dense_fb = dense
            record["fwd_bwd"] = timing.paired_ratio(fwd_bwd, dense_fb, (params, x),
                                                    (dense_params, x), rounds, min_time)
            record["status"] = "ok"
    except Exception as e:  # recorded; the benchmark goes on
        record.update(status="error", error=error_text(e))
    record["seconds"] = time.monotonic() - start
    return record


def summary_line(record: dict[str, Any]) -> str:
    head = (f"layer {record['config']} {record['dispatch']} cf={record['capacity_factor']} "
            f"{record['dtype']}: ")
    if record.get("status") == "ok":
        fb = record["fwd_bwd"]
        return head + f"fwd+bwd {fb['ratio']:.2f}x dense ({fb['ms']:.3g} ms vs {fb['dense_ms']:.3g})"
    return head + str(record.get("status")) + (f" ({record['error']})" if "error" in record else "")
