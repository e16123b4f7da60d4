"""Binary-mask top-k routing (ToMoE): the k best experts, each with combine weight 1."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from layers.routers.base import BaseRouter, Routing, register_router, split_rng
from layers.routers.top_k import token_choice_aux
from moe import routing
from moe.router_state import SELECTION_BIAS

Array = jax.Array


@register_router("mask")
class MaskRouter(BaseRouter):
    """Each token keeps its k best experts with weight 1 (a binary mask over experts).

    The router of a dense MLP converted by ToMoE (`moe.tomoe`,
    docs/surgery.md): the experts are disjoint groups of the dense MLP's hidden
    units, so with weight 1 per selected expert the layer computes the dense
    MLP restricted to the selected groups, and with k = E exactly the dense
    MLP. Selection: top-k of the logits plus the `selection_bias` router state
    (loss-free balancing). The scores reported to the balance losses and
    statistics are sigmoid(logits), as for `TopKRouter.score = 'sigmoid'`.
    Options (gin: `MaskRouter.<name>`): those of `BaseRouter` (init_std,
    jitter_eps, use_bias).
    """

    state_keys = (SELECTION_BIAS,)
    expert_parallel_ok = True

    def __call__(self, x: Array, *, mask: Array, capacity: int | None, deterministic: bool,
                 rng: Array | None, state: Mapping[str, Array]) -> Routing:
        del capacity
        logits = self.logits(x, deterministic=deterministic, rng=split_rng(rng)[0])
        probs = routing.score_probs(logits, "sigmoid")
        selection = logits
        bias = state.get(SELECTION_BIAS)
        if bias is not None:
            selection = selection + jax.lax.stop_gradient(bias.astype(jnp.float32))
        _, expert_index = jax.lax.top_k(selection, self.k)
        weights = jnp.ones(expert_index.shape, jnp.float32)
        gating = routing.TokenChoice(expert_index.astype(jnp.int32), weights, probs)
        return Routing(aux=token_choice_aux(logits, gating, mask, self.num_experts, "sigmoid"),
                       expert_index=gating.expert_index, weights=weights * mask[:, None])
