"""Tests for the embedded stdlib corpus (experiments.data.corpus)."""

from __future__ import annotations

import ast
import math
from collections import Counter

import pytest

from experiments.data import corpus

MAX_BYTES = 40_000


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


@pytest.fixture(scope="module")
def records(cache_dir):
    return corpus.load_corpus(cache_dir=cache_dir, max_bytes_per_domain=MAX_BYTES)


def test_both_domains_are_present_and_labelled(records):
    assert corpus.domain_names() == ["code", "prose"]
    counts = Counter(r["domain"] for r in records)
    assert set(counts) == {"code", "prose"}
    for r in records:
        assert set(r) == {"text", "domain", "path"}
        assert isinstance(r["text"], str) and r["text"]
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths))


def test_domains_hold_the_right_kind_of_text(records):
    for r in records:
        if r["domain"] == "code":
            assert r["path"].startswith("stdlib/") and r["path"].endswith(".py")
            assert "/test/" not in r["path"] and "/tests/" not in r["path"]
            ast.parse(r["text"])  # Real Python source.
        else:
            assert r["path"].endswith("::docstrings") or r["path"].startswith(
                "pydoc_data/topics/"
            )


def test_each_domain_respects_the_byte_cap(records):
    for domain in corpus.DOMAINS:
        size = sum(
            len(r["text"].encode("utf-8")) for r in records if r["domain"] == domain
        )
        assert 0 < size <= MAX_BYTES


def test_cache_is_written_once_and_reused(cache_dir, records, monkeypatch):
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".jsonl"  # No temp files left.

    def fail(*args, **kwargs):
        raise AssertionError("the corpus was rebuilt despite the cache")

    monkeypatch.setattr(corpus, "build_corpus", fail)
    assert (
        corpus.load_corpus(cache_dir=cache_dir, max_bytes_per_domain=MAX_BYTES)
        == records
    )


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(corpus.CACHE_ENV_VAR, str(tmp_path))
    assert corpus.default_cache_dir() == tmp_path / "corpus"
    monkeypatch.delenv(corpus.CACHE_ENV_VAR)
    assert corpus.default_cache_dir().parts[-3:] == (".cache", "sparse_moe", "corpus")


def test_split_is_disjoint_complete_and_deterministic(cache_dir, records):
    kwargs = {
        "validation_fraction": 0.3,
        "cache_dir": cache_dir,
        "max_bytes_per_domain": MAX_BYTES,
    }
    train = corpus.corpus_split("train", **kwargs)
    validation = corpus.corpus_split("validation", **kwargs)
    train_paths = {r["path"] for r in train}
    validation_paths = {r["path"] for r in validation}
    assert train_paths.isdisjoint(validation_paths)
    assert train_paths | validation_paths == {r["path"] for r in records}
    assert train and validation
    assert corpus.corpus_split("train", **kwargs) == train


def test_split_hash_is_pinned_and_keeps_sub_documents_with_their_file():
    # SHA-1 based, so these never change with PYTHONHASHSEED or platform.
    assert corpus.split_of("stdlib/json/decoder.py", 0.5) == "validation"
    assert corpus.split_of("stdlib/abc.py", 0.5) == "train"
    for path in ("stdlib/json/decoder.py", "stdlib/abc.py", "stdlib/os.py"):
        assert corpus.split_of(path + "::docstrings", 0.5) == corpus.split_of(path, 0.5)
    assert corpus.split_of("stdlib/json/decoder.py", 0.0) == "train"
    fraction = (
        sum(corpus.split_of(f"doc{i}", 0.25) == "validation" for i in range(4000))
        / 4000
    )
    assert 0.22 < fraction < 0.28


def test_module_docstrings_in_source_order():
    source = '"""Module."""\nclass A:\n    """Class A."""\n    def f(self):\n        """Method f."""\n'
    assert corpus.module_docstrings(source) == "Module.\n\nClass A.\n\nMethod f."
    assert corpus.module_docstrings("def broken(:\n") == ""


def test_unigram_entropy():
    uniform = corpus.unigram_entropy(
        [{"text": bytes(range(128)).decode("ascii"), "domain": "x", "path": "p"}]
    )
    assert uniform.bits_per_byte == pytest.approx(7.0)
    assert uniform.nats_per_byte == pytest.approx(7.0 * math.log(2))
    assert uniform.num_bytes == 128
    constant = corpus.unigram_entropy([{"text": "aaaa", "domain": "x", "path": "p"}])
    assert constant.bits_per_byte == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least one byte"):
        corpus.unigram_entropy([])


def test_split_unigram_entropy_is_plausible_for_text(cache_dir):
    stats = corpus.unigram_entropy(
        corpus.corpus_split("train", cache_dir=cache_dir, max_bytes_per_domain=MAX_BYTES)
    )
    assert 3.5 < stats.bits_per_byte < 6.0
    assert stats.num_bytes > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "test"}, "split must be one of"),
        ({"split": "train", "validation_fraction": 1.0}, "validation_fraction"),
        ({"split": "train", "validation_fraction": -0.1}, "validation_fraction"),
        ({"split": "train", "max_bytes_per_domain": 0}, "max_bytes_per_domain"),
    ],
)
def test_bad_arguments_raise(cache_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        corpus.corpus_split(cache_dir=cache_dir, **kwargs)


def test_missing_stdlib_dir_raises(tmp_path):
    with pytest.raises(ValueError, match="stdlib_dir"):
        corpus.load_corpus(cache_dir=tmp_path, stdlib_dir=tmp_path / "missing")
