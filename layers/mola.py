"""MoLA ("Higher Layers Need More LoRA Experts", Gao et al. 2024): routed LoRA experts
on the FFN matrices of a frozen dense model, with a number of experts per layer
(docs/conditional_compute.md, "MoLA").

For a dense FFN with frozen weights W_i `[d, f]` (and W_g for a GLU) and W_o `[f, d]`,
layer l with E_l LoRA experts, rank r and scale s = alpha / r:

  g = top-k router(h)                                   `[T, E_l]`, zero off the top k
  D_M(x) = s * sum_e g_e (x A^M_e) B^M_e                A^M_e `[d_in, r]`, B^M_e `[r, d_out]`
  u = h W_i + D_i(h);   a = act(u)  (GLU: act(h W_g + D_g(h)) * u)
  y = a W_o + D_o(a)

B starts at zero, so at initialisation y equals the base FFN. Only A, B and the router
train: `freeze` turns every other parameter into a `FrozenParam`, a variable that is not
an `nnx.Param`, so `nnx.split(model, nnx.Param, ...)` leaves the base out of the
gradients, the optimizer state and the checkpoints (the trainer keeps it in the
non-parameter state, rebuilt from the base run at every start:
`experiments.train.mola.mola_lm`).

The LoRA matmuls run for every expert on every token (E_l * r columns, small next to
the FFN) and the gates zero the unselected ones: the result is the top-k mixture; the
FLOP counter counts these T x E_l rows (`flop_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from layers.mlp import DenseMLP
from layers.params import EMBED, EXPERT, MLP, make_param, normal_init
from layers.routers import BaseRouter, TopKRouter
from moe import balance, expert_stats
from moe.experts import activation_fn
from moe.layer_aux import MoeAux

Array = jax.Array


class FrozenParam(nnx.Variable):
    """A base-model weight that does not train: not an `nnx.Param`, so it stays out of
    `nnx.state(model, nnx.Param)` (gradients, optimizer, checkpoints, parameter counts)."""


def freeze(module: nnx.Module) -> int:
    """Turns every `nnx.Param` of `module` (in place) into a `FrozenParam` with the same
    value and metadata; returns how many."""
    count = 0
    for _, sub in list(nnx.iter_modules(module)):
        for attribute, value in list(vars(sub).items()):
            if isinstance(value, nnx.Param):
                setattr(sub, attribute, FrozenParam(value[...], **value.get_metadata()))
                count += 1
    return count


class LoraExperts(nnx.Module):
    """The LoRA experts of one FFN: per matrix M of `shapes` (`{M: (d_in, d_out)}`),
    `M_a [E, d_in, r]` (normal, std d_in^-1/2) and `M_b [E, r, d_out]` (zeros)."""

    def __init__(self, num_experts: int, rank: int, shapes: Mapping[str, tuple[int, int]], *,
                 param_dtype, rngs: nnx.Rngs):
        self.num_experts, self.rank, self.matrices = num_experts, rank, tuple(shapes)
        for name, (d_in, d_out) in shapes.items():
            inner, outer = (MLP, EMBED) if name == "down" else (EMBED, MLP)
            setattr(self, f"{name}_a", make_param(rngs, normal_init(d_in ** -0.5),
                                                  (num_experts, d_in, rank),
                                                  (EXPERT, inner, None), param_dtype))
            setattr(self, f"{name}_b", nnx.Param(jnp.zeros((num_experts, rank, d_out),
                                                           param_dtype),
                                                 logical_axes=(EXPERT, None, outer)))

    def delta(self, name: str, x: Array, gates: Array, dtype) -> Array:
        """sum_e gates[t, e] (x_t A_e) B_e: x `[T, d_in]`, gates `[T, E]` -> `[T, d_out]`."""
        a = getattr(self, f"{name}_a")[...].astype(dtype)
        b = getattr(self, f"{name}_b")[...].astype(dtype)
        low = jnp.einsum("td,edr->ter", x.astype(dtype), a) * gates[:, :, None].astype(dtype)
        return jnp.einsum("ter,erf->tf", low, b)


class MolaFFN(nnx.Module):
    """A frozen `DenseMLP` plus routed LoRA experts on its matrices: a MoE block
    (called like `MoeLayer`, returns `(y [B, S, d], MoeAux)`).

    Built by `add_lora_experts`, not by gin. The router is a token-choice router
    (`layers.routers`, default `TopKRouter`) over the layer's E experts; its aux is
    the layer's (load-balancing and z-loss, counts, P_i, entropy), so the trainer's
    balance losses, per-layer expert load and the routing analysis apply unchanged.
    """

    is_moe_block: ClassVar[bool] = True
    dispatch: ClassVar[str] = "lora_dense"
    capacity_factor: ClassVar[None] = None
    eval_capacity_factor: ClassVar[None] = None

    def __init__(self, base: DenseMLP, *, num_experts: int, k: int, rank: int, alpha: float,
                 router: Callable[..., BaseRouter] = TopKRouter, causal: bool = True,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        d_model, d_ff = base.wi[...].shape
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.dtype = base.dtype
        self.base = base
        self.router = router(d_model, num_experts, k, causal=causal, param_dtype=param_dtype,
                             rngs=rngs)
        if not isinstance(self.router, BaseRouter):
            raise ValueError(f"mola_lm.router must build a layers.routers.BaseRouter, got "
                             f"{type(self.router).__name__}")
        shapes = {"up": (d_model, d_ff), **({"gate": (d_model, d_ff)} if base.glu else {}),
                  "down": (d_ff, d_model)}
        self.experts = LoraExperts(num_experts, rank, shapes, param_dtype=param_dtype,
                                   rngs=rngs)

    # -- the MoE-block interface the trainer, sharding and FLOP counter use ---------------
    def capacity(self, num_tokens: int, deterministic: bool) -> None:
        del num_tokens, deterministic
        return None

    def use_expert_parallel(self, options: Any, shards: int) -> bool:
        del options, shards
        return False

    def flop_rows(self, tokens: int, seq_len: int) -> int:
        """Expert rows per micro-batch: every expert's LoRA runs on every token."""
        del seq_len
        return tokens * self.num_experts

    def __call__(self, x: Array, *, mask: Array | None = None, deterministic: bool = True,
                 rng: Array | None = None, router_state: Mapping[str, Array] | None = None,
                 ) -> tuple[Array, MoeAux]:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [batch, seq, d_model={self.d_model}], got {x.shape}")
        batch, seq, _ = x.shape
        tokens = x.reshape(batch * seq, self.d_model)
        token_mask = (jnp.ones((batch * seq,), jnp.float32) if mask is None
                      else mask.reshape(-1).astype(jnp.float32))
        decision = self.router(tokens, mask=token_mask, capacity=None,
                               deterministic=deterministic, rng=rng,
                               state=dict(router_state or {}))
        if decision.expert_choice or decision.local_output is not None:
            raise ValueError(f"mola_lm.router must be a token-choice router over the LoRA "
                             f"experts only, got {type(self.router).__name__} (expert choice, "
                             f"or experts computed by the router)")
        index, weights = decision.expert_index, decision.weights
        # [T, E]: each token's combine weight per expert (the sentinel E adds nothing).
        gates = jnp.einsum("tke,tk->te", jax.nn.one_hot(index, self.num_experts),
                           weights.astype(jnp.float32))
        y = self._ffn(tokens, gates).reshape(batch, seq, self.d_model)
        counts = balance.expert_counts(index, self.num_experts, mask=token_mask)
        picked = (index < self.num_experts) & (token_mask[:, None] > 0)
        aux = decision.aux.replace(
            counts=counts, kept_counts=jax.lax.stop_gradient(counts),
            dropped_fraction=jnp.zeros((), jnp.float32),
            max_violation=balance.max_violation(counts),
            active_experts=jnp.sum(picked) / jnp.maximum(jnp.sum(token_mask), 1.0),
            num_tokens=jnp.sum(token_mask))
        return y.astype(x.dtype), aux

    def routing_stats(self, x: Array, *, mask: Array | None = None,
                      router_state: Mapping[str, Array] | None = None,
                      ) -> expert_stats.RoutingStats:
        """The routing statistics of one call (`experiments.inference.routing_stats`):
        x `[B, S, d]`, deterministic routing. An expert's output on a token is the change
        it alone makes to the FFN's output (its gate set to 1, every other to 0)."""
        tokens = x.reshape(-1, self.d_model)
        token_mask = (jnp.ones((tokens.shape[0],), jnp.float32) if mask is None
                      else mask.reshape(-1).astype(jnp.float32))
        decision = self.router(tokens, mask=token_mask, capacity=None, deterministic=True,
                               rng=None, state=dict(router_state or {}))
        index = decision.expert_index
        plain = self._ffn(tokens, jnp.zeros((tokens.shape[0], self.num_experts), jnp.float32))
        norms = jnp.stack([jnp.linalg.norm(
            (self._ffn(tokens, jax.nn.one_hot(index[:, j], self.num_experts)) - plain)
            .astype(jnp.float32), axis=-1) for j in range(index.shape[1])], axis=1)
        return expert_stats.layer_stats(
            tokens, token_mask, self.router.logits(tokens, deterministic=True),
            decision.aux.token_probs, index, decision.weights, None, norms=norms)

    def _ffn(self, h: Array, gates: Array) -> Array:
        """The base FFN with the gated LoRA deltas: h `[T, d]`, gates `[T, E]` -> `[T, d]`."""
        base, dt, s = self.base, self.dtype, self.scale
        h = h.astype(dt)
        up = h @ base.wi[...].astype(dt) + s * self.experts.delta("up", h, gates, dt)
        act = activation_fn(base.activation)
        if base.glu:
            gate = h @ base.wi_gate[...].astype(dt) + s * self.experts.delta("gate", h, gates, dt)
            hidden = act(gate) * up
        else:
            hidden = act(up)
        return hidden @ base.wo[...].astype(dt) + s * self.experts.delta("down", hidden, gates, dt)


def check_options(experts_per_layer: Sequence[int], num_layers: int, *, k: int, rank: int,
                  alpha: float, where: str = "mola_lm") -> tuple[int, ...]:
    """The per-layer expert counts as a tuple, or ValueError naming the bad option."""
    if isinstance(experts_per_layer, (str, bytes)) or not isinstance(experts_per_layer,
                                                                   (list, tuple)):
        raise ValueError(f"{where}.experts_per_layer must be a list of ints (one per layer, "
                         f"bottom to top, e.g. [2, 4, 6, 8]), got {experts_per_layer!r}")
    counts = tuple(experts_per_layer)
    if len(counts) != num_layers:
        raise ValueError(f"{where}.experts_per_layer has {len(counts)} entries {list(counts)}, "
                         f"but the base model has num_layers={num_layers}: give one count "
                         f"per layer")
    for i, e in enumerate(counts):
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"{where}.experts_per_layer[{i}] must be an int >= 1, got {e!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(counts):
        raise ValueError(f"{where}.k must be an int in [1, min(experts_per_layer)="
                         f"{min(counts)}] (layer {counts.index(min(counts))} has "
                         f"{min(counts)} experts), got {k!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}.rank must be an int >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"{where}.alpha must be a number > 0, got {alpha!r}")
    return counts


def add_lora_experts(model: nnx.Module, experts_per_layer: Sequence[int], *, k: int,
                     rank: int, alpha: float, router: Callable[..., BaseRouter] = TopKRouter,
                     rngs: nnx.Rngs, where: str = "mola_lm") -> None:
    """Replaces (in place) every layer's dense FFN of the `TransformerLM` `model` by a
    `MolaFFN` with `experts_per_layer[i]` experts, and makes every layer a MoE layer
    (`model.moe_layer_names`). Freeze the base first (`freeze`): the new LoRA and
    router parameters are `nnx.Param`s."""
    counts = check_options(experts_per_layer, model.num_layers, k=k, rank=rank, alpha=alpha,
                           where=where)
    if getattr(model, "scanned", None) is not None:
        raise ValueError(f"{where} needs unscanned layers (TransformerLM.scan_layers = False)")
    if getattr(model, "mtp", None) is not None:
        raise ValueError(f"{where} does not take multi-token prediction modules "
                         f"(TransformerLM.mtp = None)")
    for name, e in zip(model.layer_names, counts):
        block = getattr(model, name)
        if not isinstance(block.ffn, DenseMLP):
            raise ValueError(f"{where} adds LoRA experts to a dense model: {name}'s FFN is a "
                             f"{type(block.ffn).__name__} (train the base with moe_every = 0 "
                             f"or dense_baseline = True)")
        param_dtype = block.ffn.wi[...].dtype
        block.ffn = MolaFFN(block.ffn, num_experts=e, k=k, rank=rank, alpha=alpha,
                            router=router, causal=model.causal, param_dtype=param_dtype,
                            rngs=rngs)
    model.moe_layer_names = tuple(model.layer_names)
