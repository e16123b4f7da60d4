"""Evaluation on the validation split: loss per domain and routing counts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.train.train_step import (  # SHIM(rewire-b): _model_kwargs
    _model_kwargs,
    domain_sums,
    moe_stats,
    token_cross_entropy,
)
from moe.router_state import RouterState


@dataclasses.dataclass
class EvalResult:
    """Token-weighted validation losses (nats per token) and routing counts.

    Attributes:
      loss: cross-entropy over all real tokens.
      domain_loss: `{domain: loss}` for domains with tokens.
      domain_tokens: `{domain: number of real tokens}`.
      expert_counts: `{moe layer: [E] assignments}` over the whole pass.
      dropped_fraction: `{moe layer: mean dropped fraction}` over batches.
      num_batches: batches evaluated.
    """

    loss: float
    domain_loss: dict[str, float]
    domain_tokens: dict[str, int]
    expert_counts: dict[str, np.ndarray]
    dropped_fraction: dict[str, float]
    num_batches: int

    def scalars(self) -> dict[str, float]:
        """`loss` and `<domain>/loss`, for `MetricsWriter.write(split='valid')`."""
        return {"loss": self.loss, **{f"{d}/loss": v for d, v in self.domain_loss.items()}}


def make_eval_step(graphdef: nnx.GraphDef, rest: Any, num_domains: int) -> Callable:
    """`eval_step(params, batch) -> dict` of per-domain CE sums and token counts and
    per-layer MoE statistics, deterministic (no router noise, eval capacity).
    An optional third argument `model_kwargs` goes to the model call (e.g. the
    loss-free `selection_biases`)."""

    def eval_step(params, batch, router_state=None):
        model = nnx.merge(graphdef, params, rest)
        logits, aux = model(batch["inputs"], segment_ids=batch["segment_ids"],
                            positions=batch["positions"], deterministic=True,
                            **_model_kwargs(router_state))  # SHIM(rewire-b)
        ce = token_cross_entropy(logits, batch["targets"])
        domain_ce, domain_tokens = domain_sums(ce, batch["weights"], batch["domain"], num_domains)
        return {"domain_ce_sum": domain_ce, "domain_tokens": domain_tokens,
                    "ce_sum": jnp.sum(ce * batch["weights"]), "tokens": jnp.sum(batch["weights"]),
                    "moe": moe_stats(aux)}

    return jax.jit(eval_step)


def evaluate(eval_step: Callable, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
             domains: Sequence[str], router_state: RouterState | None = None,
             ) -> EvalResult:
    """Runs `eval_step` over `batches` and token-weights the losses (`router_state`, if
    given, is passed to every call)."""
    ce_sum, tokens = 0.0, 0.0
    domain_ce = np.zeros(len(domains))
    domain_tokens = np.zeros(len(domains))
    counts: dict[str, np.ndarray] = {}
    dropped: dict[str, float] = {}
    num_batches = 0
    for batch in batches:
        args = () if router_state is None else (router_state,)
        out = jax.device_get(eval_step(params, dict(batch), *args))
        num_batches += 1
        ce_sum += float(out["ce_sum"])
        tokens += float(out["tokens"])
        domain_ce += out["domain_ce_sum"]
        domain_tokens += out["domain_tokens"]
        for layer, stats in out["moe"].items():
            counts[layer] = counts.get(layer, 0) + np.asarray(stats.counts, np.float64)
            dropped[layer] = dropped.get(layer, 0.0) + float(stats.dropped_fraction)
    if tokens == 0:
        raise ValueError("evaluation saw no real tokens (empty validation data?)")
    return EvalResult(
        loss=ce_sum / tokens,
        domain_loss={d: float(domain_ce[i] / domain_tokens[i])
                     for i, d in enumerate(domains) if domain_tokens[i] > 0},
        domain_tokens={d: int(domain_tokens[i]) for i, d in enumerate(domains)},
        expert_counts=counts,
        dropped_fraction={layer: v / num_batches for layer, v in dropped.items()},
        num_batches=num_batches)


def make_routing_counts_step(graphdef: nnx.GraphDef, rest: Any, num_domains: int) -> Callable:
    """`step(params, batch[, model_kwargs]) -> {moe layer: [D, E] counts}`: expert
    assignments of each domain's tokens (`model_kwargs`, e.g. the loss-free
    `selection_biases`, goes to the model call).

    The model runs once per domain with the other domains' tokens marked as
    padding (segment id 0), which excludes them from routing statistics. A
    segment holds a single document, so the domain's own tokens see exactly
    the context they see in a normal pass.
    """

    def step(params, batch, model_kwargs=None):
        model = nnx.merge(graphdef, params, rest)
        per_domain = []
        for d in range(num_domains):
            segment_ids = jnp.where(batch["domain"] == d, batch["segment_ids"], 0)
            _, aux = model(batch["inputs"], segment_ids=segment_ids,
                           positions=batch["positions"], deterministic=True,
                           **(model_kwargs or {}))
            per_domain.append({layer: a["counts"] for layer, a in aux.items()})
        return {layer: jnp.stack([p[layer] for p in per_domain]) for layer in per_domain[0]}

    return jax.jit(step)


def routing_counts(step: Callable, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
                   model_kwargs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Sums `make_routing_counts_step` outputs over `batches`: `{layer: [D, E]}`."""
    total: dict[str, np.ndarray] = {}
    args = () if model_kwargs is None else (model_kwargs,)
    for batch in batches:
        for layer, counts in jax.device_get(step(params, dict(batch), *args)).items():
            total[layer] = total.get(layer, 0) + np.asarray(counts, np.float64)
    return total
