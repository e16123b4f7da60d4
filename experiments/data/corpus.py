"""The embedded default corpus: code and prose from the interpreter's stdlib.

Nothing is downloaded. On first use the corpus is built from the standard
library of the running Python and cached as JSON lines; later calls read the
cache. Two labelled domains:

* ``code``: Python source files of the stdlib (test directories,
  site-packages, ``pydoc_data`` and the generated ``encodings`` tables
  skipped).
* ``prose``: English prose, i.e. the docstrings of each stdlib module (module,
  class and function docstrings joined in source order, one document per
  module) and the values of ``pydoc_data.topics.topics`` (one document each).

Each domain is capped at ``max_bytes_per_domain`` UTF-8 bytes. Candidates are
visited in the order of a (salted) SHA-1 of their path, so a small cap gives a
pseudo-random sample of the stdlib rather than its alphabetical head.

Every document is a :class:`Record` ``{"text", "domain", "path"}``. The
train/validation split hashes the path (see :func:`split_of`); it depends on
neither ``PYTHONHASHSEED`` nor file-system order. A module's docstring
document (``<file>::docstrings``) hashes like its source file, so prose seen
in validation was never seen as code in training.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypedDict

import numpy as np

from experiments.data.files import write_atomically
from moe.validation import check_one_of


class Record(TypedDict):
    """One document: its text, its domain label and a stable, unique path."""

    text: str
    domain: str
    path: str


DOMAINS: tuple[str, ...] = ("code", "prose")
SPLITS: tuple[str, ...] = ("train", "validation")
DEFAULT_MAX_BYTES_PER_DOMAIN = 4_000_000
DEFAULT_VALIDATION_FRACTION = 0.05
CACHE_ENV_VAR = "SPARSE_MOE_CACHE"

# Bump when the corpus contents change for the same interpreter and cap, so
# stale caches are not reused.
_FORMAT_VERSION = 3
_SKIPPED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "pydoc_data",
        # Generated codec tables: megabytes of near-identical code.
        "encodings",
    }
)
# Separates a split key from a sub-document name: "a/b.py::docstrings".
_GROUP_SEPARATOR = "::"
# A domain stops collecting at the first document that does not fit once it
# is this full; this bounds how many modules get parsed for a small cap.
_STOP_FILL_FRACTION = 0.9


def default_cache_dir() -> Path:
    """``$SPARSE_MOE_CACHE/corpus`` if the variable is set, else ``~/.cache/sparse_moe/corpus``."""
    root = os.environ.get(CACHE_ENV_VAR)
    if root:
        return Path(root).expanduser() / "corpus"
    return Path.home() / ".cache" / "sparse_moe" / "corpus"


def domain_names() -> list[str]:
    """The embedded corpus's domain names; a domain's id is its index."""
    return list(DOMAINS)


def _check_fraction(validation_fraction: float) -> None:
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must be in [0, 1), got {validation_fraction!r}"
        )


def _check_split(split: str) -> None:
    check_one_of("split", split, SPLITS)


def split_of(
    path: str, validation_fraction: float = DEFAULT_VALIDATION_FRACTION
) -> str:
    """The split ('train' or 'validation') a document belongs to.

    Hashes the part of ``path`` before ``"::"`` with SHA-1, so the result is the
    same on every machine and run, and sub-documents of one file stay together.
    """
    _check_fraction(validation_fraction)
    key = path.split(_GROUP_SEPARATOR, 1)[0]
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if unit < validation_fraction else "train"


def select_split(
    records: Iterable[Record],
    split: str,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> list[Record]:
    """The records of ``split``, in their input order."""
    _check_split(split)
    _check_fraction(validation_fraction)
    return [r for r in records if split_of(r["path"], validation_fraction) == split]


def _path_order_key(path: str) -> bytes:
    # Salted: ordering by the split hash itself would fill a small cap with
    # the lowest hashes, i.e. with validation documents only.
    return hashlib.sha1(b"sample-order:" + path.encode("utf-8")).digest()


def _stdlib_python_files(stdlib_dir: Path) -> list[Path]:
    """Sorted ``.py`` files under ``stdlib_dir``, skipping tests and packages."""
    found = []
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = sorted(
            d for d in dirs if d not in _SKIPPED_DIRS and not d.endswith("_test")
        )
        found.extend(Path(root) / f for f in files if f.endswith(".py"))
    return sorted(found)


def _fill_budget(
    candidates: Iterable[tuple[str, str]], domain: str, max_bytes: int
) -> list[Record]:
    """Takes (path, text) candidates in order while they fit in ``max_bytes``.

    ``candidates`` is consumed lazily; an empty text is skipped.
    """
    records: list[Record] = []
    used = 0
    for path, text in candidates:
        size = len(text.encode("utf-8"))
        if size == 0:
            continue
        if used + size > max_bytes:
            if used >= _STOP_FILL_FRACTION * max_bytes:
                break
            continue
        records.append(Record(text=text, domain=domain, path=path))
        used += size
    return records


def _read_source(file: Path) -> str | None:
    try:
        return file.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def collect_code(stdlib_dir: Path, max_bytes: int) -> list[Record]:
    """Python source files of the stdlib as ``code`` records (path ``stdlib/<rel>``)."""
    files = _stdlib_python_files(stdlib_dir)
    paths = {f: "stdlib/" + f.relative_to(stdlib_dir).as_posix() for f in files}
    ordered = sorted(files, key=lambda f: _path_order_key(paths[f]))

    def candidates() -> Iterator[tuple[str, str]]:
        for f in ordered:
            text = _read_source(f)
            if text is not None:
                yield paths[f], text

    return _fill_budget(candidates(), "code", max_bytes)


def module_docstrings(source: str) -> str:
    """Module, class and function docstrings of ``source`` in source order.

    Returns "" when the source does not parse or has no docstrings.
    """
    with warnings.catch_warnings():
        # Some stdlib files hold invalid escape sequences (SyntaxWarning).
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return ""
    docstring_nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in ast.walk(tree) if isinstance(n, docstring_nodes)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    docs = [ast.get_docstring(n, clean=True) for n in nodes]
    return "\n\n".join(d.strip() for d in docs if d and d.strip())


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data import topics  # pylint: disable=g-import-not-at-top
    except ImportError:
        return {}
    return dict(topics.topics)


def collect_prose(stdlib_dir: Path, max_bytes: int) -> list[Record]:
    """Docstrings (one document per module) and pydoc topics as ``prose`` records."""
    files = _stdlib_python_files(stdlib_dir)
    sources: dict[str, Path | str] = {
        "stdlib/"
        + f.relative_to(stdlib_dir).as_posix()
        + _GROUP_SEPARATOR
        + "docstrings": f
        for f in files
    }
    for name, text in _pydoc_topics().items():
        sources[f"pydoc_data/topics/{name}"] = text

    def candidates() -> Iterator[tuple[str, str]]:
        for path in sorted(sources, key=_path_order_key):
            item = sources[path]
            if isinstance(item, str):
                yield path, item.strip()
            else:
                text = _read_source(item)
                if text is not None:
                    yield path, module_docstrings(text)

    return _fill_budget(candidates(), "prose", max_bytes)


def build_corpus(stdlib_dir: Path, max_bytes_per_domain: int) -> list[Record]:
    """Builds the corpus from ``stdlib_dir`` without touching any cache."""
    return collect_code(stdlib_dir, max_bytes_per_domain) + collect_prose(
        stdlib_dir, max_bytes_per_domain
    )


def _cache_file(cache_dir: Path, stdlib_dir: Path, max_bytes_per_domain: int) -> Path:
    identity = f"{_FORMAT_VERSION}|{sys.version}|{stdlib_dir}|{max_bytes_per_domain}"
    digest = hashlib.sha1(identity.encode("utf-8")).hexdigest()[:16]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return (
        cache_dir
        / f"corpus-v{_FORMAT_VERSION}-{tag}-{max_bytes_per_domain}-{digest}.jsonl"
    )


def _read_records(path: Path) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        return [Record(**json.loads(line)) for line in f]


def load_corpus(
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
    stdlib_dir: str | os.PathLike[str] | None = None,
) -> list[Record]:
    """All records of the embedded corpus, built on first use and then cached.

    Args:
        cache_dir: Where the JSONL cache lives; default :func:`default_cache_dir`.
        max_bytes_per_domain: Cap on each domain's total UTF-8 bytes.
        stdlib_dir: The stdlib to read; default the running interpreter's.

    Returns:
        Code records followed by prose records, each in SHA-1-of-path order.
    """
    if not isinstance(max_bytes_per_domain, int) or max_bytes_per_domain <= 0:
        raise ValueError(
            f"max_bytes_per_domain must be a positive int, got {max_bytes_per_domain!r}"
        )
    stdlib = Path(stdlib_dir or sysconfig.get_paths()["stdlib"]).resolve()
    if not stdlib.is_dir():
        raise ValueError(
            f"stdlib_dir must be an existing directory, got {str(stdlib)!r}"
        )
    cache = (
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    )
    path = _cache_file(cache, stdlib, max_bytes_per_domain)
    if path.exists():
        return _read_records(path)
    records = build_corpus(stdlib, max_bytes_per_domain)
    write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                   for r in records).encode("utf-8"))
    return records


def corpus_split(
    split: str = "train",
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes_per_domain: int = DEFAULT_MAX_BYTES_PER_DOMAIN,
) -> list[Record]:
    """The embedded corpus records of ``split`` ('train' or 'validation')."""
    _check_split(split)
    records = load_corpus(
        cache_dir=cache_dir, max_bytes_per_domain=max_bytes_per_domain
    )
    return select_split(records, split, validation_fraction)


@dataclasses.dataclass(frozen=True)
class UnigramEntropy:
    """Entropy of the byte unigram distribution: a loss scale for byte models."""

    bits_per_byte: float
    nats_per_byte: float
    num_bytes: int


def unigram_entropy(records: Iterable[Record]) -> UnigramEntropy:
    """Byte-level unigram entropy of the UTF-8 bytes of ``records``' texts."""
    counts = np.zeros(256, dtype=np.int64)
    for r in records:
        counts += np.bincount(
            np.frombuffer(r["text"].encode("utf-8"), np.uint8), minlength=256
        )
    return entropy_of_counts(counts)


def entropy_of_counts(counts: np.ndarray) -> UnigramEntropy:
    """The unigram entropy of ``[256] int64`` byte counts."""
    total = int(counts.sum())
    if total == 0:
        raise ValueError("records must contain at least one byte of text")
    p = counts[counts > 0] / total
    nats = float(-(p * np.log(p)).sum())
    return UnigramEntropy(
        bits_per_byte=nats / math.log(2), nats_per_byte=nats, num_bytes=total
    )
