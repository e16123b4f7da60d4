"""The trainer's logging: step records, MoE scalars and histograms, evaluations,
the progress line and the end-of-run summary."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.data.config import DataConfig
from experiments.reporting import summary as summary_lib
from experiments.reporting.console import Console
from experiments.reporting.metrics import (
    MetricsWriter,
    ProgressLine,
    load_fractions,
    model_aux_scalars,
    moe_scalars,
    train_moe_scalars,
    valid_moe_scalars,
)
from experiments.runtime import gin_utils, paths
from experiments.train.evaluation import EvalResult
from experiments.train.throughput import throughput_scalars

_log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
# The step's total loss, its parts (every MoeAux loss) and the gradient norm.
_STEP_SCALARS = ("loss", "ce", "lbl", "grad_norm")


class StepLog:
    """Writes what one run logs; `close()` when done."""

    def __init__(self, log_dir: paths.Path, *, domains: list[str], num_steps: int, start_step: int,
                 resumed: bool, log_every: int, summary_window: int, quiet: bool,
                 console: Console | None = None, tokenizer: str = "",
                 num_devices: int = 1, peak_tflops: float | None = None):
        self.log_dir, self.num_steps, self.log_every = log_dir, num_steps, log_every
        self.start_step = start_step
        self.writer = MetricsWriter(log_dir, resume_step=start_step if resumed else None)
        self.progress = None if quiet else ProgressLine(num_steps, start_step)
        self.console = console or Console(quiet=True)
        self.console.progress = self.progress
        self._bits_per_byte = tokenizer == "byte"
        self.window = summary_lib.DomainLossWindow(domains, summary_window)
        self.dropped = summary_lib.DroppedMean()
        self._last_time = time.monotonic()
        self._closed = False
        self.num_devices, self.peak_tflops = num_devices, peak_tflops

    def train_step(self, step: int, metrics: Mapping[str, Any], *, learning_rate: float,
                   flops: float, hook_scalars: Mapping[str, float],
                   data_seconds: float = 0.0) -> None:
        """The step's record (every step); MoE scalars, histograms and progress every
        `log_every` steps and at the last. `data_seconds`: time spent waiting for
        this step's batch (`experiments.train.throughput`)."""
        now = time.monotonic()
        step_seconds = max(now - self._last_time, 1e-9)
        tokens_per_sec = float(metrics["num_tokens"]) / step_seconds
        self._last_time = now
        throughput = throughput_scalars(
            tokens=float(metrics["num_tokens"]), flops=flops, step_seconds=step_seconds,
            data_seconds=data_seconds, num_devices=self.num_devices, peak=self.peak_tflops)
        self.window.add(metrics["domain_ce_sum"], metrics["domain_tokens"])
        self.dropped.add(metrics["moe"])
        log_now = step % self.log_every == 0 or step == self.num_steps
        scalars = {name: float(metrics[name]) for name in _STEP_SCALARS}
        scalars.update({name: float(metrics[name]) for name in metrics["loss_terms"]})
        scalars.update(learning_rate=learning_rate, tokens_per_sec=tokens_per_sec, flops=flops,
                       seq_balance=float(metrics["seq_balance"]),
                       **throughput, **train_moe_scalars(metrics["moe"]),
                       **model_aux_scalars(metrics.get("model_aux", {})), **hook_scalars)
        self.writer.write(step, "train", scalars,
                          tb_scalars=moe_scalars(metrics["moe"]) if log_now else None)
        if log_now:
            for layer, stats in metrics["moe"].items():
                if stats.counts is not None:  # MoE layers (not a dense SkipBlock)
                    self.writer.histogram(f"moe/{layer}/load_histogram",
                                          load_fractions(stats.counts), step)
            if self.progress:
                self.progress.update(step, scalars["loss"], tokens_per_sec,
                                     dropped=scalars.get("dropped_fraction"),
                                     mfu=throughput.get("mfu"),
                                     data_wait=throughput["data_wait_fraction"])

    def evaluation(self, step: int, result: EvalResult) -> None:
        self.writer.write(step, "valid", dict(result.scalars(),
                                              **valid_moe_scalars(result.expert_counts)))
        self.console.evaluation(step, result.loss, result.domain_loss, self._bits_per_byte)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.progress:
            self.progress.finish()
        self.writer.close()


def summary(workdir: paths.Path, log: StepLog, *, step: int, data: DataConfig,
            last_eval: EvalResult, moe_layers: Sequence[str],
            checkpoint_dir: paths.Path, skipped_steps: Sequence[int] = ()) -> dict[str, Any]:
    """The end-of-run summary (also written to `<log dir>/summary.json`);
    `skipped_steps`: the steps whose non-finite update was not applied."""
    try:
        entropy = data.unigram_entropy("train")
        entropy_dict = {"nats_per_byte": entropy.nats_per_byte,
                        "bits_per_byte": entropy.bits_per_byte, "num_bytes": entropy.num_bytes}
    except ValueError as e:  # e.g. a corpus without text
        _log.warning("no unigram entropy: %s", e)
        entropy_dict = None
    writer = log.writer
    result = {
        "step": step, "domains": data.domains(), "tokenizer": data.tokenizer,
        "train_loss": log.window.losses(),
        "valid_loss": dict(last_eval.domain_loss, all=last_eval.loss),
        "valid_tokens": last_eval.domain_tokens, "unigram_entropy": entropy_dict,
        **run_totals(log, step=step, data=data),
        "skipped_steps": list(skipped_steps),
        "moe": summary_lib.moe_summary({k: last_eval.expert_counts[k] for k in moe_layers
                                        if k in last_eval.expert_counts},
                                       last_eval.dropped_fraction,
                                       train_dropped=log.dropped.means()),
        "paths": {"workdir": str(workdir), "checkpoints": str(checkpoint_dir),
                  "tensorboard": str(writer.tensorboard_dir), "metrics": str(writer.jsonl_path),
                  "config": str(workdir / gin_utils.CONFIG_FILE),
                  "operative_config": str(workdir / gin_utils.OPERATIVE_CONFIG_FILE),
                  "summary": str(workdir / SUMMARY_FILE)}}
    paths.write_text(log.log_dir / SUMMARY_FILE, json.dumps(result, indent=2))
    return result


def run_totals(log: StepLog, *, step: int, data: DataConfig) -> dict[str, Any]:
    """`wall_time_s` of this invocation (start-up, compilation and evaluations
    included; a resumed run counts from its restart), the steps it ran, and
    `tokens_seen`: token positions trained on over the whole run,
    steps x `DataConfig.batch_size` x `seq_len` (padding included)."""
    return {"wall_time_s": round(log.console.elapsed(), 3),
            "steps_this_run": step - log.start_step,
            "tokens_seen": step * data.batch_size * data.seq_len}
