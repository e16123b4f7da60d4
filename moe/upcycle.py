"""Upcycling transforms: spawn E experts from one dense FFN (pure functions).

A dense FFN is a mapping from weight names to arrays, e.g. `{"wi": [d, f],
"wi_gate": [d, f] (GLU only), "wo": [f, d]}` plus optional biases. The
functions here return the same names stacked over experts (`[E, ...]`). Used by
checkpoint upcycling (`experiments.convert.upcycle_checkpoint`, docs/upcycling.md) and by
EvoMoE's expert-diversify step (docs/evomoe.md, "Expert diversification").

Weight roles. Transforms that act on the hidden units (Drop-Upcycling, virtual
groups) need to know where the hidden axis of each weight is; `FFN_ROLES` maps
the names used in this codebase and common aliases to a role:

  "in"        hidden units on the last axis: `wi`/`w_in`, `wi_gate`/`w_gate`
              `[d, f]`, and their biases `bi`/`b_in`, `bi_gate`/`b_gate` `[f]`;
  "out"       hidden units on the first axis: `wo`/`w_out` `[f, d]`;
  "out_bias"  no hidden axis: `bo`/`b_out` `[d]`.

Pass `roles=` to use other names.

Virtual groups (NVIDIA, He et al. 2024; docs/upcycling.md): with granularity G the
dense hidden units are split into G contiguous shards, expert e = r*G + g gets
shard g (r in [0, R), R = E / G full copies), the router's R rows are each
repeated G times, and weights are scaled so that a selected group of G shards
adds up to the dense FFN. See `activation_scale` and `weight_scales`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from moe.experts import ACTIVATIONS, check_activation, is_glu
from moe.validation import check_one_of

Array = jax.Array

ROLES = ("in", "out", "out_bias")
FFN_ROLES: dict[str, str] = {
    "wi": "in", "w_in": "in", "wi_gate": "in", "w_gate": "in",
    "bi": "in", "b_in": "in", "bi_gate": "in", "b_gate": "in",
    "wo": "out", "w_out": "out",
    "bo": "out_bias", "b_out": "out_bias",
}


# ---------------------------------------------------------------------------
# Weight roles and hidden axes.


def _roles_for(dense: Mapping[str, Array], roles: Mapping[str, str] | None) -> dict[str, str]:
    table = dict(FFN_ROLES)
    table.update(roles or {})
    out = {}
    for name in dense:
        if name not in table:
            raise ValueError(
                f"unknown FFN weight name {name!r}: known names are {sorted(table)}; pass "
                f"roles={{{name!r}: one of {ROLES}}} to name its role")
        check_one_of(f"role of {name!r}", table[name], ROLES)
        out[name] = table[name]
    return out


def _hidden_axis(role: str, ndim: int) -> int | None:
    if role == "in":
        return ndim - 1
    if role == "out":
        return 0
    return None


def hidden_size(dense: Mapping[str, Array], roles: Mapping[str, str] | None = None) -> int:
    """The dense hidden size f, checked to agree across the weights."""
    table = _roles_for(dense, roles)
    sizes = {name: dense[name].shape[_hidden_axis(role, dense[name].ndim)]
             for name, role in table.items() if role != "out_bias"}
    if not sizes:
        raise ValueError(f"no weight with a hidden axis among {sorted(dense)}")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the weights disagree on the hidden size: {sizes}")
    return next(iter(sizes.values()))


# ---------------------------------------------------------------------------
# Expert diversification (spawn E experts from one dense FFN).


def _check_common(dense: Mapping[str, Array], num_experts: int, ratio: float,
                  noise_std: float) -> None:
    if not dense:
        raise ValueError("dense must hold at least one weight")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")


def _need_rng(strategy: str, rng: Array | None) -> Array:
    if rng is None:
        raise ValueError(f"strategy {strategy!r} is random and needs an rng key")
    return rng


def _stack(array: Array, num_experts: int) -> Array:
    return jnp.broadcast_to(array[None], (num_experts,) + array.shape)


def _spawn_copy(dense, num_experts, *, rng, ratio, noise_std, roles):
    del rng, ratio, noise_std, roles
    return {name: _stack(w, num_experts) for name, w in dense.items()}


def _spawn_noise(dense, num_experts, *, rng, ratio, noise_std, roles):
    del ratio, roles
    rng = _need_rng("noise", rng)
    out = {}
    for i, (name, w) in enumerate(sorted(dense.items())):
        # Relative noise: std = noise_std * std(w), so one setting suits every matrix.
        scale = noise_std * jnp.std(w.astype(jnp.float32))
        noise = jax.random.normal(jax.random.fold_in(rng, i), (num_experts,) + w.shape,
                                  jnp.float32)
        out[name] = (w.astype(jnp.float32)[None] + scale * noise).astype(w.dtype)
    return out


def _spawn_mask(dense, num_experts, *, rng, ratio, noise_std, roles):
    del noise_std, roles
    rng = _need_rng("mask", rng)
    if ratio <= 0:
        raise ValueError("strategy 'mask' needs a keep ratio in (0, 1], got 0 (all weights zero)")
    out = {}
    for i, (name, w) in enumerate(sorted(dense.items())):
        keep = jax.random.bernoulli(jax.random.fold_in(rng, i), ratio, (num_experts,) + w.shape)
        out[name] = jnp.where(keep, w[None], jnp.zeros((), w.dtype))
    return out


def _spawn_drop_upcycling(dense, num_experts, *, rng, ratio, noise_std, roles):
    del noise_std
    rng = _need_rng("drop_upcycling", rng)
    table = _roles_for(dense, roles)
    f = hidden_size(dense, roles)
    num_drop = round(ratio * f)
    # Per expert, the same random set of hidden units is re-initialised in every
    # weight (fc1/gate columns, fc2 rows, fc1 biases).
    perm_keys = jax.random.split(jax.random.fold_in(rng, 0), num_experts)
    order = jax.vmap(lambda key: jax.random.permutation(key, f))(perm_keys)  # [E, f]
    dropped = jnp.zeros((num_experts, f), bool).at[
        jnp.arange(num_experts)[:, None], order[:, :num_drop]].set(True)
    out = {}
    for i, (name, w) in enumerate(sorted(dense.items())):
        role = table[name]
        stacked = _stack(w, num_experts)
        if role == "out_bias" or num_drop == 0:
            out[name] = stacked
            continue
        w32 = w.astype(jnp.float32)
        mean, std = jnp.mean(w32), jnp.std(w32)
        fresh = (mean + std * jax.random.normal(jax.random.fold_in(rng, i + 1),
                                                stacked.shape, jnp.float32)).astype(w.dtype)
        axis = _hidden_axis(role, w.ndim) + 1  # +1: the expert axis in front
        shape = [num_experts] + [1] * w.ndim
        shape[axis] = f
        out[name] = jnp.where(dropped.reshape(shape), fresh, stacked)
    return out


SpawnFn = Callable[..., dict[str, Array]]
DIVERSIFY_STRATEGIES: dict[str, SpawnFn] = {
    "copy": _spawn_copy,
    "noise": _spawn_noise,
    "mask": _spawn_mask,
    "drop_upcycling": _spawn_drop_upcycling,
}


def spawn_experts(dense: Mapping[str, Array], num_experts: int, *, strategy: str = "copy",
                  rng: Array | None = None, ratio: float = 0.5, noise_std: float = 0.01,
                  roles: Mapping[str, str] | None = None) -> dict[str, Array]:
    """E experts from one dense FFN.

    Args:
      dense: `{name: array}` dense FFN weights (any names for copy/noise/mask;
        names with a known role, see `FFN_ROLES`, for drop_upcycling).
      num_experts: E.
      strategy: one of `DIVERSIFY_STRATEGIES`:
        "copy": every expert is an exact copy (Komatsuzaki et al.).
        "noise": copy + independent Gaussian noise per expert and entry, with
          *relative* std `noise_std * std(w)` (std over the whole dense
          array; a constant array, e.g. a zero bias, gets no noise).
        "mask": W_e = W ⊙ M_e with M_e an independent Bernoulli mask per
          expert that *keeps* each entry with probability `ratio` (fraction of
          zeros ≈ 1 - ratio; EvoMoE's "mask ratio" r, the zeroed
          fraction, is ratio = 1 - r: docs/evomoe.md). No rescaling.
        "drop_upcycling": copy, then per expert re-initialise round(ratio * f)
          randomly chosen hidden units (the same units in fc1/gate columns,
          fc1 biases and fc2 rows) from N(mean(W), std(W)²) of each dense
          matrix (Drop-Upcycling, Nakamura et al. 2025; ratio 0.5 worked best
          there: docs/upcycling.md).
          The output bias is copied.
      rng: PRNG key (required by every strategy but "copy").
      ratio: keep probability ("mask") or re-initialised fraction
        ("drop_upcycling"), in [0, 1]; unused otherwise.
      noise_std: relative noise std ("noise"); unused otherwise.
      roles: extra `{name: role}` entries for `FFN_ROLES`.

    Returns:
      `{name: [E, *dense[name].shape]}` in each weight's dtype.
    """
    check_one_of("strategy", strategy, DIVERSIFY_STRATEGIES)
    _check_common(dense, num_experts, ratio, noise_std)
    dense = {name: jnp.asarray(w) for name, w in dense.items()}
    return _spawn_jit(dense, rng, strategy=strategy, num_experts=num_experts, ratio=float(ratio),
                      noise_std=float(noise_std),
                      roles=None if roles is None else tuple(sorted(roles.items())))


# One compiled program per configuration: eagerly, each small op compiles on
# its own, which costs seconds on CPU.
@functools.partial(jax.jit, static_argnames=("strategy", "num_experts", "ratio", "noise_std",
                                             "roles"))
def _spawn_jit(dense, rng, *, strategy, num_experts, ratio, noise_std, roles):
    return DIVERSIFY_STRATEGIES[strategy](dense, num_experts, rng=rng, ratio=ratio,
                                          noise_std=noise_std,
                                          roles=None if roles is None else dict(roles))


# ---------------------------------------------------------------------------
# Virtual groups and weight scaling (He et al. 2024; docs/upcycling.md, "Virtual groups").

WEIGHT_SCALINGS = ("balanced", "output", "none")
# Activations h with h(c x) = c^p h(x) for c > 0: exact under "balanced" scaling.
_HOMOGENEOUS_DEGREE = {"relu": 1, "squared_relu": 2, "reglu": 2}


def check_virtual_groups(num_experts: int, k: int, granularity: int, d_ff: int) -> None:
    """Raises ValueError unless E, k and the dense hidden size f split into G groups."""
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity G must be an int >= 1, got {granularity!r}")
    if num_experts < 1 or not 1 <= k <= num_experts:
        raise ValueError(f"need 1 <= k <= num_experts, got k={k}, num_experts={num_experts}")
    if num_experts % granularity:
        raise ValueError(f"num_experts={num_experts} must be a multiple of granularity "
                         f"G={granularity} (E = R * G full copies of G shards)")
    if d_ff % granularity:
        raise ValueError(f"the dense hidden size {d_ff} must be a multiple of granularity "
                         f"G={granularity}")
    if granularity > 1 and k % granularity:
        raise ValueError(f"k={k} must be a multiple of granularity G={granularity} with virtual "
                         f"groups, so that top-k selects whole groups")


def activation_scale(num_experts: int, k: int, granularity: int, *, normalize: bool,
                     score: str = "softmax", route_scale: float = 1.0) -> float:
    """The factor a by which a selected group's output must be multiplied.

    With virtual-group routing (k a multiple of G; a group's G experts share
    their logits) the MoE output is c * sum_shards FFN_shard(x) = c * FFN(x)
    per group; a = 1 / c:
      * normalised top-k (weights sum to route_scale): c = route_scale / G per
        group share, a = G / route_scale (exact for any router);
      * unnormalised softmax at a uniform (zero) router: every weight is
        route_scale / E and k / G groups are picked: a = E G / (k route_scale);
      * unnormalised sigmoid at a zero router: every weight is route_scale / 2:
        a = 2 G / (k route_scale).
    The unnormalised values make the model exact only at a zero router.
    """
    if route_scale <= 0:
        raise ValueError(f"route_scale must be > 0, got {route_scale}")
    if normalize:
        return granularity / route_scale
    if score == "softmax":
        return num_experts * granularity / (k * route_scale)
    if score == "sigmoid":
        return 2.0 * granularity / (k * route_scale)
    raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")


def weight_scales(a: float, activation: str, mode: str = "balanced") -> tuple[float, float]:
    """(s_in, s_out): multipliers of the input-side weights (fc1, gate, fc1
    biases) and of fc2 that make an expert's output a times larger.

      "balanced" (Megatron; docs/upcycling.md): s_in = s_out = a^(1/2) for plain
        activations, a^(1/3) for GLU and squared ReLU. Exact only when the
        activation is positively homogeneous (relu, squared_relu, reglu);
        for gelu/silu/swiglu/geglu the output is only approximately a times.
      "output": s_in = 1, s_out = a: exact for every elementwise activation.
      "none": (1, 1).
    """
    check_activation(activation)
    check_one_of("weight scaling", mode, WEIGHT_SCALINGS)
    if not a > 0:
        raise ValueError(f"activation scale a must be > 0, got {a}")
    if mode == "none":
        return 1.0, 1.0
    if mode == "output":
        return 1.0, float(a)
    root = 3.0 if (is_glu(activation) or activation == "squared_relu") else 2.0
    s = float(a) ** (1.0 / root)
    return s, s


def scaling_is_exact(activation: str, mode: str) -> bool:
    """Whether `weight_scales(a, activation, mode)` scales the output by exactly a."""
    check_activation(activation)
    if mode == "balanced":
        return activation in _HOMOGENEOUS_DEGREE
    return True


def split_hidden(dense: Mapping[str, Array], granularity: int,
                 roles: Mapping[str, str] | None = None) -> dict[str, Array]:
    """G contiguous shards of the hidden units: `{name: [G, *shard shape]}`.

    Input-side weights `[..., f]` -> `[G, ..., f/G]`; fc2 `[f, d]` -> `[G, f/G,
    d]`; the output bias is replicated `[G, d]`.
    """
    table = _roles_for(dense, roles)
    f = hidden_size(dense, roles)
    if not isinstance(granularity, int) or granularity < 1 or f % granularity:
        raise ValueError(f"granularity G must be an int >= 1 dividing the hidden size {f}, "
                         f"got {granularity!r}")
    out = {}
    for name, w in dense.items():
        w = jnp.asarray(w)
        role = table[name]
        if role == "out_bias":
            out[name] = _stack(w, granularity)
        elif role == "in":
            shards = w.reshape(w.shape[:-1] + (granularity, f // granularity))
            out[name] = jnp.moveaxis(shards, -2, 0)
        else:
            out[name] = w.reshape((granularity, f // granularity) + w.shape[1:])
    return out


def upcycle_ffn(dense: Mapping[str, Array], num_experts: int, *, granularity: int = 1,
                scale_in: float = 1.0, scale_out: float = 1.0, out_bias_scale: float = 1.0,
                strategy: str = "copy", rng: Array | None = None, ratio: float = 0.5,
                noise_std: float = 0.01,
                roles: Mapping[str, str] | None = None) -> dict[str, Array]:
    """Experts for one MoE layer, with virtual groups and scaling.

    The hidden units are split into G shards (`split_hidden`); each shard is
    spawned R = E / G times with `spawn_experts(strategy, ...)` (independent
    randomness per shard); expert e = r * G + g holds copy r of shard g. Then
    input-side weights are multiplied by `scale_in`, fc2 by `scale_out` and the
    output bias by `out_bias_scale` (use a / G, see `upcycle_scales`).

    Returns `{name: [E, *shard shape]}`.
    """
    if not isinstance(granularity, int) or granularity < 1 or num_experts % granularity:
        raise ValueError(f"num_experts={num_experts} must be a multiple of granularity "
                         f"G={granularity!r}")
    table = _roles_for(dense, roles)
    copies = num_experts // granularity
    shards = split_hidden(dense, granularity, roles)
    per_shard = []
    for g in range(granularity):
        shard = {name: w[g] for name, w in shards.items()}
        shard_rng = None if rng is None else jax.random.fold_in(rng, g)
        per_shard.append(spawn_experts(shard, copies, strategy=strategy, rng=shard_rng,
                                       ratio=ratio, noise_std=noise_std, roles=roles))
    factor = {"in": scale_in, "out": scale_out, "out_bias": out_bias_scale}
    out = {}
    for name in dense:
        stacked = jnp.stack([s[name] for s in per_shard], axis=1)  # [R, G, ...]
        stacked = stacked.reshape((num_experts,) + stacked.shape[2:])
        scale = factor[table[name]]
        out[name] = stacked if scale == 1.0 else (stacked * scale).astype(stacked.dtype)
    return out


def upcycle_scales(num_experts: int, k: int, granularity: int, activation: str, *,
                   normalize: bool, score: str = "softmax", route_scale: float = 1.0,
                   mode: str = "balanced") -> dict[str, float]:
    """`{"scale_in", "scale_out", "out_bias_scale"}` for `upcycle_ffn`, and `a`.

    The output bias must add up to the dense bias once over the selected
    experts' weights, hence a / G (1 for G = 1 with normalised top-k).
    """
    a = activation_scale(num_experts, k, granularity, normalize=normalize, score=score,
                         route_scale=route_scale)
    s_in, s_out = weight_scales(a, activation, mode)
    bias = 1.0 if mode == "none" else a / granularity
    return {"a": a, "scale_in": s_in, "scale_out": s_out, "out_bias_scale": bias}


def merge_virtual_group(experts: Mapping[str, Array], group: int, granularity: int, *,
                        scale_in: float = 1.0, scale_out: float = 1.0,
                        out_bias_scale: float = 1.0,
                        roles: Mapping[str, str] | None = None) -> dict[str, Array]:
    """Inverse of `upcycle_ffn` for one copy r = `group`: concatenates experts
    r*G .. r*G+G-1 along the hidden axis and undoes the scales. Returns the
    dense `{name: array}` (exactly the original for strategy "copy")."""
    table = _roles_for(experts, roles)
    first = group * granularity
    num_experts = next(iter(experts.values())).shape[0]
    if not 0 <= group < num_experts // granularity:
        raise ValueError(f"group must be in [0, {num_experts // granularity}), got {group}")
    factor = {"in": scale_in, "out": scale_out, "out_bias": out_bias_scale}
    out = {}
    for name, w in experts.items():
        members = w[first:first + granularity] / factor[table[name]]
        role = table[name]
        if role == "out_bias":
            out[name] = members[0]
        else:
            out[name] = jnp.concatenate(list(members), axis=_hidden_axis(role, w.ndim - 1))
    return out


# ---------------------------------------------------------------------------
# Router initialisation.


def _router_normal(rng, d_model, num_experts, *, std, granularity):
    del granularity
    return std * jax.random.normal(_need_rng("normal", rng), (d_model, num_experts), jnp.float32)


def _router_zero(rng, d_model, num_experts, *, std, granularity):
    del rng, std, granularity
    return jnp.zeros((d_model, num_experts), jnp.float32)


def _router_virtual_group(rng, d_model, num_experts, *, std, granularity):
    if num_experts % granularity:
        raise ValueError(f"num_experts={num_experts} must be a multiple of granularity "
                         f"G={granularity}")
    rows = std * jax.random.normal(_need_rng("virtual_group", rng),
                                   (d_model, num_experts // granularity), jnp.float32)
    return virtual_group_router(rows, granularity)


ROUTER_INITS: dict[str, Callable[..., Array]] = {
    "normal": _router_normal,
    "zero": _router_zero,
    "virtual_group": _router_virtual_group,
}


def virtual_group_router(kernel: Array, granularity: int) -> Array:
    """Repeats each of the R router columns G times consecutively.

    kernel `[d, R]` -> `[d, R * G]`: experts r*G .. r*G+G-1 (one full copy of
    the dense FFN) get identical logits.
    """
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity G must be an int >= 1, got {granularity!r}")
    return jnp.repeat(kernel, granularity, axis=-1)


def init_router(rng: Array | None, d_model: int, num_experts: int, *, method: str = "normal",
                std: float = 0.02, granularity: int = 1) -> Array:
    """A new router kernel `[d_model, E] float32`.

    method: "normal" (N(0, std²), flaxformer's default std 0.02), "zero"
    (uniform routing; with identical experts every token ties and takes experts
    0..k-1, so use it only for exactness checks), or "virtual_group" (R = E/G
    normal columns, each repeated G times).
    """
    check_one_of("router init", method, ROUTER_INITS)
    if std < 0:
        raise ValueError(f"router init std must be >= 0, got {std}")
    return ROUTER_INITS[method](rng, d_model, num_experts, std=std, granularity=granularity)


def exactness_conditions(*, activation: str, granularity: int, k: int, normalize: bool,
                         router_init: str, weight_scaling: str, routing_type: str = "token_choice",
                         dropless: bool = True, num_shared_experts: int = 0,
                         route_scale: float = 1.0, diversify: str = "copy") -> list[str]:
    """The reasons an upcycled MoE layer is *not* function-preserving at init
    (empty list = exact in exact arithmetic): the conditions of docs/upcycling.md,
    "When the upcycled model is exact"."""
    check_activation(activation)
    violated = []
    if diversify != "copy":
        violated.append(f"diversify={diversify!r}: the experts are no longer copies of the "
                        "dense FFN")
    if routing_type != "token_choice":
        violated.append(f"routing_type={routing_type!r}: expert choice gives each token 0..E "
                        "experts with raw softmax weights")
    if not dropless:
        violated.append("capacity dropping (capacity_factor is set): dropped tokens lose their "
                        "FFN output")
    if num_shared_experts:
        violated.append("shared experts are added on top of the routed ones")
    if granularity > 1 and router_init != "virtual_group" and router_init != "zero":
        violated.append(f"router_init={router_init!r} with G={granularity}: a group's shards get "
                        "different logits, so top-k does not pick whole groups")
    if granularity > 1 and k % granularity:
        violated.append(f"k={k} is not a multiple of G={granularity}")
    if not normalize and router_init != "zero":
        violated.append("softmax-then-top-k (normalize=False) with a non-zero router: the "
                        "weights sum to less than 1 and vary per token")
    scale_needed = granularity > 1 or not normalize or route_scale != 1.0
    if scale_needed and weight_scaling == "none":
        violated.append("weight_scaling='none' but the selected weights do not sum to 1 per "
                        "copy of the dense FFN")
    elif scale_needed and not scaling_is_exact(activation, weight_scaling):
        violated.append(f"activation {activation!r} is not positively homogeneous, so "
                        f"weight_scaling={weight_scaling!r} (scaling fc1 too) is approximate")
    return violated


__all__ = [
    "ACTIVATIONS", "DIVERSIFY_STRATEGIES", "FFN_ROLES", "ROUTER_INITS", "WEIGHT_SCALINGS",
    "activation_scale", "check_virtual_groups", "exactness_conditions", "hidden_size",
    "init_router", "merge_virtual_group", "scaling_is_exact", "spawn_experts", "split_hidden",
    "upcycle_ffn", "upcycle_scales", "virtual_group_router", "weight_scales",
]
