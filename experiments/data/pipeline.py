"""Grain input pipeline: records -> tokens -> packed ``[batch, seq_len]`` batches.

Training pipeline (:func:`make_train_iterator`)::

    records of the 'train' split (experiments.data.sources)
    -> tokenize each document, append EOS (optionally prepend BOS)
    -> cut each document into chunks of at most seq_len + 1 tokens; a chunk
       of n tokens gives n - 1 (input, target) pairs, and consecutive chunks
       overlap by one token so every next-token pair is trained exactly once
    -> MapDataset over chunks, sharded [process_index::process_count]
    -> shuffle(seed), repeated forever with a different shuffle each epoch
    -> first-fit packing into rows of seq_len (grain FirstFitPackIterDataset)
    -> batches of batch_size rows

:func:`make_eval_iterator` is the same over the 'validation' split without
shuffling or repetition: one deterministic pass, the last batch padded with
empty rows to ``batch_size``.

Batch dict (numpy, ``B = batch_size``, ``S = seq_len``):

* ``inputs``      ``[B, S] int32``   token ids, ``tokenizer.pad_id`` on padding.
* ``targets``     ``[B, S] int32``   next token of the same document.
* ``weights``     ``[B, S] float32`` loss mask: 1 on real tokens, 0 on padding.
  A target never crosses into another document (chunks carry their own
  targets), so no real token needs masking.
* ``segment_ids`` ``[B, S] int32``   1, 2, 3... per chunk within a row, 0 = padding.
* ``positions``   ``[B, S] int32``   position within the segment, from 0.
* ``domain``      ``[B, S] int32``   domain id per token (index into the source's
  domain names, :func:`experiments.data.sources.load_source_split`), -1 on padding.

Segments must not attend across each other: the model's attention mask has to
allow query q to see key k only when ``segment_ids[q] == segment_ids[k] != 0``
(and ``positions[k] <= positions[q]`` when causal). This module does not build
that mask.

Resume: the iterators are grain ``DatasetIterator`` s. :func:`iterator_state`
returns a JSON-able dict (save it with ``ocp.args.JsonSave``) and
:func:`restore_iterator_state` puts it back into a freshly built iterator with
the same arguments; the next batch is then bit-identical to the one the
original iterator would have produced.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import gin
import grain
import numpy as np

from experiments.data import corpus, shards
from experiments.data.corpus import Record
from experiments.data.sources import load_source_split
from experiments.data.tokenizers import Tokenizer, encode_to_array, make_tokenizer

Batch = dict[str, np.ndarray]
DOMAIN_PAD_ID = -1
_PACKED_FEATURES = ("inputs", "targets", "domain")


@dataclasses.dataclass(frozen=True)
class TokenizedDocuments:
    """Documents' token ids back to back.

    Attributes:
      tokens: ``[total_tokens] int32`` all documents concatenated.
      offsets: ``[num_docs + 1] int64`` document i is
        ``tokens[offsets[i]:offsets[i + 1]]``.
      domain_ids: ``[num_docs] int32`` domain id of each document.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    domain_ids: np.ndarray


def tokenize_documents(
    records: Sequence[Record],
    tokenizer: Tokenizer,
    domains: Sequence[str],
    *,
    add_bos: bool = False,
) -> TokenizedDocuments:
    """Tokenizes every record, appending EOS (and prepending BOS if asked)."""
    if add_bos and tokenizer.bos_id < 0:
        raise ValueError("add_bos=True needs a tokenizer with a BOS id (bos_id >= 0)")
    if tokenizer.eos_id < 0:
        raise ValueError(f"{tokenizer!r} has no EOS id (every document ends with EOS): name "
                         "eos_token in the tokenizer_config.json next to its tokenizer.json")
    domain_index = {d: i for i, d in enumerate(domains)}
    unknown = {r["domain"] for r in records} - domain_index.keys()
    if unknown:
        raise ValueError(
            f"record domains {sorted(unknown)} are not in domains {list(domains)}"
        )
    prefix = [np.array([tokenizer.bos_id], np.int32)] if add_bos else []
    eos = np.array([tokenizer.eos_id], np.int32)
    pieces = []
    lengths = np.zeros(len(records), np.int64)
    for i, r in enumerate(records):
        doc = [*prefix, encode_to_array(tokenizer, r["text"]), eos]
        pieces.extend(doc)
        lengths[i] = sum(len(p) for p in doc)
    offsets = np.zeros(len(records) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    domain_ids = np.array([domain_index[r["domain"]] for r in records], np.int32)
    return TokenizedDocuments(
        tokens=tokens.astype(np.int32), offsets=offsets, domain_ids=domain_ids
    )


def chunk_bounds(
    offsets: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunks of at most ``seq_len + 1`` tokens covering every document.

    Chunk k of a document of n tokens spans ``[k * seq_len, min(k * seq_len +
    seq_len + 1, n))`` relative to the document start, so chunks overlap by
    one token. Documents of fewer than 2 tokens yield no chunk.

    Args:
      offsets: ``[num_docs + 1] int64`` document boundaries.
      seq_len: Packed row length.

    Returns:
      ``(starts, ends, doc_index)``, each ``[num_chunks]`` int64, in document
      order.
    """
    lengths = np.diff(offsets)
    num_chunks = np.where(lengths >= 2, (lengths - 2) // seq_len + 1, 0)
    doc_index = np.repeat(np.arange(len(lengths)), num_chunks)
    first_chunk = np.cumsum(num_chunks) - num_chunks
    k = np.arange(int(num_chunks.sum())) - np.repeat(first_chunk, num_chunks)
    starts = offsets[doc_index] + k * seq_len
    ends = np.minimum(starts + seq_len + 1, offsets[doc_index + 1])
    return starts, ends, doc_index


class ChunkSource:
    """Random-access grain source; element i is one chunk as a training example.

    ``source[i]`` is ``{"inputs": [n] int32, "targets": [n] int32,
    "domain": [n] int32}`` with ``n <= seq_len``: a chunk's tokens without its
    last, its tokens without its first, and its document's domain id.
    """

    def __init__(self, documents: TokenizedDocuments, seq_len: int):
        self._tokens = documents.tokens
        self._starts, self._ends, doc_index = chunk_bounds(documents.offsets, seq_len)
        self._domain_ids = documents.domain_ids[doc_index]

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        start, end = int(self._starts[index]), int(self._ends[index])
        chunk = self._tokens[start:end]
        return {
            "inputs": chunk[:-1],
            "targets": chunk[1:],
            "domain": np.full(end - start - 1, self._domain_ids[index], np.int32),
        }


def _to_batch_features(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames grain's packing outputs to the batch keys and adds ``weights``."""
    segment_ids = packed["inputs_segment_ids"]
    return {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "weights": (segment_ids > 0).astype(np.float32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"],
        "domain": packed["domain"],
    }


@dataclasses.dataclass(frozen=True)
class _PadBatch:
    """Pads a short final batch with empty rows up to ``batch_size``."""

    batch_size: int
    pad_id: int

    def __call__(self, batch: Batch) -> Batch:
        missing = self.batch_size - batch["inputs"].shape[0]
        if missing == 0:
            return batch
        fill = {"inputs": self.pad_id, "targets": self.pad_id, "domain": DOMAIN_PAD_ID}
        return {
            k: np.concatenate(
                [v, np.full((missing, *v.shape[1:]), fill.get(k, 0), v.dtype)]
            )
            for k, v in batch.items()
        }


def _check_positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _process_shard(
    process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    _check_positive("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index!r}"
        )
    return process_index, process_count


def epoch_shuffled(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
    """``ds`` repeated forever, each epoch in a different seeded order."""
    # Shuffle before repeat: grain reseeds upstream shuffles for every epoch.
    return ds.shuffle(seed=seed).repeat(None)


def _packed_dataset(
    chunks: grain.MapDataset,
    *,
    seq_len: int,
    batch_size: int,
    num_packing_bins: int,
    pad_id: int,
    seed: int,
    shuffle_bins: bool,
) -> grain.IterDataset:
    # Chunks live in memory: reader threads would only contend for the GIL.
    ds = chunks.to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={k: seq_len for k in _PACKED_FEATURES},
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct={"inputs": pad_id, "targets": pad_id, "domain": DOMAIN_PAD_ID},
    )
    return ds.map(_to_batch_features)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    chunks: grain.MapDataset
    tokenizer: Tokenizer


def _prepare(
    source: str,
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    tokenizer: str | Tokenizer,
    process_index: int | None,
    process_count: int | None,
    add_bos: bool,
    validation_fraction: float,
    cache_dir: str | os.PathLike[str] | None,
    max_bytes_per_domain: int,
) -> _Prepared:
    _check_positive("seq_len", seq_len)
    _check_positive("batch_size", batch_size)
    index, count = _process_shard(process_index, process_count)
    tok = make_tokenizer(tokenizer)
    shards_dir = shards.parse_source(source)
    if shards_dir is not None:
        chunk_source = shards.open_chunk_source(
            shards_dir, split, seq_len=seq_len, tokenizer=tokenizer, add_bos=add_bos,
            validation_fraction=validation_fraction)
        return _sharded_chunks(chunk_source, source, split, index, count, tok)
    data = load_source_split(
        source,
        split,
        validation_fraction=validation_fraction,
        cache_dir=cache_dir,
        max_bytes_per_domain=max_bytes_per_domain,
    )
    if not data.records:
        raise ValueError(
            f"the {split!r} split of source {source!r} is empty "
            f"(validation_fraction={validation_fraction})"
        )
    documents = tokenize_documents(data.records, tok, data.domains, add_bos=add_bos)
    return _sharded_chunks(ChunkSource(documents, seq_len), source, split, index, count, tok)


def _sharded_chunks(chunk_source: Any, source: str, split: str, index: int, count: int,
                    tok: Tokenizer) -> _Prepared:
    """This process's chunks `[index::count]` of a random-access chunk source."""
    chunks = grain.MapDataset.source(chunk_source)[index::count]
    if len(chunks) == 0:
        raise ValueError(
            f"process {index} of process_count={count} gets no data from the {split!r} "
            f"split of {source!r}"
        )
    return _Prepared(chunks=chunks, tokenizer=tok)


# Arguments `DataConfig` always passes (so train and eval agree); gin refuses a
# binding on them and `experiments.runtime.gin_utils.parse` names the binding
# to write instead. Direct Python callers still pass them as usual.
_SET_BY_DATA_CONFIG = {
    "source": "DataConfig.source",
    "seq_len": "DataConfig.seq_len",
    "tokenizer": "DataConfig.tokenizer",
    "validation_fraction": "DataConfig.validation_fraction",
    "cache_dir": "DataConfig.cache_dir",
    "max_bytes_per_domain": "DataConfig.max_bytes_per_domain",
    "process_index": "make_sharded_train_iterator.data_shards (shards follow the processes)",
    "process_count": "make_sharded_train_iterator.data_shards (shards follow the processes)",
}
_TRAIN_SET_BY = {**_SET_BY_DATA_CONFIG, "batch_size": "DataConfig.batch_size",
                 "seed": "train.seed"}
_EVAL_SET_BY = {**_SET_BY_DATA_CONFIG, "batch_size": "DataConfig.eval_batch_size"}


@gin.configurable(denylist=list(_TRAIN_SET_BY))
def make_train_iterator(
    source: str = "embedded",
    *,
    seq_len: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    tokenizer: str | Tokenizer = "byte",
    process_index: int | None = None,
    process_count: int | None = None,
    num_packing_bins: int | None = None,
    add_bos: bool = False,
    validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION,
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes_per_domain: int = corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
) -> grain.DatasetIterator:
    """Endless iterator of packed training batches (see the module docstring).

    In a training run `DataConfig` passes every argument but `num_packing_bins`
    and `add_bos`, the two that gin may bind here.

    Args:
      source: 'embedded', 'text:<glob>', 'jsonl:<path>' or 'shards:<dir>' (prepared by
        scripts/prepare_data.py; see experiments/data/shards.py).
      seq_len: Row length S.
      batch_size: Rows per batch B on this process.
      seed: Seeds the chunk shuffle (reshuffled each epoch) and the order of
        packed rows; in [0, 2**32).
      tokenizer: 'byte', 'sentencepiece:<path>' or a Tokenizer.
      process_index: This process's shard; default ``jax.process_index()``.
      process_count: Number of shards; default ``jax.process_count()``.
      num_packing_bins: Rows packed at once; more bins, less padding. Default
        ``2 * batch_size``.
      add_bos: Prepend BOS to every document (then its first token is trained).
      validation_fraction: Share of documents held out (split by path hash).
      cache_dir: Embedded-corpus cache; default
        :func:`experiments.data.corpus.default_cache_dir`.
      max_bytes_per_domain: Embedded-corpus size cap per domain.

    Returns:
      A grain ``DatasetIterator`` of batch dicts; checkpoint it with
      :func:`iterator_state` / :func:`restore_iterator_state`.
    """
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed < 2**32
    ):
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    _check_positive("batch_size", batch_size)
    if num_packing_bins is None:
        num_packing_bins = 2 * batch_size
    _check_positive("num_packing_bins", num_packing_bins)
    prepared = _prepare(
        source,
        "train",
        seq_len=seq_len,
        batch_size=batch_size,
        tokenizer=tokenizer,
        process_index=process_index,
        process_count=process_count,
        add_bos=add_bos,
        validation_fraction=validation_fraction,
        cache_dir=cache_dir,
        max_bytes_per_domain=max_bytes_per_domain,
    )
    ds = _packed_dataset(
        epoch_shuffled(prepared.chunks, int(seed)),
        seq_len=seq_len,
        batch_size=batch_size,
        num_packing_bins=num_packing_bins,
        pad_id=prepared.tokenizer.pad_id,
        seed=int(seed),
        shuffle_bins=True,
    )
    return iter(ds.batch(batch_size, drop_remainder=True))


@gin.configurable(denylist=list(_EVAL_SET_BY))
def make_eval_iterator(
    source: str = "embedded",
    *,
    seq_len: int = 128,
    batch_size: int = 16,
    tokenizer: str | Tokenizer = "byte",
    process_index: int | None = None,
    process_count: int | None = None,
    add_bos: bool = False,
    validation_fraction: float = corpus.DEFAULT_VALIDATION_FRACTION,
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes_per_domain: int = corpus.DEFAULT_MAX_BYTES_PER_DOMAIN,
) -> grain.DatasetIterator:
    """One deterministic pass over this process's shard of the validation split.

    Packed like training data (no shuffle; ``batch_size`` packing bins); the
    last batch is padded with empty rows (weights 0, domain -1) to
    ``batch_size``. Arguments as in :func:`make_train_iterator`; use the same
    ``source``, ``seq_len``, ``tokenizer`` and ``validation_fraction``. In a
    training run `DataConfig` passes every argument but ``add_bos``.
    """
    prepared = _prepare(
        source,
        "validation",
        seq_len=seq_len,
        batch_size=batch_size,
        tokenizer=tokenizer,
        process_index=process_index,
        process_count=process_count,
        add_bos=add_bos,
        validation_fraction=validation_fraction,
        cache_dir=cache_dir,
        max_bytes_per_domain=max_bytes_per_domain,
    )
    ds = _packed_dataset(
        prepared.chunks,
        seq_len=seq_len,
        batch_size=batch_size,
        num_packing_bins=batch_size,
        pad_id=prepared.tokenizer.pad_id,
        seed=0,
        shuffle_bins=False,
    )
    ds = ds.batch(batch_size, drop_remainder=False)
    return iter(ds.map(_PadBatch(batch_size, prepared.tokenizer.pad_id)))


make_train_iterator.gin_set_by = _TRAIN_SET_BY
make_eval_iterator.gin_set_by = _EVAL_SET_BY

_BYTES_TAG = "__bytes_base64__"
_TUPLE_TAG = "__tuple__"


def _to_json_compatible(value: Any) -> Any:
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"iterator state keys must be str, got {key!r}")
        return {k: _to_json_compatible(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_to_json_compatible(v) for v in value]}
    if isinstance(value, list):
        return [_to_json_compatible(v) for v in value]
    if isinstance(value, bytes):
        return {_BYTES_TAG: base64.b64encode(value).decode("ascii")}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"iterator state holds a value JSON cannot store: {value!r:.80}")


def _from_json_compatible(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES_TAG}:
            return base64.b64decode(value[_BYTES_TAG])
        if set(value) == {_TUPLE_TAG}:
            return tuple(_from_json_compatible(v) for v in value[_TUPLE_TAG])
        return {k: _from_json_compatible(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json_compatible(v) for v in value]
    return value


def iterator_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's position as a JSON-able dict (for ``ocp.args.JsonSave``)."""
    return _to_json_compatible(iterator.get_state())


def restore_iterator_state(
    iterator: grain.DatasetIterator, state: dict[str, Any]
) -> None:
    """Moves ``iterator`` to a position saved by :func:`iterator_state`.

    ``iterator`` must come from the same builder called with the same
    arguments as the one whose state was saved.
    """
    if not isinstance(state, dict):
        raise TypeError(
            f"state must be a dict from iterator_state(), got {type(state).__name__}"
        )
    iterator.set_state(_from_json_compatible(state))
