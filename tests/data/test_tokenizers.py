"""Tests for experiments.data.tokenizers and scripts/train_tokenizer.py."""

from __future__ import annotations

import importlib.util
import json
import json.decoder
import json.encoder
import string
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments.data import tokenizers
from experiments.data.tokenizers import ByteTokenizer, make_tokenizer
from tests.helpers import path_with_both_splits

HAS_SENTENCEPIECE = importlib.util.find_spec("sentencepiece") is not None
needs_sentencepiece = pytest.mark.skipif(
    not HAS_SENTENCEPIECE,
    reason="optional dependency 'sentencepiece' is not installed (pip install -e '.[seqio]')",
)

CODE_SAMPLE = (
    "class Stack:\n"
    '    """A LIFO stack."""\n'
    "\n"
    "    def push(self, item):\n"
    "\tif item is None:  # tab-indented\n"
    "            raise ValueError('no  None')\n"
    "        self._items.append(item)   \n"
    "\n\n"
    "  # ünïcode ☃ and \r\n line endings\x00\n"
)


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    assert tok.encode("A") == [ord("A") + 3]
    assert tok.encode("") == []
    ids = tok.encode(CODE_SAMPLE)
    assert len(ids) == len(CODE_SAMPLE.encode("utf-8"))
    assert min(ids) >= 3 and max(ids) < 259
    assert tok.decode(ids) == CODE_SAMPLE
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == CODE_SAMPLE
    arr = tok.encode_array(CODE_SAMPLE)
    assert arr.dtype == np.int32 and arr.tolist() == ids


def test_byte_tokenizer_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="ids must be in"):
        ByteTokenizer().decode([300])


def test_make_tokenizer():
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    tok = ByteTokenizer()
    assert make_tokenizer(tok) is tok
    for bad in ("bytes", "sentencepiece:", "spm:x.model", 3):
        with pytest.raises(ValueError, match="tokenizer must be one of"):
            make_tokenizer(bad)


def test_sentencepiece_missing_model_file(tmp_path):
    with pytest.raises(ValueError, match="model_path"):
        tokenizers.SentencePieceTokenizer(tmp_path / "missing.model")


def _training_texts() -> list[str]:
    # A small corpus of real code and docstrings: a few stdlib modules.
    modules = (json.decoder, json.encoder, textwrap, string)
    return [Path(m.__file__).read_text(encoding="utf-8") for m in modules]


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    if not HAS_SENTENCEPIECE:
        pytest.skip("optional dependency 'sentencepiece' is not installed")
    path = tmp_path_factory.mktemp("spm") / "code.model"
    return tokenizers.train_sentencepiece(_training_texts(), path, vocab_size=600)


@needs_sentencepiece
def test_sentencepiece_round_trips_code_exactly(spm_tokenizer):
    tok = spm_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 300 < tok.vocab_size <= 600
    ids = tok.encode(CODE_SAMPLE)
    assert tok.decode(ids) == CODE_SAMPLE
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == CODE_SAMPLE
    assert tok.encode_array(CODE_SAMPLE).tolist() == ids
    for text in ("    x = 1\n", "\n\n\t\t\n", "  leading and trailing  ", ""):
        assert tok.decode(tok.encode(text)) == text
    # Whitespace is kept as tokens and compresses: indentation runs are single pieces.
    pieces = [tok._sp.id_to_piece(i) for i in tok.encode("        return x\n")]
    assert "\n" in pieces and "▁" * 8 in pieces


@needs_sentencepiece
def test_sentencepiece_compresses_better_than_bytes(spm_tokenizer):
    text = _training_texts()[0]
    assert len(spm_tokenizer.encode(text)) < 0.6 * len(ByteTokenizer().encode(text))


@needs_sentencepiece
def test_make_tokenizer_loads_sentencepiece(spm_tokenizer):
    tok = make_tokenizer(f"sentencepiece:{spm_tokenizer.model_path}")
    assert tok.encode(CODE_SAMPLE) == spm_tokenizer.encode(CODE_SAMPLE)


@needs_sentencepiece
def test_train_sentencepiece_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizers.train_sentencepiece(["x"], tmp_path / "m.model", vocab_size=100)
    with pytest.raises(ValueError, match="model_type"):
        tokenizers.train_sentencepiece(["x"], tmp_path / "m.model", model_type="word")


@needs_sentencepiece
def test_train_tokenizer_script(tmp_path, capsys):
    script = Path(__file__).resolve().parents[2] / "scripts" / "train_tokenizer.py"
    spec = importlib.util.spec_from_file_location("train_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    texts = _training_texts() * 3
    # Both splits non-empty, so the validation report prints.
    data = path_with_both_splits(
        lambda i: tmp_path / f"data{i}.jsonl",
        lambda p: [[f"{p}:{n}" for n in range(1, len(texts) + 1)]], validation_fraction=0.3)
    with open(data, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "domain": "code", "id": i}))
            f.write("\n")
    output = tmp_path / "out" / "tok.model"
    argv = ["--source", f"jsonl:{data}", "--output", str(output), "--vocab_size", "500"]
    assert module.main([*argv, "--validation_fraction", "0.3"]) == 0
    assert output.is_file()
    out = capsys.readouterr().out
    assert "vocab_size=500" in out and "bytes per token" in out
    tok = tokenizers.SentencePieceTokenizer(output)
    assert tok.decode(tok.encode(CODE_SAMPLE)) == CODE_SAMPLE
