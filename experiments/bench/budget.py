"""A wall-clock budget for the benchmark, and errors recorded as one line."""

from __future__ import annotations

import time


class Budget:
    """`total_s` seconds from construction; sections take shares of what is left."""

    def __init__(self, total_s: float):
        if not total_s > 0:
            raise ValueError(f"budget must be > 0 seconds, got {total_s}")
        self.total_s = total_s
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def section_deadline(self, share: float) -> float:
        """A `time.monotonic()` deadline for a section given `share` of the time left."""
        return time.monotonic() + max(self.left(), 0.0) * share


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def error_text(error: BaseException, limit: int = 400) -> str:
    """`Type: first line of the message`, at most `limit` characters."""
    message = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {message[0] if message else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
