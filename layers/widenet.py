"""WideNet ("Go Wider Instead of Deeper", Xue et al. 2022): one attention and one FFN
shared across depth, each layer with its own norms (docs/conditional_compute.md).

`widenet_lm` builds the ordinary `TransformerLM` (every `TransformerLM.*` and
`MoeLayer.*` binding applies) and then makes its layers share modules:

  * every layer uses layer 0's attention;
  * every MoE layer uses the first MoE layer's FFN (experts, shared experts and,
    with `share_router`, the router); every dense layer the first dense layer's;
  * each layer keeps its own `attention_norm` and `ffn_norm`, so the shared
    router sees differently normalised inputs at each depth.

NNX stores a shared module once: the parameter tree, the checkpoints and the
optimizer hold one copy, and gradients from every depth add up in it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gin
from flax import nnx

from layers.transformer import TransformerLM


@gin.configurable(denylist=["vocab_size", "rngs"])
def widenet_lm(vocab_size: int, *, rngs: nnx.Rngs, share: bool = True,
               share_router: bool = True,
               base: Callable[..., Any] = TransformerLM) -> TransformerLM:
    """`train.model_cls = @widenet_lm`: `base(vocab_size=, rngs=)` with its modules
    shared across depth (`share_across_depth`).

    Args (gin: `widenet_lm.<name>`):
      share: False builds the unshared model unchanged (the comparison baseline).
      share_router: MoE layers share the router too (WideNet); False gives each
        MoE layer its own router over the shared experts.
      base: the model factory (default `TransformerLM`, with its gin bindings).
    """
    model = base(vocab_size=vocab_size, rngs=rngs)
    if share:
        share_across_depth(model, share_router=share_router)
    return model


def share_across_depth(model: TransformerLM, *, share_router: bool = True) -> None:
    """Makes the layers of `model` (in place) use layer 0's attention and the first
    FFN of their kind (MoE or dense); norms stay per layer."""
    blocks = []
    for name in model.layer_names:
        block = getattr(model, name, None)
        if block is None:
            raise ValueError(f"widenet_lm needs unscanned layers (TransformerLM.scan_layers = "
                             f"False): layer {name!r} is not an attribute of the model")
        blocks.append((name, block))
    first: dict[str, Any] = {}
    for name, block in blocks:
        if "attention" in first:
            block.attention = first["attention"]
        else:
            first["attention"] = block.attention
        kind = "moe" if name in model.moe_layer_names else "dense"
        if kind not in first:
            first[kind] = block.ffn
        elif kind == "moe" and not share_router:
            _share_all_but_router(block.ffn, first[kind])
        else:
            block.ffn = first[kind]


def _share_all_but_router(ffn: nnx.Module, source: nnx.Module) -> None:
    """`ffn` keeps its router and takes every other part of `source` (same class)."""
    if type(ffn) is not type(source) or not hasattr(ffn, "router"):
        raise ValueError(f"widenet_lm.share_router=False needs MoE blocks with a router, got "
                         f"{type(ffn).__name__}")
    for attribute in ("experts", "shared", "shared_gate"):
        if hasattr(source, attribute):
            setattr(ffn, attribute, getattr(source, attribute))
