"""Tokenizers: bytes (default) and an optional local SentencePiece model.

Both implement :class:`Tokenizer`: ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``vocab_size``, ``pad_id``, ``bos_id``,
``eos_id``, plus ``encode_array(str) -> [n] int32`` for the data pipeline.

:class:`ByteTokenizer` ids (vocab_size 259)::

    0 = pad, 1 = bos, 2 = eos, 3 + b = UTF-8 byte b (0..255)

SentencePiece models trained with :func:`train_sentencepiece` use the same
special ids (0 pad, 1 bos, 2 eos, 3 unk) and keep whitespace verbatim, so code
round-trips with its indentation and newlines. ``sentencepiece`` is an optional
dependency (the ``seqio`` extra) and is imported only when needed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import gin
import numpy as np

from experiments.data.files import write_atomically
from moe.validation import check_one_of


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the trainer need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@gin.configurable
class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids; no training, no unknowns."""

    PAD_ID = 0
    BOS_ID = 1
    EOS_ID = 2
    NUM_SPECIAL = 3

    @property
    def vocab_size(self) -> int:
        return 256 + self.NUM_SPECIAL

    @property
    def pad_id(self) -> int:
        return self.PAD_ID

    @property
    def bos_id(self) -> int:
        return self.BOS_ID

    @property
    def eos_id(self) -> int:
        return self.EOS_ID

    def encode_array(self, text: str) -> np.ndarray:
        """``[len(text.encode())] int32`` token ids."""
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return data.astype(np.int32) + self.NUM_SPECIAL

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """Drops special ids; invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(
                f"ids must be in [0, {self.vocab_size}), got {arr.min()}..{arr.max()}"
            )
        data = (arr[arr >= self.NUM_SPECIAL] - self.NUM_SPECIAL).astype(np.uint8)
        return data.tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _import_sentencepiece() -> Any:
    try:
        import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError(
            "SentencePiece support needs the optional 'sentencepiece' package: "
            "pip install -e '.[seqio]' (or pip install sentencepiece)"
        ) from e
    return sentencepiece


@gin.configurable(denylist=["model_path"])
class SentencePieceTokenizer:
    """A local SentencePiece ``.model`` file.

    ``pad_id`` falls back to 0 when the model defines none: padded positions
    are masked out by ``segment_ids``/``weights``, so the id only has to be
    valid. ``bos_id`` is -1 when the model has no BOS. A model without EOS is
    rejected, since the pipeline appends EOS to every document.
    """

    # Built by `make_tokenizer` from `DataConfig.tokenizer`, which names the file.
    gin_set_by: ClassVar[dict[str, str]] = {
        "model_path": "DataConfig.tokenizer = 'sentencepiece:<path>'"}

    def __init__(self, model_path: str | os.PathLike[str]):
        if not os.path.isfile(model_path):
            raise ValueError(f"model_path is not a file: {str(model_path)!r}")
        spm = _import_sentencepiece()
        self._model_path = str(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self._model_path)
        if self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model has no EOS id: {self._model_path!r}")

    @property
    def model_path(self) -> str:
        return self._model_path

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return max(int(self._sp.pad_id()), 0)

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text, out_type=int))

    def encode_array(self, text: str) -> np.ndarray:
        """``[num_pieces] int32`` token ids."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Control ids (pad, bos, eos) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self._model_path!r})"


TOKENIZER_SPECS = ("byte", "sentencepiece:<model path>")


def make_tokenizer(spec: str | Tokenizer = "byte") -> Tokenizer:
    """A tokenizer from ``'byte'`` or ``'sentencepiece:<path to .model>'``.

    A :class:`Tokenizer` instance is returned unchanged.
    """
    if not isinstance(spec, str):
        if isinstance(spec, Tokenizer):
            return spec
        raise ValueError(
            f"tokenizer must be one of {TOKENIZER_SPECS} or a Tokenizer, got {spec!r}"
        )
    if spec == "byte":
        return ByteTokenizer()
    kind, _, path = spec.partition(":")
    if kind == "sentencepiece" and path:
        return SentencePieceTokenizer(path)
    raise ValueError(f"tokenizer must be one of {TOKENIZER_SPECS}, got {spec!r}")


def encode_to_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """``[n] int32`` ids, through ``encode_array`` when the tokenizer has it."""
    encode_array = getattr(tokenizer, "encode_array", None)
    if encode_array is not None:
        return np.asarray(encode_array(text), dtype=np.int32)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


# SentencePiece treats each training sentence as a line of at most
# `max_sentence_length` bytes; documents are cut into runs of whole lines below
# that, keeping the "\n" characters so their counts are seen.
_MAX_SENTENCE_BYTES = 4096
# Pieces that must never merge with neighbours, so indentation and line
# structure survive tokenization intact.
_WHITESPACE_SYMBOLS = ("\n", "\t", "\r")


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            line_size = len(line.encode("utf-8"))
            if chunk and size + line_size > _MAX_SENTENCE_BYTES:
                yield "".join(chunk)
                chunk, size = [], 0
            if line_size > _MAX_SENTENCE_BYTES:
                # Drop the rest of an overlong line; byte fallback covers it.
                line = line.encode("utf-8")[:_MAX_SENTENCE_BYTES].decode(
                    "utf-8", errors="ignore"
                )
                line_size = len(line.encode("utf-8"))
            chunk.append(line)
            size += line_size
        if chunk:
            yield "".join(chunk)


MODEL_TYPES = ("bpe", "unigram")


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str | os.PathLike[str],
    *,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    input_sentence_size: int = 1_000_000,
    num_threads: int | None = None,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Trains a whitespace-preserving SentencePiece model and writes it.

    The settings keep text verbatim: identity normalization, no collapsing of
    spaces, no dummy-prefix space, whitespace-only pieces allowed (runs of
    indentation become single pieces), ``\\n``, ``\\t`` and ``\\r`` as their own
    pieces, and byte fallback so any string round-trips exactly.

    Args:
      texts: Training documents.
      model_path: The ``.model`` file to write (atomically).
      vocab_size: Number of pieces, including the 4 specials and 256 bytes.
      model_type: One of :data:`MODEL_TYPES`.
      input_sentence_size: Cap on sampled training sentences (0 = all).
      num_threads: Trainer threads; default ``os.cpu_count()``.
      seed: Seed of the sentence sampling.

    Returns:
      The trained tokenizer loaded from ``model_path``.
    """
    check_one_of("model_type", model_type, MODEL_TYPES)
    min_vocab = 4 + 256 + len(_WHITESPACE_SYMBOLS) + 1
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be >= {min_vocab}, got {vocab_size}")
    spm = _import_sentencepiece()
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9995,
        user_defined_symbols=list(_WHITESPACE_SYMBOLS),
        max_sentence_length=_MAX_SENTENCE_BYTES * 4,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    path = Path(model_path)
    write_atomically(path, model.getvalue())
    return SentencePieceTokenizer(path)
