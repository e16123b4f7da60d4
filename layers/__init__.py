"""Flax NNX modules built on the pure functions of `moe/`."""

from layers.experts import Experts
from layers.mlp import DenseMLP
from layers.moe_layer import MoeLayer
from layers.params import logical_axes_of
from layers.router import Router
from layers.transformer import TransformerLM, mask_tokens

__all__ = ["DenseMLP", "Experts", "MoeLayer", "Router", "logical_axes_of"]
__all__ += ["TransformerLM", "mask_tokens"]
