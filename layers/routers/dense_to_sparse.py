"""The EvoMoE dense-to-sparse gate as a router (docs/evomoe.md)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from layers.routers.base import BaseRouter, Routing, register_router, router_losses, split_rng
from layers.routers.top_k import token_choice_aux
from moe import dense_to_sparse, routing
from moe.layer_aux import MoeAux
from moe.router_state import DTS_HARD, DTS_TEMPERATURE

Array = jax.Array


@register_router("dense_to_sparse")
class DenseToSparseRouter(BaseRouter):
    """EvoMoE's Gumbel-softmax gate (`moe.dense_to_sparse.dense_to_sparse_gating`).

    Training: the active set {g > threshold} (soft phase) or the top-k of g
    (hard phase; k = the layer's k), dispatched dropless, every active
    (token, expert) pair computed; the balance loss goes to `MoeAux.dts_loss`
    (weighted by `LossWeights.dts_weight`). It reads the router-state keys
    `dts_temperature` (tau) and `dts_hard` of each step. Evaluation:
    deterministic top-k on softmax(z) with the layer's eval capacity.

    Args (gin: `DenseToSparseRouter.<name>`): init_std, jitter_eps, use_bias as
    in `BaseRouter`; threshold: theta in [0, 1/E); gumbel_weights: combine
    weights mask * g instead of mask * softmax(z).
    """

    state_keys = (DTS_TEMPERATURE, DTS_HARD)
    variable_assignments = True

    def __init__(self, d_model: int, num_experts: int, k: int, *, causal: bool = True,
                 init_std: float = 0.02, jitter_eps: float = 0.0, use_bias: bool = False,
                 threshold: float = dense_to_sparse.DEFAULT_THRESHOLD,
                 gumbel_weights: bool = False, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_experts >= 1 and not 0.0 <= threshold < 1.0 / num_experts:
            raise ValueError(f"DenseToSparseRouter.threshold must be in [0, 1/num_experts="
                             f"{1.0 / num_experts:g}), got {threshold}")
        super().__init__(d_model, num_experts, k, causal=causal, init_std=init_std,
                         jitter_eps=jitter_eps, use_bias=use_bias, param_dtype=param_dtype,
                         rngs=rngs)
        self.threshold, self.gumbel_weights = threshold, gumbel_weights

    def __call__(self, x: Array, *, mask: Array, capacity: int | None, deterministic: bool,
                 rng: Array | None, state: Mapping[str, Array]) -> Routing:
        jitter_rng, noise_rng = split_rng(rng)
        logits = self.logits(x, deterministic=deterministic, rng=jitter_rng)
        if deterministic:
            gating = routing.top_k_gating(logits, self.k)
            return Routing(aux=token_choice_aux(logits, gating, mask, self.num_experts),
                           expert_index=gating.expert_index, weights=gating.weights * mask[:, None])
        missing = [key for key in self.state_keys if key not in state]
        if missing or noise_rng is None:
            raise ValueError(f"DenseToSparseRouter in training needs the router state keys "
                             f"{self.state_keys} (missing: {missing}) and an rng key")
        gate = dense_to_sparse.dense_to_sparse_gating(
            logits, temperature=state[DTS_TEMPERATURE], threshold=self.threshold, rng=noise_rng,
            hard=state[DTS_HARD], gumbel_weights=self.gumbel_weights, k=self.k, mask=mask)
        expert_index, weights = dense_to_sparse.active_pairs_as_assignments(gate.active,
                                                                            gate.weights)
        aux = MoeAux(dts_loss=gate.aux_loss, **router_losses(logits, gate.probs, mask))
        return Routing(aux=aux, expert_index=expert_index, weights=weights, dropless=True)
