"""Streaming safetensors read/write (numpy; bfloat16 through ml_dtypes).

The format is an 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}}` and the raw data. Reading
memory-maps each file and copies out one tensor at a time, so the host holds
about one copy of the model; sharded checkpoints (`model.safetensors.index.json`)
are read shard by shard. Writing fills shards up to `max_shard_bytes` and writes
the index when there is more than one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A malformed, truncated or missing safetensors file."""


def _header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: truncated (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsError(f"{path}: truncated (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise SafetensorsError(f"{path}: unreadable header ({e})") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise SafetensorsError(f"{path}: truncated (data ends at {8 + n + end} bytes, file has "
                               f"{size})")
    return header, 8 + n


class SafetensorsReader:
    """Every tensor of a HF model directory, read one at a time."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({model_dir / f for f in weight_map.values()})
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise SafetensorsError(f"{model_dir}: no *.safetensors file")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for path in files:
            if not path.exists():
                raise SafetensorsError(f"{path}: listed in {INDEX} but missing")
            header, start = _header(path)
            for name, info in header.items():
                if info["dtype"] not in _DTYPES:
                    raise SafetensorsError(f"{path}: tensor {name} has dtype {info['dtype']}; "
                                           f"supported: {', '.join(_DTYPES)}")
                self._where[name] = (path, info, start)
        self._maps: dict[Path, np.memmap] = {}

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """A fresh `dtype` copy of tensor `name` (KeyError when absent)."""
        path, info, start = self._where[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[path][start + begin:start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"]).astype(dtype)

    def close(self) -> None:
        self._maps.clear()


def _write_file(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    header, offset = {}, 0
    for name, a in tensors:
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, a in tensors:
            f.write(np.ascontiguousarray(a).tobytes())


def write_sharded(out_dir: Path, tensors: Iterable[tuple[str, np.ndarray]], *,
                  dtype: str = "float32", max_shard_bytes: int = 2 * 1024 ** 3) -> list[Path]:
    """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` + index."""
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    shards: list[list[str]] = []
    buffer: list[tuple[str, np.ndarray]] = []
    size, total, parts = 0, 0, []

    def flush() -> None:
        nonlocal buffer, size
        if buffer:
            part = out_dir / f"part-{len(parts)}.tmp"
            _write_file(part, buffer)
            parts.append(part)
            shards.append([n for n, _ in buffer])
        buffer, size = [], 0

    for name, a in tensors:
        a = np.asarray(a).astype(np_dtype)
        if buffer and size + a.nbytes > max_shard_bytes:
            flush()
        buffer.append((name, a))
        size += a.nbytes
        total += a.nbytes
    flush()
    if len(parts) == 1:
        final = [parts[0].rename(out_dir / "model.safetensors")]
        return final
    n = len(parts)
    final = [p.rename(out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors")
             for i, p in enumerate(parts)]
    weight_map = {name: f.name for f, names in zip(final, shards) for name in names}
    (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": weight_map}, indent=2) + "\n",
                                 encoding="utf-8")
    return final
