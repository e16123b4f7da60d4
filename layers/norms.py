"""Normalisation layers."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from layers.params import NORM, constant_param, make_param


def _ones_init(key: jax.Array, shape, dtype) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


# Every argument is set by the parent module (sizes, dtypes, rngs), so none is bindable.
@gin.configurable(denylist=["dim", "eps", "dtype", "param_dtype", "rngs"])
class RMSNorm(nnx.Module):
    """x `[..., dim]` -> `[..., dim]` in `dtype`: x / rms(x) * scale, computed in float32.

    `rngs=None` creates the scale (ones) without drawing a PRNG key; the block
    norms pass their parent's rngs (one key each, unused) to keep the init order
    of existing checkpoints.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = eps
        self.dtype = dtype
        self.scale = (constant_param(1.0, (dim,), (NORM,), param_dtype) if rngs is None
                      else make_param(rngs, _ones_init, (dim,), (NORM,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)
