"""Training FLOPs actually spent per step, for comparisons at equal compute.

Counts matmul FLOPs (2 per multiply-add) of one forward pass and multiplies by
3 for training (the backward pass costs about twice the forward):

  * every token position (padding included: it is computed) pays the
    non-expert matmuls: 2 x (size of every parameter of rank >= 2 other than
    the routed experts and the embedding table; the table counts only when
    tied to the output projection) plus attention scores and values,
    4 x S x heads x head_dim per layer;
  * routed experts pay per row they actually process: 2 x (expert weights)
    per row. Capacity dispatch processes E x C rows whatever the routing;
    dropless top-k T x k rows (T x E for the einsum reference; T counts padding,
    which `MoeLayer` now sends to the sentinel group, so with padding this
    over-counts by k rows per padding position); the
    expert-parallel dispatch (`Sharding.configure_dispatch`) every (shard,
    expert) buffer in full, or T x k rows in its ragged modes; the EvoMoE
    dense-to-sparse gate one row per active (token, expert) pair, read from
    the step's `kept_counts`; so do dropless layers with zero-computation
    experts (`NullExpertRouter`: only the FFN choices are rows), whose
    capacity mode still computes E x C rows and whose einsum reference T x E.
    Copy and constant experts (O(d) per token) are not counted. Parameters
    shared across layers (WideNet) count once per layer that uses them. Soft MoE
    (`SoftMoeLayer`) processes n x p slot rows per sequence and adds its
    dispatch and combine matmuls, 4 x n x p x d per position. Tile padding inside the grouped matmul is
    ignored.
  * multi-token prediction modules (`layers.mtp`, run in training only) count like
    layers: their parameters (projection, block) per position, their attention, and
    one more use of the output head (2 x d_model x vocab) per module and position; a
    MoE block of theirs counts its experts per row like the model's MoE layers
    (`mtp_{k}` in the step's statistics).

Realised FLOPs (`FlopCounter.realised`): a layer whose block lists `skip_modules`
(`layers.skip.SkipBlock`) reports per step the real tokens that skipped each module
(`MoeAux.<module>_skipped`); each skipped token saves that module's forward FLOPs per
position: the attention's 2 x (its parameters) + 4 x S x heads x head_dim; a dense
FFN's 2 x (its parameters); a MoE block's 2 x (its non-expert parameters) plus its
`flops_per_position`, plus per_row x (the layer's rows per real token this step).
The skip routers themselves (2 d per token) are not counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from moe.dispatch import expert_parallel as ep_lib

TRAIN_FACTOR = 3.0


@dataclasses.dataclass(frozen=True)
class FlopCounter:
    """Per-step training FLOPs of one model structure.

    dense_per_position: forward FLOPs per token position outside the routed experts.
    expert_per_row: `{moe layer: forward FLOPs of one expert on one row}`.
    static_rows: `{moe layer: rows per micro-batch}`, None where the row count
      depends on the routing (taken from the step's `kept_counts`).
    """

    dense_per_position: float
    expert_per_row: dict[str, float]
    static_rows: dict[str, int | None]
    skippable: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def step_flops(self, moe_stats: Mapping[str, Any], *, positions: int,
                   num_microbatches: int) -> float:
        """Training FLOPs of a step over `positions` token positions (B x S)."""
        total = positions * self.dense_per_position
        for layer, per_row in self.expert_per_row.items():
            rows = self.static_rows[layer]
            if rows is None:
                num_rows = float(np.sum(moe_stats[layer].kept_counts))
            else:
                num_rows = float(rows * num_microbatches)
            total += num_rows * per_row
        return TRAIN_FACTOR * total

    def _rows(self, layer: str, stats: Any, num_microbatches: int) -> float:
        rows = self.static_rows[layer]
        return (float(np.sum(stats.kept_counts)) if rows is None
                else float(rows * num_microbatches))

    def realised(self, moe_stats: Mapping[str, Any], *, positions: int,
                 num_microbatches: int) -> dict[str, float]:
        """`{}` without skippable layers; else `realised_flops`, the step's training
        FLOPs less what the skipped tokens did not need (x 3, like `step_flops`), and
        `realised_compute/<layer>`, the fraction of each skippable layer's FLOPs spent."""
        if not self.skippable:
            return {}
        out, saved_total = {}, 0.0
        for layer, modules in self.skippable.items():
            stats = moe_stats.get(layer)
            full, saved = positions * sum(modules.values()), 0.0
            expert = 0.0  # expert FLOPs per real token of a MoE layer this step
            if layer in self.expert_per_row and stats is not None:
                rows = self._rows(layer, stats, num_microbatches)
                full += rows * self.expert_per_row[layer]
                expert = rows * self.expert_per_row[layer] / max(float(stats.num_tokens), 1.0)
            for module, per_position in modules.items():
                skipped = None if stats is None else getattr(stats, f"{module}_skipped", None)
                if skipped is not None:
                    saved += float(skipped) * (per_position + (expert if module == "ffn" else 0))
            out[f"realised_compute/{layer}"] = 1.0 - saved / full if full else 1.0
            saved_total += saved
        out["realised_flops"] = (self.step_flops(moe_stats, positions=positions,
                                                 num_microbatches=num_microbatches)
                                 - TRAIN_FACTOR * saved_total)
        return out


def _moe_rows(moe: Any, tokens: int, seq_len: int) -> int | None:
    """Expert rows per micro-batch of the dispatch the layer runs (None: from kept_counts).
    A MoE block that is not a `MoeLayer` may say itself (`flop_rows(tokens, seq_len)`,
    e.g. `layers.soft_moe.SoftMoeLayer`)."""
    if hasattr(moe, "flop_rows"):
        return moe.flop_rows(tokens, seq_len)
    if moe.router.variable_assignments:  # dropless, a varying number of rows per token
        # (the einsum reference still runs every expert on every token)
        return tokens * moe.num_experts if moe.dispatch == "einsum" else None
    capacity = moe.capacity(tokens, False)
    if moe.dispatch == "expert_parallel":
        return ep_lib.dispatch_rows(tokens, moe.k, moe.num_experts, capacity,
                                    shards=moe.dispatch_shards,
                                    options=moe.expert_parallel or ep_lib.active_options())
    if capacity is not None:  # capacity buffers, and expert choice
        return moe.num_experts * capacity
    if moe.dispatch == "einsum":
        return tokens * moe.num_experts
    return tokens * moe.k


def flop_counter(model: nnx.Module, *, batch_size: int, seq_len: int,
                 num_microbatches: int = 1) -> FlopCounter:
    """The FLOP counter of `model` (a `TransformerLM`) for micro-batches of
    `batch_size / num_microbatches` rows of `seq_len` tokens."""
    tokens = batch_size // num_microbatches * seq_len
    moe_layers = {name: model.moe_layer(name) for name in getattr(model, "moe_layer_names", ())}
    mtp = getattr(model, "mtp", None)
    if mtp is not None and mtp.moe:
        moe_layers.update({mtp.layer_name(k): mtp.module(k).block.ffn
                           for k in range(1, mtp.depth + 1)})
    # Scanned layers' parameters are stacked: one `scanned/unit_{j}` per unit position.
    moe_blocks = {id(moe) for moe in moe_layers.values()}
    dense = 0.0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        if "experts" in names and _under_moe(model, names, moe_blocks):
            continue
        if names[0] == "embedding" and not getattr(model, "tie_embeddings", False):
            continue
        if value.ndim >= 2:
            dense += 2.0 * value.size
    dense += _repeated_use_flops(model, moe_layers)
    for name in getattr(model, "layer_names", ()):
        dense += _attention_flops(model.block(name).attention, seq_len)
    if mtp is not None:
        dense += mtp.flops_per_position(seq_len, 2.0 * model.d_model * model.vocab_size)
    per_row, rows = {}, {}
    for name, moe in moe_layers.items():
        expert_size = sum(v.size for _, v in nnx.to_flat_state(nnx.state(moe.experts, nnx.Param)))
        expert_size //= model.layer_repeats(name) if name in model.layer_names else 1
        per_row[name] = 2.0 * expert_size / moe.num_experts
        rows[name] = _moe_rows(moe, tokens, seq_len)
        dense += getattr(moe, "flops_per_position", lambda: 0.0)()
    return FlopCounter(dense_per_position=dense, expert_per_row=per_row, static_rows=rows,
                       skippable=_skippable(model, seq_len))


def _attention_flops(attention: Any, seq_len: int) -> float:
    """Attention scores and values per position (not the projections)."""
    if hasattr(attention, "attention_flops"):  # its own count (layers.mla.MLAttention)
        return attention.attention_flops(seq_len)
    return 4.0 * seq_len * attention.num_heads * attention.head_dim


def _param_flops(module: nnx.Module, repeats: int, *, skip_experts: bool = False) -> float:
    """2 x the parameters of rank >= 2 of `module` (one layer's share when scanned)."""
    total = sum(v.size for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
                if v.ndim >= 2 and not (skip_experts and "experts" in [str(p) for p in path]))
    return 2.0 * total / repeats


def _skippable(model: nnx.Module, seq_len: int) -> dict[str, dict[str, float]]:
    """`{layer: {module: forward FLOPs per position, experts excepted}}` of the layers
    whose block lists `skip_modules` (`layers.skip.SkipBlock`)."""
    out = {}
    for name in getattr(model, "layer_names", ()):
        block = model.block(name)
        modules = getattr(block, "skip_modules", ())
        if not modules:
            continue
        repeats = model.layer_repeats(name)
        out[name] = {"attention": _param_flops(block.attention, repeats)
                     + _attention_flops(block.attention, seq_len),
                     "ffn": _param_flops(block.ffn, repeats, skip_experts=block.is_moe)
                     + getattr(block.ffn, "flops_per_position", lambda: 0.0)()}
    return out


def _repeated_use_flops(model: nnx.Module, moe_layers: dict[str, Any]) -> float:
    """Forward FLOPs of parameters that several layers share (WideNet,
    `layers.widenet`): the state holds them once, every layer computes with them."""
    seen: set[int] = set()
    extra = 0.0
    for name in getattr(model, "layer_names", ()):
        block = getattr(model, name, None)
        if block is None:
            continue
        for path, value in nnx.iter_graph(block):
            if not isinstance(value, nnx.Param):
                continue
            if name in moe_layers and "experts" in [str(p) for p in path]:
                continue  # counted per row processed
            if id(value) in seen and value.ndim >= 2:
                extra += 2.0 * value.size
            seen.add(id(value))
    return extra


def _under_moe(model: nnx.Module, names: list[str], moe_blocks: set[int]) -> bool:
    """Whether the parameter at path `names` belongs to one of the MoE FFNs (by id)."""
    module = model
    for name in names[:names.index("experts")]:
        module = getattr(module, name, None)
        if module is None:
            return False
    return id(module) in moe_blocks
