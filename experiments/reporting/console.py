"""What the trainer prints on stderr besides the progress line: the start-up
block, the compile notice, one line per evaluation and step hooks' announcements
(e.g. EvoMoE phase changes). Nothing is printed when `quiet`; the wall clock
(`elapsed`) runs either way, for the summary.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TextIO

import jax

from experiments.runtime import paths


class _LineBreaker(Protocol):
    def break_line(self) -> None: ...


def param_counts(model: Any) -> tuple[int, int]:
    """(total, active per token) parameters: `TransformerLM.param_count` and
    `active_param_count` when the model has them, else the size of every `nnx.Param`."""
    if hasattr(model, "param_count") and hasattr(model, "active_param_count"):
        return int(model.param_count()), int(model.active_param_count())
    from flax import nnx  # pylint: disable=g-import-not-at-top

    total = sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return total, total


def human_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def startup_block(*, devices: Sequence[Any], mesh_shape: Mapping[str, int], dispatch: str,
                  params: tuple[int, int], structure: str, workdir: paths.Path,
                  resume_step: int | None) -> str:
    """The lines printed before training starts."""
    platform = devices[0].platform if devices else "?"
    kinds = sorted({str(getattr(d, "device_kind", "?")) for d in devices} - {platform})
    kind_note = f" ({', '.join(kinds)})" if kinds else ""
    total, active = params
    structure_note = "" if structure == "model" else f" ({structure} structure)"
    mesh = " x ".join(f"{axis}={size}" for axis, size in mesh_shape.items()) or "-"
    return "\n".join([
        f"devices: {len(devices)} x {platform}{kind_note}, "
        f"{jax.process_count()} process(es)",
        f"mesh: {mesh}",
        dispatch,
        f"parameters: {human_count(total)} total, {human_count(active)} active per token"
        f"{structure_note} ({total:,} / {active:,})",
        f"workdir: {workdir}",
        "fresh start" if resume_step is None else f"resuming from checkpoint at step {resume_step}",
    ])


def eval_line(step: int, loss: float, domain_loss: Mapping[str, float], *,
              bits_per_byte: bool) -> str:
    """One evaluation: `eval step 10: loss 4.7506 nats/token; code 4.6036, prose 4.8976`,
    with the byte tokenizer (a token is a byte) in bits per byte as well:
    `eval step 10: loss 4.7506 nats/byte = 6.854 bits/byte; code 6.642, prose 7.066 bits/byte`."""
    if not bits_per_byte:
        parts = ", ".join(f"{d} {v:.4f}" for d, v in domain_loss.items())
        return f"eval step {step}: loss {loss:.4f} nats/token" + (f"; {parts}" if parts else "")
    ln2 = math.log(2.0)
    parts = ", ".join(f"{d} {v / ln2:.3f}" for d, v in domain_loss.items())
    return (f"eval step {step}: loss {loss:.4f} nats/byte = {loss / ln2:.3f} bits/byte"
            + (f"; {parts} bits/byte" if parts else ""))


class Console:
    """The trainer's console output (stderr by default); silent when `quiet`."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.progress: _LineBreaker | None = None  # set by the step log: ends a "\r" line
        self._started = time.monotonic()
        self._compiled: set[str] = set()
        self._compile_start: float | None = None

    def elapsed(self) -> float:
        """Seconds since this console (the run) started."""
        return time.monotonic() - self._started

    def print(self, text: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.break_line()
        print(text, file=self.stream, flush=True)

    def startup(self, runtimes: Any, sharding: Any, workdir: paths.Path, run: Any) -> None:
        """The start-up block for the structure trained first (`run_state.Runtimes`,
        `mesh.Sharding`, `run_state.RunState`)."""
        structure = run.train.structure
        self.print(startup_block(
            devices=sharding.mesh.devices.reshape(-1).tolist(), mesh_shape=sharding.mesh_shape,
            dispatch=runtimes.dispatch_lines[structure],
            params=runtimes[structure].param_counts,
            structure=run.train.structure, workdir=workdir,
            resume_step=run.step if run.resumed else None))

    def before_step(self, structure: str) -> None:
        """Announces the compilation of the first step of each model structure."""
        if structure in self._compiled:
            return
        self._compiled.add(structure)
        self._compile_start = time.monotonic()
        which = "" if structure == "model" else f" ({structure} model)"
        self.print(f"compiling the train step{which}…")

    def after_step(self) -> None:
        """After the step's metrics reached the host: the compile time, once."""
        if self._compile_start is None:
            return
        seconds, self._compile_start = time.monotonic() - self._compile_start, None
        self.print(f"compiled the train step and ran the first step in {seconds:.1f} s")

    def evaluation(self, step: int, loss: float, domain_loss: Mapping[str, float],
                   bits_per_byte: bool) -> None:
        self.print(eval_line(step, loss, domain_loss, bits_per_byte=bits_per_byte))

    def messages(self, step: int, messages: Sequence[str]) -> None:
        """Step hooks' announcements after step `step`."""
        for message in messages:
            self.print(f"step {step}: {message}")
