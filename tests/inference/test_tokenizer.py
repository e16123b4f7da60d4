"""Tokenizers of imported models: `HFTokenizer` over a tokenizer.json written here
with the `tokenizers` library (a tiny byte-level BPE), the `hf:` spec, and the
workdir tokenizer / EOS ids that scoring, generation and lm-eval use."""

from __future__ import annotations

import json

import gin
import numpy as np
import pytest

from experiments.data import pipeline
from experiments.data.config import DataConfig
from experiments.data.tokenizers import HFTokenizer, make_tokenizer
from experiments.inference import tokenizer as tok_lib
from tests.tokenizer_files import write_bpe_tokenizer

TEXT = "the cat sat, héllo 😀\n  indented"


def test_hf_tokenizer_ids_specials_and_round_trip(tmp_path):
    """Specials come from tokenizer_config.json; encode adds none; decode skips them;
    byte-level BPE round-trips any text (accents, emoji, newlines, spaces)."""
    path = write_bpe_tokenizer(tmp_path)
    tok = make_tokenizer(f"hf:{path}")
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode(TEXT)
    assert ids and all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode([1, *ids, 2, 0]) == TEXT
    assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat")  # merges
    np.testing.assert_array_equal(tok.encode_array(TEXT), np.asarray(ids, np.int32))
    assert make_tokenizer(f"hf:{tmp_path}").encode(TEXT) == ids  # a directory works too


def test_hf_tokenizer_special_tokens_when_configured(tmp_path):
    """add_special_tokens=True applies the tokenizer.json's post-processor (a BOS)."""
    path = write_bpe_tokenizer(tmp_path, bos_template=True)
    plain = HFTokenizer(path)
    with_bos = HFTokenizer(path, add_special_tokens=True)
    assert with_bos.encode(TEXT) == [1, *plain.encode(TEXT)]
    gin.clear_config()
    try:
        gin.parse_config("HFTokenizer.add_special_tokens = True")
        assert make_tokenizer(f"hf:{path}").encode("a cat")[0] == 1
    finally:
        gin.clear_config()


def test_hf_tokenizer_without_config_files(tmp_path):
    """No tokenizer_config.json / special_tokens_map.json: no BOS/EOS (-1), pad 0;
    special_tokens_map.json alone names them."""
    path = write_bpe_tokenizer(tmp_path, config=False)
    tok = HFTokenizer(path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, -1, -1)
    with pytest.raises(ValueError, match="has no EOS id"):
        pipeline.tokenize_documents([{"text": "a cat", "domain": "d"}], tok, ["d"])
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = HFTokenizer(path)
    assert (tok.pad_id, tok.eos_id) == (2, 2)  # pad falls back to EOS
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<end>"}))
    with pytest.raises(ValueError, match="eos_token '<end>' is not in the vocabulary"):
        HFTokenizer(path)


def test_hf_spec_refusals(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json not found"):
        make_tokenizer(f"hf:{tmp_path / 'none.json'}")
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    with pytest.raises(ValueError, match="not a tokenizer.json the tokenizers package reads"):
        make_tokenizer(f"hf:{tmp_path}")
    for bad in ("hf:", "hf", "huggingface:x"):
        with pytest.raises(ValueError, match=r"DataConfig.tokenizer must be one of .*'hf:"):
            DataConfig(tokenizer=bad)


def test_data_pipeline_trains_on_an_hf_tokenizer(tmp_path):
    """DataConfig.tokenizer = 'hf:...': batches of the BPE's ids, vocab_size its size."""
    path = write_bpe_tokenizer(tmp_path)
    data = DataConfig(tokenizer=f"hf:{path}", seq_len=16, batch_size=2,
                      max_bytes_per_domain=20000)
    assert data.vocab_size() == HFTokenizer(path).vocab_size
    batch = next(data.train_iterator(0))
    assert batch["inputs"].shape == (2, 16) and batch["inputs"].max() < data.vocab_size()


def test_workdir_tokenizer_precedence(tmp_path, monkeypatch):
    """tokenizer.json wins over tokenizer.model, which wins over the data tokenizer."""
    write_bpe_tokenizer(tmp_path)
    assert isinstance(tok_lib.workdir_tokenizer(tmp_path), HFTokenizer)
    sentinel = object()
    monkeypatch.setitem(tok_lib.WORKDIR_TOKENIZERS, "tokenizer.json", lambda p: sentinel)
    assert tok_lib.workdir_tokenizer(tmp_path) is sentinel
    (tmp_path / "tokenizer.json").unlink()
    gin.clear_config()
    assert type(tok_lib.workdir_tokenizer(tmp_path)).__name__ == "ByteTokenizer"


def test_workdir_eos_ids(tmp_path):
    """generation_config.json, else hf_import.json's config, else the tokenizer's EOS."""
    write_bpe_tokenizer(tmp_path)
    assert tok_lib.workdir_eos_ids(tmp_path) == [2]
    (tmp_path / "hf_import.json").write_text(json.dumps({"config": {"eos_token_id": 7}}))
    assert tok_lib.workdir_eos_ids(tmp_path) == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9, 5]}))
    assert tok_lib.workdir_eos_ids(tmp_path) == [5, 9]
    for name in ("generation_config.json", "hf_import.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    assert tok_lib.workdir_eos_ids(tmp_path) == []


def test_copy_tokenizer_files(tmp_path):
    write_bpe_tokenizer(tmp_path / "src")
    (tmp_path / "src" / "other.json").write_text("{}")
    (tmp_path / "dst").mkdir()
    assert tok_lib.copy_tokenizer_files(tmp_path / "src", tmp_path / "dst") == [
        "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"]
