"""Grouped matmul section of the accelerator benchmark.

Per (shape, routing, mode) every candidate grouped matmul is compiled, called
once (the warm-up, also the correctness check), checked against a float32
HIGHEST-precision XLA reference (outputs, and with `fwd_bwd` both input
gradients) and, only if it passes, timed in interleaved rounds against the
others and a dense matmul of the same useful FLOPs (`2 * M * K * N`, x3 with
the backward pass). A candidate that fails to build or run is recorded with
its error; one that computes wrong values is recorded as "wrong", never timed.

Candidates (`candidates()`): `gmm` (`moe.kernels.gmm`, the platform's backend:
Pallas Triton on GPU, Mosaic TPU on TPU, the XLA tile loop on CPU),
`gmm_mosaic_gpu` (GPU), `gmm_pallas_interpret` (CPU `--small` only: the Mosaic
TPU kernel in Pallas interpret mode), `pallas_fused_gather` (the fused
dispatch's row-gathering gmm, `moe.kernels.fused.gather_gmm`; interpreted on
CPU `--small`), `jax.lax.ragged_dot`, jax's megablox (TPU), tokamax's
`ragged_dot` (the optional `tokamax` extra) and `dense`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from experiments.bench.budget import error_text
from moe import kernels
from moe.dispatch import tokamax_backend
from moe.kernels import fused

MODES = ("fwd", "fwd_bwd")
ROUTINGS = ("uniform", "skewed")
MAX_CHECKED_GROUPS = 8


class GmmShape(NamedTuple):
    """`tokens * top_k` rows (M) of width `k` (d_model) times E `[k, n]` expert matrices."""

    name: str
    num_groups: int  # E
    top_k: int
    tokens: int
    k: int  # K: d_model
    n: int  # N: expert d_ff

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k


FULL_SHAPES = (
    GmmShape("mixtral", 8, 2, 8192, 4096, 14336),  # Mixtral 8x7B: E=8, k=2, d=4096, f=14336
    GmmShape("olmoe", 64, 8, 4096, 2048, 1024),  # OLMoE-1B-7B: E=64, k=8, f=1024
    GmmShape("deepseek", 256, 8, 4096, 7168, 2048),  # DeepSeek-V3: E=256, k=8, f=2048
    GmmShape("small", 8, 2, 2048, 1024, 2048),
)
SMALL_SHAPES = (  # CPU --small: seconds, not a performance claim
    GmmShape("mixtral_small", 8, 2, 128, 64, 128),
    GmmShape("fine_grained_small", 64, 8, 32, 64, 32),
)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One grouped matmul: `fn(lhs [M, K], rhs, group_sizes [E]) -> [M, N]`.

    dense: rhs is one `[K, N]` matrix (the baseline) instead of `[E, K, N]`.
    unavailable: why it cannot run here (then `fn` is None).
    """

    fn: Callable[..., jax.Array] | None
    dense: bool = False
    unavailable: str | None = None
    backend: str | None = None


class Tolerance(NamedTuple):
    """Largest accepted relative Frobenius error and max error (over the max |ref|)."""

    rel_fro: float
    rel_max: float


def tolerance(dtype: str, platform: str, scale: float = 1.0) -> Tolerance:
    """bf16: output rounding and f32 accumulation order; f32 on an accelerator: its
    default matmul precision (bf16 passes on TPU, TF32 on GPU); f32 on CPU: exact-ish."""
    if dtype == "bfloat16":
        base = Tolerance(2e-2, 5e-2)
    elif platform == "cpu":
        base = Tolerance(1e-4, 1e-3)
    else:
        base = Tolerance(1e-2, 3e-2)
    return Tolerance(base.rel_fro * scale, base.rel_max * scale)


def _import_or_none(module: str):
    try:
        return importlib.import_module(module)
    except Exception:  # ImportError, or a broken install of an optional package
        return None


def _dense(lhs, rhs, group_sizes):
    del group_sizes
    return jnp.dot(lhs, rhs, preferred_element_type=jnp.float32).astype(lhs.dtype)


def _fused_gather_candidate(platform: str, small: bool) -> Candidate:
    """The `pallas_fused` dispatch's first kernel, `gather_gmm`, reading the rows through an
    identity index (the gmm inputs are already sorted): what gathering in the kernel costs
    over `gmm`. Its backward runs the fused scatter and the gathered tgmm."""
    backend = {"tpu": "tpu", "gpu": "triton"}.get(platform)
    if backend is None and not small:
        return Candidate(None, unavailable="Pallas interpret mode runs only with --small")

    def fn(lhs, rhs, group_sizes):
        rows = jnp.arange(lhs.shape[0], dtype=jnp.int32)
        return fused.gather_gmm(lhs, rhs, group_sizes, rows, backend=backend or "tpu",
                                interpret=backend is None)

    return Candidate(fn, backend=backend or "tpu (interpret)")


def candidates(platform: str, small: bool) -> dict[str, Candidate]:
    """The grouped matmuls this platform can run (others listed with the reason)."""
    auto = {"tpu": "tpu", "gpu": "triton"}.get(platform, "xla")
    out = {"gmm": Candidate(lambda a, b, g: kernels.gmm(a, b, g), backend=auto)}
    if platform == "gpu":
        out["gmm_mosaic_gpu"] = Candidate(
            lambda a, b, g: kernels.gmm(a, b, g, backend="mosaic_gpu"), backend="mosaic_gpu")
    if platform == "cpu":
        out["gmm_pallas_interpret"] = (
            Candidate(lambda a, b, g: kernels.gmm(a, b, g, backend="tpu", interpret=True),
                      backend="tpu (interpret)") if small else
            Candidate(None, unavailable="Pallas interpret mode runs only with --small"))
    out["ragged_dot"] = Candidate(lambda a, b, g: jax.lax.ragged_dot(a, b, g))
    if platform != "tpu":
        out["megablox"] = Candidate(None, unavailable="TPU only")
    else:
        megablox = _import_or_none("jax.experimental.pallas.ops.tpu.megablox")
        out["megablox"] = (Candidate(None, unavailable="not importable from this jax")
                           if megablox is None else
                           Candidate(lambda a, b, g: megablox.gmm(a, b, g, a.dtype,
                                                                  (512, 512, 512))))
    out["pallas_fused_gather"] = _fused_gather_candidate(platform, small)
    missing = tokamax_backend.missing()
    out["tokamax"] = (Candidate(None, unavailable=missing) if missing else
                      Candidate(tokamax_backend.tokamax_gmm))
    out["dense"] = Candidate(_dense, dense=True)
    return out


def group_sizes(shape: GmmShape, routing: str, seed: int) -> np.ndarray:
    """`[E]` int32 summing to M: uniform multinomial, or skewed (Zipf, exponent 1.2,
    over a random order of the experts; fine-grained shapes get empty groups)."""
    rng = np.random.default_rng(seed)
    if routing == "uniform":
        probs = np.full(shape.num_groups, 1.0 / shape.num_groups)
    elif routing == "skewed":
        probs = 1.0 / np.arange(1, shape.num_groups + 1) ** 1.2
        probs = rng.permutation(probs / probs.sum())
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    return rng.multinomial(shape.rows, probs).astype(np.int32)


class Inputs(NamedTuple):
    lhs: jax.Array  # [M, K]
    rhs: jax.Array  # [E, K, N]
    dense_rhs: jax.Array  # [K, N]
    cot: jax.Array  # [M, N]
    group_sizes: jax.Array  # [E] int32
    sizes: np.ndarray  # the same, on the host


def make_inputs(shape: GmmShape, routing: str, dtype: str, seed: int) -> Inputs:
    keys = jax.random.split(jax.random.key(seed), 4)
    sizes = group_sizes(shape, routing, seed)
    m, k, n, e = shape.rows, shape.k, shape.n, shape.num_groups
    return Inputs(jax.random.normal(keys[0], (m, k), dtype),
                  jax.random.normal(keys[1], (e, k, n), dtype) * k**-0.5,
                  jax.random.normal(keys[2], (k, n), dtype) * k**-0.5,
                  jax.random.normal(keys[3], (m, n), dtype), jnp.asarray(sizes), sizes)


def _with_backward(matmul: Callable) -> Callable:
    """`(lhs, rhs, group_sizes, cot) -> (out, d lhs, d rhs)`."""

    def run(lhs, rhs, group_sizes, cot):
        out, vjp = jax.vjp(lambda a, b: matmul(a, b, group_sizes), lhs, rhs)
        return (out, *vjp(cot))

    return run


def build(candidate: Candidate, data: Inputs, mode: str) -> timing.Call:
    """The jitted call of `candidate` in `mode` and its arguments."""
    rhs = data.dense_rhs if candidate.dense else data.rhs
    if mode == "fwd":
        return jax.jit(candidate.fn), (data.lhs, rhs, data.group_sizes)
    return jax.jit(_with_backward(candidate.fn)), (data.lhs, rhs, data.group_sizes, data.cot)


# --------------------------------------------------------------------------- correctness

def _errors(got: jax.Array, ref: jax.Array) -> jax.Array:
    """[relative Frobenius error, max error / max |ref|] (absolute where ref is ~0)."""
    diff = got - ref
    return jnp.stack([jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(ref), 1.0),
                      jnp.max(jnp.abs(diff)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1.0)])


@functools.partial(jax.jit, static_argnames=("with_grads",))
def _group_errors(lhs, rhs, cot, offsets, g, out, dlhs, drhs, *, with_grads: bool):
    """`[n, 2]` errors of out (and d lhs, d rhs) on group g's rows vs float32 dots."""
    hi, f32 = jax.lax.Precision.HIGHEST, jnp.float32
    rows = jnp.arange(lhs.shape[0])
    mask = ((rows >= offsets[g]) & (rows < offsets[g + 1]))[:, None]
    w = rhs[g].astype(f32)
    x = jnp.where(mask, lhs.astype(f32), 0.0)
    pairs = [(jnp.where(mask, out.astype(f32), 0.0), jnp.dot(x, w, precision=hi))]
    if with_grads:
        c = jnp.where(mask, cot.astype(f32), 0.0)
        pairs.append((jnp.where(mask, dlhs.astype(f32), 0.0), jnp.dot(c, w.T, precision=hi)))
        pairs.append((drhs[g].astype(f32), jnp.dot(x.T, c, precision=hi)))
    return jnp.stack([_errors(a, b) for a, b in pairs])


def checked_groups(sizes: np.ndarray, seed: int) -> list[int]:
    """Every group when E <= 8; else the first, last, largest, smallest (an empty
    one when there is one) and random others, 8 in all."""
    e = len(sizes)
    if e <= MAX_CHECKED_GROUPS:
        return list(range(e))
    chosen = dict.fromkeys([0, e - 1, int(np.argmax(sizes)), int(np.argmin(sizes))])
    for g in np.random.default_rng(seed).permutation(e):
        if len(chosen) >= MAX_CHECKED_GROUPS:
            break
        chosen.setdefault(int(g))
    return list(chosen)


def check(result: Any, data: Inputs, mode: str, tol: Tolerance, seed: int = 0) -> dict:
    """Correctness of one call's `result` against the reference: ok, worst errors."""
    out, dlhs, drhs = result if mode == "fwd_bwd" else (result, None, None)
    m, n = data.lhs.shape[0], data.rhs.shape[2]
    expected = [(out, (m, n))] + ([(dlhs, data.lhs.shape), (drhs, data.rhs.shape)]
                                  if mode == "fwd_bwd" else [])
    for array, shape in expected:
        if tuple(array.shape) != tuple(shape):
            return {"ok": False, "reason": f"shape {tuple(array.shape)}, expected {shape}"}
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(data.sizes)]).astype(np.int32))
    groups = checked_groups(data.sizes, seed)
    errors = np.max([np.asarray(_group_errors(data.lhs, data.rhs, data.cot, offsets, g, out,
                                              dlhs, drhs, with_grads=mode == "fwd_bwd"))
                     for g in groups], axis=0)
    names = ["out", "d_lhs", "d_rhs"][:len(errors)]
    rel_fro = {k: float(v) for k, v in zip(names, errors[:, 0])}
    rel_max = {k: float(v) for k, v in zip(names, errors[:, 1])}
    # NaN fails both comparisons.
    ok = all(v <= tol.rel_fro for v in rel_fro.values()) and all(
        v <= tol.rel_max for v in rel_max.values())
    return {"ok": bool(ok), "checked_groups": len(groups), "rel_fro_err": rel_fro,
            "rel_max_err": rel_max, "tolerance": tol._asdict()}


# --------------------------------------------------------------------------- one case

def _prepare(name: str, candidate: Candidate, data: Inputs, mode: str, tol: Tolerance,
             seed: int) -> tuple[dict, timing.Call | None]:
    """Builds, warms up and checks one candidate: (its record, the call to time or None)."""
    entry: dict[str, Any] = {"backend": candidate.backend} if candidate.backend else {}
    if candidate.unavailable:
        return dict(entry, status="unavailable", reason=candidate.unavailable), None
    try:
        fn, args = build(candidate, data, mode)
        result = jax.block_until_ready(fn(*args))  # compile + warm-up, never timed
        if not candidate.dense:
            entry["correctness"] = check(result, data, mode, tol, seed)
            if not entry["correctness"]["ok"]:
                return dict(entry, status="wrong"), None
    except Exception as e:  # one candidate's failure is recorded, not fatal
        return dict(entry, status="error", error=error_text(e)), None
    return entry, (fn, args)


def _figures(times: dict[str, list[float]], flops: float) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in times.items():
        seconds = float(np.median(values))
        row = {"ms": 1e3 * seconds, "tflops": flops / seconds / 1e12}
        if "dense" in times:
            row["pct_of_dense"] = 100.0 * timing.median_ratio(times["dense"], values)
        if "ragged_dot" in times:
            row["speedup_over_ragged_dot"] = timing.median_ratio(times["ragged_dot"], values)
        out[name] = row
    return out


def run_case(shape: GmmShape, routing: str, dtype: str, mode: str,
             cands: dict[str, Candidate], *, rounds: int, min_time: float, tol: Tolerance,
             seed: int = 0) -> dict[str, Any]:
    """One (shape, routing, dtype, mode): every candidate's status, correctness and figures."""
    start = time.monotonic()
    data = make_inputs(shape, routing, dtype, seed)
    flops = 2.0 * shape.rows * shape.k * shape.n * (3 if mode == "fwd_bwd" else 1)
    record: dict[str, Any] = dict(
        shape=shape.name, num_groups=shape.num_groups, top_k=shape.top_k, tokens=shape.tokens,
        rows=shape.rows, k=shape.k, n=shape.n, routing=routing, dtype=dtype, mode=mode,
        flops=flops, group_sizes={"min": int(data.sizes.min()), "max": int(data.sizes.max()),
                                  "empty": int((data.sizes == 0).sum())},
        candidates={})
    calls = {}
    for name, candidate in cands.items():
        record["candidates"][name], call = _prepare(name, candidate, data, mode, tol, seed)
        if call is not None:
            calls[name] = call
    try:
        times = timing.interleaved(calls, rounds, min_time, warmup=False) if calls else {}
    except Exception as e:  # e.g. out of memory while timing
        for name in calls:
            record["candidates"][name].update(status="error", error=error_text(e))
        times = {}
    for name, figures in _figures(times, flops).items():
        record["candidates"][name].update(status="ok", **figures)
    record["seconds"] = time.monotonic() - start
    return record


def summary_line(record: dict[str, Any]) -> str:
    """One progress line: each candidate's TFLOP/s and % of dense, or its status."""
    parts = []
    for name, c in record["candidates"].items():
        if c.get("status") == "ok":
            pct = f" {c['pct_of_dense']:.0f}%" if "pct_of_dense" in c else ""
            parts.append(f"{name} {c['tflops']:.3g}TF/s{pct}")
        elif c.get("status") != "unavailable":
            parts.append(f"{name} {c.get('status')}")
    return (f"gmm {record['shape']} {record['routing']} {record['dtype']} {record['mode']}: "
            + ", ".join(parts))
