"""Tokenizers: bytes (default), a local SentencePiece model, a HF ``tokenizer.json``.

All implement :class:`Tokenizer`: ``encode(str) -> list[int]``,
``decode(list[int]) -> str``, ``vocab_size``, ``pad_id``, ``bos_id``,
``eos_id``, plus ``encode_array(str) -> [n] int32`` for the data pipeline.

:class:`ByteTokenizer` ids (vocab_size 259)::

    0 = pad, 1 = bos, 2 = eos, 3 + b = UTF-8 byte b (0..255)

SentencePiece models trained with :func:`train_sentencepiece` use the same
special ids (0 pad, 1 bos, 2 eos, 3 unk) and keep whitespace verbatim, so code
round-trips with its indentation and newlines. ``sentencepiece`` is an optional
dependency (the ``seqio`` extra) and is imported only when needed.

:class:`HFTokenizer` reads an imported model's ``tokenizer.json`` with the
``tokenizers`` package (byte-level BPE, WordPiece, Unigram, with their
normalizers, pre-tokenizers and added tokens exactly as transformers applies
them); its special ids come from ``tokenizer_config.json`` /
``special_tokens_map.json`` next to it.
"""

from __future__ import annotations

import io
import json
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


# The special tokens' keys of tokenizer_config.json / special_tokens_map.json.
_SPECIAL_KEYS = {"pad": "pad_token", "bos": "bos_token", "eos": "eos_token"}
HF_TOKENIZER_FILE = "tokenizer.json"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token as the config files write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@gin.configurable(denylist=["path"])
class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` package).

    Special tokens (pad, bos, eos) are named by ``tokenizer_config.json``, else
    ``special_tokens_map.json``, in the same directory; an id is -1 when no file
    names it (``pad_id`` then falls back to ``eos_id``, else 0: padded positions
    are masked, the id only has to be valid). ``encode`` adds no special tokens
    unless ``add_special_tokens`` (the tokenizer.json's post-processor, e.g. a
    Llama BOS); ``decode`` skips special tokens. ``vocab_size`` counts added
    tokens (a model's embedding may have more rows: ``train.vocab_size``).
    """

    gin_set_by: ClassVar[dict[str, str]] = {
        "path": "DataConfig.tokenizer = 'hf:<path to tokenizer.json>'"}

    def __init__(self, path: str | os.PathLike[str], add_special_tokens: bool = False):
        path = Path(path)
        if path.is_dir():
            path = path / HF_TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"tokenizer.json not found: {str(path)!r}")
        try:
            from tokenizers import Tokenizer as _HF  # pylint: disable=g-import-not-at-top
        except ImportError as e:
            raise ImportError("a tokenizer.json needs the 'tokenizers' package: "
                              "pip install 'tokenizers>=0.21,<1'") from e
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # the Rust side raises its own Exception type
            raise ValueError(f"{path}: not a tokenizer.json the tokenizers package reads "
                             f"({e})") from None
        self._path = path
        self.add_special_tokens = bool(add_special_tokens)
        config = _read_json(path.parent / "tokenizer_config.json")
        special_map = _read_json(path.parent / "special_tokens_map.json")
        self._ids: dict[str, int] = {}
        for name, key in _SPECIAL_KEYS.items():
            content = _token_content(config.get(key)) or _token_content(special_map.get(key))
            token_id = self._tok.token_to_id(content) if content is not None else None
            if content is not None and token_id is None:
                raise ValueError(f"{path}: {key} {content!r} is not in the vocabulary")
            self._ids[name] = -1 if token_id is None else int(token_id)

    @property
    def path(self) -> str:
        return str(self._path)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def pad_id(self) -> int:
        if self._ids["pad"] >= 0:
            return self._ids["pad"]
        return max(self._ids["eos"], 0)

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids)

    def encode_array(self, text: str) -> np.ndarray:
        """``[n] int32`` token ids."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Special tokens (pad, bos, eos, added specials) decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self._path)!r})"


TOKENIZER_SPECS = ("byte", "sentencepiece:<model path>", "hf:<tokenizer.json path>")
_PATH_KINDS = ("sentencepiece", "hf")


def check_tokenizer_spec(spec: str, name: str = "tokenizer") -> None:
    """Refuses a spec string that is none of `TOKENIZER_SPECS` (files are not opened)."""
    kind, _, path = str(spec).partition(":")
    if spec != "byte" and not (kind in _PATH_KINDS and path):
        raise ValueError(f"{name} must be one of {TOKENIZER_SPECS}, got {spec!r}")


def make_tokenizer(spec: str | Tokenizer = "byte") -> Tokenizer:
    """A tokenizer from ``'byte'``, ``'sentencepiece:<path to .model>'`` or
    ``'hf:<path to tokenizer.json>'`` (its directory also works).

    A :class:`Tokenizer` instance is returned unchanged.
    """
    if not isinstance(spec, str):
        if isinstance(spec, Tokenizer):
            return spec
        raise ValueError(
            f"tokenizer must be one of {TOKENIZER_SPECS} or a Tokenizer, got {spec!r}"
        )
    check_tokenizer_spec(spec)
    if spec == "byte":
        return ByteTokenizer()
    kind, _, path = spec.partition(":")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)


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
