"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from layers.routers.base import BaseRouter, Routing, register_router, router_losses, split_rng
from moe import routing
from moe.layer_aux import MoeAux

Array = jax.Array


@register_router("expert_choice")
class ExpertChoiceRouter(BaseRouter):
    """Expert e processes the C tokens with the highest softmax score for e.

    It looks at every token of the group, so it leaks future tokens in a
    causal decoder: refused there (encoders only, `TransformerLM.causal=False`).
    Capacity C = ceil(T * cf / E) with cf = the layer's capacity factor, or k
    (the average experts per token) when it is None. Balanced by
    construction: the LBL is 0. The combine happens in the layer with
    `moe.dispatch.expert_choice_dispatch` (a gather per expert).

    Args (gin: `ExpertChoiceRouter.<name>`): init_std, jitter_eps, use_bias as
    in `BaseRouter`.
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *, causal: bool = True,
                 init_std: float = 0.02, jitter_eps: float = 0.0, use_bias: bool = False,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if causal:
            raise ValueError("ExpertChoiceRouter looks at future tokens; a causal decoder "
                             "(TransformerLM.causal = True) cannot use it: choose a "
                             "token-choice MoeLayer.router, or set TransformerLM.causal = "
                             "False (an encoder)")
        super().__init__(d_model, num_experts, k, causal=causal, init_std=init_std,
                         jitter_eps=jitter_eps, use_bias=use_bias, param_dtype=param_dtype,
                         rngs=rngs)

    def capacity(self, num_tokens: int, capacity_factor: float | None, *,
                 min_capacity: int = 1, multiple_of: int = 1) -> int:
        del min_capacity, multiple_of
        return routing.expert_choice_capacity(
            num_tokens, self.num_experts, self.k if capacity_factor is None else capacity_factor)

    def __call__(self, x: Array, *, mask: Array, capacity: int | None, deterministic: bool,
                 rng: Array | None, state: Mapping[str, Array]) -> Routing:
        jitter_rng, _ = split_rng(rng)
        logits = self.logits(x, deterministic=deterministic, rng=jitter_rng)
        # Padding tokens must not be chosen: push their logits far down.
        masked_logits = jnp.where(mask[:, None] > 0, logits, -1e9)
        gating = routing.expert_choice_gating(masked_logits, capacity)
        weights = gating.weights * mask[gating.token_index]
        probs = routing.score_probs(logits)
        aux = MoeAux(lbl=jnp.zeros((), jnp.float32), **router_losses(logits, probs, mask))
        return Routing(aux=aux, token_index=gating.token_index, expert_weights=weights)
