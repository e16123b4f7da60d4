"""The mixture-of-experts layer: router, dispatch, experts, combine."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from layers import renamed
from layers.experts import Experts
from layers.mlp import DenseMLP
from layers.params import EMBED, fan_in_init, make_param
from layers.remat import MOE_COMBINE, MOE_ROUTING
from layers.routers import BaseRouter, Routing, TopKRouter, get_router
from moe import balance
from moe.dispatch import expert_choice_dispatch, get_dispatch
from moe.dispatch import expert_parallel as ep_lib
from moe.dispatch.registry import DEFAULT_DISPATCH, check_dispatch
from moe.layer_aux import MoeAux

Array = jax.Array
# Arguments TransformerLM passes to its MoE block; not bindable in gin.
MOE_BLOCK_DENYLIST = ("d_model", "causal", "dtype", "param_dtype", "rngs")


@gin.configurable(denylist=list(MOE_BLOCK_DENYLIST))
class MoeLayer(nnx.Module):
    """Sparse MoE feed-forward block.

    Called on x `[B, S, d_model]` (optionally with `mask [B, S]`, 1 = real
    token, and the layer's router state), returns `(y [B, S, d_model],
    MoeAux)`. The routing group is the whole call: all B*S tokens, flattened
    batch-major. The router fills its part of the aux (losses, P_i, per-token
    routing); the layer adds counts before and after dropping, the dropped
    fraction, MaxVio, experts per token and the number of real tokens.

    Args (gin: `MoeLayer.<name>`):
      d_ff: hidden size of each routed expert.
      num_experts: E routed experts.
      k: experts per token (token choice); for expert choice the average
        experts per token when `capacity_factor` is None.
      router: router factory (a registered router class, e.g. `@TopKRouter`,
        or its registry name); called as `router(d_model, num_experts, k,
        causal=, param_dtype=, rngs=)`. Its options are bindings on its class.
      experts: expert-weights factory, called as `experts(num_experts, d_model,
        d_ff, activation=, param_dtype=, rngs=)`.
      dispatch: one of `moe.dispatch.available_dispatches()`. Under a mesh
        whose "expert" rule spans devices, `Sharding.configure_dispatch` sets
        it to "expert_parallel" (experiments/runtime/mesh.py).
      capacity_factor: None = dropless. Otherwise the router's capacity, for
        token choice C = ceil(k * T * cf / E).
      eval_capacity_factor: capacity factor when `deterministic=True`
        (defaults to `capacity_factor`).
      min_capacity, capacity_multiple_of: capacity rounding.
      activation: activation of the routed and shared experts.
      num_shared_experts, shared_d_ff: dense experts every token goes through;
        hidden size shared_d_ff (default d_ff) per shared expert, activation
        `activation` (fused into one `shared` DenseMLP of width
        num_shared_experts * shared_d_ff).
      shared_gate: scale the shared experts' output per token by
        sigmoid(x . shared_gate), param `shared_gate [d_model]` (EMBED), created
        after the other parameters (Qwen2-MoE's shared_expert_gate); needs
        num_shared_experts > 0. The gate's logit is computed in float32.
    Set by the parent (refused in gin): d_model, causal (a causal decoder
    refuses routers that look at future tokens), dtype (compute dtype of the
    experts; the router is always float32), param_dtype, rngs.
    """

    def __init__(self, d_model: int, d_ff: int | None = None, num_experts: int = 8, k: int = 2, *,
                 router: Callable[..., BaseRouter] | str = TopKRouter,
                 experts: Callable[..., Experts] = Experts, dispatch: str = DEFAULT_DISPATCH,
                 capacity_factor: float | None = None,
                 eval_capacity_factor: float | None = None, min_capacity: int = 1,
                 capacity_multiple_of: int = 1, activation: str = "relu",
                 num_shared_experts: int = 0, shared_d_ff: int | None = None,
                 shared_gate: bool = False, causal: bool = True, dtype=jnp.float32,
                 param_dtype=jnp.float32,
                 rngs: nnx.Rngs, **old_router_args: Any):
        renamed.refuse_removed_router_bindings()
        if old_router_args:
            router = renamed.router_from_old_args(old_router_args, "MoeLayer")
        _validate(d_ff=d_ff, num_experts=num_experts, k=k, dispatch=dispatch,
                  capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                  num_shared_experts=num_shared_experts)
        if shared_gate and not num_shared_experts:
            raise ValueError("MoeLayer.shared_gate needs shared experts (num_shared_experts > 0)")
        if isinstance(router, str):
            router = get_router(router)
        self.d_model, self.d_ff = d_model, d_ff
        self.num_experts, self.k = num_experts, k
        self.dispatch = dispatch
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = (capacity_factor if eval_capacity_factor is None
                                     else eval_capacity_factor)
        self.min_capacity, self.capacity_multiple_of = min_capacity, capacity_multiple_of
        self.dtype = dtype
        # Set by `use_expert_parallel` (the sharding config), never by gin.
        self.expert_parallel: ep_lib.ExpertParallelOptions | None = None
        self.dispatch_shards = 1
        self.router = router(d_model, num_experts, k, causal=causal, param_dtype=param_dtype,
                             rngs=rngs)
        if not isinstance(self.router, BaseRouter):
            raise ValueError(f"MoeLayer.router must build a layers.routers.BaseRouter, got "
                             f"{type(self.router).__name__}")
        self.router.check_capacity_factor(capacity_factor)
        self.experts = experts(num_experts, d_model, d_ff, activation=activation,
                               param_dtype=param_dtype, rngs=rngs)
        self.shared = (DenseMLP(d_model, (shared_d_ff or d_ff) * num_shared_experts,
                                activation=activation, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs) if num_shared_experts else None)
        self.shared_gate = (make_param(rngs, fan_in_init([0]), (d_model,), (EMBED,), param_dtype)
                            if shared_gate else None)

    @property
    def activation(self) -> str:
        return self.experts.activation

    def use_expert_parallel(self, options: ep_lib.ExpertParallelOptions, shards: int) -> bool:
        """Switches this layer to the expert-parallel dispatch over `shards` batch
        shards, if its router allows it; returns whether it did. Called by the
        sharding config (`experiments.runtime.mesh.Sharding.configure_dispatch`)
        before the model is split, so the choice is part of the model's graph."""
        if not self.router.expert_parallel_ok:
            return False
        self.dispatch, self.expert_parallel, self.dispatch_shards = (
            "expert_parallel", options, shards)
        return True

    def capacity(self, num_tokens: int, deterministic: bool) -> int | None:
        """Static per-expert capacity for a group of `num_tokens` (None = dropless)."""
        cf = self.eval_capacity_factor if deterministic else self.capacity_factor
        return self.router.capacity(num_tokens, cf, min_capacity=self.min_capacity,
                                    multiple_of=self.capacity_multiple_of)

    def __call__(self, x: Array, *, mask: Array | None = None, deterministic: bool = True,
                 rng: Array | None = None, router_state: Mapping[str, Array] | None = None,
                 ) -> tuple[Array, MoeAux]:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, seq, d_model={self.d_model}], got {x.shape}")
        batch, seq, _ = x.shape
        if mask is not None and mask.shape != (batch, seq):
            raise ValueError(f"mask must be [batch, seq]=({batch}, {seq}), got {mask.shape}")
        num_tokens = batch * seq
        tokens = x.reshape(num_tokens, self.d_model)
        token_mask = (jnp.ones((num_tokens,), jnp.float32) if mask is None
                      else mask.reshape(num_tokens).astype(jnp.float32))
        capacity = self.capacity(num_tokens, deterministic)
        decision = self.router(tokens, mask=token_mask, capacity=capacity,
                               deterministic=deterministic, rng=rng,
                               state=dict(router_state or {}))
        decision = _tag_routing(decision)
        ffn = self.experts.ffn(self.dtype)
        compute_tokens = tokens.astype(self.dtype)
        if decision.expert_choice:
            y, stats = _expert_choice(compute_tokens, decision, token_mask, ffn)
        else:
            y, stats = self._token_choice(compute_tokens, decision, token_mask, ffn,
                                          None if decision.dropless else capacity)
            if decision.local_output is not None:  # experts computed by the router
                y = (y.astype(jnp.float32) + decision.local_output).astype(y.dtype)
        aux = decision.aux.replace(**stats, num_tokens=jnp.sum(token_mask))
        y = checkpoint_name(y, MOE_COMBINE).reshape(batch, seq, self.d_model)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                gate = jax.nn.sigmoid(jnp.einsum("bsd,d->bs", x.astype(jnp.float32),
                                                 self.shared_gate[...].astype(jnp.float32)))
                shared = shared * gate[..., None].astype(shared.dtype)
            y = y + shared
        return y.astype(x.dtype), aux

    def _token_choice(self, tokens: Array, decision: Routing, token_mask: Array, ffn,
                      capacity: int | None) -> tuple[Array, dict[str, Array]]:
        index, num_experts = decision.expert_index, self.num_experts
        dispatch_index = index
        if capacity is None and self.expert_parallel is None:
            # Dropless: masked tokens (padding, tokens a skip router routed out) go to
            # the sentinel group E, so they cost no expert rows (their output is 0).
            dispatch_index = jnp.where(token_mask[:, None] > 0, index, num_experts)
        options = (contextlib.nullcontext() if self.expert_parallel is None
                   else ep_lib.use_options(self.expert_parallel))
        with options:
            out = get_dispatch(self.dispatch)(tokens, dispatch_index, decision.weights, ffn,
                                              capacity=capacity, priority=decision.priority,
                                              mask=token_mask)
        counts = balance.expert_counts(index, num_experts, mask=token_mask)
        valid = index < num_experts  # the sentinel E marks "no expert"
        kept = out.keep & valid & (token_mask[:, None] > 0)
        kept_counts = jax.lax.stop_gradient(jnp.einsum(
            "tke,tk->e", jax.nn.one_hot(index, num_experts), kept))
        return out.y, dict(
            counts=counts,
            kept_counts=kept_counts,
            dropped_fraction=balance.dropped_fraction(out.keep, mask=token_mask, valid=valid),
            max_violation=balance.max_violation(counts),
            active_experts=jnp.sum(kept) / jnp.maximum(jnp.sum(token_mask), 1.0),
        )


def _tag_routing(decision: Routing) -> Routing:
    """The decision's index and weight arrays tagged `moe_routing` (the `save_moe`
    remat policy keeps them, `layers.remat`)."""
    fields = ("expert_index", "weights", "priority", "token_index", "expert_weights")
    return dataclasses.replace(decision, **{
        f: checkpoint_name(getattr(decision, f), MOE_ROUTING)
        for f in fields if getattr(decision, f) is not None})


def _expert_choice(tokens: Array, decision: Routing, token_mask: Array,
                   ffn) -> tuple[Array, dict[str, Array]]:
    """Expert e processes its C picked tokens; counts are the picked real tokens."""
    y = expert_choice_dispatch(tokens, decision.token_index, decision.expert_weights, ffn)
    picked_real = token_mask[decision.token_index]  # [E, C]
    kept_counts = jax.lax.stop_gradient(jnp.sum(picked_real, axis=1))
    per_token = jnp.zeros(token_mask.shape).at[decision.token_index.reshape(-1)].add(
        picked_real.reshape(-1))
    num_real = jnp.maximum(jnp.sum(token_mask), 1.0)
    return y, dict(
        counts=kept_counts,
        kept_counts=kept_counts,
        dropped_fraction=jnp.sum((per_token == 0) * token_mask) / num_real,
        max_violation=balance.max_violation(kept_counts),
        active_experts=jnp.sum(per_token * token_mask) / num_real,
    )


def _validate(*, d_ff, num_experts, k, dispatch, capacity_factor, eval_capacity_factor,
              num_shared_experts) -> None:
    if d_ff is None or d_ff < 1:
        raise ValueError(f"MoeLayer.d_ff (the hidden size of each expert) must be set and >= 1, "
                         f"got {d_ff}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
    check_dispatch(dispatch)  # a known name, its optional package installed
    for name, value in (("capacity_factor", capacity_factor),
                        ("eval_capacity_factor", eval_capacity_factor)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 or None (dropless), got {value}")
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts must be >= 0, got {num_shared_experts}")


def active_ffn(moe_block: Callable[..., Any], k: int | None = None) -> tuple[int, str]:
    """`(d_ff, activation)` of a dense FFN with the active parameters per token of
    the MoE block `moe_block` would build (router excepted): k * d_ff +
    num_shared_experts * shared_d_ff, with the experts' activation.

    Read from the block's configuration (explicit `functools.partial` arguments
    over gin bindings over defaults), without building it; `k` overrides the
    block's experts per token (e.g. 1 for EvoMoE's dense phase).
    """
    config = configured_arguments(moe_block)
    d_ff, num_experts = config.get("d_ff"), config.get("num_experts", 8)
    k = config.get("k", 2) if k is None else k
    _validate(d_ff=d_ff, num_experts=num_experts, k=k, dispatch=config.get("dispatch", DEFAULT_DISPATCH),
              capacity_factor=config.get("capacity_factor"),
              eval_capacity_factor=config.get("eval_capacity_factor"),
              num_shared_experts=config.get("num_shared_experts", 0))
    shared = config.get("num_shared_experts", 0) * (config.get("shared_d_ff") or d_ff)
    return k * d_ff + shared, config.get("activation", "relu")


def configured_arguments(factory: Callable[..., Any]) -> dict[str, Any]:
    """The keyword arguments a (possibly partial) gin-configurable factory will get:
    its signature defaults, then its gin bindings, then the partial's arguments."""
    partial_kwargs: dict[str, Any] = {}
    while isinstance(factory, functools.partial):
        partial_kwargs = {**factory.keywords, **partial_kwargs}
        factory = factory.func
    init = factory.__init__ if inspect.isclass(factory) else factory
    defaults = {name: p.default for name, p in inspect.signature(init).parameters.items()
                if p.default is not inspect.Parameter.empty}
    try:
        bound = gin.get_bindings(factory)
    except (ValueError, TypeError):  # not a gin configurable
        bound = {}
    return {**defaults, **bound, **partial_kwargs}
