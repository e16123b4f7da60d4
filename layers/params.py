"""Parameter creation with logical axis names.

Every parameter carries `logical_axes` metadata (e.g. `("expert", "embed",
"mlp")`). The sharding rules (gin) map these names to mesh axes; nothing in
`layers/` knows about meshes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names used by the layers.
EMBED, MLP, EXPERT, HEADS, KV, VOCAB, NORM = "embed", "mlp", "expert", "heads", "kv", "vocab", "norm"
# The leading axis of scanned layers' stacked parameters (`layers.scan`).
LAYERS = "layers"


def fan_in_init(fan_in_axes: Sequence[int], scale: float = 1.0):
    """Truncated normal with variance scale / fan_in, fan_in taken over `fan_in_axes`."""

    def init(key: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
        fan_in = 1
        for axis in fan_in_axes:
            fan_in *= shape[axis]
        # 0.8796 = std of a standard normal truncated to [-2, 2].
        std = (scale / max(fan_in, 1)) ** 0.5 / 0.87962566103423978
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


def normal_init(std: float):
    def init(key: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
        return std * jax.random.normal(key, shape, dtype)

    return init


def make_param(rngs: nnx.Rngs, init, shape: Sequence[int], logical_axes: Sequence[str],
               dtype=jnp.float32) -> nnx.Param:
    if len(shape) != len(logical_axes):
        raise ValueError(f"logical_axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(logical_axes))


def constant_param(value: float, shape: Sequence[int], logical_axes: Sequence[str],
                   dtype=jnp.float32) -> nnx.Param:
    """A parameter filled with `value` (biases at 0, norm scales at 1); draws no PRNG key,
    so adding one leaves the keys (hence the init) of every other parameter unchanged."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"logical_axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    return nnx.Param(jnp.full(tuple(shape), value, dtype), logical_axes=tuple(logical_axes))


def logical_axes_of(module: nnx.Module) -> dict:
    """`{path: logical_axes}` for every parameter of `module`."""
    state = nnx.state(module, nnx.Param)
    return {path: var.get_metadata().get("logical_axes")
            for path, var in nnx.to_flat_state(state)}
