"""Prepared token shards: the on-disk format and the memory-mapped reader.

Written by :mod:`experiments.data.prepare` (``scripts/prepare_data.py``); read by
the pipeline for ``DataConfig.source = 'shards:<dir>'``. Layout of ``<dir>``::

    manifest.json                 written last: tokenizer identity, dtype, domains,
                                  split rule, per-shard files with sha256 and counts
    plan.json                     the settings and inputs (a rerun must match them)
    shard-00000/                  one per unit of input, renamed into place when complete
      meta.json                   this shard's entry of the manifest
      train.tokens                [tokens] uint16|uint32, raw little-endian
      train.offsets.npy           [docs + 1] int64: document i is tokens[o[i]:o[i + 1]]
      train.domains.npy           [docs] int32: index into meta.json "domains"
      validation.tokens, validation.offsets.npy, validation.domains.npy

Token files hold each document's tokens only: the reader appends EOS (and
prepends BOS with ``add_bos``) as :func:`experiments.data.pipeline.tokenize_documents`
does, so ``add_bos`` stays a choice of the run.

:class:`ShardChunkSource` is the random-access source behind the grain
``MapDataset``: element i is the i-th chunk of the split in document order, the
same element the in-memory ``ChunkSource`` gives for the same corpus, so packing,
shuffling, per-process sharding and resume are the pipeline's own. Host memory
and start-up time: a chunk is read from its token file by a positional read
(:class:`TokenFile`); the offsets indexes are memory-mapped, and start-up reads and
verifies them (8 bytes per document).

``<dir>`` may be in a bucket (``shards:gs://bucket/corpus``,
:mod:`experiments.runtime.paths`): a chunk is then one ranged GET of its token
object, and the offsets and domain indexes are read into memory at start-up
(the same 8 bytes per document, verified the same way).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import gin
import numpy as np

from experiments.data.tokenizers import Tokenizer, make_tokenizer
from experiments.runtime import paths

SCHEME = "shards"
FORMAT = "sparse_moe.token_shards"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
SHARD_META = "meta.json"
SPLITS = ("train", "validation")
DTYPES = ("uint16", "uint32")
VERIFY_MODES = ("index", "full")
_HASH_BLOCK = 1 << 22


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def split_files(split: str) -> dict[str, str]:
    """The file names of one split of a shard, by role."""
    return {"tokens": f"{split}.tokens", "offsets": f"{split}.offsets.npy",
            "domains": f"{split}.domains.npy"}


def file_sha256(path: paths.PathLike) -> str:
    digest = hashlib.sha256()
    with paths.as_path(path).open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def dtype_for(vocab_size: int, requested: str = "auto") -> str:
    """The token dtype: `requested`, or the smallest that holds every id for 'auto'."""
    if requested not in ("auto", *DTYPES):
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {requested!r}")
    if requested == "auto":
        requested = "uint16" if vocab_size <= 2**16 else "uint32"
    limit = int(np.iinfo(requested).max) + 1
    if vocab_size > limit:
        raise ValueError(f"the tokenizer's vocabulary ({vocab_size} ids) exceeds dtype "
                         f"{requested} (at most {limit} ids); use --dtype uint32")
    return requested


# ----------------------------------------------------------------------------- tokenizer identity


@functools.lru_cache(maxsize=16)
def _hash_cached(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # Part of the cache key only.
    return file_sha256(path)


def _file_hash(path: str) -> str:
    stat = os.stat(path)
    return _hash_cached(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


# The spec kind of a Tokenizer instance passed instead of a spec string.
_SPEC_KINDS = {"ByteTokenizer": "byte", "SentencePieceTokenizer": "sentencepiece",
               "HFTokenizer": "hf"}


def _tokenizer_file(spec: str) -> str | None:
    _, sep, argument = spec.partition(":")
    return argument if sep and argument else None


def tokenizer_identity(spec: str | Tokenizer) -> dict[str, Any]:
    """What identifies a tokenizer: its spec, the sha256 of its file, vocab and special ids.

    A spec ``'<kind>:<path>'`` (sentencepiece, hf, ...) hashes the file at path (a
    directory: the names and hashes of its files); a Tokenizer instance is identified
    by its ``model_path`` attribute if it has one.
    """
    tokenizer = make_tokenizer(spec)
    if not isinstance(spec, str):
        kind = _SPEC_KINDS.get(type(spec).__name__, type(spec).__name__)
        path = getattr(spec, "model_path", None) or getattr(spec, "path", None)
        spec = f"{kind}:{path}" if path else kind
    path = _tokenizer_file(spec)
    sha = None
    if path is not None and os.path.isfile(path):
        sha = _file_hash(path)
    elif path is not None and os.path.isdir(path):  # A tokenizer directory: all its files.
        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            if os.path.isfile(os.path.join(path, name)):
                digest.update(f"{name}\0{_file_hash(os.path.join(path, name))}\0".encode())
        sha = digest.hexdigest()
    identity = {"spec": spec, "kind": spec.partition(":")[0], "sha256": sha,
                "vocab_size": int(tokenizer.vocab_size), "pad_id": int(tokenizer.pad_id),
                "bos_id": int(tokenizer.bos_id), "eos_id": int(tokenizer.eos_id)}
    # Options that change the ids a tokenizer emits (e.g. a tokenizer.json's
    # post-processor adding BOS) are part of its identity.
    add_special = getattr(tokenizer, "add_special_tokens", None)
    if isinstance(add_special, bool):
        identity["add_special_tokens"] = add_special
    return identity


def check_eos(identity: dict[str, Any]) -> None:
    """Documents end with EOS (added by the reader), so the tokenizer must have one."""
    if identity["eos_id"] < 0:
        raise ValueError(f"tokenizer {identity['spec']!r} has no EOS id (every document ends "
                         "with EOS): name eos_token in its configuration")


def _describe(identity: dict[str, Any]) -> str:
    sha = identity.get("sha256")
    extra = ("" if identity.get("add_special_tokens") is None
             else f", add_special_tokens={identity['add_special_tokens']}")
    return (f"{identity.get('spec')!r} (vocab {identity.get('vocab_size')}"
            + (f", sha256 {sha[:12]}" if sha else "") + extra + ")")


def check_tokenizer(prepared: dict[str, Any], run: dict[str, Any], where: str) -> None:
    """Refuses a run tokenizer that differs from the one the shards were made with.

    The kind, file hash, vocabulary and special ids must agree; the path may differ
    (the same file copied elsewhere).
    """
    keys = ("kind", "sha256", "vocab_size", "pad_id", "bos_id", "eos_id",
            "add_special_tokens")
    if any(prepared.get(k) != run.get(k) for k in keys):
        raise ValueError(f"DataConfig.tokenizer {_describe(run)} does not match the tokenizer "
                         f"the shards in {where} were prepared with: {_describe(prepared)}")


# ----------------------------------------------------------------------------- reading


_MAX_OPEN_FILES = 256
_open_files: collections.OrderedDict[str, int] = collections.OrderedDict()


def _descriptor(path: str) -> int:
    """A read-only descriptor of `path`, from a small LRU cache (bounded open files)."""
    fd = _open_files.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        while len(_open_files) >= _MAX_OPEN_FILES:
            os.close(_open_files.popitem(last=False)[1])
    _open_files[path] = fd
    return fd


@dataclasses.dataclass(frozen=True)
class TokenFile:
    """A token file read by positional reads (``os.pread``).

    Not a memory map: a mapped file's pages count in the process's RSS once touched,
    and the kernel maps ~64 KB around each random access, so a long run's RSS would
    grow towards the corpus size; reads through the page cache keep it flat (and
    measured faster, docs/benchmarks.md). Picklable (no open descriptor inside).
    """

    path: str
    dtype: str

    def read(self, start: int, stop: int) -> np.ndarray:
        """``[stop - start] int32``: tokens ``start:stop``."""
        if stop <= start:
            return np.zeros(0, np.int32)
        itemsize = np.dtype(self.dtype).itemsize
        if paths.is_remote(self.path):
            raw = paths.read_range(self.path, start * itemsize, stop * itemsize)
        else:
            raw = os.pread(_descriptor(self.path), (stop - start) * itemsize, start * itemsize)
        if len(raw) != (stop - start) * itemsize:
            raise ValueError(f"shard file {self.path!r} is shorter than its offsets index")
        return np.frombuffer(raw, np.dtype(self.dtype).newbyteorder("<")).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class SplitShard:
    """One split of one shard.

    Attributes:
      tokens: the split's token file (``[tokens]`` uint16/uint32).
      offsets: ``[docs + 1] int64`` document boundaries (memory-mapped).
      domain_ids: ``[docs] int32`` global domain ids.
    """

    tokens: TokenFile
    offsets: np.ndarray
    domain_ids: np.ndarray


def read_manifest(directory: paths.PathLike) -> dict[str, Any]:
    path = paths.as_path(directory) / MANIFEST
    if not path.is_file():
        why = ("an unfinished prepare_data.py output (rerun it to finish)"
               if (paths.as_path(directory) / PLAN).is_file() else
               "not a prepared corpus (make one with scripts/prepare_data.py)")
        raise ValueError(f"shards directory {str(directory)!r} has no {MANIFEST}: {why}")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: not a version-{VERSION} {FORMAT} manifest "
                         f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


def verify_file(path: paths.Path, expected: dict[str, Any], *, checksum: bool) -> None:
    """Refuses a shard file whose size (and, with `checksum`, sha256) differs from the manifest."""
    if not path.is_file():
        raise ValueError(f"shard file {str(path)!r} listed in the manifest is missing")
    size = paths.file_size(path)
    if size != expected["bytes"]:
        raise ValueError(f"shard file {str(path)!r} has {size} bytes, the manifest says "
                         f"{expected['bytes']}: the file is damaged or from another run")
    if checksum and file_sha256(path) != expected["sha256"]:
        raise ValueError(f"shard file {str(path)!r} does not match its checksum in the "
                         f"manifest (sha256 {expected['sha256'][:12]}...): the file is damaged")


def _load_split_shard(directory: paths.Path, entry: dict[str, Any], split: str, dtype: str,
                      domain_index: dict[str, int], verify: str) -> SplitShard:
    names = split_files(split)
    files = entry["files"]
    for role, name in names.items():
        verify_file(directory / entry["name"] / name, files[name],
                    checksum=verify == "full" or role != "tokens")
    base = directory / entry["name"]
    offsets = _load_npy(base / names["offsets"], mmap=True)
    local = np.asarray(_load_npy(base / names["domains"]), np.int32)
    table = np.array([domain_index[d] for d in entry["domains"]] or [0], np.int32)
    return SplitShard(tokens=TokenFile(str(base / names["tokens"]), dtype),
                      offsets=np.asarray(offsets, np.int64),
                      domain_ids=table[local] if len(local) else local)


def _load_npy(path: paths.Path, *, mmap: bool = False) -> np.ndarray:
    """A `.npy` file: memory-mapped (with `mmap`) when local, read whole from a bucket."""
    if paths.is_remote(path):
        return np.load(io.BytesIO(path.read_bytes()))
    return np.load(os.fspath(path), mmap_mode="r" if mmap else None)


@gin.configurable(denylist=["directory", "split"])
def open_split(directory: paths.PathLike, split: str, *,
               verify: str = "index") -> tuple[dict[str, Any], list[SplitShard]]:
    """The manifest and the shards of `split` (non-empty ones, in order).

    verify: 'index' checks every file's size and the checksums of the offsets and
      domain files (cheap); 'full' also hashes the token files (reads the corpus).
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"open_split.verify must be one of {list(VERIFY_MODES)}, got {verify!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    directory = paths.as_path(directory)
    manifest = read_manifest(directory)
    domain_index = {d: i for i, d in enumerate(manifest["domains"])}
    shards = [_load_split_shard(directory, entry, split, manifest["dtype"], domain_index, verify)
              for entry in manifest["shards"] if entry["splits"][split]["documents"]]
    return manifest, shards


open_split.gin_set_by = {"directory": "DataConfig.source = 'shards:<dir>'"}


class ShardChunkSource:
    """Random-access grain source over prepared shards; element i is one chunk.

    The chunks and their order are those of the in-memory
    ``experiments.data.pipeline.ChunkSource`` over the same documents: each
    document (plus EOS, after BOS if `bos_id` is given) is cut into chunks of at
    most ``seq_len + 1`` tokens overlapping by one, in document order.
    ``source[i]`` is ``{"inputs": [n] int32, "targets": [n] int32, "domain": [n] int32}``.
    """

    def __init__(self, shards: Sequence[SplitShard], seq_len: int, *, eos_id: int,
                 bos_id: int | None = None):
        self._shards = list(shards)
        self._seq_len = seq_len
        self._eos_id = eos_id
        self._bos_id = bos_id
        extra = 1 + (bos_id is not None)
        # Per shard: chunks before each document ([docs + 1] int64).
        self._doc_chunks = []
        for shard in self._shards:
            lengths = np.diff(shard.offsets) + extra
            per_doc = np.where(lengths >= 2, (lengths - 2) // seq_len + 1, 0)
            self._doc_chunks.append(np.concatenate([[0], np.cumsum(per_doc)]))
        totals = [int(c[-1]) for c in self._doc_chunks]
        self._shard_chunks = np.concatenate([[0], np.cumsum(totals, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._shard_chunks[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} out of range [0, {len(self)})")
        s = int(np.searchsorted(self._shard_chunks, index, side="right")) - 1
        local = index - int(self._shard_chunks[s])
        doc_chunks = self._doc_chunks[s]
        d = int(np.searchsorted(doc_chunks, local, side="right")) - 1
        shard = self._shards[s]
        chunk = self._chunk_tokens(shard, d, local - int(doc_chunks[d]))
        return {"inputs": chunk[:-1], "targets": chunk[1:],
                "domain": np.full(len(chunk) - 1, shard.domain_ids[d], np.int32)}

    def _chunk_tokens(self, shard: SplitShard, doc: int, k: int) -> np.ndarray:
        """`[n] int32`: chunk k of document `doc` in its virtual [BOS] tokens EOS form."""
        first, last = int(shard.offsets[doc]), int(shard.offsets[doc + 1])
        bos = int(self._bos_id is not None)
        length = last - first + bos + 1
        start = k * self._seq_len
        end = min(start + self._seq_len + 1, length)
        out = np.empty(end - start, np.int32)
        lo, hi = max(start - bos, 0), min(end - bos, last - first)  # Stored-token range.
        at = 0
        if bos and start == 0:
            out[0] = self._bos_id
            at = 1
        out[at:at + hi - lo] = shard.tokens.read(first + lo, first + hi)
        if end == length:
            out[-1] = self._eos_id
        return out


def parse_source(source: str) -> str | None:
    """The directory of a 'shards:<dir>' source, or None for another source."""
    scheme, sep, argument = source.partition(":")
    if scheme != SCHEME or not sep:
        return None
    if not argument:
        raise ValueError(f"source 'shards' needs a directory ('shards:<dir>'), got {source!r}")
    return argument


def open_chunk_source(directory: str, split: str, *, seq_len: int, tokenizer: str | Tokenizer,
                      add_bos: bool, validation_fraction: float) -> ShardChunkSource:
    """The chunks of `split` after checking the run's settings against the manifest."""
    manifest, shards = open_split(directory, split)
    if not shards:
        raise ValueError(f"the {split!r} split of source 'shards:{directory}' is empty "
                         f"(validation_fraction={manifest['validation_fraction']})")
    identity = tokenizer_identity(tokenizer)
    check_tokenizer(manifest["tokenizer"], identity, directory)
    check_eos(identity)
    if manifest["validation_fraction"] != validation_fraction:
        raise ValueError(f"DataConfig.validation_fraction={validation_fraction} differs from "
                         f"the shards in {directory}, split with --validation_fraction="
                         f"{manifest['validation_fraction']}; bind it to that value")
    tok = make_tokenizer(tokenizer)
    if add_bos and tok.bos_id < 0:
        raise ValueError("add_bos=True needs a tokenizer with a BOS id (bos_id >= 0)")
    return ShardChunkSource(shards, seq_len, eos_id=tok.eos_id,
                            bos_id=tok.bos_id if add_bos else None)


def domains(directory: str) -> list[str]:
    return list(read_manifest(directory)["domains"])


def byte_counts(directory: str, split: str) -> np.ndarray:
    """``[256] int64`` UTF-8 byte counts of the split's text (for the unigram entropy)."""
    return np.asarray(read_manifest(directory)["splits"][split]["byte_counts"], np.int64)
