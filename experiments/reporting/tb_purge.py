"""Cutting TensorBoard event files back to a step, as `metrics.jsonl` is on resume.

tensorboardX's `SummaryWriter(purge_step=N)` only appends a "restart" marker to
a new event file: TensorBoard itself then hides the older files' events at
steps >= N, but other readers (tbparse, `EventAccumulator` per file, pandas
exports) still see the re-run steps twice. `purge_events` rewrites every event
file of a directory keeping only the events at steps <= `last_step`, so every
step has one point after any number of resumes, whatever reads the files.
"""

from __future__ import annotations

import importlib
import struct
import sys
from collections.abc import Iterator
from types import ModuleType

from experiments.runtime import paths


def import_tensorboardx() -> ModuleType:
    """tensorboardX, imported without torch. Its writer imports torch whenever
    it is installed (only to accept torch tensors); the core never imports torch
    (tests/interop/test_core_without_torch.py), so torch is hidden meanwhile."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return importlib.import_module("tensorboardX")
    sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
        return importlib.import_module("tensorboardX")
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


import_tensorboardx()
from tensorboardX.proto.event_pb2 import Event  # noqa: E402
from tensorboardX.record_writer import masked_crc32c  # noqa: E402

_HEADER = struct.Struct("<Q")  # record length; then its masked CRC32C (4 bytes)


def read_records(path: paths.PathLike, data: bytes | None = None) -> Iterator[bytes]:
    """The records of a TFRecord file (or of its contents `data`), stopping at a
    torn or damaged one (a killed writer)."""
    data = paths.as_path(path).read_bytes() if data is None else data
    pos = 0
    while pos + 12 <= len(data):
        header = data[pos:pos + 8]
        (length,) = _HEADER.unpack(header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc32c(header):
            return
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            return
        record = data[start:end]
        if struct.unpack("<I", data[end:end + 4])[0] != masked_crc32c(record):
            return
        yield record
        pos = end + 4


def encode_record(record: bytes) -> bytes:
    header = _HEADER.pack(len(record))
    return (header + struct.pack("<I", masked_crc32c(header)) + record
            + struct.pack("<I", masked_crc32c(record)))


def purge_events(tensorboard_dir: paths.PathLike, last_step: int) -> int:
    """Drops the summaries at steps > `last_step` from every event file under
    `tensorboard_dir` (local or `gs://`; rewritten whole, `paths.write_bytes`);
    returns how many were dropped.

    Events without a summary (the file-version header, session markers) are kept.
    """
    dropped = 0
    directory = paths.as_path(tensorboard_dir)
    if not directory.is_dir():
        return 0
    for path in paths.find_files(directory):
        if not path.name.startswith("events.out.tfevents."):
            continue
        kept, changed, data = [], False, path.read_bytes()
        for record in read_records(path, data):
            event = Event.FromString(record)
            if event.HasField("summary") and event.step > last_step:
                dropped += 1
                changed = True
                continue
            kept.append(encode_record(record))
        if changed or len(b"".join(kept)) != len(data):  # also drops a torn tail
            paths.write_bytes(path, b"".join(kept))  # its temporary file: not matched
    return dropped
