"""Argument checks shared by every layer of the codebase (errors name the option)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_one_of(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raises `ValueError("<name> must be one of (...), got <value>")` unless `value`
    is one of `choices` (a sequence, or a mapping whose keys are the choices)."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
