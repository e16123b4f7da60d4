"""Dense feed-forward block."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.params import EMBED, MLP, fan_in_init, make_param
from moe.experts import activation_fn, is_glu


# Every argument is set by the parent module (sizes, dtypes, rngs), so none is bindable.
@gin.configurable(denylist=["d_model", "d_ff", "activation", "dtype", "param_dtype", "rngs"])
class DenseMLP(nnx.Module):
    """x `[..., d_model]` -> `[..., d_model]`: act(x W_i) W_o, or act(x W_g) * (x W_i) W_o for GLU."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "relu",
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if d_model < 1 or d_ff < 1:
            raise ValueError(f"d_model and d_ff must be >= 1, got {d_model}, {d_ff}")
        self.activation = activation
        self.glu = is_glu(activation)  # validates the name
        self.dtype = dtype
        self.wi = make_param(rngs, fan_in_init([0]), (d_model, d_ff), (EMBED, MLP), param_dtype)
        self.wi_gate = (make_param(rngs, fan_in_init([0]), (d_model, d_ff), (EMBED, MLP),
                                   param_dtype) if self.glu else None)
        self.wo = make_param(rngs, fan_in_init([0]), (d_ff, d_model), (MLP, EMBED), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # The tokens as one [N, d_model] matrix: on CPU a [B, S, d] x [d, f] product's
        # weight gradient contracts two dimensions, which XLA:CPU lowers with transposed
        # copies of the activations (1.2-1.6x the 2D FFN's forward+backward,
        # docs/cpu_targets.md "Two harnesses"). Same values on every backend.
        lead = x.shape[:-1]
        x = x.astype(self.dtype).reshape(-1, x.shape[-1])
        up = x @ self.wi[...].astype(self.dtype)
        act = activation_fn(self.activation)
        if self.glu:
            hidden = act(x @ self.wi_gate[...].astype(self.dtype)) * up
        else:
            hidden = act(up)
        y = hidden @ self.wo[...].astype(self.dtype)
        return y.reshape(*lead, y.shape[-1])
