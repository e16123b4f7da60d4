"""Rematerialisation policies: what the backward pass keeps of a layer's activations.

`TransformerLM.remat_policy` (gin) wraps every block (unscanned) and every
repeat of the scanned unit (`layers.scan`) in `jax.checkpoint` with:

  none          no remat: every activation the backward pass needs is kept.
  full          nothing kept; the whole block is recomputed in the backward pass
                (least memory, one more forward pass of the blocks).
  save_dots     matmul outputs without batch dimensions kept (the projections of
                attention, the dense FFN and the experts), the rest recomputed
                (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).
  save_moe      the MoE layer's combine output and routing decision kept
                (`checkpoint_name` tags `moe_combine`, `moe_routing` in
                `layers.moe_layer`); attention, the expert FFN and the rest
                recomputed.
  offload_dots  as save_dots, but the kept matmul outputs live in host memory
                (`pinned_host`) between the passes. Needs a backend with host
                offload (GPU, TPU); refused on CPU.

Losses and gradients are the same under every policy (float32, to rounding).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

REMAT_POLICIES = ("none", "full", "save_dots", "save_moe", "offload_dots")
# checkpoint_name tags set in layers.moe_layer.
MOE_COMBINE, MOE_ROUTING = "moe_combine", "moe_routing"


def check_remat_policy(policy: str, backend: str | None = None) -> str:
    """Validates a policy name (ValueError naming `TransformerLM.remat_policy`)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"TransformerLM.remat_policy must be one of {', '.join(REMAT_POLICIES)}, "
                         f"got {policy!r}")
    backend = backend or jax.default_backend()
    if policy == "offload_dots" and backend == "cpu":
        raise ValueError("TransformerLM.remat_policy='offload_dots' needs host-memory offload "
                         "(GPU or TPU); the backend is cpu: use 'save_dots' or 'full'")
    return policy


def _policy(policy: str) -> Callable[..., bool] | None:
    cp = jax.checkpoint_policies
    if policy == "full":
        return cp.nothing_saveable
    if policy == "save_dots":
        return cp.dots_with_no_batch_dims_saveable
    if policy == "save_moe":
        return cp.save_only_these_names(MOE_COMBINE, MOE_ROUTING)
    if policy == "offload_dots":
        return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"no checkpoint policy for {policy!r}")


def remat(fn: Callable, policy: str, *, prevent_cse: bool = True) -> Callable:
    """`fn` under `jax.checkpoint` with the policy (`fn` itself for 'none').
    prevent_cse=False inside `lax.scan` (the scan already keeps XLA from merging
    the recomputation with the forward pass)."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=_policy(policy), prevent_cse=prevent_cse)
