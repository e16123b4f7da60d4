"""The router: a float32 projection from tokens to expert logits."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.params import EMBED, EXPERT, make_param, normal_init


@gin.configurable
class Router(nnx.Module):
    """x `[T, d_model]` -> logits `[T, E] float32`.

    Always computes in float32 ("selective precision"), whatever the dtype of
    the parameters and activations. Optional multiplicative jitter
    u ~ U(1 - eps, 1 + eps) on the router input, in training only.
    """

    def __init__(self, d_model: int, num_experts: int, *, init_std: float = 0.02,
                 jitter_eps: float = 0.0, use_bias: bool = False, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 0.0 <= jitter_eps < 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        self.jitter_eps = jitter_eps
        self.kernel = make_param(rngs, normal_init(init_std), (d_model, num_experts),
                                 (EMBED, EXPERT), param_dtype)
        self.bias = (make_param(rngs, normal_init(0.0), (num_experts,), (EXPERT,), param_dtype)
                     if use_bias else None)

    def __call__(self, x: jax.Array, *, deterministic: bool = True,
                 rng: jax.Array | None = None) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.jitter_eps > 0 and not deterministic:
            if rng is None:
                raise ValueError("router jitter in training needs an rng key")
            x = x * jax.random.uniform(rng, x.shape, jnp.float32,
                                       1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        logits = x @ self.kernel[...].astype(jnp.float32)
        if self.bias is not None:
            logits = logits + self.bias[...].astype(jnp.float32)
        return logits
