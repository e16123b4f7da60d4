"""Flax NNX modules built on the pure functions of `moe/`."""

from layers.experts import Experts
from layers.mla import MLAttention
from layers.mlp import DenseMLP
from layers.moe_layer import MoeLayer, active_ffn
from layers.mtp import MultiTokenPrediction
from layers.params import logical_axes_of
from layers.routers import (
    BaseRouter,
    DenseToSparseRouter,
    ExpertChoiceRouter,
    HashRouter,
    NullExpertRouter,
    Routing,
    TopKRouter,
    register_router,
)
from layers.soft_moe import SoftMoeLayer
from layers.transformer import TransformerLM, mask_tokens
from layers.widenet import widenet_lm

__all__ = ["BaseRouter", "DenseMLP", "DenseToSparseRouter", "ExpertChoiceRouter", "Experts",
           "HashRouter", "MLAttention", "MoeLayer", "MultiTokenPrediction", "NullExpertRouter",
           "Routing",
           "SoftMoeLayer", "TopKRouter", "TransformerLM", "active_ffn", "logical_axes_of",
           "mask_tokens", "register_router", "widenet_lm"]
