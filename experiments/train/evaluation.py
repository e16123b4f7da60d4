"""Evaluation on the validation split: loss per domain and routing counts (per-domain routing
statistics of a checkpoint: `experiments.inference.routing_stats`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.train.train_step import domain_sums, moe_stats, token_cross_entropy
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
    """`eval_step(params, batch, router_state=None) -> dict` of per-domain CE sums
    and token counts and per-layer MoE statistics (`{layer: MoeAux}`),
    deterministic (no router noise, eval capacity). `router_state` (e.g. the
    loss-free selection biases) goes to the model call. A plain function: the
    caller jits it once (`Sharding.wrap_eval_step`, or `jax.jit`)."""

    def eval_step(params, batch, router_state: RouterState | None = None):
        model = nnx.merge(graphdef, params, rest)
        logits, aux = model(batch["inputs"], segment_ids=batch["segment_ids"],
                            positions=batch["positions"], deterministic=True,
                            router_state=router_state)
        ce = token_cross_entropy(logits, batch["targets"])
        domain_ce, domain_tokens = domain_sums(ce, batch["weights"], batch["domain"], num_domains)
        return {"domain_ce_sum": domain_ce, "domain_tokens": domain_tokens,
                    "ce_sum": jnp.sum(ce * batch["weights"]), "tokens": jnp.sum(batch["weights"]),
                    "moe": moe_stats(aux)}

    return eval_step


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
            if stats.counts is None:  # not a MoE layer (e.g. a dense layer's skip statistics)
                continue
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
