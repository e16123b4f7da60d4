"""Hash routing (Roller et al. 2021): each token id goes to fixed experts drawn by a seeded hash."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from layers.routers.base import BaseRouter, Routing, register_router
from moe.layer_aux import MoeAux
from moe.router_state import TOKEN_IDS

Array = jax.Array

_GOLDEN = 0x9E3779B9


def _mix32(x: Array) -> Array:
    """A 32-bit integer finaliser (lowbias32): every input bit flips each output bit with
    probability about 1/2. uint32 in, uint32 out (multiplication wraps mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_scores(token_ids: Array, num_experts: int, seed: int) -> Array:
    """token_ids `[T] int` -> `[T, E] uint32`: h(seed, id, e), a pseudo-random score per
    (token id, expert) pair; a pure function of its arguments (no PRNG state, same on
    every process and backend)."""
    ids = token_ids.astype(jnp.uint32)
    salt = _mix32(jnp.uint32(seed) ^ jnp.uint32(_GOLDEN))
    per_id = _mix32(ids ^ salt)  # [T]
    experts = jnp.arange(num_experts, dtype=jnp.uint32) * jnp.uint32(_GOLDEN)  # [E]
    return _mix32(per_id[:, None] + experts[None, :] + salt)


def hash_experts(token_ids: Array, num_experts: int, k: int, seed: int) -> Array:
    """token_ids `[T] int` -> `[T, k] int32`: the k distinct experts with the smallest
    scores `hash_scores` (a uniformly drawn k-subset per token id, fixed by the seed)."""
    scores = hash_scores(token_ids, num_experts, seed)
    return jnp.argsort(scores, axis=-1, stable=True)[:, :k].astype(jnp.int32)


@register_router("hash")
class HashRouter(BaseRouter):
    """Token id t goes to the k experts `hash_experts(t, E, k, seed)`, weight 1/k each.

    No parameters (no projection kernel), no balance loss (`lbl` is 0: the
    assignment cannot be trained), deterministic in training and evaluation.
    The routing table is a function of (token id, E, k, seed) only; `seed` is a
    gin binding, so the run's config.gin records it and a resumed, restored or
    exported model routes identically (`table(vocab_size)` lists it). Balance is
    the hash's: over V token ids each expert gets about V k / E of them (the
    tokens' frequencies decide the load).

    The router reads the token ids from the router state (`TOKEN_IDS`, which
    `TransformerLM` supplies to routers that declare it); a `MoeLayer` called
    without a state holding `token_ids` is refused.

    Args (gin: `HashRouter.<name>`):
      seed: the hash seed, an int in [0, 2**32).
    k (`MoeLayer.k`): experts per token, 1 <= k <= E (distinct experts).
    """

    state_keys = (TOKEN_IDS,)
    expert_parallel_ok = True

    def __init__(self, d_model: int, num_experts: int, k: int, *, causal: bool = True,
                 seed: int = 0, param_dtype=jnp.float32, rngs: nnx.Rngs):
        del d_model, param_dtype, rngs  # no parameters
        if num_experts < 1:
            raise ValueError(f"MoeLayer.num_experts must be >= 1, got {num_experts}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"MoeLayer.k must be in [1, num_experts={num_experts}] for "
                             f"HashRouter (k distinct hashed experts), got {k!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
            raise ValueError(f"HashRouter.seed must be an int in [0, 2**32), got {seed!r}")
        self.num_experts, self.k, self.causal, self.seed = num_experts, k, causal, seed
        self.init_std, self.jitter_eps = 0.0, 0.0
        self.kernel = self.bias = None

    def logits(self, x: Array, *, deterministic: bool = True, rng: Array | None = None) -> Array:
        raise ValueError("HashRouter has no logits (its routing is a hash of the token id)")

    def table(self, vocab_size: int) -> Array:
        """The routing table `[vocab_size, k] int32`: the experts of every token id."""
        return hash_experts(jnp.arange(vocab_size), self.num_experts, self.k, self.seed)

    def __call__(self, x: Array, *, mask: Array, capacity: int | None, deterministic: bool,
                 rng: Array | None, state: Mapping[str, Array]) -> Routing:
        del capacity, deterministic, rng
        if TOKEN_IDS not in state:
            raise ValueError(f"HashRouter needs the token ids: call the MoeLayer with "
                             f"router_state holding {TOKEN_IDS!r} (TransformerLM supplies it)")
        ids = state[TOKEN_IDS].reshape(-1)
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"router state {TOKEN_IDS!r} holds {ids.shape[0]} token ids for "
                             f"{x.shape[0]} tokens")
        experts = hash_experts(ids, self.num_experts, self.k, self.seed)
        weights = jnp.full(experts.shape, 1.0 / self.k, jnp.float32) * mask[:, None]
        probs = jnp.sum(jax.nn.one_hot(experts, self.num_experts), axis=1) / self.k  # [T, E]
        real = jnp.maximum(jnp.sum(mask), 1.0)
        aux = MoeAux(lbl=jnp.zeros((), jnp.float32),
                     mean_probs=jnp.sum(probs * mask[:, None], axis=0) / real,
                     router_entropy=jnp.full((), jnp.log(float(self.k)), jnp.float32))
        return Routing(aux=aux, expert_index=experts, weights=weights)
