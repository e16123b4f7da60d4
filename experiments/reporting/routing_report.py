"""Routing analysis of a trained workdir: restore, route the labelled validation
data, write per-layer heat maps and JSON, and a loss-curve plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gin
import jax

from experiments.data.config import DataConfig
from experiments.reporting import analysis
from experiments.reporting.metrics import METRICS_FILE, read_jsonl
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from experiments.train.config import model_vocab_size
from experiments.train.evaluation import make_routing_counts_step, routing_counts
from experiments.train.trainer import build_model, split_model
from moe.router_state import SELECTION_BIAS, RouterState


def _model_cls() -> type:
    """`train.model_cls` as configured in the run (TransformerLM by default)."""
    try:
        return gin.query_parameter("train.model_cls").scoped_configurable_fn
    except ValueError:
        from layers.transformer import TransformerLM  # pylint: disable=g-import-not-at-top
        return TransformerLM


def analyze_workdir(workdir: str | Path, output_dir: str | Path | None = None,
                    max_batches: int | None = None) -> dict[str, Any]:
    """Writes `<output_dir>/routing_<layer>.{png,json}`, `routing.json` and
    `loss_curves.png` (output_dir defaults to `<workdir>/analysis`).

    The run's `config.gin` must already be parsed (see `parse_run_config`).
    Returns the `routing.json` contents plus `files`, the paths written. A
    dense run has no routing: `layers` is empty and only `routing.json` and the
    loss curves are written.
    """
    workdir = Path(workdir)
    output_dir = Path(output_dir) if output_dir is not None else workdir / "analysis"
    output_dir.mkdir(parents=True, exist_ok=True)
    data_config = DataConfig()
    domains = data_config.domains()
    model = build_model(_model_cls(), model_vocab_size(data=data_config), seed=0)
    graphdef, params, rest = split_model(model)
    # Read-only: the run may still be training and saving.
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        restored = checkpointer.restore_latest(jax.eval_shape(lambda: params), None)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no intact checkpoint under {workdir / 'checkpoints'}")
    batches = data_config.eval_batches()[:max_batches]
    # Loss-free selection biases are part of the router: route as the trainer did.
    biases = restored.balance_state
    router_state = None
    if biases:
        router_state = RouterState(layers={
            layer: {SELECTION_BIAS: biases[layer]}
            for layer in getattr(model, "moe_layer_names", ()) if layer in biases})
    step_fn = make_routing_counts_step(graphdef, rest, len(domains))
    counts = routing_counts(step_fn, restored.params, batches, router_state)

    report: dict[str, Any] = {"step": restored.step, "num_batches": len(batches),
                              "selection_biases": router_state is not None, "layers": {}}
    files: list[Path] = []
    for layer, layer_counts in counts.items():
        layer_report = analysis.layer_report(layer_counts, domains)
        report["layers"][layer] = layer_report
        (output_dir / f"routing_{layer}.json").write_text(json.dumps(layer_report, indent=2))
        files += [output_dir / f"routing_{layer}.json", output_dir / f"routing_{layer}.png"]
        analysis.plot_heatmap(
            layer_counts, domains,
            f"{layer} @ step {restored.step}: I(domain; expert) = "
            f"{layer_report['mutual_information_bits']:.3f} bits", output_dir / f"routing_{layer}.png")
    (output_dir / "routing.json").write_text(json.dumps(report, indent=2))
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


def parse_run_config(workdir: str | Path) -> None:
    """Parses the run's saved `config.gin` (written by the trainer)."""
    path = Path(workdir) / gin_utils.CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir!s} a training workdir?")
    gin_utils.parse([str(path)], [])
