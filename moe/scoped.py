"""Thread-local settings that code traced inside a `with` block reads (the active
sharding rules, the expert-parallel options)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ScopedValue(Generic[T]):
    """A value set for the duration of `with scoped.use(value):` in this thread;
    `get()` is None outside any block. Blocks nest; leaving one restores the outer value."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> T | None:
        return getattr(self._local, "value", None)

    @contextlib.contextmanager
    def use(self, value: T) -> Iterator[T]:
        previous = self.get()
        self._local.value = value
        try:
            yield value
        finally:
            self._local.value = previous
