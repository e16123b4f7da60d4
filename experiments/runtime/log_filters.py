"""Filters for library log messages that say nothing to the user.

orbax's `CheckpointManager` logs three absl warnings every time it is opened
read-only (`CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.`,
`... setting max_to_keep=None.`, `Given directory is read only=<dir>`): they
describe the read-only mode the caller asked for. `quiet_read_only_warnings`
drops exactly those messages while the read-only manager is built.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

_READ_ONLY_PREFIXES = ("CheckpointManagerOptions.read_only=True, setting",
                       "Given directory is read only=")


class _DropReadOnlyNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_READ_ONLY_PREFIXES)


@contextlib.contextmanager
def quiet_read_only_warnings() -> Iterator[None]:
    """Drops orbax's read-only notices (absl logger) inside the block; nothing else."""
    logger, dropper = logging.getLogger("absl"), _DropReadOnlyNotices()
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)
