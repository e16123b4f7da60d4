"""Pure-JAX mixture-of-experts core: routing, balancing, dispatch, kernels.

No Flax state lives here; `layers/` builds the NNX modules on top.
"""

from moe import balance, dispatch, experts, routing

__all__ = ["balance", "dispatch", "experts", "routing"]
