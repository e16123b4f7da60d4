"""Stacked expert weights as an NNX module."""

from __future__ import annotations

import gin
import jax.numpy as jnp
from flax import nnx

from layers.params import EMBED, EXPERT, MLP, fan_in_init, make_param
from moe.experts import ExpertFFN, is_glu


# Every argument is set by the parent module (sizes, dtypes, rngs), so none is bindable.
@gin.configurable(denylist=["num_experts", "d_model", "d_ff", "activation", "param_dtype", "rngs"])
class Experts(nnx.Module):
    """E expert FFNs with weights `[E, d_model, d_ff]` and `[E, d_ff, d_model]`."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, activation: str = "relu",
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_experts < 1 or d_model < 1 or d_ff < 1:
            raise ValueError(f"num_experts, d_model and d_ff must be >= 1, "
                             f"got {num_experts}, {d_model}, {d_ff}")
        self.activation = activation
        glu = is_glu(activation)  # validates the name
        in_axes, out_axes = (EXPERT, EMBED, MLP), (EXPERT, MLP, EMBED)
        shape_in, shape_out = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
        self.wi = make_param(rngs, fan_in_init([1]), shape_in, in_axes, param_dtype)
        self.wi_gate = (make_param(rngs, fan_in_init([1]), shape_in, in_axes, param_dtype)
                        if glu else None)
        self.wo = make_param(rngs, fan_in_init([1]), shape_out, out_axes, param_dtype)

    def ffn(self, dtype) -> ExpertFFN:
        """The pure-function view used by the dispatchers, cast to the compute dtype."""
        return ExpertFFN(
            wi=self.wi[...].astype(dtype),
            wo=self.wo[...].astype(dtype),
            wi_gate=None if self.wi_gate is None else self.wi_gate[...].astype(dtype),
            activation=self.activation,
        )
