"""The `pallas_fused` dispatch: the permutation runs inside the grouped-matmul kernels.

Dropless mode, for tokens `x [T, d]` and the assignments sorted by expert
(`sorted_layout`: row r holds token `row_token[r]`, R = T * k rows):

    up, gate = gather_gmm(x, wi), gather_gmm(x, wi_gate)   # rows gathered in the kernel
    h        = act(gate) * up * w_r                         # [R, f], XLA elementwise
    y        = gmm_scatter(h, wo)                           # added into token order

so neither the permuted `[R, d]` copy of x nor the `[R, d]` expert outputs are
written; the backward pass uses the same kernels transposed
(`moe/kernels/fused.py`). The routing weight `w_r` of row r multiplies the
hidden activations (the scatter is linear in them), so its gradient comes
from XLA's autodiff of that product. Padding (`mask` False) and the "no
expert" sentinel sort past the real groups and cost no kernel work.

Capacity mode uses the `[E, C, d]` buffers of the `sort` dispatch.

Kernel choice: `MOE_PALLAS_BACKEND` ("tpu" or "triton"; unset: the
platform's) and `MOE_PALLAS_INTERPRET` as for the `pallas` dispatch; on CPU
the kernels run in Pallas interpret mode (correct, slow: tests only).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from moe.dispatch.dispatchers import DispatchOutput, capacity_sort_dispatch
from moe.dispatch.layout import sorted_layout
from moe.experts import ExpertFFN
from moe.kernels import api as kernel_api
from moe.kernels import fused

Array = jax.Array


def fused_dropless(x: Array, expert_index: Array, weights: Array, ffn: ExpertFFN, *,
                   mask: Array | None = None, backend: str | None = None,
                   interpret: bool | None = None,
                   tiling: tuple[int, int, int] | None = None) -> DispatchOutput:
    """Dropless dispatch through the fused kernels (explicit kernel options)."""
    num_tokens, num_experts = x.shape[0], ffn.num_experts
    if mask is not None:  # padding goes to the sentinel group: past the real rows
        expert_index = jnp.where(mask[:, None], expert_index, num_experts)
    layout, group_sizes = sorted_layout(expert_index, num_experts)
    call = dict(backend=backend, interpret=interpret, tiling=tiling)
    rows = layout.row_token
    row_weight = weights[rows, layout.row_choice].astype(x.dtype)  # [R]
    up = fused.gather_gmm(x, ffn.wi, group_sizes, rows, **call)
    gate = None if ffn.wi_gate is None else fused.gather_gmm(x, ffn.wi_gate, group_sizes,
                                                             rows, **call)
    hidden = ffn.hidden(up, gate) * row_weight[:, None]
    y = fused.gmm_scatter(hidden, ffn.wo, group_sizes, rows, num_tokens, **call)
    return DispatchOutput(y.astype(x.dtype), layout.keep)


def kernel_options() -> dict:
    """`backend` and `interpret` from the environment (`MOE_PALLAS_BACKEND`,
    `MOE_PALLAS_INTERPRET`), refusing a backend without fused kernels and a compiled
    run on CPU."""
    backend = os.environ.get(kernel_api.BACKEND_ENV) or None
    if backend is not None and backend not in fused.FUSED_BACKENDS:
        raise ValueError(
            f"{kernel_api.BACKEND_ENV}={backend!r}: dispatch 'pallas_fused' has kernels for "
            f"{fused.FUSED_BACKENDS} only; for {backend!r} use dispatch 'pallas'")
    flag = os.environ.get(kernel_api.INTERPRET_ENV, "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"{kernel_api.INTERPRET_ENV} must be '1', '0' or unset, got {flag!r}")
    if flag == "0" and jax.default_backend() == "cpu":
        raise ValueError(
            f"{kernel_api.INTERPRET_ENV}=0: dispatch 'pallas_fused' has no compiled CPU kernel "
            f"(it runs on CPU only in Pallas interpret mode); on CPU use 'sort'")
    return {"backend": backend, "interpret": None if flag == "" else flag == "1"}


def pallas_fused_dispatch(x: Array, expert_index: Array, weights: Array, ffn: ExpertFFN, *,
                          capacity: int | None, priority: Array | None = None,
                          mask: Array | None = None) -> DispatchOutput:
    """Capacity mode: `[E, C, d]` buffers (as `sort`). Dropless: `fused_dropless`."""
    if capacity is not None:
        return capacity_sort_dispatch(x, expert_index, weights, ffn, capacity=capacity,
                                      priority=priority, mask=mask)
    return fused_dropless(x, expert_index, weights, ffn, mask=mask, **kernel_options())
