"""Documents from input files for `scripts/prepare_data.py`: text, JSONL and Parquet.

Every reader yields :class:`Document` ``(key, text, domain)`` in file order. The key
is what the train/validation split hashes (:func:`experiments.data.corpus.split_of`),
the same key the in-memory sources use, so a prepared corpus splits like
``text:<glob>`` / ``jsonl:<path>`` read directly:

* text file: the path as the glob returns it; the whole file is one document,
  newlines normalised as Python's text mode does (``\\r\\n`` and ``\\r`` -> ``\\n``);
* JSONL (``.jsonl``/``.ndjson``, plain, ``.gz`` or ``.zst``): ``<path>:<line>``
  (1-based), one document per non-blank line;
* Parquet: ``<path>:<row>`` (1-based), one document per row.

A file that cannot be read or decoded (I/O error, not UTF-8, a corrupt gzip/zstd
stream or Parquet file) raises :class:`BadFileError` naming it; the caller
decides whether that is fatal. A malformed record (a line that is not JSON, a
missing text field, a Parquet file without the text column) raises
``ValueError`` naming the file and line or the columns the file has.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, NamedTuple

FORMATS: tuple[str, ...] = ("auto", "text", "jsonl", "parquet")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_COMPRESSIONS = (".gz", ".zst")
_PARQUET_ROWS_PER_BATCH = 1024


class Document(NamedTuple):
    key: str
    text: str
    domain: str


class BadFileError(ValueError):
    """A file that cannot be read or decoded; `path` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read {path!r}: {reason}")
        self.path = path
        self.reason = reason


class FieldOptions(NamedTuple):
    """Where the text and domain are in a JSONL object or a Parquet row."""

    text_field: str = "text"
    domain_field: str = "domain"
    default_domain: str = "text"


def file_format(path: str, requested: str = "auto") -> str:
    """'text', 'jsonl' or 'parquet': `requested`, or by suffix when it is 'auto'."""
    if requested not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {requested!r}")
    if requested != "auto":
        return requested
    name = path.lower()
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """The files matching any of `patterns` (``**`` recurses; a directory stands for
    every file under it), sorted, without duplicates."""
    if not patterns:
        raise ValueError("--input: give at least one file or glob")
    files: set[str] = set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "**", "*")
        matched = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
        if not matched:
            raise ValueError(f"--input {pattern!r} matches no files")
        files.update(matched)
    return sorted(files)


def read_documents(path: str, fmt: str, fields: FieldOptions) -> Iterator[Document]:
    """The documents of one file (`fmt`: 'text', 'jsonl' or 'parquet')."""
    if fmt == "text":
        yield _read_text(path, fields.default_domain)
    elif fmt == "jsonl":
        yield from _read_jsonl(path, fields)
    elif fmt == "parquet":
        yield from _read_parquet(path, fields)
    else:
        raise ValueError(f"format must be one of {list(FORMATS[1:])}, got {fmt!r}")


def _read_text(path: str, domain: str) -> Document:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadFileError(path, e.strerror or str(e)) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFileError(path, f"not valid UTF-8 at byte {e.start}") from e
    # As `open(path, encoding="utf-8").read()` (universal newlines) in sources.py.
    return Document(path, text.replace("\r\n", "\n").replace("\r", "\n"), domain)


def _open_binary(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        try:
            import zstandard  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise ImportError(f"{path!r} is zstd-compressed: pip install zstandard") from e
        raw = open(path, "rb")  # pylint: disable=consider-using-with
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")  # pylint: disable=consider-using-with


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard  # pylint: disable=g-import-not-at-top

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _read_jsonl(path: str, fields: FieldOptions) -> Iterator[Document]:
    errors = _decompression_errors()
    try:
        with _open_binary(path) as f:
            for line_number, raw in enumerate(f, start=1):
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadFileError(path, f"line {line_number} is not valid UTF-8 "
                                             f"(byte {e.start})") from e
                if line.strip():
                    yield _jsonl_document(line, where, fields)
    except errors as e:
        raise BadFileError(path, str(e) or type(e).__name__) from e


def _jsonl_document(line: str, where: str, fields: FieldOptions) -> Document:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON line ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get(fields.text_field)
    if not isinstance(text, str):
        if fields.text_field not in obj:
            raise ValueError(f"{where}: --text_field {fields.text_field!r} is not a key of "
                             f"the object (its keys: {sorted(obj)})")
        raise ValueError(f"{where}: --text_field {fields.text_field!r} must name a string, "
                         f"got {obj[fields.text_field]!r:.80}")
    domain = obj.get(fields.domain_field, fields.default_domain)
    if not isinstance(domain, str):
        raise ValueError(f"{where}: --domain_field {fields.domain_field!r} must name a "
                         f"string, got {domain!r:.80}")
    return Document(where, text, domain)


def _import_pyarrow_parquet():
    try:
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("Parquet input needs pyarrow: pip install pyarrow") from e
    return pq


def _read_parquet(path: str, fields: FieldOptions) -> Iterator[Document]:
    pq = _import_pyarrow_parquet()
    import pyarrow as pa  # pylint: disable=g-import-not-at-top

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise BadFileError(path, str(e)) from e
    names = parquet.schema_arrow.names
    if fields.text_field not in names:
        raise ValueError(f"{path}: Parquet file has no column --text_field "
                         f"{fields.text_field!r} (its columns: {names})")
    has_domain = fields.domain_field in names
    columns = [fields.text_field] + ([fields.domain_field] if has_domain else [])
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_ROWS_PER_BATCH, columns=columns):
            texts = batch.column(0).to_pylist()
            domains = batch.column(1).to_pylist() if has_domain else None
            for i, text in enumerate(texts):
                row += 1
                yield _parquet_document(path, row, text, None if domains is None else domains[i],
                                        has_domain, fields)
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
        raise BadFileError(path, f"after row {row}: {e}") from e


def _parquet_document(path: str, row: int, text: object, domain: object, has_domain: bool,
                      fields: FieldOptions) -> Document:
    where = f"{path}:{row}"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadFileError(path, f"row {row} is not valid UTF-8") from e
    if not isinstance(text, str):
        raise ValueError(f"{path}: row {row}: column --text_field {fields.text_field!r} "
                         f"must hold strings, got {text!r:.80}")
    if not has_domain or domain is None:
        domain = fields.default_domain
    if not isinstance(domain, str):
        raise ValueError(f"{path}: row {row}: column --domain_field {fields.domain_field!r} "
                         f"must hold strings, got {domain!r:.80}")
    return Document(where, text, domain)
