"""Flax NNX modules built on the pure functions of `moe/`."""

from layers.experts import Experts
from layers.mlp import DenseMLP
from layers.moe_layer import MoeLayer
from layers.params import logical_axes_of
from layers.router import Router

__all__ = ["DenseMLP", "Experts", "MoeLayer", "Router", "logical_axes_of"]
