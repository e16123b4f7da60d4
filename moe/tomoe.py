"""ToMoE: a dense MLP as a MoE of its own hidden-unit groups, with a learned router (pure JAX).

A dense MLP `act(x W_i) W_o` (GLU: `act(x W_g) * (x W_i) W_o`) with hidden size
f is split into E experts of f/E hidden units each: expert e holds the columns
`groups[e]` of W_i (and W_g) and the rows `groups[e]` of W_o. The groups are a
partition of range(f) (a permutation of the hidden units: nothing is deleted),
so with every expert selected, each with weight 1, the MoE computes exactly
the dense MLP; with k of E selected, the MLP restricted to those groups.

  coactivation_groups   groups of equal size from hidden activations on data:
                        balanced k-means of the units' activation profiles
  check_groups          a partition of range(f) into E equal groups, or an error
  partition_ffn         the dense FFN's weights as stacked experts `[E, ...]`
  magnitude_keep        static structural pruning by weight magnitude (the baseline)
  prune_units           the dense FFN cut to the kept hidden units
  straight_through_mask the differentiable top-k mask: hard top-k forward,
                        sigmoid((z + noise) / tau) backward
  active_penalty        (mean soft-mask fraction - target)^2: drives the number of
                        active hidden units to the target
  router_loss           the layer's objective: relative reconstruction error of the
                        masked MoE against the dense MLP output + penalty

docs/surgery.md ("ToMoE") has the objective and what we chose where the paper
leaves room.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe.experts import ExpertFFN

Array = jax.Array
_IN, _OUT = ("wi", "wi_gate"), "wo"


def check_groups(groups: Sequence[Sequence[int]], d_ff: int, num_experts: int) -> np.ndarray:
    """`[E, f/E] int` groups that partition range(d_ff) into `num_experts` equal groups."""
    if num_experts < 1 or d_ff % num_experts:
        raise ValueError(f"num_experts={num_experts} must divide the dense d_ff={d_ff} "
                         f"(experts are equal groups of hidden units)")
    arr = np.asarray([list(g) for g in groups], np.int64)
    if arr.shape != (num_experts, d_ff // num_experts) or not np.array_equal(
            np.sort(arr.reshape(-1)), np.arange(d_ff)):
        raise ValueError(f"groups must partition the {d_ff} hidden units into {num_experts} "
                         f"groups of {d_ff // num_experts}, got shape {arr.shape}")
    return arr


def coactivation_groups(hidden: np.ndarray, num_experts: int, seed: int = 0,
                        iterations: int = 30) -> np.ndarray:
    """Balanced clustering of hidden units by co-activation.

    hidden `[N, f]`: the hidden activations (after the nonlinearity, GLU product)
    of N tokens. Each unit's profile is its |activation| over the tokens,
    centred and normalised to unit length, so units that fire on the same tokens
    are close. k-means on the profiles (farthest-point initialisation from a
    seeded first unit) with a balanced assignment: units are taken in order of
    their best distance and each joins its nearest cluster that still has room
    (capacity f/E). -> `[E, f/E]` groups (each sorted; groups ordered by first unit).
    """
    h = np.abs(np.asarray(hidden, np.float64))
    f = h.shape[1]
    if num_experts < 1 or f % num_experts:
        raise ValueError(f"num_experts={num_experts} must divide the dense d_ff={f} "
                         f"(experts are equal groups of hidden units)")
    size = f // num_experts
    prof = (h - h.mean(axis=0)).T  # [f, N]
    prof = prof / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centres = [prof[int(rng.integers(f))]]
    while len(centres) < num_experts:
        dist = np.min([np.sum((prof - c) ** 2, axis=1) for c in centres], axis=0)
        centres.append(prof[int(np.argmax(dist))])
    centres = np.stack(centres)
    labels = None
    for _ in range(iterations):
        dist = ((prof[:, None, :] - centres[None]) ** 2).sum(-1)  # [f, E]
        new = _balanced_assign(dist, size)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack([prof[labels == c].mean(axis=0) for c in range(num_experts)])
    groups = [sorted(np.flatnonzero(labels == c).tolist()) for c in range(num_experts)]
    return np.asarray(sorted(groups, key=lambda g: g[0]), np.int64)


def _balanced_assign(dist: np.ndarray, size: int) -> np.ndarray:
    """`[f]` labels: units by ascending distance to their best centre; each takes its
    nearest centre with room (exactly `size` per centre)."""
    f, e = dist.shape
    labels = np.full(f, -1)
    room = np.full(e, size)
    for unit in np.argsort(dist.min(axis=1), kind="stable"):
        for c in np.argsort(dist[unit], kind="stable"):
            if room[c]:
                labels[unit], room[c] = c, room[c] - 1
                break
    return labels


def partition_ffn(ffn: Mapping[str, Any], groups: np.ndarray) -> dict[str, np.ndarray]:
    """Dense FFN weights `{wi [d, f], wi_gate? [d, f], wo [f, d]}` -> experts
    `{wi [E, d, f/E], wi_gate? [E, d, f/E], wo [E, f/E, d]}` (expert e = units groups[e])."""
    out = {}
    for name in _IN:
        if name in ffn:
            w = np.asarray(ffn[name])
            out[name] = np.stack([w[:, g] for g in groups])
    out[_OUT] = np.stack([np.asarray(ffn[_OUT])[g] for g in groups])
    unknown = set(ffn) - set(_IN) - {_OUT}
    if unknown:
        raise ValueError(f"ToMoE does not know the dense FFN parameters {sorted(unknown)}")
    return out


def magnitude_keep(ffn: Mapping[str, Any], keep: int) -> np.ndarray:
    """Static structural pruning, the baseline ToMoE is compared with: the `keep` hidden
    units of largest ‖W_i[:, u]‖·‖W_o[u]‖ (GLU: ‖W_g[:, u]‖·‖W_i[:, u]‖·‖W_o[u]‖), sorted."""
    score = np.linalg.norm(np.asarray(ffn["wi"]), axis=0) * np.linalg.norm(
        np.asarray(ffn[_OUT]), axis=1)
    if "wi_gate" in ffn:
        score = score * np.linalg.norm(np.asarray(ffn["wi_gate"]), axis=0)
    return np.sort(np.argsort(-score, kind="stable")[:keep])


def prune_units(ffn: Mapping[str, Any], units: np.ndarray) -> dict[str, np.ndarray]:
    """Dense FFN weights `{wi [d, f], wi_gate? [d, f], wo [f, d]}` cut to the hidden units
    `units` `[f']` int (e.g. `magnitude_keep`'s): `{wi [d, f'], wi_gate? [d, f'], wo [f', d]}`.
    Keeping every unit in order is the identity."""
    unknown = set(ffn) - set(_IN) - {_OUT}
    if unknown:
        raise ValueError(f"static pruning does not know the dense FFN parameters "
                         f"{sorted(unknown)}")
    units = np.asarray(units)
    return {name: (np.asarray(w)[units] if name == _OUT else np.asarray(w)[:, units])
            for name, w in ffn.items()}


def straight_through_mask(logits: Array, k: int, tau: float, noise: Array | None = None,
                          ) -> tuple[Array, Array]:
    """The differentiable top-k mask over experts.

    logits `[T, E]`; noise `[T, E]` (logistic noise in training, None in evaluation).
    -> (mask `[T, E]`: forward value exactly the top-k indicator of logits + noise,
    gradient that of the soft mask; soft `[T, E]` = sigmoid((logits + noise) / tau)).
    """
    z = logits if noise is None else logits + noise
    soft = jax.nn.sigmoid(z / tau)
    top = jax.lax.top_k(z, k)[1]
    hard = jnp.sum(jax.nn.one_hot(top, logits.shape[-1], dtype=soft.dtype), axis=-2)
    return hard + (soft - jax.lax.stop_gradient(soft)), soft  # forward: exactly hard


def active_penalty(soft: Array, weights: Array, target: float) -> Array:
    """(Σ_t w_t mean_e soft_t,e / Σ_t w_t - target)^2: the soft fraction of active hidden
    units (equal groups) against the target fraction. soft `[T, E]`, weights `[T]`."""
    frac = jnp.sum(weights * jnp.mean(soft, axis=-1)) / jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.square(frac - target)


def masked_output(x: Array, experts: ExpertFFN, mask: Array) -> Array:
    """Σ_e mask_t,e Expert_e(x_t): x `[T, d]`, mask `[T, E]` -> `[T, d]` (every expert computed)."""
    return jnp.einsum("etd,te->td", experts.all_experts(x), mask.astype(x.dtype))


def router_loss(kernel: Array, experts: ExpertFFN, x: Array, target: Array, weights: Array, *,
                k: int, tau: float, penalty: float, active_fraction: float,
                noise: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The ToMoE objective of one layer: relative squared error of the masked MoE
    output against the dense output plus `penalty` x `active_penalty`.

    kernel `[d, E]` router; x `[T, d]` the dense MLP's inputs, target `[T, d]` its
    outputs, weights `[T]` (1 = real token). -> (loss, {"error", "penalty", "soft_fraction"}).
    """
    logits = x.astype(jnp.float32) @ kernel.astype(jnp.float32)
    mask, soft = straight_through_mask(logits, k, tau, noise)
    y = masked_output(x, experts, mask)
    err = jnp.sum(weights[:, None] * jnp.square(y - target)) / jnp.maximum(
        jnp.sum(weights[:, None] * jnp.square(target)), 1e-12)
    pen = active_penalty(soft, weights, active_fraction)
    frac = jnp.sum(weights * jnp.mean(soft, axis=-1)) / jnp.maximum(jnp.sum(weights), 1.0)
    return err + penalty * pen, {"error": err, "penalty": pen, "soft_fraction": frac}
