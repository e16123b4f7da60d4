"""The jit-compiled training step (NNX functional style).

The model lives outside jit as `(graphdef, params, rest)` from `nnx.split`;
`params` is a plain nested dict of arrays (orbax- and optax-friendly) and the
step rebuilds the module with `nnx.merge` inside the traced function. Nothing
is mutated: every MoE statistic leaves the step as an output.

One step splits the batch `[B, S]` into `num_microbatches` micro-batches of
`B / num_microbatches` rows and scans over them, summing gradients. The loss
of the whole batch is

    CE (sum over real tokens / number of real tokens of the batch)
    + lbl_weight * reduce_layers(LBL) + z_loss_weight * reduce_layers(z-loss)

with the auxiliary losses averaged over micro-batches, so the gradient equals
the one of a single full-batch pass whenever the auxiliary losses are
per-micro-batch quantities (they are: each micro-batch is a routing group).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = Mapping[str, jax.Array]
LAYER_REDUCTIONS = ("sum", "mean")
# Per-layer MoE statistics that add up over micro-batches; the others are averaged.
SUMMED_STATS = ("counts", "kept_counts", "num_tokens")
AVERAGED_STATS = ("lbl", "z_loss", "mean_probs", "dropped_fraction", "max_violation",
                  "router_entropy", "active_experts")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Auxiliary-loss weights and how they are combined across MoE layers.

    Attributes:
      lbl_weight: alpha, the load-balancing loss weight.
      z_loss_weight: c_z, the router z-loss weight.
      layer_reduction: 'sum' or 'mean' of the per-layer losses.
    """

    lbl_weight: float = 0.01
    z_loss_weight: float = 1e-3
    layer_reduction: str = "sum"

    def __post_init__(self):
        if self.layer_reduction not in LAYER_REDUCTIONS:
            raise ValueError(f"LossWeights.layer_reduction must be one of {LAYER_REDUCTIONS}, "
                             f"got {self.layer_reduction!r}")
        if self.lbl_weight < 0 or self.z_loss_weight < 0:
            raise ValueError(f"LossWeights weights must be >= 0, got lbl_weight="
                             f"{self.lbl_weight}, z_loss_weight={self.z_loss_weight}")


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`[B, S]` cross-entropy in nats of float32 `logits [B, S, V]`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def domain_sums(values: jax.Array, weights: jax.Array, domain: jax.Array,
                num_domains: int) -> tuple[jax.Array, jax.Array]:
    """`(sum of weighted values per domain [D], weight per domain [D])`; domain -1 is ignored."""
    onehot = jax.nn.one_hot(domain, num_domains, dtype=jnp.float32)  # -1 -> all zeros
    return (jnp.einsum("bs,bsd->d", values * weights, onehot),
            jnp.einsum("bs,bsd->d", weights, onehot))


def reduce_layers(aux: Mapping[str, Mapping[str, jax.Array]], key: str,
                  reduction: str) -> jax.Array:
    """Sum or mean of `aux[layer][key]` over MoE layers (0 without MoE layers)."""
    values = [layer_aux[key] for layer_aux in aux.values()]
    if not values:
        return jnp.zeros((), jnp.float32)
    total = sum(values)
    return total / len(values) if reduction == "mean" else total


def moe_stats(aux: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, dict[str, jax.Array]]:
    """The per-layer statistics the step reports (stop-gradient, float32)."""
    return {layer: {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32))
                    for k, v in layer_aux.items() if k in SUMMED_STATS + AVERAGED_STATS}
            for layer, layer_aux in aux.items()}


def combine_microbatch_stats(stats: dict[str, dict[str, jax.Array]]) -> dict[str, dict[str, jax.Array]]:
    """Reduces stats stacked over micro-batches `[A, ...]`: counts summed, the rest averaged."""
    return {layer: {k: (jnp.sum(v, axis=0) if k in SUMMED_STATS else jnp.mean(v, axis=0))
                    for k, v in layer_stats.items()}
            for layer, layer_stats in stats.items()}


def split_microbatches(batch: Batch, num_microbatches: int) -> dict[str, jax.Array]:
    """`[B, ...]` -> `[A, B / A, ...]` for every entry."""
    out = {}
    for name, value in batch.items():
        if value.shape[0] % num_microbatches:
            raise ValueError(f"batch size {value.shape[0]} (batch[{name!r}]) is not divisible by "
                             f"num_microbatches={num_microbatches}")
        out[name] = value.reshape(num_microbatches, value.shape[0] // num_microbatches,
                                  *value.shape[1:])
    return out


def make_train_step(graphdef: nnx.GraphDef, rest: Any, tx: optax.GradientTransformation, *,
                    loss_weights: LossWeights, num_microbatches: int, num_domains: int,
                    ) -> Callable[..., tuple[Any, Any, dict[str, Any]]]:
    """Builds `step(params, opt_state, batch, rng) -> (params, opt_state, metrics)`, jitted.

    `batch` holds `inputs, targets, weights, segment_ids, positions, domain`
    `[B, S]`; `rng` is this step's key (the caller folds the step in).
    `metrics`: loss, ce, lbl, z_loss, grad_norm, num_tokens, domain_ce_sum
    `[D]`, domain_tokens `[D]`, and `moe`: `{layer: stats}` with counts,
    kept_counts and num_tokens summed over micro-batches and the other
    statistics (see `AVERAGED_STATS`) averaged.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")

    def microbatch_loss(params, mb, rng, total_tokens):
        model = nnx.merge(graphdef, params, rest)
        logits, aux = model(mb["inputs"], segment_ids=mb["segment_ids"],
                            positions=mb["positions"], deterministic=False, rng=rng)
        ce = token_cross_entropy(logits, mb["targets"])
        ce_sum = jnp.sum(ce * mb["weights"])
        lbl = reduce_layers(aux, "lbl", loss_weights.layer_reduction)
        z_loss = reduce_layers(aux, "z_loss", loss_weights.layer_reduction)
        loss = (ce_sum / total_tokens + (loss_weights.lbl_weight * lbl
                                         + loss_weights.z_loss_weight * z_loss) / num_microbatches)
        domain_ce, domain_tokens = domain_sums(ce, mb["weights"], mb["domain"], num_domains)
        out = {"ce_sum": ce_sum, "lbl": lbl, "z_loss": z_loss, "domain_ce_sum": domain_ce,
                   "domain_tokens": domain_tokens, "moe": moe_stats(aux)}
        return loss, jax.lax.stop_gradient(out)

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def step(params, opt_state, batch, rng):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        total_tokens = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        microbatches = split_microbatches(batch, num_microbatches)

        def body(grad_acc, xs):
            index, mb = xs
            (loss, out), grads = grad_fn(params, mb, jax.random.fold_in(rng, index), total_tokens)
            grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
            return grad_acc, (loss, out)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (losses, outs) = jax.lax.scan(
            body, zeros, (jnp.arange(num_microbatches), microbatches))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": jnp.sum(losses),
            "ce": jnp.sum(outs["ce_sum"]) / total_tokens,
            "lbl": jnp.mean(outs["lbl"]),
            "z_loss": jnp.mean(outs["z_loss"]),
            "grad_norm": optax.global_norm(grads),
            "num_tokens": jnp.sum(batch["weights"]),
            "domain_ce_sum": jnp.sum(outs["domain_ce_sum"], axis=0),
            "domain_tokens": jnp.sum(outs["domain_tokens"], axis=0),
            "moe": combine_microbatch_stats(outs["moe"]),
        }
        return params, opt_state, metrics

    return jax.jit(step)
