"""The `pallas_fused` dispatch (moe/dispatch/fused.py, moe/kernels/fused*.py) and the optional
`tokamax` dispatch (moe/dispatch/tokamax_backend.py).

The fused kernels run here in Pallas interpret mode on CPU (TPU and Triton variants) against
the XLA path (the `sort` dispatch), values and gradients; the compiled paths are lowered for
TPU and CUDA without the hardware. Every routing case has the same shapes, so each backend
compiles one program and runs it on every case.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import core as jax_core

from moe.dispatch import fused as fused_dispatch
from moe.dispatch import get_dispatch, tokamax_backend
from moe.dispatch.registry import unavailable
from moe.experts import ExpertFFN
from moe.kernels import fused

T, D, F, E, K = 12, 16, 24, 4, 2


def _ffn(activation="swiglu", d=D, f=F, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    gate = jax.random.normal(keys[2], (E, d, f), dtype) / 4 if activation == "swiglu" else None
    return ExpertFFN(jax.random.normal(keys[0], (E, d, f), dtype) / 4,
                     jax.random.normal(keys[1], (E, f, d), dtype) / 5, gate, activation)


def _case(name):
    """(expert_index [T, K], mask [T]) of one routing scenario."""
    mask = np.ones(T, bool)
    if name == "empty_groups":  # experts 1 and 3 get nothing
        index = np.stack([np.zeros(T), np.full(T, 2)], 1)
    elif name == "all_to_one_expert":  # every choice on expert 2; the second choices are
        index = np.stack([np.full(T, 2), np.full(T, E)], 1)  # the "no expert" sentinel E
    elif name == "duplicates_in_a_tile":
        # Tokens 0-5 choose experts 0 and 1: sorted rows 0-5 (expert 0) and 6-11 (expert 1)
        # hold tokens 0-5 twice, so the first 8-row tile scatters into tokens 0 and 1 twice.
        index = np.stack([np.where(np.arange(T) < 6, 0, 2), np.where(np.arange(T) < 6, 1, 3)], 1)
    elif name == "padding":  # the last 4 tokens are padding: masked, weights zeroed
        index = np.random.default_rng(1).integers(0, E, (T, 1)) + np.array([0, 1])
        index = index % E
        mask[-4:] = False
    else:
        raise ValueError(name)
    return jnp.asarray(index, jnp.int32), jnp.asarray(mask)


CASES = ("empty_groups", "all_to_one_expert", "duplicates_in_a_tile", "padding")


def _value_and_grads(run, zero_padding_weights=True):
    """jitted `(ffn, x, weights, expert_index, mask) -> (loss, grads)` of `run(...)`.

    Callers of a dispatch zero the padding's weights; `zero_padding_weights=False` leaves
    them to the dispatch, which must then ignore masked tokens by itself."""

    def loss(ffn, x, weights, expert_index, mask):
        if zero_padding_weights:
            weights = jnp.where(mask[:, None], weights, 0.0)
        y = run(x, expert_index, weights, ffn, mask)
        return jnp.sum(jnp.sin(y) * jnp.arange(D, dtype=y.dtype))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


_REFERENCE = _value_and_grads(
    lambda x, index, w, ffn, mask: get_dispatch("sort")(x, index, w, ffn, capacity=None,
                                                        mask=mask).y)


@pytest.mark.parametrize("backend,tiling", [("tpu", (8, 16, 16)), ("triton", (16, 16, 16))])
def test_fused_dispatch_matches_the_xla_path_in_interpret_mode(backend, tiling):
    ffn = _ffn()
    x = jax.random.normal(jax.random.key(1), (T, D))
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(2), (T, K)), axis=-1)
    # The padding's weights stay nonzero here: padded rows sort past the real groups and are
    # neither computed nor scattered, so the result equals the reference's with zero weights.
    fused_run = _value_and_grads(
        lambda x, index, w, ffn, mask: fused_dispatch.fused_dropless(
            x, index, w, ffn, mask=mask, backend=backend, interpret=True, tiling=tiling).y,
        zero_padding_weights=False)
    for case in CASES:
        expert_index, mask = _case(case)
        got, want = fused_run(ffn, x, weights, expert_index, mask), _REFERENCE(
            ffn, x, weights, expert_index, mask)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                       err_msg=case)


def test_tpu_kernels_under_the_tpu_interpreter():
    # The TPU interpreter models DMAs, semaphores and uninitialized VMEM (NaN) faithfully.
    from jax.experimental.pallas import tpu as pltpu

    from moe.kernels import fused_tpu

    expert_index, _ = _case("duplicates_in_a_tile")
    order = np.argsort(np.asarray(expert_index).reshape(-1), kind="stable")
    rows = jnp.asarray(order // K, jnp.int32)
    sizes = np.bincount(np.asarray(expert_index).reshape(-1), minlength=E)
    rng = np.random.default_rng(0)
    x, lhs = rng.standard_normal((T, D)), rng.standard_normal((T * K, D))
    rhs = rng.standard_normal((E, D, F))
    params = pltpu.InterpretParams(detect_races=True)
    call = dict(tiling=(8, 16, 16), interpret=params)
    gs = jnp.asarray(sizes, jnp.int32)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    group = np.repeat(np.arange(E), sizes)
    gathered = fused_tpu.gather_gmm(f32(x), f32(rhs), gs, rows, **call)
    np.testing.assert_allclose(gathered, np.einsum("rd,rdf->rf", x[order // K], rhs[group]),
                               rtol=1e-5, atol=1e-4)
    lhs_f = rng.standard_normal((T * K, F))
    scattered = fused_tpu.gmm_scatter(f32(lhs_f), f32(np.swapaxes(rhs, 1, 2)), gs, rows, T,
                                      **call)
    expected = np.zeros((T, D))
    np.add.at(expected, order // K, np.einsum("rf,rfd->rd", lhs_f, np.swapaxes(rhs, 1, 2)[group]))
    np.testing.assert_allclose(scattered, expected, rtol=1e-5, atol=1e-4)
    wgrad = fused_tpu.gather_tgmm(f32(x), f32(lhs), gs, rows, **call)
    expected = np.stack([x[order // K][group == g].T @ lhs[group == g] for g in range(E)])
    np.testing.assert_allclose(wgrad, expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- lowering

@pytest.mark.parametrize("backend,platform,target", [
    ("tpu", "tpu", "tpu_custom_call"), ("triton", "cuda", "__gpu$xla.gpu.triton")],
    ids=["tpu", "triton"])
def test_fused_dispatch_lowers_for_its_hardware(backend, platform, target):
    tokens, d, f = 128, 256, 384
    ffn = _ffn("relu", d, f, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (tokens, d), jnp.bfloat16)
    expert_index = jax.random.randint(jax.random.key(2), (tokens, K), 0, E)
    weights = jnp.full((tokens, K), 0.5)

    def loss(ffn, x, weights):
        y = fused_dispatch.fused_dropless(x, expert_index, weights, ffn, backend=backend,
                                          interpret=False).y
        return jnp.sum(y.astype(jnp.float32))

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    text = jax.jit(value_and_grad).trace(ffn, x, weights).lower(
        lowering_platforms=(platform,)).as_text()
    assert set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)) == {target}
    # Forward: gather_gmm (wi), gmm_scatter (wo). Backward of each: the other kernel
    # transposed and a gathered tgmm. (The two tgmm calls have one shape, so the lowered
    # text holds one function called twice: count the kernels in the jaxpr.)
    kernels = sorted(_pallas_kernels(jax.make_jaxpr(value_and_grad)(ffn, x, weights).jaxpr))
    suffix = "tpu" if backend == "tpu" else "triton"
    assert kernels == [f"moe_{name}_{suffix}" for name in ("gather_gmm", "gather_gmm",
                       "gather_tgmm", "gather_tgmm", "gmm_scatter", "gmm_scatter")]
    assert all(f"moe_{name}_{suffix}" in text for name in ("gather_gmm", "gather_tgmm",
                                                            "gmm_scatter"))


def _pallas_kernels(jaxpr) -> list[str]:
    """Names of the pallas_call equations of a jaxpr, nested jaxprs included."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            names.append(str(eqn.params["name"]))
        for sub in jax_core.jaxprs_in_params(eqn.params):
            names += _pallas_kernels(sub)
    return names


# --------------------------------------------------------------------------- errors

def test_a_backend_without_fused_kernels_is_refused_naming_the_alternatives(monkeypatch):
    ffn, x = _ffn("relu"), jnp.zeros((T, D))
    expert_index, _ = _case("empty_groups")
    with pytest.raises(ValueError, match=r"no backend 'xla'; they run on \('tpu', 'triton'\)"):
        fused.gather_gmm(x, ffn.wi, jnp.array([T * K, 0, 0, 0]), jnp.zeros(T * K, jnp.int32),
                         backend="xla")
    dispatch = get_dispatch("pallas_fused")
    monkeypatch.setenv("MOE_PALLAS_BACKEND", "mosaic_gpu")
    with pytest.raises(ValueError, match=r"kernels for \('tpu', 'triton'\) only; for "
                                         r"'mosaic_gpu' use dispatch 'pallas'"):
        dispatch(x, expert_index, jnp.ones((T, K)), ffn, capacity=None)
    monkeypatch.setenv("MOE_PALLAS_BACKEND", "")
    monkeypatch.setenv("MOE_PALLAS_INTERPRET", "0")
    with pytest.raises(ValueError, match="no compiled CPU kernel.*on CPU use 'sort'"):
        dispatch(x, expert_index, jnp.ones((T, K)), ffn, capacity=None)


def test_tokamax_implementation_on_a_backend_without_it_names_the_alternatives(monkeypatch):
    monkeypatch.setenv(tokamax_backend.IMPLEMENTATION_ENV, "mosaic")
    with pytest.raises(ValueError, match=r"no 'mosaic' ragged_dot on backend 'cpu'; there use "
                                         r"one of \('xla',\)"):
        tokamax_backend.implementation("cpu")
    assert tokamax_backend.implementation("tpu") == "mosaic"
    monkeypatch.setenv(tokamax_backend.IMPLEMENTATION_ENV, "cuda")
    with pytest.raises(ValueError, match="must be one of"):
        tokamax_backend.implementation("gpu")


def test_tokamax_without_the_extra_is_refused_naming_it():
    if unavailable("tokamax") is None:
        pytest.skip("tokamax is installed here")
    from flax import nnx

    from layers import MoeLayer

    with pytest.raises(ValueError, match=r"install the 'tokamax' extra \(pip install -e "
                                         r"'\.\[tokamax\]'"):
        MoeLayer(8, 16, 4, 2, dispatch="tokamax", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs the optional package tokamax"):
        get_dispatch("tokamax")


def test_tokamax_dispatch_matches_the_xla_path():
    pytest.importorskip("tokamax", reason="the optional tokamax extra is not installed")
    ffn = _ffn()
    x = jax.random.normal(jax.random.key(1), (T, D))
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(2), (T, K)), axis=-1)
    run = _value_and_grads(lambda x, index, w, ffn, mask: get_dispatch("tokamax")(
        x, index, w, ffn, capacity=None, mask=mask).y)
    for case in CASES:
        expert_index, mask = _case(case)
        got, want = run(ffn, x, weights, expert_index, mask), _REFERENCE(
            ffn, x, weights, expert_index, mask)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                       err_msg=case)
