"""What every router shares: the routing result, the projection, the registry.

A router is an NNX module that turns the tokens of one routing group into a
`Routing`, which `layers.MoeLayer` hands to the dispatcher. It owns its
parameters (the float32 projection `kernel [d_model, E]`, at parameter path
`.../router/kernel` inside the MoE layer) and its options (gin bindings on
its class), reads the per-step inputs it declares in `state_keys` from the
layer's router state (`moe.router_state.RouterState.for_layer`), and fills
its part of the layer's `MoeAux` (losses, probabilities, per-token routing).

Adding a router is one class plus `@register_router("name")` (which also
makes it a gin configurable, bindable as `MoeLayer.router = @MyRouter`);
docs/architecture.md has the worked example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.params import EMBED, EXPERT, make_param, normal_init
from moe import balance
from moe.dispatch import expert_capacity
from moe.layer_aux import MoeAux
from moe.validation import check_one_of

Array = jax.Array

# Arguments the MoE layer passes to every router; not bindable in gin.
ROUTER_DENYLIST = ("d_model", "num_experts", "k", "causal", "param_dtype", "rngs")


@dataclasses.dataclass(frozen=True)
class Routing:
    """A router's decision for one routing group of T tokens and E experts.

    Token-choice form (every router but expert choice):
      expert_index: `[T, k'] int32` experts per token; the sentinel value E
        means "no expert" (a variable number of experts per token, e.g. the
        dense-to-sparse active set via `moe.dense_to_sparse.active_pairs_as_assignments`).
      weights: `[T, k'] float32` combine weights (zero for padding and sentinels).
      priority: optional `[T]`: capacity slots go to higher priority first.
      dropless: dispatch every assignment, whatever the layer's capacity.
    Expert-choice form:
      token_index: `[E, C] int32` tokens picked by each expert.
      expert_weights: `[E, C] float32` their combine weights.
    aux: the router's part of the layer's `MoeAux` (losses, mean_probs,
      router_entropy, token_* ...); the layer adds counts and dispatch statistics.
    local_output: optional `[T, d_model] float32` output of experts the router
      computes itself, without dispatch (zero-computation experts: copy and
      constant experts, `layers.routers.null_experts`); the layer adds it to
      the dispatched output (token choice only).
    """

    aux: MoeAux
    expert_index: Array | None = None
    weights: Array | None = None
    priority: Array | None = None
    dropless: bool = False
    token_index: Array | None = None
    expert_weights: Array | None = None
    local_output: Array | None = None

    def __post_init__(self):
        token_form = self.expert_index is not None and self.weights is not None
        expert_form = self.token_index is not None and self.expert_weights is not None
        if token_form == expert_form:
            raise ValueError("a Routing holds either expert_index and weights (token choice) "
                             "or token_index and expert_weights (expert choice)")

    @property
    def expert_choice(self) -> bool:
        return self.token_index is not None


_ROUTERS: dict[str, type] = {}


def register_router(name: str) -> Callable[[type], type]:
    """Class decorator: registers a router under `name` and as a gin configurable
    (its structural arguments, `ROUTER_DENYLIST`, refused in gin)."""

    def decorate(cls: type) -> type:
        if name in _ROUTERS:
            raise ValueError(f"router {name!r} is already registered")
        configurable = gin.configurable(cls, denylist=list(ROUTER_DENYLIST))
        _ROUTERS[name] = configurable
        return configurable

    return decorate


def available_routers() -> tuple[str, ...]:
    return tuple(_ROUTERS)


def get_router(name: str) -> type:
    check_one_of("MoeLayer.router", name, _ROUTERS)
    return _ROUTERS[name]


def split_rng(rng: Array | None) -> tuple[Array | None, Array | None]:
    """(jitter key, selection-noise key) of one call; both None without a key."""
    return (None, None) if rng is None else tuple(jax.random.split(rng))


class BaseRouter(nnx.Module):
    """The float32 projection x `[T, d_model]` -> logits `[T, E]`, and the router interface.

    Always computes in float32 ("selective precision"), whatever the dtype of
    the parameters and activations. Optional multiplicative jitter
    u ~ U(1 - eps, 1 + eps) on the router input, in training only.

    Class attributes a subclass may set:
      state_keys: router-state keys it reads (`moe.router_state`).
      expert_parallel_ok: token choice with k distinct experts per token, so the
        expert-parallel dispatch can run it (its default buffers, sized to the
        worst case, then hold every assignment; a repeated expert would
        overflow them and be reported as dropped).
      variable_assignments: the number of assignments per token varies in
        training (FLOPs are then counted from `kept_counts`).
    """

    state_keys: ClassVar[tuple[str, ...]] = ()
    expert_parallel_ok: ClassVar[bool] = False
    variable_assignments: ClassVar[bool] = False

    def __init__(self, d_model: int, num_experts: int, k: int, *, causal: bool = True,
                 init_std: float = 0.02, jitter_eps: float = 0.0, use_bias: bool = False,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got {k}")
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.num_experts, self.k, self.causal = num_experts, k, causal
        self.init_std, self.jitter_eps = init_std, jitter_eps
        self.kernel = make_param(rngs, normal_init(init_std), (d_model, num_experts),
                                 (EMBED, EXPERT), param_dtype)
        self.bias = (make_param(rngs, normal_init(0.0), (num_experts,), (EXPERT,), param_dtype)
                     if use_bias else None)

    def logits(self, x: Array, *, deterministic: bool = True,
               rng: Array | None = None) -> Array:
        """x `[T, d_model]` -> logits `[T, E] float32`."""
        x = x.astype(jnp.float32)
        if self.jitter_eps > 0 and not deterministic:
            if rng is None:
                raise ValueError("router jitter in training needs an rng key")
            x = x * jax.random.uniform(rng, x.shape, jnp.float32,
                                       1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits = x @ self.kernel[...].astype(jnp.float32)
        if self.bias is not None:
            logits = logits + self.bias[...].astype(jnp.float32)
        return logits

    def capacity(self, num_tokens: int, capacity_factor: float | None, *,
                 min_capacity: int = 1, multiple_of: int = 1) -> int | None:
        """Slots per expert for a group of `num_tokens` (None = dropless):
        ceil(k * T * cf / E), see `moe.dispatch.expert_capacity`."""
        if capacity_factor is None:
            return None
        return expert_capacity(num_tokens, self.num_experts, self.k, capacity_factor,
                               min_capacity=min_capacity, multiple_of=multiple_of)

    def check_capacity_factor(self, capacity_factor: float | None) -> None:
        """Refuses a training capacity factor this router cannot work with."""
        del capacity_factor

    def __call__(self, x: Array, *, mask: Array, capacity: int | None, deterministic: bool,
                 rng: Array | None, state: Mapping[str, Array]) -> Routing:
        """x `[T, d_model]`, mask `[T]` (1 = real token) -> Routing."""
        raise NotImplementedError


def router_losses(logits: Array, probs: Array, mask: Array) -> dict[str, Any]:
    """The aux fields every softmax router reports: z-loss, P_i and entropy."""
    return dict(z_loss=balance.router_z_loss(logits, mask=mask),
                mean_probs=balance.mean_probs(probs, mask=mask),
                router_entropy=balance.router_entropy(probs, mask=mask))
