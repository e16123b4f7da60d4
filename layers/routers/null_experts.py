"""Zero-computation experts and adaptive k: AdaMoE's null experts, MoE++'s zero/copy/constant
experts (docs/conditional_compute.md).

The router scores E FFN experts plus m zero-computation experts and picks the
top k of all E + m. FFN choices are dispatched as usual; a zero-computation
choice is never dispatched (its index becomes the sentinel E, "no expert"), so
a token spends between 0 and k FFN experts. Copy and constant experts return
something cheap, computed here and handed to the layer as `Routing.local_output`:

  zero:   E(x) = 0
  copy:   E(x) = x
  const:  E(x) = a1 * x + a2 * v,   [a1, a2] = softmax(W_c x),  W_c [d, 2], v [d] learned
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers.params import EMBED, make_param, normal_init
from layers.routers.base import BaseRouter, Routing, register_router, router_losses, split_rng
from layers.routers.top_k import balance_probs
from moe import balance, routing
from moe.layer_aux import MoeAux
from moe.router_state import SELECTION_BIAS
from moe.validation import check_one_of

Array = jax.Array

NULL_KINDS = ("zero", "copy", "const")
WEIGHT_RULES = ("raw", "renorm_true_only", "zero_then_renorm")


def null_weights(weights: Array, is_ffn: Array, is_zero: Array, rule: str) -> Array:
    """Combine weights of the k choices under a weight rule. `[T, k]` -> `[T, k]`.

    raw:              the router scores as they are (Switch, variant A);
    renorm_true_only: AdaMoE: the FFN choices renormalised to sum 1 among
                      themselves (a token with no FFN choice keeps 0 there);
                      null choices keep their raw score;
    zero_then_renorm: MoE++: zero-expert choices get 0, the other choices
                      (FFN, copy, const) are renormalised to sum 1.
    A sum of 0 is replaced by 1, so nothing divides by zero.
    """
    check_one_of("NullExpertRouter.weight_rule", rule, WEIGHT_RULES)
    if rule == "raw":
        return weights
    if rule == "renorm_true_only":
        ffn = jnp.where(is_ffn, weights, 0.0)
        total = jnp.sum(ffn, axis=-1, keepdims=True)
        return jnp.where(is_ffn, ffn / jnp.where(total > 0, total, 1.0), weights)
    kept = jnp.where(is_zero, 0.0, weights)
    total = jnp.sum(kept, axis=-1, keepdims=True)
    return kept / jnp.where(total > 0, total, 1.0)


@register_router("null_experts")
class NullExpertRouter(BaseRouter):
    """Top-k over E FFN experts plus zero-computation experts (AdaMoE, MoE++).

    Args (gin: `NullExpertRouter.<name>`):
      null_experts: kinds of the m zero-computation experts, in index order
        E, E+1, ...: each one of "zero", "copy", "const" (e.g. AdaMoE
        `('zero',) * 4`, MoE++ `('const', 'copy', 'zero')`).
      weight_rule: "raw", "renorm_true_only" (AdaMoE) or "zero_then_renorm"
        (MoE++); see `null_weights`.
      null_balance_weight: tau, the weight of the null experts' terms in the
        load-balancing loss E' * sum_i eta_i f_i P_i over all E' = E + m
        columns (eta = 1 for FFN experts, tau for null experts; MoE++).
        tau = 1 is AdaMoE's code (a plain LBL over E + m columns, f counting
        null choices too); tau = 0 balances the FFN columns only.
      score: "softmax" (both papers) or "sigmoid".
      init_std, jitter_eps, use_bias: as in `BaseRouter` (the null experts
        get their own `null_kernel [d, m]` and `null_bias [m]`).
    Parameters: `kernel [d, E]` (as every router), `null_kernel [d, m]`, and for
    n_c const experts `const_gate [n_c, d, 2]`, `const_value [n_c, d]`.
    Router state: `selection_bias` `[E]` (zeros are appended for the null
    experts, so loss-free balancing leaves them alone) or `[E + m]`.
    """

    state_keys = (SELECTION_BIAS,)
    # Null choices become sentinels, which the expert-parallel buffers do not expect.
    expert_parallel_ok = False

    def __init__(self, d_model: int, num_experts: int, k: int, *, causal: bool = True,
                 null_experts: Sequence[str] = ("zero",), weight_rule: str = "renorm_true_only",
                 null_balance_weight: float = 1.0, score: str = "softmax",
                 init_std: float = 0.02, jitter_eps: float = 0.0, use_bias: bool = False,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        null_experts = tuple(null_experts)
        if not null_experts:
            raise ValueError("NullExpertRouter.null_experts must name at least one expert "
                             f"(each one of {NULL_KINDS}); use TopKRouter for none")
        for kind in null_experts:
            check_one_of("NullExpertRouter.null_experts entry", kind, NULL_KINDS)
        check_one_of("NullExpertRouter.weight_rule", weight_rule, WEIGHT_RULES)
        check_one_of("NullExpertRouter.score", score, routing.SCORE_FUNCTIONS)
        if not null_balance_weight >= 0:
            raise ValueError(f"NullExpertRouter.null_balance_weight must be >= 0, "
                             f"got {null_balance_weight}")
        super().__init__(d_model, num_experts, k, causal=causal, init_std=init_std,
                         jitter_eps=jitter_eps, use_bias=use_bias, param_dtype=param_dtype,
                         rngs=rngs)
        self.null_experts, self.weight_rule = null_experts, weight_rule
        self.null_balance_weight, self.score = float(null_balance_weight), score
        m = len(null_experts)
        self.null_kernel = make_param(rngs, normal_init(init_std), (d_model, m), (EMBED, None),
                                      param_dtype)
        self.null_bias = (make_param(rngs, normal_init(0.0), (m,), (None,), param_dtype)
                          if use_bias else None)
        num_const = null_experts.count("const")
        self.const_gate = (make_param(rngs, normal_init(init_std), (num_const, d_model, 2),
                                      (None, EMBED, None), param_dtype) if num_const else None)
        self.const_value = (make_param(rngs, normal_init(1.0), (num_const, d_model),
                                       (None, EMBED), param_dtype) if num_const else None)

    def check_capacity_factor(self, capacity_factor: float | None) -> None:
        # Dropless: the rows are the FFN choices, known only after routing (the FLOP
        # counter reads `kept_counts`); with a capacity the E x C buffers are fixed.
        self.variable_assignments = capacity_factor is None

    @property
    def num_total(self) -> int:
        return self.num_experts + len(self.null_experts)

    def all_logits(self, x: Array, *, deterministic: bool = True,
                   rng: Array | None = None) -> Array:
        """x `[T, d]` -> logits `[T, E + m] float32` (FFN columns first)."""
        ffn = self.logits(x, deterministic=deterministic, rng=rng)
        x = x.astype(jnp.float32)
        if self.jitter_eps > 0 and not deterministic:  # the same draw as `logits`
            x = x * jax.random.uniform(rng, x.shape, jnp.float32,
                                       1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        null = x @ self.null_kernel[...].astype(jnp.float32)
        if self.null_bias is not None:
            null = null + self.null_bias[...].astype(jnp.float32)
        return jnp.concatenate([ffn, null], axis=-1)

    def null_outputs(self, x: Array) -> Array:
        """Outputs of the copy and const experts (zeros for zero experts).
        x `[T, d]` -> `[T, m, d] float32`."""
        x = x.astype(jnp.float32)
        outputs, const = [], 0
        for kind in self.null_experts:
            if kind == "zero":
                outputs.append(jnp.zeros_like(x))
            elif kind == "copy":
                outputs.append(x)
            else:
                gate = self.const_gate[const].astype(jnp.float32)
                a = jax.nn.softmax(x @ gate, axis=-1)  # [T, 2]
                value = self.const_value[const].astype(jnp.float32)
                outputs.append(a[:, :1] * x + a[:, 1:] * value[None, :])
                const += 1
        return jnp.stack(outputs, axis=1)

    def _selection_bias(self, state: Mapping[str, Array]) -> Array | None:
        bias = state.get(SELECTION_BIAS)
        if bias is None or bias.shape == (self.num_total,):
            return bias
        if bias.shape != (self.num_experts,):
            raise ValueError(f"NullExpertRouter: selection_bias must be [E]=({self.num_experts},)"
                             f" or [E + m]=({self.num_total},), got {bias.shape}")
        return jnp.concatenate([bias, jnp.zeros((self.num_total - self.num_experts,),
                                                bias.dtype)])

    def __call__(self, x: Array, *, mask: Array, capacity: int | None, deterministic: bool,
                 rng: Array | None, state: Mapping[str, Array]) -> Routing:
        jitter_rng, _ = split_rng(rng)
        logits = self.all_logits(x, deterministic=deterministic, rng=jitter_rng)
        gating = routing.top_k_gating(logits, self.k, score=self.score,
                                      selection_bias=self._selection_bias(state))
        index, num_ffn = gating.expert_index, self.num_experts
        is_ffn = index < num_ffn
        kinds = jnp.array([NULL_KINDS.index(kind) for kind in self.null_experts], jnp.int32)
        null_slot = jnp.clip(index - num_ffn, 0, len(self.null_experts) - 1)
        is_zero = ~is_ffn & (kinds[null_slot] == NULL_KINDS.index("zero"))
        weights = null_weights(gating.weights, is_ffn, is_zero, self.weight_rule) * mask[:, None]
        # Copy / const choices: sum_j w_j * E_j(x), computed here, never dispatched.
        null_w = jnp.where(is_ffn, 0.0, weights)  # [T, k]
        null_w_per_expert = jnp.einsum("tk,tkm->tm", null_w,
                                       jax.nn.one_hot(null_slot, len(self.null_experts)))
        local = (None if set(self.null_experts) == {"zero"} else
                 jnp.einsum("tm,tmd->td", null_w_per_expert, self.null_outputs(x)))
        return Routing(aux=self._aux(logits, gating, mask, is_ffn),
                       expert_index=jnp.where(is_ffn, index, num_ffn).astype(jnp.int32),
                       weights=jnp.where(is_ffn, weights, 0.0), local_output=local)

    def _aux(self, logits: Array, gating: routing.TokenChoice, mask: Array,
             is_ffn: Array) -> MoeAux:
        """LBL over all E + m columns with the null columns weighted by tau, z-loss,
        P_i [E + m], entropy, the null fraction, and the per-token routing (indices
        over E + m, probabilities tau-weighted) for the step's balance scopes."""
        eta = jnp.concatenate([jnp.ones((self.num_experts,), jnp.float32),
                               jnp.full((self.num_total - self.num_experts,),
                                        self.null_balance_weight, jnp.float32)])
        probs = balance_probs(gating.probs, self.score) * eta
        counts = balance.expert_counts(gating.expert_index, self.num_total, mask=mask)
        choices = jnp.maximum(jnp.sum(mask) * self.k, 1.0)
        return MoeAux(
            lbl=balance.load_balancing_loss(probs, counts, mask=mask),
            **router_losses(logits, gating.probs, mask),
            null_fraction=jnp.sum(jnp.where(is_ffn, 0.0, 1.0) * mask[:, None]) / choices,
            token_probs=probs,
            token_experts=gating.expert_index,
            token_mask=mask,
        )
