"""The jit-compiled training step (NNX functional style).

The model lives outside jit as `(graphdef, params, rest)` from `nnx.split`;
`params` is a plain nested dict of arrays (orbax- and optax-friendly) and the
step rebuilds the module with `nnx.merge` inside the traced function. Nothing
is mutated: every MoE statistic leaves the step as an output.

One step splits the batch `[B, S]` into `num_microbatches` micro-batches of
`B / num_microbatches` rows and scans over them, summing gradients. The loss
of the whole batch is

    CE (sum over real tokens / number of real tokens of the batch)
    + lbl_weight * reduce_layers(LBL over lbl_scope groups)
    + seq_balance_weight * reduce_layers(sequence-wise balance loss)
    + z_loss_weight * reduce_layers(z-loss)

with the z-loss averaged over micro-batches and the balance losses assembled
from per-micro-batch shares over their balance groups (`experiments.
balance_loss`, docs/balancing.md), so the loss and gradient equal those of a
single full-batch pass with the same balance groups.
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

from experiments.train.balance_loss import GLOBAL_MODES, StepBalance, zeros_like_counts
from moe import sharding
from moe.balance_scope import parse_lbl_scope
from moe.dense_to_sparse import DtsState  # SHIM(rewire-b)
from moe.layer_aux import MoeAux, reduce_microbatches
from moe.router_state import DTS_HARD, DTS_TEMPERATURE, SELECTION_BIAS, RouterState
from moe.validation import check_one_of

Batch = Mapping[str, jax.Array]
LAYER_REDUCTIONS = ("sum", "mean")
# Per-layer MoE statistics that add up over micro-batches; the others are averaged.
SUMMED_STATS = ("counts", "kept_counts", "num_tokens")
AVERAGED_STATS = ("lbl", "z_loss", "mean_probs", "dropped_fraction", "max_violation",
                  "router_entropy", "active_experts", "sequence_max_violation")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Auxiliary-loss weights and how they are combined across MoE layers.

    Attributes:
      lbl_weight: alpha, the load-balancing loss weight.
      z_loss_weight: c_z, the router z-loss weight.
      layer_reduction: 'sum' or 'mean' of the per-layer losses.
      lbl_scope: balance groups of the LBL (`moe.balance_scope`): 'sequence',
        'sequences:N', 'micro_batch' (one device's rows of one micro-batch),
        'global_batch' or 'shuffled:N'.
      lbl_global_mode: for scopes whose groups span micro-batches: 'exact'
        (an extra forward pass collects the step's counts first) or 'causal'
        (Megatron's running buffer over the micro-batches seen so far).
      seq_balance_weight: alpha of the DeepSeek-V3 sequence-wise balance loss
        (LBL per row on normalised scores; 1e-4 in DeepSeek-V3), on top of the LBL.
    """

    lbl_weight: float = 0.01
    z_loss_weight: float = 1e-3
    layer_reduction: str = "sum"
    lbl_scope: str = "micro_batch"
    lbl_global_mode: str = "exact"
    seq_balance_weight: float = 0.0

    def __post_init__(self):
        check_one_of("LossWeights.layer_reduction", self.layer_reduction, LAYER_REDUCTIONS)
        if self.lbl_weight < 0 or self.z_loss_weight < 0 or self.seq_balance_weight < 0:
            raise ValueError(f"LossWeights weights must be >= 0, got lbl_weight="
                             f"{self.lbl_weight}, z_loss_weight={self.z_loss_weight}, "
                             f"seq_balance_weight={self.seq_balance_weight}")
        try:
            parse_lbl_scope(self.lbl_scope)
        except ValueError as e:
            raise ValueError(f"LossWeights.{e}") from None
        check_one_of("LossWeights.lbl_global_mode", self.lbl_global_mode, GLOBAL_MODES)


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


def moe_stats(aux: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, MoeAux]:
    """The per-layer statistics the step reports (stop-gradient, float32)."""
    # SHIM(rewire-b): today's layers return dicts; rewire-a's return MoeAux.
    return {layer: MoeAux(**{k: v for k, v in layer_aux.items()
                             if k in MoeAux.stat_names()}).stats()
            for layer, layer_aux in aux.items()}


def combine_microbatch_stats(stats: dict[str, MoeAux]) -> dict[str, MoeAux]:
    """Reduces stats stacked over micro-batches `[A, ...]` (`MoeAux` declarations)."""
    return {layer: reduce_microbatches(layer_stats) for layer, layer_stats in stats.items()}


def _model_kwargs(router_state: RouterState | None) -> dict[str, Any]:
    """SHIM(rewire-b): `RouterState` -> today's model call arguments."""
    if router_state is None:
        return {}
    kwargs: dict[str, Any] = {}
    biases = {layer: values[SELECTION_BIAS] for layer, values in router_state.layers.items()
              if SELECTION_BIAS in values}
    if biases:
        kwargs["selection_biases"] = biases
    if DTS_TEMPERATURE in router_state.shared:
        kwargs["dts_state"] = DtsState(temperature=router_state.shared[DTS_TEMPERATURE],
                                       hard=router_state.shared[DTS_HARD])
    return kwargs


def split_microbatches(batch: Batch, num_microbatches: int) -> dict[str, jax.Array]:
    """`[B, ...]` -> `[A, B / A, ...]` for every entry. Under a mesh, every
    micro-batch is spread over all batch shards (`moe.sharding.constrain`)."""
    out = {}
    for name, value in batch.items():
        if value.shape[0] % num_microbatches:
            raise ValueError(f"batch size {value.shape[0]} (batch[{name!r}]) is not divisible by "
                             f"num_microbatches={num_microbatches}")
        value = value.reshape(num_microbatches, value.shape[0] // num_microbatches,
                              *value.shape[1:])
        out[name] = sharding.constrain(value, (None, sharding.BATCH) + (None,) * (value.ndim - 2))
    return out


def make_train_step(graphdef: nnx.GraphDef, rest: Any, tx: optax.GradientTransformation, *,
                    loss_weights: LossWeights, num_microbatches: int, num_domains: int,
                    data_parallel_size: int = 1,
                    ) -> Callable[..., tuple[Any, Any, dict[str, Any]]]:
    """Builds `step(params, opt_state, batch, rng, model_kwargs=None) -> (params,
    opt_state, metrics)`, jitted.

    `batch` holds `inputs, targets, weights, segment_ids, positions, domain`
    `[B, S]`; `rng` is this step's key (the caller folds the step in).
    `model_kwargs`: optional pytree of per-step model call arguments (arrays,
    traced: e.g. `dts_state`, the EvoMoE gate temperature), the same for every
    micro-batch (e.g. `{"selection_biases": {layer: [E]}}` for loss-free balancing).
    `data_parallel_size`: devices the batch dimension is sharded over (defines
    the `micro_batch` balance scope).
    `metrics`: loss, ce, lbl (the scoped LBL), seq_balance, z_loss, grad_norm,
    num_tokens, domain_ce_sum `[D]`, domain_tokens `[D]`, and `moe`: `{layer:
    stats}` with counts, kept_counts and num_tokens summed over micro-batches,
    `batch_max_violation` (MaxVio of the step's counts) and the other
    statistics (see `AVERAGED_STATS`) averaged.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    step_balance = StepBalance(loss_weights.lbl_scope, loss_weights.lbl_global_mode,
                               num_microbatches, data_parallel_size)

    def forward(params, mb, rng, model_kwargs):
        model = nnx.merge(graphdef, params, rest)
        return model(mb["inputs"], segment_ids=mb["segment_ids"], positions=mb["positions"],
                     deterministic=False, rng=rng, **(model_kwargs or {}))

    def microbatch_counts(params, mb, rng, model_kwargs, num_groups):
        """Forward only: `{layer: [G, E]}` balance-group counts of one micro-batch."""
        _, aux = forward(params, mb, rng, model_kwargs)
        return StepBalance.layer_counts(aux, mb["lbl_group"], num_groups)

    def microbatch_loss(params, mb, rng, total_tokens, model_kwargs, groups, prior, add_own):
        logits, aux = forward(params, mb, rng, model_kwargs)
        ce = token_cross_entropy(logits, mb["targets"])
        ce_sum = jnp.sum(ce * mb["weights"])
        terms, own_counts = step_balance.terms(aux, mb["lbl_group"], mb["row_group"], groups,
                                               prior, add_own)
        lbl = reduce_layers(terms, "lbl", loss_weights.layer_reduction)
        seq_balance = reduce_layers(terms, "seq_balance", loss_weights.layer_reduction)
        z_loss = reduce_layers(aux, "z_loss", loss_weights.layer_reduction)
        loss = (ce_sum / total_tokens + loss_weights.lbl_weight * lbl
                + loss_weights.seq_balance_weight * seq_balance
                + loss_weights.z_loss_weight * z_loss / num_microbatches)
        domain_ce, domain_tokens = domain_sums(ce, mb["weights"], mb["domain"], num_domains)
        for layer, layer_terms in terms.items():
            if "sequence_max_violation" in layer_terms:
                aux[layer] = dict(aux[layer],
                                  sequence_max_violation=layer_terms["sequence_max_violation"])
        # lbl and seq_balance are shares; x num_microbatches so their mean is the step's loss.
        out = {"ce_sum": ce_sum, "lbl": lbl * num_microbatches,
               "seq_balance": seq_balance * num_microbatches, "z_loss": z_loss,
               "domain_ce_sum": domain_ce, "domain_tokens": domain_tokens,
               "moe": moe_stats(aux), "own_counts": own_counts}
        return loss, jax.lax.stop_gradient(out)

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def step(params, opt_state, batch, rng, router_state=None):
        model_kwargs = _model_kwargs(router_state)  # SHIM(rewire-b)
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        total_tokens = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        # Shuffled balance groups: a fresh draw per step, reproducible from the step key.
        groups = step_balance.groups(batch["segment_ids"],
                                     jax.random.fold_in(rng, num_microbatches))
        microbatches = split_microbatches(
            dict(batch, lbl_group=groups.lbl_group, row_group=groups.row_group), num_microbatches)
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num_microbatches))

        prior, add_own = None, True
        if groups.count_source != "local":
            count_shapes = jax.eval_shape(
                lambda p, mb, key, kw: microbatch_counts(p, mb, key, kw, groups.num_groups),
                params, jax.tree.map(lambda x: x[0], microbatches), keys[0], model_kwargs)
            prior = zeros_like_counts(count_shapes)
        if groups.count_source == "exact":
            # First pass: the counts of the whole step, then the gradient pass uses them.
            def count_body(total, xs):
                key, mb = xs
                counts = microbatch_counts(params, mb, key, model_kwargs, groups.num_groups)
                return jax.tree.map(jnp.add, total, counts), None

            prior, _ = jax.lax.scan(count_body, prior, (keys, microbatches))
            add_own = False

        def body(carry, xs):
            grad_acc, running = carry
            key, mb = xs
            (loss, out), grads = grad_fn(params, mb, key, total_tokens, model_kwargs, groups,
                                         running, add_own)
            grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
            own_counts = out.pop("own_counts")
            if groups.count_source == "causal":  # Megatron's running buffer
                running = jax.tree.map(jnp.add, running, own_counts)
            return (grad_acc, running), (loss, out)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, _), (losses, outs) = jax.lax.scan(body, (zeros, prior), (keys, microbatches))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": jnp.sum(losses),
            "ce": jnp.sum(outs["ce_sum"]) / total_tokens,
            "lbl": jnp.mean(outs["lbl"]),
            "seq_balance": jnp.mean(outs["seq_balance"]),
            "z_loss": jnp.mean(outs["z_loss"]),
            "grad_norm": optax.global_norm(grads),
            "num_tokens": jnp.sum(batch["weights"]),
            "domain_ce_sum": jnp.sum(outs["domain_ce_sum"], axis=0),
            "domain_tokens": jnp.sum(outs["domain_tokens"], axis=0),
            "moe": combine_microbatch_stats(outs["moe"]),
        }
        return params, opt_state, metrics

    return jax.jit(step)
