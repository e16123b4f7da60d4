"""`scripts/ensemble_eval.py`: the sparse ensemble of branch workdirs on the validation
split of the clustered source (`experiments.cbtm.ensemble` has the formulas)."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np

from experiments.cbtm import ensemble
from experiments.cbtm.clusters import load_clustering
from experiments.data.config import DataConfig
from experiments.data.tokenizers import make_tokenizer
from experiments.inference.restore import parse_run_config
from experiments.inference.score import load_scorer


@dataclasses.dataclass(frozen=True)
class EnsembleSpec:
    """The flags of scripts/ensemble_eval.py."""

    clusters: str
    branches: tuple[str, ...]
    top_k: tuple[int, ...] = (1,)
    temperature: float = 0.1
    prefix_tokens: int = 32
    eval_max_batches: int | None = None


def _run_data(workdir: str) -> tuple[DataConfig, str]:
    """The run's DataConfig (from its config.gin) and its source."""
    parse_run_config(workdir)
    data = DataConfig()
    return data, data.source


def run_source(workdir: str) -> str:
    """The run's `DataConfig.source` (from its config.gin; gin is left with that config)."""
    return _run_data(workdir)[1]


def _branch_logprobs(workdir: str, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Per batch `[B, S] float64` log p(target) under the branch (latest checkpoint)."""
    scorer = load_scorer(workdir)
    out = [ensemble.target_logprobs(
        np.asarray(jax.device_get(scorer.forward(b["inputs"], b["segment_ids"]))), b["targets"])
        for b in batches]
    del scorer
    gc.collect()
    return out


def evaluate_ensemble(spec: EnsembleSpec) -> dict[str, Any]:
    """The ensemble's (for each top_k) and each branch's validation loss per domain."""
    if spec.prefix_tokens < 0:
        raise ValueError(f"--prefix_tokens must be >= 0, got {spec.prefix_tokens}")
    clustering = load_clustering(spec.clusters)
    for top_k in spec.top_k:  # checked before any model is loaded
        ensemble.ensemble_weights(np.zeros((1, clustering.centres.shape[1])),
                                  clustering.centres, top_k=top_k,
                                  temperature=spec.temperature)
    runs = [_run_data(w) for w in spec.branches]
    ensemble.check_branch_sources(clustering, [source for _, source in runs])
    data = dataclasses.replace(runs[0][0], source=clustering.source)
    if spec.eval_max_batches is not None:
        data = dataclasses.replace(data, eval_max_batches=spec.eval_max_batches)
    stored = clustering.meta["spec"]["validation_fraction"]
    if data.validation_fraction != stored:
        raise ValueError(f"--branch {spec.branches[0]!r} has DataConfig.validation_fraction "
                         f"{data.validation_fraction}, the clustering {stored}")
    batches = data.eval_batches(process_index=0, process_count=1)
    domains = data.domains()
    tokenizer = make_tokenizer(data.tokenizer)
    ctx = ensemble.contexts(batches, tokenizer.decode, spec.prefix_tokens)
    if not any(m.any() for m in ctx.scored):
        raise ValueError(f"--prefix_tokens {spec.prefix_tokens} leaves no validation token to "
                         f"score (DataConfig.seq_len = {data.seq_len}): give fewer")
    features = clustering.features.transform(ctx.texts)
    lp = np.stack([np.stack(_branch_logprobs(w, batches)) for w in spec.branches])
    gin.clear_config()
    domain = [b["domain"] for b in batches]
    result: dict[str, Any] = {
        "clusters": spec.clusters, "branches": list(spec.branches),
        "temperature": spec.temperature, "prefix_tokens": spec.prefix_tokens,
        "batches": len(batches), "contexts": len(ctx.texts),
        "scored_tokens": {d: int(sum(((x == i) & m).sum() for x, m in zip(domain, ctx.scored)))
                          for i, d in enumerate(domains)},
        "branch_loss": [ensemble.domain_losses(list(-lp[j]), ctx.scored, domain, domains)
                        for j in range(len(spec.branches))],
        "ensemble_loss": {}, "top1_cluster_share": {}}
    for top_k in spec.top_k:
        w = ensemble.ensemble_weights(features, clustering.centres, top_k=top_k,
                                      temperature=spec.temperature)
        nll = [-ensemble.mixture_logprobs(lp[:, b], w[np.maximum(ctx.segment_of[b], 0)])
               for b in range(len(batches))]
        result["ensemble_loss"][f"top{top_k}"] = ensemble.domain_losses(
            nll, ctx.scored, domain, domains)
    result["top1_cluster_share"] = _top1_share(features, clustering, ctx, domain, domains)
    return result


def _top1_share(features: np.ndarray, clustering: Any, ctx: ensemble.Contexts,
                domain: Sequence[np.ndarray], domains: Sequence[str]) -> dict[str, list[float]]:
    """Per domain: the share of its scored tokens whose context's nearest cluster is j."""
    nearest = ensemble.ensemble_weights(features, clustering.centres, top_k=1,
                                        temperature=1.0).argmax(1)
    k = clustering.num_clusters
    counts = np.zeros((len(domains), k))
    for seg, m, d in zip(ctx.segment_of, ctx.scored, domain):
        np.add.at(counts, (d[m], nearest[seg[m]]), 1)
    return {name: (counts[i] / max(counts[i].sum(), 1)).round(4).tolist()
            for i, name in enumerate(domains)}
