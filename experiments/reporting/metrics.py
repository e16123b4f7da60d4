"""Metric sinks: TensorBoard (tensorboardX), `metrics.jsonl` and a text progress line.

`metrics.jsonl` holds one JSON object per line: `{"step": N, "split": "train",
...scalars}` for every train step and `{"step": N, "split": "valid", ...}` per
evaluation. On resume it is cut back to the restored step, and so are the
TensorBoard event files (`experiments.reporting.tb_purge`), so after a crash and
restart every step appears exactly once in both.

In a bucket (`gs://`, no append) the records are kept in memory and
`metrics.jsonl` is rewritten whole every `flush_secs` seconds, at every
`flush()` (the trainer's checkpoints) and at `close()`; TensorBoard's event
files are written by tensorboardX's own GCS writer (google-cloud-storage).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from typing import Any, TextIO

import jax.numpy as jnp
import numpy as np

from experiments.reporting.tb_purge import import_tensorboardx, purge_events
from experiments.runtime import paths
from moe import balance
from moe.layer_aux import LayerAux, MoeAux, layer_means

METRICS_FILE = "metrics.jsonl"


def moe_scalars(layer_stats: LayerAux) -> dict[str, float]:
    """TensorBoard scalars of the per-layer MoE statistics of one step: each
    expert's load share and every per-layer scalar `MoeAux` reports
    (its `layer_mean` fields)."""
    out: dict[str, float] = {}
    for layer, stats in layer_stats.items():
        if stats.counts is not None:
            for i, fraction in enumerate(load_fractions(stats.counts)):
                out[f"moe/{layer}/load/expert_{i}"] = float(fraction)
        for name in MoeAux.field_names(over_layers="layer_mean"):
            value = getattr(stats, name)
            if value is not None:
                out[f"moe/{layer}/{name}"] = float(value)
    return out


def train_moe_scalars(layer_stats: LayerAux) -> dict[str, float]:
    """Train-record scalars of a step: the mean over layers of each `layer_mean`
    field and `batch_max_violation`, the MaxVio of each layer's step counts
    (every micro-batch and device), mean over layers."""
    out = layer_means(layer_stats)
    values = [float(balance.max_violation(jnp.asarray(a.counts)))
              for a in layer_stats.values() if a.counts is not None]
    if values:
        out["batch_max_violation"] = float(np.mean(values))
    return out


def model_aux_scalars(model_aux: LayerAux) -> dict[str, float]:
    """Train-record scalars of the model-level aux (`moe.layer_aux.split_model_aux`, e.g.
    `layers.mtp.MtpAux`): `{name}/{field}` for a scalar field, `{name}/{field}_{i}`
    (1-based) for a vector's entries (`mtp/loss_depth_1`). Loss fields are left out:
    the step logs them with its loss terms."""
    out: dict[str, float] = {}
    for name, aux in model_aux.items():
        losses = set(type(aux).loss_names())
        for field, value in aux.items():
            if field in losses:
                continue
            value = np.asarray(value, np.float64)
            if value.ndim == 0:
                out[f"{name}/{field}"] = float(value)
            else:
                out.update({f"{name}/{field}_{i + 1}": float(v)
                            for i, v in enumerate(value.reshape(-1))})
    return out


def valid_moe_scalars(expert_counts: dict[str, Any]) -> dict[str, float]:
    """Validation scalars: MaxVio of the whole pass's counts, per layer and mean."""
    out = {f"{layer}/max_violation": float(balance.max_violation(jnp.asarray(counts)))
           for layer, counts in expert_counts.items()}
    if out:
        out["max_violation"] = float(np.mean(list(out.values())))
    return out


def load_fractions(counts: Any) -> np.ndarray:
    """Share of the assignments each expert received (uniform when there are none)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    return counts / total if total > 0 else np.full_like(counts, 1.0 / max(len(counts), 1))


def truncate_jsonl(path: paths.PathLike, last_step: int) -> None:
    """Keeps only the records with `step <= last_step` (and drops a torn last line)."""
    path = paths.as_path(path)
    if not path.exists():
        return
    kept = []
    for line in _lines(path.read_text(encoding="utf-8")):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if record.get("step", math.inf) <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    paths.write_text(path, "".join(kept))


def _lines(text: str) -> list[str]:
    """The lines of `text`, split at "\\n" only, each with its "\\n" (the last may lack it)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def read_jsonl(path: paths.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Records of a `metrics.jsonl` (local or `gs://`), optionally only those of one split."""
    records = []
    for line in _lines(paths.as_path(path).read_text(encoding="utf-8")):
        if line.strip():
            record = json.loads(line)
            if split is None or record.get("split") == split:
                records.append(record)
    return records


class _RewrittenFile:
    """An append-only text file on object storage: kept in memory, rewritten whole
    when flushed (at most every `flush_secs` from `write`)."""

    def __init__(self, path: paths.Path, flush_secs: float):
        self.path, self.flush_secs = path, flush_secs
        self._parts = [path.read_text(encoding="utf-8")] if path.exists() else []
        self._dirty, self._flushed_at = False, time.monotonic()

    def write(self, text: str) -> None:
        self._parts.append(text)
        self._dirty = True

    def flush(self, *, force: bool = True) -> None:
        if self._dirty and (force or time.monotonic() - self._flushed_at >= self.flush_secs):
            self._parts = ["".join(self._parts)]
            paths.write_text(self.path, self._parts[0])
            self._dirty, self._flushed_at = False, time.monotonic()

    def close(self) -> None:
        self.flush()


class MetricsWriter:
    """Writes scalars and histograms to TensorBoard and records to `metrics.jsonl`
    (in a local directory or a bucket, `experiments.runtime.paths`)."""

    def __init__(self, workdir: paths.PathLike, *, resume_step: int | None = None,
                 tensorboard_dir: paths.PathLike | None = None, flush_secs: float = 10.0):
        self.workdir = paths.as_path(workdir)
        self.jsonl_path = self.workdir / METRICS_FILE
        if resume_step is None:
            self.jsonl_path.unlink(missing_ok=True)
        else:
            truncate_jsonl(self.jsonl_path, resume_step)
        self.tensorboard_dir = paths.as_path(tensorboard_dir or self.workdir / "tensorboard")
        # Events of steps after the restored one (or of an earlier run, on a fresh
        # start) are removed from the files; `purge_step` also tells a TensorBoard
        # that already loaded them to drop them.
        last_step = resume_step or 0
        purge_events(self.tensorboard_dir, last_step)
        SummaryWriter = import_tensorboardx().SummaryWriter
        self._tb = SummaryWriter(str(self.tensorboard_dir), flush_secs=flush_secs,
                                 purge_step=last_step + 1)
        self._remote = paths.is_remote(self.jsonl_path)
        if self._remote:
            self._jsonl: Any = _RewrittenFile(self.jsonl_path, flush_secs)
        else:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    def write(self, step: int, split: str, scalars: dict[str, float],
              tb_scalars: dict[str, float] | None = None) -> None:
        """Appends a `metrics.jsonl` record; `scalars` (prefixed `<split>/`) and
        `tb_scalars` (tags as given) go to TensorBoard."""
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._remote:
            self._jsonl.flush(force=False)
        else:
            self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.add_scalar(f"{split}/{name}", float(value), step)
        for tag, value in (tb_scalars or {}).items():
            self._tb.add_scalar(tag, float(value), step)

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self._tb.add_histogram(tag, np.asarray(values), step)

    def flush(self) -> None:
        self._jsonl.flush()
        self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


class ProgressLine:
    """A plain-text progress line on stderr: a carriage-return line on a
    terminal, one line per update otherwise."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None):
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self._tty = self.stream.isatty()
        self._start = time.monotonic()
        self._start_step = start_step
        self._pending = False  # a "\r" line without its newline yet

    def update(self, step: int, loss: float, tokens_per_sec: float,
               dropped: float | None = None, mfu: float | None = None,
               data_wait: float | None = None) -> None:
        """`dropped`: the step's dropped fraction of assignments (mean over MoE
        layers), shown when nonzero; `mfu` (when the device's peak is known) and
        `data_wait` (fraction of the step spent waiting for data, shown from 5%)."""
        now = time.monotonic()
        done = step - self._start_step
        rate = done / max(now - self._start, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        width = 20
        filled = int(width * step / max(self.total_steps, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total_steps} "
                f"loss {loss:.4f} {tokens_per_sec / 1e3:.1f}k tok/s eta {eta:.0f}s")
        if mfu is not None:
            line += f" mfu {100 * mfu:.1f}%"
        if data_wait is not None and data_wait >= 0.05:
            line += f" data wait {100 * data_wait:.0f}%"
        if dropped:
            line += f" dropped {dropped:.4f}"
        if self._tty:
            self.stream.write("\r" + line)
            self._pending = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def break_line(self) -> None:
        """Ends a pending carriage-return line, so another line can be printed."""
        if self._tty and self._pending:
            self.stream.write("\n")
            self.stream.flush()
        self._pending = False

    def finish(self) -> None:
        self.break_line()
