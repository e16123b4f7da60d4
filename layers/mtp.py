"""Multi-token prediction (DeepSeek-V3, section 2.2): D sequential prediction modules.

Depth k (1-based, k = 1..D) at position i combines the previous depth's hidden
state h^{k-1}_i (h^0 = the main model's last hidden state after its final norm, the
state its output head reads, as in Megatron-Core and vLLM; h^k = depth k's block
output) with the embedding of token t_{i+k}:

    x^k_i = W_k [RMSNorm_e(Emb(t_{i+k})); RMSNorm_h(h^{k-1}_i)]      (W_k: 2d -> d)
    h^k   = Block_k(x^k)                       (one transformer block, causal, same masks)
    p^k_i = softmax(Head(RMSNorm_k(h^k_i)))    predicts t_{i+k+1}

sharing the embedding `Emb` and the output projection `Head` with the main model
(the concatenation order, embedding first, is that of the DeepSeek-V3 checkpoints'
`eh_proj`). The training loss adds

    L_MTP = lambda * (1/D) sum_k CE_k,  CE_k = mean over valid i of -log p^k_i(t_{i+k+1})

(`LossWeights.mtp_weight` = lambda; a step hook may schedule it,
`experiments.train.loss_schedule.LossWeightSchedule`). The targets are the model's
own inputs shifted by k+1: position i of depth k is valid when i+k+1 < S and token
i+k+1 is real and in the same packed segment as token i (so a target never comes
from another document; the last target of each segment, which is not among the
inputs, is not predicted by MTP).

The modules run only in the training forward (`TransformerLM.__call__` with
`deterministic=False`); evaluation, scoring and generation skip them, unless
self-speculative decoding asks for them (`experiments.inference.speculative`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import gin
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from layers.norms import RMSNorm
from layers.params import EMBED, fan_in_init, make_param
from moe.layer_aux import MoeAux, aux_field

MTP_AUX = "mtp"  # key of the MTP aux in the model's aux dict


@dataclasses.dataclass(frozen=True)
class MtpAux(MoeAux):
    """The MTP modules' output of one call: a model-level aux (not a MoE layer's).

    mtp_loss: (1/D) sum_k CE_k, weighted by `LossWeights.mtp_weight` (lambda).
    loss_depth: `[D]` CE_k per depth (logged as `mtp/loss_depth_k`, k 1-based).
    """

    model_level: ClassVar[bool] = True

    # aux_field returns a dataclasses.field (its default is None), as in MoeAux.
    mtp_loss: jax.Array | None = aux_field(  # noqa: RUF009
        "mean", "loss", weight="mtp_weight", doc="mean over depths of the MTP cross-entropies")
    loss_depth: jax.Array | None = aux_field(  # noqa: RUF009
        "mean", doc="[D] MTP cross-entropy per depth")


jax.tree_util.register_dataclass(
    MtpAux, data_fields=[f.name for f in dataclasses.fields(MtpAux)], meta_fields=[])


def shift_left(x: jax.Array, k: int, fill: int | bool = 0) -> jax.Array:
    """`[B, S]` -> `[B, S]`: out[:, i] = x[:, i + k], `fill` where i + k >= S."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], min(k, x.shape[1])), fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def mtp_targets(inputs: jax.Array, segment_ids: jax.Array | None, k: int,
                ) -> tuple[jax.Array, jax.Array]:
    """Targets of depth k: (`[B, S] int32` t_{i+k+1}, `[B, S] bool` valid).

    valid[b, i]: i + k + 1 < S, and tokens i and i + k + 1 are real and in one
    segment (packed segments are contiguous runs of one id, so equal ids at both
    ends mean one document)."""
    targets = shift_left(inputs, k + 1)
    in_range = shift_left(jnp.ones(inputs.shape, bool), k + 1, False)
    if segment_ids is None:
        return targets, in_range
    same = (shift_left(segment_ids, k + 1, -1) == segment_ids) & (segment_ids > 0)
    return targets, in_range & same


class MtpDepth(nnx.Module):
    """One prediction module: norms, the 2d -> d projection, a block, its output norm."""

    def __init__(self, block: nnx.Module, d_model: int, *, norm_eps: float, dtype,
                 param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=None)
        self.enorm, self.hnorm, self.norm = (RMSNorm(d_model, **norm) for _ in range(3))
        self.eh_proj = make_param(rngs, fan_in_init([0]), (2 * d_model, d_model),
                                  (None, EMBED), param_dtype)
        self.block = block
        self.dtype = dtype

    def combine(self, h: jax.Array, emb: jax.Array) -> jax.Array:
        """h, emb `[B, S, d]` -> the block's input `[B, S, d]`."""
        x = jnp.concatenate([self.enorm(emb), self.hnorm(h)], axis=-1).astype(self.dtype)
        return x @ self.eh_proj[...].astype(self.dtype)


@gin.configurable(denylist=["d_model", "make_block", "norm_eps", "dtype", "param_dtype",
                            "rngs"])
class MultiTokenPrediction(nnx.Module):
    """D sequential MTP modules (module doc). Built by `TransformerLM` (`TransformerLM.mtp =
    @MultiTokenPrediction`), which passes `make_block(moe) -> TransformerBlock`.

    Args:
      depth: D, the number of modules (DeepSeek-V3: 1); 0 builds none.
      moe: the modules' blocks have a MoE FFN (the model's `moe_block`) instead of a
        dense one (`dense_block` with `TransformerLM.d_ff`). A MoE block's aux joins
        the model's as layer `mtp_{k}`.
    """

    def __init__(self, d_model: int, *, make_block: Callable[[bool], nnx.Module],
                 depth: int = 1, moe: bool = False, norm_eps: float = 1e-6,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"MultiTokenPrediction.depth must be an int >= 0 (the number of "
                             f"prediction modules; 0 = none), got {depth!r}")
        if not isinstance(moe, bool):
            raise ValueError(f"MultiTokenPrediction.moe must be True or False, got {moe!r}")
        self.depth, self.moe = depth, moe
        for k in range(1, depth + 1):
            setattr(self, f"depth_{k}", MtpDepth(make_block(moe), d_model, norm_eps=norm_eps,
                                                 dtype=dtype, param_dtype=param_dtype,
                                                 rngs=rngs))

    def module(self, k: int) -> MtpDepth:
        return getattr(self, f"depth_{k}")

    def layer_name(self, k: int) -> str:
        """Name of depth k's MoE FFN among the model's aux (`moe=True`)."""
        return f"mtp_{k}"

    def __call__(self, h: jax.Array, inputs: jax.Array, *, embed: Callable, head: Callable,
                 segment_ids: jax.Array | None, block_kwargs: dict,
                 rng: jax.Array | None = None) -> tuple[MtpAux, dict[str, MoeAux]]:
        """h `[B, S, d]` main hidden state (final-normed), inputs `[B, S] int32` -> (MtpAux, `{mtp_k:
        MoeAux}` of MoE blocks). `embed(tokens) -> [B, S, d]`; `head(x) -> [B, S, V]`
        float32 logits of normed x; block_kwargs: the main blocks' call arguments
        (positions, mask, token_mask, deterministic)."""
        losses, layer_aux = [], {}
        for k in range(1, self.depth + 1):
            mod = self.module(k)
            x = mod.combine(h, embed(shift_left(inputs, k)))
            block_rng = None if rng is None else jax.random.fold_in(rng, 10_000 + k)
            h, aux = mod.block(x, rng=block_rng, **block_kwargs)
            if aux is not None:
                layer_aux[self.layer_name(k)] = aux
            targets, valid = mtp_targets(inputs, segment_ids, k)
            ce = optax.softmax_cross_entropy_with_integer_labels(head(mod.norm(h)), targets)
            valid = valid.astype(jnp.float32)
            losses.append(jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0))
        if not losses:
            return MtpAux(mtp_loss=jnp.zeros((), jnp.float32),
                          loss_depth=jnp.zeros((0,), jnp.float32)), layer_aux
        per_depth = jnp.stack(losses)
        return MtpAux(mtp_loss=jnp.mean(per_depth), loss_depth=per_depth), layer_aux

    def flops_per_position(self, seq_len: int, head_flops: float) -> float:
        """Forward FLOPs per position the FLOP counter cannot see in the parameters: each
        depth's attention scores and values, and its use of the shared output head."""
        flops = 0.0
        for k in range(1, self.depth + 1):
            attention = self.module(k).block.attention
            if hasattr(attention, "attention_flops"):
                flops += attention.attention_flops(seq_len)
            else:
                flops += 4.0 * seq_len * attention.num_heads * attention.head_dim
            flops += head_flops
        return flops
