"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen (hashable: a static argument of jitted code).

    temperature: 0 = greedy (argmax; top_k and top_p are then irrelevant),
      else logits / temperature are sampled; >= 0 and finite.
    top_k: None, or keep only the k highest logits (k >= 1; ties at the k-th
      value are kept).
    top_p: None, or keep the smallest set of most probable tokens whose
      probability (after temperature and top_k) reaches top_p, in (0, 1]; the
      most probable token is always kept.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                              or not 0 < p <= 1):
            raise ValueError(f"top_p must be None or in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """logits `[B, V] float32` / temperature, with tokens outside top_k / top_p set
    to -inf. Needs temperature > 0."""
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if config.top_p is not None and config.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better tokens
        keep_sorted = before < config.top_p  # the first token always (before = 0)
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample(logits: jax.Array, rng: jax.Array, config: SamplingConfig) -> jax.Array:
    """logits `[B, V] float32` -> next tokens `[B] int32` (greedy ignores `rng`).

    Row b draws with `fold_in(rng, b)`: its token depends on its own logits, the
    key and its row index, not on how many rows the batch has.
    """
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(lambda row: jax.random.fold_in(rng, row))(jnp.arange(logits.shape[0]))
    filtered = filter_logits(logits, config)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
