"""A tiny HF `tokenizer.json` written by tests with the `tokenizers` library
(byte-level BPE, as GPT-2/Llama-3/Qwen use), plus its tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = ["the cat sat on the mat", "the dog sat on the log",
             "a cat and a dog", "hello world, hello tokens"] * 4
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2


def write_bpe_tokenizer(directory: str | Path, *, vocab_size: int = 300,
                        config: bool = True, bos_template: bool = False) -> Path:
    """Trains a byte-level BPE on `SENTENCES` (at most `vocab_size` ids, the 3
    specials first) and writes `tokenizer.json` (+ `tokenizer_config.json`
    naming pad/bos/eos when `config`); `bos_template`: its post-processor adds
    `<s>` when asked for special tokens. Returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config:
        # eos as transformers writes an AddedToken (a dict), the others as strings.
        eos = {"__type": "AddedToken", "content": "</s>", "lstrip": False,
               "normalized": False, "rstrip": False, "single_word": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": eos, "pad_token": "<pad>"}))
    return directory / "tokenizer.json"
