"""Training a byte-level BPE `tokenizer.json` with the `tokenizers` package.

`train_byte_level_bpe` writes a directory that `HFTokenizer` (`tokenizer='hf:<dir>'`)
and transformers' `AutoTokenizer` read as they are:

  tokenizer.json         byte-level BPE (GPT-2's byte-to-unicode alphabet, so every
                         string round-trips exactly and there is no unknown token),
                         no normalizer, ByteLevel pre-tokenizer without a prefix space,
                         ByteLevel decoder; the special tokens are added tokens.
  tokenizer_config.json  `pad_token`, `bos_token`, `eos_token`: the names HFTokenizer
                         takes the pad/bos/eos ids from.

Ids: 0 `<|pad|>`, 1 `<|bos|>`, 2 `<|eos|>`, then the 256 byte symbols, then the
merges. Text that spells a special token literally is encoded as that token (as
every tokenizer with added tokens does). Training is deterministic for the same
texts in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + 1  # the specials, the bytes, one merge
OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json")


def train_byte_level_bpe(texts: Iterable[str], output_dir: str | os.PathLike[str], *,
                         vocab_size: int = 8192, min_frequency: int = 2) -> Path:
    """Trains a byte-level BPE on `texts` and writes `output_dir` (atomically:
    a temporary directory renamed into place; an earlier output of this function
    there is replaced, any other non-empty directory refused).

    Args:
      texts: training documents.
      output_dir: the directory to write (`OUTPUT_FILES`).
      vocab_size: ids in all, the 3 specials and 256 bytes included (at most:
        a small corpus may run out of pairs seen `min_frequency` times).
      min_frequency: a pair is merged only if seen at least this many times.

    Returns:
      The path of the written `tokenizer.json`.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (3 special tokens, "
                         f"256 bytes and a merge), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) \
            or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    out = Path(output_dir)
    _check_output(out)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": PAD,
              "bos_token": BOS, "eos_token": EOS, "clean_up_tokenization_spaces": False}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer.save(str(tmp / OUTPUT_FILES[0]))
        (tmp / OUTPUT_FILES[1]).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / OUTPUT_FILES[0]


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is a file; a BPE tokenizer is written as a "
                         f"directory ({', '.join(OUTPUT_FILES)})")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if other:
            raise ValueError(f"output {str(out)!r} holds other files ({', '.join(other[:3])}); "
                             f"give a new or empty directory")


def _replace_dir(new: Path, out: Path) -> None:
    """Renames `new` to `out`; an existing `out` is moved aside first, then removed."""
    if not out.exists():
        new.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)
