"""Routing analysis of a trained workdir: restore, route the labelled validation
data, write per-layer heat maps and JSON, and a loss-curve plot."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from experiments.data.config import DataConfig
from experiments.inference import restore as restore_lib
from experiments.inference import routing_stats
from experiments.inference.restore import restore_model
from experiments.reporting import analysis, soft_routing
from experiments.reporting.metrics import METRICS_FILE, read_jsonl
from experiments.runtime import paths
from moe.soft_stats import SoftRoutingStats


def analyze_workdir(workdir: paths.PathLike, output_dir: paths.PathLike | None = None,
                    max_batches: int | None = None) -> dict[str, Any]:
    """Writes `<output_dir>/routing_<layer>.{png,json}`, `routing.json` and
    `loss_curves.png` (output_dir defaults to `<workdir>/analysis`).

    Restores the run's model from its `config.gin` and latest intact
    checkpoint (`experiments.inference.restore.restore_model`: gin is cleared
    and the run's config parsed; MoE layers dropless; the loss-free selection
    biases applied) and counts, per domain, the expert assignments of the
    validation tokens with the routing statistics of
    `experiments.inference.routing_stats` (one pass per domain, the other
    domains' tokens as padding). A Soft MoE layer gets the soft statistics of
    `experiments.reporting.soft_routing` (combine-weight mass instead of counts,
    dispatch concentration from one more pass over all tokens). Returns the
    `routing.json` contents plus
    `files`, the paths written. A dense run has no routing: `layers` is empty
    and only `routing.json` and the loss curves are written.
    """
    workdir = paths.as_path(workdir)
    output_dir = paths.as_path(output_dir) if output_dir is not None else workdir / "analysis"
    restored = restore_model(workdir, causal_only=False)
    output_dir.mkdir(parents=True, exist_ok=True)
    data_config = DataConfig()
    domains = data_config.domains()
    batches = data_config.eval_batches()[:max_batches]
    restored = routing_stats.unscanned_view(restored)
    step_fn = routing_stats.make_stats_step(restored, allow_soft=True)
    per_domain = [routing_stats.collect_stats(restored, batches, domain=d, step_fn=step_fn,
                                              allow_soft=True) for d in range(len(domains))]
    layers = list(per_domain[0]) if per_domain else []
    soft = [layer for layer in layers if isinstance(per_domain[0][layer], SoftRoutingStats)]
    # Soft MoE's dispatch concentration: one pass over all tokens, as the model runs.
    all_tokens = (routing_stats.collect_stats(restored, batches, step_fn=step_fn,
                                              allow_soft=True) if soft else {})
    counts = {layer: np.stack([stats[layer].counts for stats in per_domain])
              for layer in layers if layer not in soft}
    router_state = restored.router_state if restored.router_state.layers else None
    report: dict[str, Any] = {"step": restored.step, "num_batches": len(batches),
                              "selection_biases": router_state is not None, "layers": {}}
    files: list[paths.Path] = []
    for layer, layer_counts in counts.items():
        layer_report = analysis.layer_report(layer_counts, domains)
        report["layers"][layer] = layer_report
        paths.write_text(output_dir / f"routing_{layer}.json", json.dumps(layer_report, indent=2))
        files += [output_dir / f"routing_{layer}.json", output_dir / f"routing_{layer}.png"]
        analysis.plot_heatmap(
            layer_counts, domains,
            f"{layer} @ step {restored.step}: I(domain; expert) = "
            f"{layer_report['mutual_information_bits']:.3f} bits", output_dir / f"routing_{layer}.png")
    for layer in soft:
        layer_report = soft_routing.soft_layer_report(
            [stats[layer] for stats in per_domain], all_tokens[layer], domains)
        report["layers"][layer] = layer_report
        paths.write_text(output_dir / f"routing_{layer}.json", json.dumps(layer_report, indent=2))
        files += [output_dir / f"routing_{layer}.json", output_dir / f"routing_{layer}.png"]
        analysis.plot_heatmap(
            layer_report["soft_combine_mass"], domains,
            f"{layer} @ step {restored.step} (Soft MoE, soft): I(domain; expert) = "
            f"{layer_report['soft_mutual_information_bits']:.3f} bits",
            output_dir / f"routing_{layer}.png", label="share of domain's combine weight")
    paths.write_text(output_dir / "routing.json", json.dumps(report, indent=2))
    files.append(output_dir / "routing.json")

    metrics_path = workdir / METRICS_FILE
    if metrics_path.exists():
        entropy = None
        summary_path = workdir / "summary.json"
        if summary_path.exists():
            entropy = (json.loads(summary_path.read_text()).get("unigram_entropy") or {}).get(
                "nats_per_byte")
        analysis.plot_loss_curves(read_jsonl(metrics_path), output_dir / "loss_curves.png",
                                  entropy_nats=entropy)
        files.append(output_dir / "loss_curves.png")
    return dict(report, files=[str(f) for f in files])


def parse_run_config(workdir: paths.PathLike) -> None:
    """Clears gin and parses the run's saved `config.gin` (written by the trainer);
    FileNotFoundError naming it when it is missing."""
    restore_lib.parse_run_config(workdir)
