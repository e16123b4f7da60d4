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
    + dts_weight * reduce_layers(EvoMoE dense-to-sparse loss)

over the MoE layers' `MoeAux` loss fields, with the z-loss and the
dense-to-sparse loss averaged over micro-batches and the balance losses assembled
from per-micro-batch shares over their balance groups (`experiments.
balance_loss`, docs/balancing.md), so the loss and gradient equal those of a
single full-batch pass with the same balance groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.train.balance_loss import GLOBAL_MODES, StepBalance, per_layer, zeros_like_counts
from moe import balance, layer_aux, sharding
from moe.balance_scope import parse_lbl_scope
from moe.layer_aux import MoeAux, StackedLayerAux
from moe.router_state import RouterState
from moe.validation import check_one_of

Batch = Mapping[str, jax.Array]
LAYER_REDUCTIONS = ("sum", "mean")


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
      dts_weight: weight of the EvoMoE dense-to-sparse balance loss
        (`MoeAux.dts_loss`, layers with `DenseToSparseRouter` in training).
      mtp_weight: lambda, the weight of the multi-token prediction loss
        (`layers.mtp.MtpAux.mtp_loss`; models with `TransformerLM.mtp`).
      skip_weight: weight of the Learning to Skip compute-budget loss
        (`MoeAux.skip_loss`, layers built by `layers.skip.SkipBlock`).

    A step hook may schedule an unscoped weight (every one but lbl_weight and
    seq_balance_weight): its per-step value travels in the step's RouterState under
    `scheduled_weight_key(attribute)` and replaces the constant here
    (`experiments.train.loss_schedule.LossWeightSchedule`).
    """

    lbl_weight: float = 0.01
    z_loss_weight: float = 1e-3
    layer_reduction: str = "sum"
    lbl_scope: str = "micro_batch"
    lbl_global_mode: str = "exact"
    seq_balance_weight: float = 0.0
    dts_weight: float = 0.01
    mtp_weight: float = 0.3
    skip_weight: float = 1.0

    def __post_init__(self):
        check_one_of("LossWeights.layer_reduction", self.layer_reduction, LAYER_REDUCTIONS)
        if min(self.lbl_weight, self.z_loss_weight, self.seq_balance_weight,
               self.dts_weight, self.mtp_weight, self.skip_weight) < 0:
            raise ValueError(f"LossWeights weights must be >= 0, got lbl_weight="
                             f"{self.lbl_weight}, z_loss_weight={self.z_loss_weight}, "
                             f"seq_balance_weight={self.seq_balance_weight}, "
                             f"dts_weight={self.dts_weight}, mtp_weight={self.mtp_weight}, "
                             f"skip_weight={self.skip_weight}")
        missing = [MoeAux.loss_weight_name(n) for n in MoeAux.loss_names()
                   if not hasattr(self, MoeAux.loss_weight_name(n))]
        if missing:
            raise TypeError(f"LossWeights has no weight field {missing} for a MoeAux loss")
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


def sum_layers(values: Sequence[jax.Array], reduction: str) -> jax.Array:
    """Sum or mean over layers of per-layer scalars given stacked per aux group
    (`[R]` each; one sum per group; 0 without MoE layers)."""
    if not values:
        return jnp.zeros((), jnp.float32)
    total = sum(jnp.sum(v, axis=0) for v in values)
    count = sum(v.shape[0] for v in values)
    return total / count if reduction == "mean" else total


def unscoped_losses(aux: Mapping[str, MoeAux]) -> dict[str, str]:
    """`{loss field: its LossWeights attribute}` of the losses the layers' aux types
    declare, other than the scoped LBL (a router may return a `MoeAux` subclass
    with losses of its own)."""
    types = {type(a) for _, a in StackedLayerAux.of(aux).groups} or {MoeAux}
    return {name: cls.loss_weight_name(name) for cls in sorted(types, key=str)
            for name in cls.unscoped_loss_names()}


def scheduled_weight_key(attribute: str) -> str:
    """The RouterState shared key of a scheduled `LossWeights` attribute."""
    return f"loss_weight/{attribute}"


def loss_weight(loss_weights: LossWeights, attribute: str, loss_name: str,
                router_state: RouterState | None = None) -> float | jax.Array:
    """The weight of a loss: the step's scheduled value when a hook gives one, else the
    constant `LossWeights` attribute."""
    if not hasattr(loss_weights, attribute):
        raise ValueError(f"the MoE aux loss {loss_name!r} is weighted by LossWeights."
                         f"{attribute}, which {type(loss_weights).__name__} does not have")
    if router_state is not None and scheduled_weight_key(attribute) in router_state.shared:
        return router_state.shared[scheduled_weight_key(attribute)]
    return getattr(loss_weights, attribute)


def moe_stats(aux: Mapping[str, MoeAux]) -> StackedLayerAux:
    """The per-layer statistics the step reports (`MoeAux.stats`: per-token
    fields dropped, stop-gradient, float32), stacked per aux group."""
    return StackedLayerAux.of(aux).map_groups(lambda a: a.stats())


def combine_microbatch_stats(stats: StackedLayerAux) -> StackedLayerAux:
    """Reduces stats stacked over micro-batches `[A, R, ...]` as each field declares
    (`moe.layer_aux.reduce_microbatches`: counts summed, the rest averaged)."""
    return stats.map_groups(layer_aux.reduce_microbatches)


def _with_batch_max_violation(stats: MoeAux) -> MoeAux:
    """`[R, ...]` stats with `batch_max_violation` `[R]`, the MaxVio of each layer's counts."""
    if stats.counts is None:
        return stats
    return stats.replace(batch_max_violation=per_layer(balance.max_violation, stats.counts))


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


def _microbatch_loss_fn(forward: Callable, step_balance: StepBalance, loss_weights: LossWeights,
                        num_microbatches: int, num_domains: int) -> Callable:
    """`loss(params, mb, rng, total_tokens, router_state, groups, prior, add_own) ->
    (loss, outputs)` of one micro-batch: its share of the step's loss."""
    reduction = loss_weights.layer_reduction

    def microbatch_loss(params, mb, rng, total_tokens, router_state, groups, prior, add_own):
        logits, aux = forward(params, mb, rng, router_state)
        aux, model_aux = layer_aux.split_model_aux(aux)  # e.g. the MTP loss (layers.mtp)
        aux = StackedLayerAux.of(aux)  # scanned layers stay stacked: one op per group
        ce = token_cross_entropy(logits, mb["targets"])
        ce_sum = jnp.sum(ce * mb["weights"])
        terms, own_counts = step_balance.terms(aux, mb["lbl_group"], mb["row_group"], groups,
                                               prior, add_own)
        lbl = sum_layers([t["lbl"] for t in terms if t], reduction)  # {}: no MoE routing
        seq_balance = sum_layers([t["seq_balance"] for t in terms if t], reduction)
        # Every other MoeAux loss as its layers report it, weighted as it declares.
        weights = {**unscoped_losses(aux), **unscoped_losses(model_aux)}
        # A loss field belongs to the layers or to the model (e.g. MTP), never both.
        unscoped = {name: layer_aux.reduce_layers(aux, name, reduction)
                    + layer_aux.reduce_layers(model_aux, name, reduction) for name in weights}
        loss = (ce_sum / total_tokens + loss_weights.lbl_weight * lbl
                + loss_weights.seq_balance_weight * seq_balance
                + sum(loss_weight(loss_weights, weights[name], name, router_state) * value
                      for name, value in unscoped.items()) / num_microbatches)
        domain_ce, domain_tokens = domain_sums(ce, mb["weights"], mb["domain"], num_domains)
        aux = aux.with_groups([
            a.replace(sequence_max_violation=t["sequence_max_violation"])
            if "sequence_max_violation" in t else a for (_, a), t in zip(aux.groups, terms)])
        # lbl and seq_balance are shares; x num_microbatches so their mean is the step's loss.
        out = {"ce_sum": ce_sum, "lbl": lbl * num_microbatches,
               "seq_balance": seq_balance * num_microbatches, "loss_terms": unscoped,
               "domain_ce_sum": domain_ce, "domain_tokens": domain_tokens,
               "moe": moe_stats(aux), "model_aux": moe_stats(model_aux),
               "own_counts": own_counts}
        return loss, jax.lax.stop_gradient(out)

    return microbatch_loss


def _step_metrics(losses: jax.Array, outs: Mapping[str, Any], grads: Any, batch: Batch,
                  total_tokens: jax.Array) -> dict[str, Any]:
    """The step's metrics from the per-micro-batch outputs stacked by the scan."""
    moe = combine_microbatch_stats(outs["moe"]).map_groups(_with_batch_max_violation)
    loss_terms = {name: jnp.mean(value) for name, value in outs["loss_terms"].items()}
    return {
        "loss": jnp.sum(losses),
        "ce": jnp.sum(outs["ce_sum"]) / total_tokens,
        "lbl": jnp.mean(outs["lbl"]),
        "seq_balance": jnp.mean(outs["seq_balance"]),
        **loss_terms,
        "loss_terms": loss_terms,  # {MoeAux loss name: value}, for logging
        "grad_norm": optax.tree.norm(grads),
        "num_tokens": jnp.sum(batch["weights"]),
        "domain_ce_sum": jnp.sum(outs["domain_ce_sum"], axis=0),
        "domain_tokens": jnp.sum(outs["domain_tokens"], axis=0),
        "moe": moe,
        "model_aux": combine_microbatch_stats(outs["model_aux"]),  # {name: model-level aux}
    }


def finite_checks(loss: jax.Array, grad_norm: jax.Array, grads: Any,
                  new_params: Any) -> dict[str, Any]:
    """Whether the step's update may be applied: `{"applied": all of the following,
    "loss", "grad_norm": each finite, "params": the updated parameters finite,
    "grad_groups": {top-level key of the gradient tree: its gradients finite}}`
    (booleans, no host round trip).

    Finiteness is read off sums of squares: a NaN or an inf (or a value whose square
    overflows float32, far past any trainable weight) makes the sum non-finite. The
    gradient's per-leaf sums are the ones the optimizer's global-norm clipping and the
    `grad_norm` metric take, so XLA computes them once; the parameters' sum reads the
    step's output once. Checking the update itself, as the step once did, took a pass
    over it that XLA:CPU could not fuse with the optimizer; finite updated parameters
    are also the stronger guarantee, being what is trained on and saved.
    """
    def finite_sum_of_squares(tree: Any) -> jax.Array:
        return jnp.isfinite(optax.tree.norm(tree, squared=True))

    groups = grads.items() if isinstance(grads, Mapping) else [("params", grads)]
    checks = {"loss": jnp.isfinite(loss), "grad_norm": jnp.isfinite(grad_norm),
              "params": finite_sum_of_squares(new_params)}
    return {"applied": checks["loss"] & checks["grad_norm"] & checks["params"], **checks,
            "grad_groups": {str(k): finite_sum_of_squares(v) for k, v in groups}}


def _prior_counts(microbatch_counts: Callable, params: Any, microbatches: Any, keys: jax.Array,
                  router_state: RouterState | None, groups: Any) -> tuple[Any, bool]:
    """(counts known before the gradient pass, add each micro-batch's own counts)."""
    if groups.count_source == "local":
        return None, True
    count_shapes = jax.eval_shape(
        lambda p, mb, key, st: microbatch_counts(p, mb, key, st, groups.num_groups),
        params, jax.tree.map(lambda x: x[0], microbatches), keys[0], router_state)
    prior = zeros_like_counts(count_shapes)
    if groups.count_source == "causal":
        return prior, True

    # 'exact': a first pass collects the counts of the whole step.
    def count_body(total, xs):
        key, mb = xs
        counts = microbatch_counts(params, mb, key, router_state, groups.num_groups)
        return jax.tree.map(jnp.add, total, counts), None

    prior, _ = jax.lax.scan(count_body, prior, (keys, microbatches))
    return prior, False


def make_train_step(graphdef: nnx.GraphDef, rest: Any, tx: optax.GradientTransformation, *,
                    loss_weights: LossWeights, num_microbatches: int, num_domains: int,
                    data_parallel_size: int = 1,
                    ) -> Callable[..., tuple[Any, Any, dict[str, Any]]]:
    """Builds `step(params, opt_state, batch, rng, router_state=None) -> (params,
    opt_state, metrics)`, a plain function: the caller jits it once
    (`experiments.runtime.mesh.Sharding.wrap_train_step`, or `jax.jit`).

    `batch` holds `inputs, targets, weights, segment_ids, positions, domain`
    `[B, S]`; `rng` is this step's key (the caller folds the step in).
    `router_state`: the step's `moe.router_state.RouterState` (traced; e.g.
    loss-free selection biases, the EvoMoE gate temperature), the same for
    every micro-batch.
    `data_parallel_size`: devices the batch dimension is sharded over (defines
    the `micro_batch` balance scope).
    `metrics`: loss, ce, lbl (the scoped LBL), seq_balance, z_loss, dts_loss,
    grad_norm, num_tokens, domain_ce_sum `[D]`, domain_tokens `[D]`, and
    `moe`: `{layer: MoeAux}` statistics (a `StackedLayerAux`: the layers of a
    scanned unit position stay stacked) reduced over micro-batches as each
    field declares, with `batch_max_violation` (MaxVio of the step's counts),
    and `finite` (`finite_checks`): when the loss, the gradient norm or the
    updated parameters are not finite, `finite["applied"]` is False and the caller
    must keep the `params` and `opt_state` it passed in (the trainer does:
    `experiments.train.nonfinite.SkipGuard`); the returned state is then the
    rejected candidate. Choosing on the host is free, where a select inside the
    step copied the state once more (with the update's own check, 8% of the small
    MoE preset's float32 step on CPU: docs/cpu_targets.md).
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    step_balance = StepBalance(loss_weights.lbl_scope, loss_weights.lbl_global_mode,
                               num_microbatches, data_parallel_size)

    def forward(params, mb, rng, router_state):
        model = nnx.merge(graphdef, params, rest)
        return model(mb["inputs"], segment_ids=mb["segment_ids"], positions=mb["positions"],
                     deterministic=False, rng=rng, router_state=router_state)

    def microbatch_counts(params, mb, rng, router_state, num_groups):
        """Forward only: `{layer: [G, E]}` balance-group counts of one micro-batch."""
        _, aux = forward(params, mb, rng, router_state)
        return StepBalance.layer_counts(aux, mb["lbl_group"], num_groups)

    grad_fn = jax.value_and_grad(
        _microbatch_loss_fn(forward, step_balance, loss_weights, num_microbatches, num_domains),
        has_aux=True)

    def step(params, opt_state, batch, rng, router_state: RouterState | None = None):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        total_tokens = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        # Shuffled balance groups: a fresh draw per step, reproducible from the step key.
        groups = step_balance.groups(batch["segment_ids"],
                                     jax.random.fold_in(rng, num_microbatches))
        microbatches = split_microbatches(
            dict(batch, lbl_group=groups.lbl_group, row_group=groups.row_group), num_microbatches)
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num_microbatches))
        prior, add_own = _prior_counts(microbatch_counts, params, microbatches, keys,
                                       router_state, groups)

        def body(carry, xs):
            grad_acc, running = carry
            key, mb = xs
            (loss, out), grads = grad_fn(params, mb, key, total_tokens, router_state, groups,
                                         running, add_own)
            grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
            own_counts = out.pop("own_counts")
            if groups.count_source == "causal":  # Megatron's running buffer
                running = jax.tree.map(jnp.add, running, own_counts)
            return (grad_acc, running), (loss, out)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, _), (losses, outs) = jax.lax.scan(body, (zeros, prior), (keys, microbatches))
        updates, new_opt_state = tx.update(grads, opt_state, params)
        metrics = _step_metrics(losses, outs, grads, batch, total_tokens)
        new_params = optax.apply_updates(params, updates)
        metrics["finite"] = finite_checks(metrics["loss"], metrics["grad_norm"], grads,
                                          new_params)
        # The caller keeps `params` and `opt_state` when finite["applied"] is False, so
        # it must not donate them to this step. A select here would wait for the check
        # and then copy the whole state once more.
        return new_params, new_opt_state, metrics

    return step
