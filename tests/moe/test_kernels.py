"""Grouped matmul kernels (`moe.kernels`): values, gradients, lowering, errors, dispatch.

Pallas kernels run here in interpret mode on CPU; the compiled paths are
checked by lowering for TPU and CUDA without the hardware.

Tolerances: float32 rtol 1e-5 / atol 1e-4 (outputs are O(10)); bfloat16
rtol 2e-2 / atol 1e-1 against a float64 reference on the bf16-rounded inputs
(one bf16 rounding of the output is 2^-8 relative).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import kernels
from moe.dispatch import get_dispatch
from moe.dispatch.dispatchers import make_sort_dispatch
from moe.experts import ExpertFFN
from moe.kernels import api, metadata

TOL = {jnp.float32: {"rtol": 1e-5, "atol": 1e-4}, jnp.bfloat16: {"rtol": 2e-2, "atol": 1e-1}}
M, K, N = 48, 40, 24  # K, N off the (16, 16, 16) test tiles; 3 row tiles
GROUP_SIZES = {
    "uneven_with_empty_and_tail": [9, 0, 21, 13],  # sums to 43 < M
    "one_group_holds_all": [0, M, 0, 0],
    "all_empty": [0, 0, 0, 0],
    "tile_aligned": [16, 16, 0, 16],
    "random": np.random.default_rng(7).multinomial(M - 5, [0.5, 0.0, 0.2, 0.3]).tolist(),
}
# (backend, interpret) pairs that run on CPU. None: the platform default, which
# is "xla" here (test_backend_choice_on_cpu).
BACKENDS = [(None, None), ("tpu", True), ("triton", True)]
BACKEND_IDS = ["xla", "tpu", "triton"]
TILING = (16, 16, 16)


def _ids(value):
    return "-".join(map(str, value)) if isinstance(value, tuple) else None


def _data(dtype, num_groups=4, rows=M, k=K, n=N, seed=0):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((num_groups, k, n)), dtype)
    cot = jnp.asarray(rng.standard_normal((rows, n)), dtype)
    return lhs, rhs, cot


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _ref_gmm(lhs, rhs, sizes):
    lhs, rhs = _f64(lhs), _f64(rhs)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = lhs[start:start + size] @ rhs[g]
        start += size
    return out


def _ref_tgmm(lhs, grad, sizes):
    lhs, grad = _f64(lhs), _f64(grad)
    out = np.zeros((len(sizes), lhs.shape[1], grad.shape[1]))
    start = 0
    for g, size in enumerate(sizes):
        out[g] = lhs[start:start + size].T @ grad[start:start + size]
        start += size
    return out


def _ref_grads(lhs, rhs, cot, sizes):
    """d/d(lhs, rhs) of sum(gmm(lhs, rhs) * cot): per-group cot @ rhs_g^T and lhs_g^T @ cot."""
    return _ref_gmm(cot, np.swapaxes(_f64(rhs), 1, 2), sizes), _ref_tgmm(lhs, cot, sizes)


def _close(actual, expected, dtype):
    np.testing.assert_allclose(_f64(actual), expected, **TOL[dtype])


# --------------------------------------------------------------------------- values

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", list(GROUP_SIZES))
def test_gmm_matches_reference_and_ragged_dot(case, backend, interpret, dtype):
    sizes = GROUP_SIZES[case]
    lhs, rhs, _ = _data(dtype)
    group_sizes = jnp.array(sizes, jnp.int32)
    out = kernels.gmm(lhs, rhs, group_sizes, tiling=TILING, interpret=interpret,
                      backend=backend)
    assert out.shape == (M, N) and out.dtype == dtype
    _close(out, _ref_gmm(lhs, rhs, sizes), dtype)
    ragged = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    _close(out, _f64(ragged), dtype)
    np.testing.assert_array_equal(_f64(out)[sum(sizes):], 0.0)  # tail rows exactly zero


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", list(GROUP_SIZES))
def test_gmm_gradients_match_reference(case, backend, interpret, dtype):
    sizes = GROUP_SIZES[case]
    lhs, rhs, cot = _data(dtype)
    group_sizes = jnp.array(sizes, jnp.int32)

    def loss(lhs, rhs):
        out = kernels.gmm(lhs, rhs, group_sizes, tiling=TILING, interpret=interpret,
                          backend=backend)
        return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))

    grad_lhs, grad_rhs = jax.grad(loss, argnums=(0, 1))(lhs, rhs)
    assert grad_lhs.dtype == dtype and grad_rhs.dtype == dtype
    ref_lhs, ref_rhs = _ref_grads(lhs, rhs, cot, sizes)
    _close(grad_lhs, ref_lhs, dtype)
    _close(grad_rhs, ref_rhs, dtype)


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=BACKEND_IDS)
def test_gradients_match_ragged_dot_under_jit(backend, interpret):
    sizes = GROUP_SIZES["uneven_with_empty_and_tail"]
    lhs, rhs, cot = _data(jnp.float32)

    def loss(matmul, lhs, rhs, group_sizes):
        return jnp.sum(matmul(lhs, rhs, group_sizes) * cot)

    ours = functools.partial(kernels.gmm, tiling=TILING, interpret=interpret, backend=backend)
    grad = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1)))
    expected = jax.grad(functools.partial(loss, jax.lax.ragged_dot), argnums=(0, 1))
    group_sizes = jnp.array(sizes, jnp.int32)  # traced inside the jit
    for actual, want in zip(grad(lhs, rhs, group_sizes), expected(lhs, rhs, group_sizes)):
        _close(actual, _f64(want), jnp.float32)


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", list(GROUP_SIZES))
def test_tgmm_matches_reference(case, backend, interpret):
    sizes = GROUP_SIZES[case]
    lhs, _, grad = _data(jnp.float32)
    out = kernels.tgmm(lhs, grad, jnp.array(sizes, jnp.int32), tiling=TILING,
                       interpret=interpret, backend=backend)
    assert out.shape == (4, K, N)
    _close(out, _ref_tgmm(lhs, grad, sizes), jnp.float32)


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=BACKEND_IDS)
def test_rows_past_the_groups_never_leak(backend, interpret):
    # Non-finite values in rows that belong to no group must not reach any
    # output: not the tail of gmm, not the weight gradient (0 * inf is NaN, so
    # every backend must mask both operands, not only lhs).
    sizes = GROUP_SIZES["uneven_with_empty_and_tail"]
    lhs, rhs, grad = _data(jnp.float32)
    lhs = lhs.at[sum(sizes):].set(jnp.nan)
    grad = grad.at[sum(sizes):].set(jnp.inf)
    group_sizes = jnp.array(sizes, jnp.int32)
    call = {"tiling": TILING, "interpret": interpret, "backend": backend}
    out = kernels.gmm(lhs, rhs, group_sizes, **call)
    np.testing.assert_array_equal(_f64(out)[sum(sizes):], 0.0)
    _close(out[:sum(sizes)], _ref_gmm(lhs, rhs, sizes)[:sum(sizes)], jnp.float32)
    weight_grad = kernels.tgmm(lhs, grad, group_sizes, **call)
    assert np.isfinite(_f64(weight_grad)).all()


@pytest.mark.parametrize("backend,interpret", [("tpu", True), ("triton", True)],
                         ids=["tpu", "triton"])
def test_mixed_dtypes_promote_and_grads_keep_input_dtypes(backend, interpret):
    sizes = GROUP_SIZES["random"]
    lhs, rhs, cot = _data(jnp.float32)
    lhs = lhs.astype(jnp.bfloat16)
    group_sizes = jnp.array(sizes, jnp.int32)
    call = {"tiling": TILING, "interpret": interpret, "backend": backend}
    out = kernels.gmm(lhs, rhs, group_sizes, **call)
    assert out.dtype == jnp.float32
    _close(out, _ref_gmm(lhs, rhs, sizes), jnp.float32)
    grads = jax.grad(lambda a, b: jnp.sum(kernels.gmm(a, b, group_sizes, **call) * cot),
                     argnums=(0, 1))(lhs, rhs)
    assert (grads[0].dtype, grads[1].dtype) == (jnp.bfloat16, jnp.float32)


def test_default_tiles_and_empty_dimensions():
    lhs, rhs, _ = _data(jnp.float32)
    sizes = GROUP_SIZES["uneven_with_empty_and_tail"]
    for backend in ("tpu", "triton"):  # default tiles, shrunk to the problem
        out = kernels.gmm(lhs, rhs, jnp.array(sizes), backend=backend, interpret=True)
        _close(out, _ref_gmm(lhs, rhs, sizes), jnp.float32)
    assert kernels.gmm(lhs[:0], rhs, jnp.zeros(4, jnp.int32)).shape == (0, N)
    assert kernels.tgmm(lhs[:0], lhs[:0, :N], jnp.zeros(4, jnp.int32)).shape == (4, K, N)
    assert kernels.gmm(lhs, rhs[:0], jnp.zeros(0, jnp.int32)).shape == (M, N)


# --------------------------------------------------------------------------- Mosaic GPU

@pytest.mark.parametrize("case", ["uneven_with_empty_and_tail", "one_group_holds_all"])
def test_mosaic_gpu_forward_and_gradients_in_interpret_mode(case):
    sizes = GROUP_SIZES[case]
    # wgmma tiles are multiples of 64; K, N stay off them.
    lhs, rhs, cot = _data(jnp.bfloat16, rows=150, k=100, n=70)
    sizes = [s * 3 for s in sizes]
    group_sizes = jnp.array(sizes, jnp.int32)
    call = {"tiling": (64, 64, 64), "interpret": True, "backend": "mosaic_gpu"}
    out = kernels.gmm(lhs, rhs, group_sizes, **call)
    _close(out, _ref_gmm(lhs, rhs, sizes), jnp.bfloat16)
    np.testing.assert_array_equal(_f64(out)[sum(sizes):], 0.0)
    loss = lambda a, b: jnp.sum(kernels.gmm(a, b, group_sizes, **call).astype(jnp.float32)
                                * cot.astype(jnp.float32))
    grads = jax.grad(loss, argnums=(0, 1))(lhs, rhs)
    for actual, expected in zip(grads, _ref_grads(lhs, rhs, cot, sizes)):
        _close(actual, expected, jnp.bfloat16)


# --------------------------------------------------------------------------- TPU interpreter

def test_tpu_kernels_under_the_tpu_interpreter():
    # The TPU interpreter models VMEM blocks, DMAs and uninitialized (NaN)
    # buffers more faithfully than the generic interpret mode.
    from jax.experimental.pallas import tpu as pltpu

    from moe.kernels import pallas_tpu

    sizes = GROUP_SIZES["uneven_with_empty_and_tail"]
    lhs, rhs, grad = _data(jnp.float32)
    group_sizes = jnp.array(sizes, jnp.int32)
    params = pltpu.InterpretParams(detect_races=True)
    out = pallas_tpu.gmm(lhs, rhs, group_sizes, (8, 16, 16), interpret=params)
    np.testing.assert_allclose(_f64(out), _ref_gmm(lhs, rhs, sizes), **TOL[jnp.float32])
    out = pallas_tpu.tgmm(lhs, grad, group_sizes, (8, 16, 16), interpret=params)
    np.testing.assert_allclose(_f64(out), _ref_tgmm(lhs, grad, sizes), **TOL[jnp.float32])


# --------------------------------------------------------------------------- megablox oracle

def test_matches_jax_megablox_in_interpret_mode():
    # The package re-exports ops.gmm under the name of its gmm module.
    megablox = pytest.importorskip("jax.experimental.pallas.ops.tpu.megablox.gmm",
                                   reason="jax's megablox kernels do not import")
    sizes = [9, 0, 23, 16]  # sums to M: megablox leaves rows past the sum unwritten
    lhs, rhs, grad = _data(jnp.float32, k=48, n=32)
    group_sizes = jnp.array(sizes, jnp.int32)
    expected = megablox.gmm(lhs, rhs, group_sizes, tiling=TILING, interpret=True)
    expected_t = megablox.tgmm(lhs.T, grad, group_sizes, tiling=TILING, interpret=True)
    for backend in ("tpu", "triton"):
        call = {"tiling": TILING, "interpret": True, "backend": backend}
        _close(kernels.gmm(lhs, rhs, group_sizes, **call), _f64(expected), jnp.float32)
        _close(kernels.tgmm(lhs, grad, group_sizes, **call), _f64(expected_t), jnp.float32)


# --------------------------------------------------------------------------- lowering

def _lowered_text(backend, platform, dtype, tiling=None):
    lhs, rhs, cot = _data(dtype, rows=256, k=256, n=384)
    group_sizes = jnp.array([100, 0, 120, 30], jnp.int32)

    def loss(lhs, rhs, group_sizes):
        out = kernels.gmm(lhs, rhs, group_sizes, tiling=tiling, interpret=False, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))

    # value_and_grad: the forward gmm, the transposed gmm for d(lhs), tgmm for d(rhs).
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    return jax.jit(grad).trace(lhs, rhs, group_sizes).lower(
        lowering_platforms=(platform,)).as_text()


# Mosaic GPU takes 16-bit dtypes only (float32 is rejected: test_errors).
@pytest.mark.parametrize("backend,platform,target,dtype", [
    ("tpu", "tpu", "tpu_custom_call", jnp.float32),
    ("tpu", "tpu", "tpu_custom_call", jnp.bfloat16),
    ("triton", "cuda", "__gpu$xla.gpu.triton", jnp.float32),
    ("triton", "cuda", "__gpu$xla.gpu.triton", jnp.bfloat16),
    ("mosaic_gpu", "cuda", "mosaic_gpu", jnp.bfloat16),
], ids=["tpu-f32", "tpu-bf16", "triton-f32", "triton-bf16", "mosaic_gpu-bf16"])
def test_kernels_lower_for_their_hardware(backend, platform, target, dtype):
    text = _lowered_text(backend, platform, dtype)
    calls = re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)
    # Mosaic GPU runs tgmm on Triton.
    if backend == "mosaic_gpu":
        assert calls.count("__gpu$xla.gpu.triton") == 1, calls
        assert sum(c.startswith(target) for c in calls) == 2, calls
    else:
        assert calls.count(target) == 3, calls


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call,match", [
    (lambda x, w, g: kernels.gmm(x[0], w, g), "lhs must have rank 2"),
    (lambda x, w, g: kernels.gmm(x, w[0], g), "rhs must have rank 3"),
    (lambda x, w, g: kernels.gmm(x[:, :3], w, g), "must agree on K"),
    (lambda x, w, g: kernels.gmm(x, w, g[:3]), r"group_sizes must have shape \[E\] = \(4,\)"),
    (lambda x, w, g: kernels.gmm(x, w, g[None]), "group_sizes must have shape"),
    (lambda x, w, g: kernels.gmm(x, w, g.astype(jnp.float32)), "group_sizes must be an integer"),
    (lambda x, w, g: kernels.gmm(x, w, g * 100), "sum to at most M"),
    (lambda x, w, g: kernels.gmm(x, w, -g), "must be >= 0"),
    (lambda x, w, g: kernels.gmm(x.astype(jnp.int32), w, g), "lhs must have a floating dtype"),
    (lambda x, w, g: kernels.gmm(x, w, g, backend="cuda"), "backend must be one of"),
    (lambda x, w, g: kernels.gmm(x, w, g, interpret="yes"), "interpret must be"),
    (lambda x, w, g: kernels.gmm(x, w, g, tiling=(16, 16)), "tiling must be a tuple"),
    (lambda x, w, g: kernels.gmm(x, w, g, tiling=(16, 0, 16)), "tiling must be a tuple"),
    (lambda x, w, g: kernels.gmm(x, w, g, backend="xla", interpret=True),
     "interpret=True needs a Pallas backend"),
    (lambda x, w, g: kernels.gmm(x, w, g, backend="triton", interpret=False, tiling=(24, 16, 16)),
     "powers of two"),
    (lambda x, w, g: kernels.gmm(x, w, g, backend="tpu", interpret=False, tiling=(16, 100, 128)),
     "multiples of 128"),
    (lambda x, w, g: kernels.gmm(x, w, g, backend="mosaic_gpu", interpret=True),
     "takes dtypes"),
    (lambda x, w, g: kernels.gmm(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), g,
                                 backend="mosaic_gpu", interpret=False, tiling=(64, 32, 64)),
     "multiples of 64"),
    (lambda x, w, g: kernels.tgmm(x, x[:5], g), "must agree on M"),
    (lambda x, w, g: kernels.tgmm(x, x, g[None]), r"group_sizes must have shape \[E\]"),
])
def test_errors(call, match):
    lhs, rhs, _ = _data(jnp.float32)
    with pytest.raises(ValueError, match=match):
        call(lhs, rhs, jnp.array([9, 0, 21, 13], jnp.int32))


def test_backend_choice_on_cpu():
    x = jnp.zeros((4, 4))
    assert api._resolve(None, None, None, jnp.float32, x) == api._Config("xla", None, False)
    assert api._resolve(None, True, None, jnp.float32, x) == api._Config("tpu", None, True)
    # An explicit Pallas backend interprets on CPU unless told not to.
    assert api._resolve("triton", None, None, jnp.float32, x).interpret
    assert not api._resolve("triton", False, None, jnp.float32, x).interpret


def test_xla_tile_follows_the_mean_group_size():
    assert api._xla_tile_m(16384, 8) == 256  # capped
    assert api._xla_tile_m(4096, 64) == 64
    assert api._xla_tile_m(1000, 8) == 64  # mean 125, rounded down to a power of two
    assert api._xla_tile_m(48, 64) == 64  # floor


# --------------------------------------------------------------------------- metadata

@pytest.mark.parametrize("case", list(GROUP_SIZES))
def test_visit_empty_groups_metadata(case):
    sizes = GROUP_SIZES[case]
    tile_m = 16
    meta = metadata.group_metadata(jnp.array(sizes), M, tile_m, visit_empty_groups=True)
    num_visits = int(meta.num_visits)
    groups = np.asarray(meta.visit_group)[:num_visits]
    tiles = np.asarray(meta.visit_tile)[:num_visits]
    assert num_visits <= metadata.max_visits(M, len(sizes), tile_m)
    assert set(groups.tolist()) == set(range(len(sizes)))  # every group, empty ones too
    assert (np.diff(groups) >= 0).all() and (np.diff(tiles) >= 0).all()
    plain = metadata.group_metadata(jnp.array(sizes), M, tile_m)
    assert num_visits == int(plain.num_visits) + sizes.count(0)


# --------------------------------------------------------------------------- dispatch

def _ffn_and_routing(num_tokens=24, d=16, f=40, num_experts=4, k=2):
    keys = jax.random.split(jax.random.key(3), 6)
    ffn = ExpertFFN(
        wi=jax.random.normal(keys[0], (num_experts, d, f)) / 4,
        wo=jax.random.normal(keys[1], (num_experts, f, d)) / 6,
        wi_gate=jax.random.normal(keys[2], (num_experts, d, f)) / 4,
        activation="swiglu")
    x = jax.random.normal(keys[3], (num_tokens, d))
    # Expert 3 gets no token: an empty group.
    expert_index = jax.random.randint(keys[4], (num_tokens, k), 0, num_experts - 1)
    weights = jax.nn.softmax(jax.random.normal(keys[5], (num_tokens, k)), axis=-1)
    return ffn, x, expert_index, weights


def _dispatch_value_and_grads(dispatch, ffn, x, expert_index, weights):
    def loss(ffn, x, weights):
        y = dispatch(x, expert_index, weights, ffn, capacity=None).y
        return jnp.sum(jnp.sin(y))

    # A fresh jit per call: the "pallas" dispatch reads its environment when traced.
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(ffn, x, weights)


def _assert_trees_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("env", [
    {},  # the platform default: the XLA tile loop on CPU
    {"MOE_PALLAS_INTERPRET": "1"},  # the TPU kernel in interpret mode
    {"MOE_PALLAS_INTERPRET": "1", "MOE_PALLAS_BACKEND": "triton"},
], ids=["default", "interpret", "triton"])
def test_pallas_dispatch_matches_einsum(env, monkeypatch):
    for name in ("MOE_PALLAS_INTERPRET", "MOE_PALLAS_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = _ffn_and_routing()
    expected = _dispatch_value_and_grads(get_dispatch("einsum"), *args)
    _assert_trees_close(_dispatch_value_and_grads(get_dispatch("pallas"), *args), expected)


def test_sort_dispatch_over_interpreted_kernel_matches_einsum():
    args = _ffn_and_routing()
    gmm = functools.partial(kernels.gmm, interpret=True, backend="triton", tiling=(16, 16, 16))
    dispatch = make_sort_dispatch(gmm, "triton_interpret")
    expected = _dispatch_value_and_grads(get_dispatch("einsum"), *args)
    _assert_trees_close(_dispatch_value_and_grads(dispatch, *args), expected)


def test_pallas_dispatch_rejects_a_bad_interpret_flag(monkeypatch):
    monkeypatch.setenv("MOE_PALLAS_INTERPRET", "yes")
    ffn, x, expert_index, weights = _ffn_and_routing()
    with pytest.raises(ValueError, match="MOE_PALLAS_INTERPRET must be"):
        get_dispatch("pallas")(x, expert_index, weights, ffn, capacity=None)
