"""Tests for the grain pipeline (experiments.data.pipeline) and the sources it reads."""

from __future__ import annotations

import itertools
import json
import string
from collections import Counter

import gin
import grain
import numpy as np
import pytest

from experiments.data import pipeline as data
from experiments.data import sources
from experiments.data.config import DataConfig
from experiments.data.corpus import select_split
from experiments.data.tokenizers import ByteTokenizer
from experiments.runtime import gin_utils
from tests.helpers import path_with_both_splits

SEQ_LEN = 16
BATCH = 4
EOS = ByteTokenizer.EOS_ID
BOS = ByteTokenizer.BOS_ID
PAD = ByteTokenizer.PAD_ID
MAX_BYTES = 40_000
# Each JSONL document repeats one letter, so a token tells its document.
LETTERS = string.ascii_letters[:30]


def letter_id(letter: str) -> int:
    return ByteTokenizer().encode(letter)[0]


@pytest.fixture(scope="module")
def jsonl_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("jsonl")
    domain_of = ["alpha" if i % 2 else "beta" for i in range(len(LETTERS))]
    path = path_with_both_splits(
        lambda i: directory / f"docs{i}.jsonl",
        lambda p: [[f"{p}:{line}" for line, d in enumerate(domain_of, start=1) if d == domain]
                   for domain in ("alpha", "beta")],
        validation_fraction=0.4)
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for i, letter in enumerate(LETTERS):
            length = 1 + int(rng.integers(0, 3 * SEQ_LEN))  # Some span several rows.
            record = {"text": letter * length, "domain": domain_of[i]}
            f.write(json.dumps(record) + "\n")
        f.write("\n")  # Blank lines are skipped.
    return str(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus_cache")


def jsonl_kwargs(jsonl_path, **overrides):
    kwargs = {
        "source": f"jsonl:{jsonl_path}",
        "seq_len": SEQ_LEN,
        "batch_size": BATCH,
        "process_index": 0,
        "process_count": 1,
        "validation_fraction": 0.4,
    }
    return {**kwargs, **overrides}


def embedded_kwargs(cache_dir, **overrides):
    kwargs = {
        "source": "embedded",
        "seq_len": 64,
        "batch_size": BATCH,
        "process_index": 0,
        "process_count": 1,
        "validation_fraction": 0.3,
        "cache_dir": cache_dir,
        "max_bytes_per_domain": MAX_BYTES,
    }
    return {**kwargs, **overrides}


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


def segments(batches):
    """Every packed segment as (tokens of the chunk, domain id), in order."""
    out = []
    for b in batches:
        for row in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][row]
            for s in np.unique(seg[seg > 0]):
                m = seg == s
                tokens = (*b["inputs"][row][m].tolist(), int(b["targets"][row][m][-1]))
                out.append((tokens, int(b["domain"][row][m][0])))
    return out


def check_packing_invariants(batch, seq_len, batch_size, pad_id=PAD):
    expected = {
        "inputs": np.int32,
        "targets": np.int32,
        "weights": np.float32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "domain": np.int32,
    }
    assert set(batch) == set(expected)
    for k, dtype in expected.items():
        assert batch[k].shape == (batch_size, seq_len), k
        assert batch[k].dtype == dtype, k
    for row in range(batch_size):
        seg = batch["segment_ids"][row]
        pos = batch["positions"][row]
        real = seg > 0
        # Segments are 1, 2, 3... in order; padding (0) only at the end.
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any()
        if n_real:
            assert seg[0] == 1
            assert set(np.diff(seg[:n_real]).tolist()) <= {0, 1}
        # Positions restart at 0 at every segment and count up inside it.
        starts = np.r_[True, seg[1:] != seg[:-1]] & real
        assert np.all(pos[starts] == 0)
        inner = np.nonzero(real & ~starts)[0]
        assert np.all(pos[inner] == pos[inner - 1] + 1)
        # Loss mask and padding values.
        np.testing.assert_array_equal(batch["weights"][row], real.astype(np.float32))
        assert np.all(batch["domain"][row][~real] == -1) and np.all(
            batch["domain"][row][real] >= 0
        )
        assert np.all(batch["inputs"][row][~real] == pad_id)
        assert np.all(pos[~real] == 0)
        # Within a segment the targets are the inputs shifted by one.
        same_next = real[:-1] & (seg[1:] == seg[:-1])
        np.testing.assert_array_equal(
            batch["targets"][row][:-1][same_next], batch["inputs"][row][1:][same_next]
        )


def test_embedded_batches_have_the_documented_format(cache_dir):
    iterator = data.make_train_iterator(**embedded_kwargs(cache_dir))
    for batch in take(iterator, 5):
        check_packing_invariants(batch, 64, BATCH)
        assert set(np.unique(batch["domain"])) <= {-1, 0, 1}
        assert batch["weights"].mean() > 0.9  # Packing leaves little padding.


def test_targets_never_cross_a_document_boundary(jsonl_path):
    batches = take(data.make_train_iterator(**jsonl_kwargs(jsonl_path)), 30)
    for batch in batches:
        check_packing_invariants(batch, SEQ_LEN, BATCH)
    for tokens, _ in segments(batches):
        assert 2 <= len(tokens) <= SEQ_LEN + 1
        # One letter per chunk; EOS only as the chunk's final target.
        assert len(set(tokens[:-1])) == 1 and tokens[0] != EOS
        assert tokens[-1] in (tokens[0], EOS)


def test_eval_pass_covers_every_next_token_pair_once_with_domains(jsonl_path):
    kwargs = jsonl_kwargs(jsonl_path)
    split = sources.load_source_split(
        kwargs["source"], "validation", validation_fraction=0.4
    )
    assert split.domains == ["alpha", "beta"]
    batches = list(data.make_eval_iterator(**kwargs))
    expected = Counter()
    for r in split.records:
        # A document of m bytes gets EOS appended: m (input, target) pairs.
        expected[(letter_id(r["text"][0]), split.domain_id(r["domain"]))] += len(
            r["text"]
        )
    got = Counter()
    for b in batches:
        check_packing_invariants(b, SEQ_LEN, BATCH)
        real = b["weights"] > 0
        got.update(
            zip(b["inputs"][real].tolist(), b["domain"][real].tolist(), strict=True)
        )
    assert got == expected
    # Long documents were chunked: more segments than documents.
    assert len(segments(batches)) > len(split.records)


def test_one_domain_of_the_embedded_corpus_keeps_the_domain_names(cache_dir):
    # 'embedded:code' (a fine-tune on one domain, MoLA): the code documents of the split,
    # the domain vocabulary (hence the ids) of the whole corpus.
    whole, code = (sources.load_source_split(source, "train", cache_dir=cache_dir,
                                             max_bytes_per_domain=MAX_BYTES)
                   for source in ("embedded", "embedded:code"))
    assert code.domains == whole.domains == ["code", "prose"]
    assert code.records and code.records == [r for r in whole.records if r["domain"] == "code"]


def test_eval_domain_labels_match_the_embedded_validation_split(cache_dir):
    kwargs = embedded_kwargs(cache_dir)
    split = sources.load_source_split(
        "embedded",
        "validation",
        validation_fraction=0.3,
        cache_dir=cache_dir,
        max_bytes_per_domain=MAX_BYTES,
    )
    expected = Counter()
    for r in split.records:
        expected[split.domain_id(r["domain"])] += len(r["text"].encode("utf-8"))
    got = Counter()
    for b in data.make_eval_iterator(**kwargs):
        got.update(b["domain"][b["weights"] > 0].tolist())
    assert got == expected
    assert set(got) == {0, 1}


def test_eval_is_finite_deterministic_and_padded(jsonl_path):
    first = list(data.make_eval_iterator(**jsonl_kwargs(jsonl_path)))
    second = list(data.make_eval_iterator(**jsonl_kwargs(jsonl_path)))
    assert_batches_equal(first, second)
    assert all(b["inputs"].shape == (BATCH, SEQ_LEN) for b in first)
    last = first[-1]
    empty_rows = last["weights"].sum(axis=1) == 0
    assert np.all(last["domain"][empty_rows] == -1)


def test_same_seed_same_batches_other_seed_other_batches(jsonl_path):
    a = take(data.make_train_iterator(**jsonl_kwargs(jsonl_path, seed=7)), 8)
    b = take(data.make_train_iterator(**jsonl_kwargs(jsonl_path, seed=7)), 8)
    c = take(data.make_train_iterator(**jsonl_kwargs(jsonl_path, seed=8)), 8)
    assert_batches_equal(a, b)
    assert any(
        not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c, strict=True)
    )


@pytest.mark.parametrize("source", ["jsonl", "embedded"])
def test_resume_from_json_state_is_bit_identical(source, jsonl_path, cache_dir):
    if source == "jsonl":
        kwargs = jsonl_kwargs(jsonl_path, seed=3)
    else:
        kwargs = embedded_kwargs(cache_dir, seed=3)
    n, m = 7, 9  # The JSONL source's epoch is shorter than n + m batches.
    iterator = data.make_train_iterator(**kwargs)
    take(iterator, n)
    saved = json.loads(json.dumps(data.iterator_state(iterator)))
    expected = take(iterator, m)
    restored = data.make_train_iterator(**kwargs)
    data.restore_iterator_state(restored, saved)
    assert_batches_equal(take(restored, m), expected)


def test_training_repeats_epochs_with_a_new_order_each_time(jsonl_path):
    split = sources.load_source_split(
        f"jsonl:{jsonl_path}", "train", validation_fraction=0.4
    )
    tokens_per_epoch = sum(len(r["text"]) for r in split.records)
    batches = take(data.make_train_iterator(**jsonl_kwargs(jsonl_path)), 60)
    epochs = sum(b["weights"].sum() for b in batches) / tokens_per_epoch
    assert epochs > 3
    per_letter = Counter()
    for b in batches:
        per_letter.update(b["inputs"][b["weights"] > 0].tolist())
    for r in split.records:  # Every document keeps coming back.
        assert per_letter[letter_id(r["text"][0])] >= (int(epochs) - 1) * len(r["text"])
    order = data.epoch_shuffled(grain.MapDataset.range(10), seed=0)
    epoch0, epoch1 = [order[i] for i in range(10)], [order[i] for i in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1


def test_process_shards_partition_the_data(jsonl_path):
    whole = Counter(
        map(repr, segments(data.make_eval_iterator(**jsonl_kwargs(jsonl_path))))
    )
    shards = [
        Counter(
            map(
                repr,
                segments(
                    data.make_eval_iterator(
                        **jsonl_kwargs(jsonl_path, process_index=i, process_count=2)
                    )
                ),
            )
        )
        for i in range(2)
    ]
    assert all(shards)
    assert shards[0] + shards[1] == whole
    train = [
        take(
            data.make_train_iterator(
                **jsonl_kwargs(jsonl_path, process_index=i, process_count=2)
            ),
            2,
        )
        for i in range(2)
    ]
    assert not np.array_equal(train[0][0]["inputs"], train[1][0]["inputs"])


def test_add_bos_starts_each_document_with_bos(jsonl_path):
    batches = take(
        data.make_train_iterator(**jsonl_kwargs(jsonl_path, add_bos=True)), 10
    )
    bos_seen = 0
    for b in batches:
        check_packing_invariants(b, SEQ_LEN, BATCH)
        is_bos = b["inputs"] == BOS
        assert np.all(b["positions"][is_bos] == 0)
        assert not np.any(b["targets"] == BOS)
        bos_seen += int(is_bos.sum())
    assert bos_seen > 0


def test_default_process_shard_comes_from_jax(jsonl_path):
    kwargs = jsonl_kwargs(jsonl_path)
    del kwargs["process_index"], kwargs["process_count"]
    default = take(data.make_train_iterator(**kwargs), 2)
    explicit = take(data.make_train_iterator(**jsonl_kwargs(jsonl_path)), 2)
    assert_batches_equal(default, explicit)


def test_gin_configures_the_train_iterator(jsonl_path):
    # The train and eval iterators take their shared settings from DataConfig.
    try:
        gin.bind_parameter("DataConfig.seq_len", 24)
        gin.bind_parameter("DataConfig.batch_size", 3)
        config = DataConfig(source=f"jsonl:{jsonl_path}", validation_fraction=0.4)
        batch = next(config.train_iterator(0, process_index=0, process_count=1))
    finally:
        gin.clear_config()
    check_packing_invariants(batch, 24, 3)


@pytest.mark.parametrize("binding, instead", [
    ("make_train_iterator.seq_len = 24", "DataConfig.seq_len"),
    ("make_eval_iterator.seq_len = 24", "DataConfig.seq_len"),
    ("make_train_iterator.batch_size = 3", "DataConfig.batch_size"),
    ("make_eval_iterator.batch_size = 3", "DataConfig.eval_batch_size"),
    ("make_train_iterator.source = 'embedded'", "DataConfig.source"),
    ("load_jsonl.path = 'x.jsonl'", "DataConfig.source = 'jsonl:<path>'"),
    ("load_text_files.pattern = '*.txt'", "DataConfig.source = 'text:<glob>'"),
    ("SentencePieceTokenizer.model_path = 'm.model'",
     "DataConfig.tokenizer = 'sentencepiece:<path>'"),
    ("HFTokenizer.path = 'tokenizer.json'", "DataConfig.tokenizer = 'hf:<path to tokenizer.json>'"),
])
def test_binding_a_value_dataconfig_sets_is_an_error_naming_where_to_bind_it(binding, instead):
    """DataConfig (or the source/tokenizer string) always passes these, so a binding
    on the iterator would be silently overridden: gin refuses it, and the message
    says which binding to write instead."""
    try:
        with pytest.raises(gin_utils.GinConfigError) as e:
            gin_utils.parse([], [binding])
    finally:
        gin.clear_config()
    configurable_and_param = binding.split("=")[0].strip()
    assert f"{configurable_and_param} cannot be bound" in str(e.value)
    assert f"bind {instead} instead" in str(e.value)


def test_iterator_options_dataconfig_does_not_set_stay_bindable(jsonl_path):
    try:
        gin_utils.parse([], ["make_train_iterator.add_bos = True",
                             "make_train_iterator.num_packing_bins = 5"])
        config = DataConfig(source=f"jsonl:{jsonl_path}", seq_len=SEQ_LEN, batch_size=BATCH,
                            validation_fraction=0.4)
        batches = take(config.train_iterator(0, process_index=0, process_count=1), 10)
        assert "make_train_iterator.add_bos = True" in gin.operative_config_str()
        assert "make_train_iterator.num_packing_bins = 5" in gin.operative_config_str()
    finally:
        gin.clear_config()
    assert any(np.any(b["inputs"] == BOS) for b in batches)


def test_text_file_source(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first file\n", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("second file, nested\n", encoding="utf-8")
    (tmp_path / "c.md").write_text("not matched", encoding="utf-8")
    records = sources.load_text_files(str(tmp_path / "**" / "*.txt"))
    assert [r["text"] for r in records] == ["first file\n", "second file, nested\n"]
    assert {r["domain"] for r in records} == {"text"}
    batch = next(
        data.make_train_iterator(
            f"text:{tmp_path}/**/*.txt",
            seq_len=32,
            batch_size=2,
            process_index=0,
            process_count=1,
            validation_fraction=0.0,
        )
    )
    check_packing_invariants(batch, 32, 2)
    with pytest.raises(ValueError, match="matched no files"):
        sources.load_text_files(str(tmp_path / "*.csv"))


def test_jsonl_source_fields_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x", "lang": "en"}\n\n{"body": "y"}\n', encoding="utf-8")
    records = sources.load_jsonl(
        str(path), text_field="body", domain_field="lang", default_domain="unknown"
    )
    assert records == [
        {"text": "x", "domain": "en", "path": f"{path}:1"},
        {"text": "y", "domain": "unknown", "path": f"{path}:3"},
    ]
    for content, match in [
        ('{"text": "ok"}\nnot json\n', "invalid JSON"),
        ('{"txt": "missing"}\n', "text_field 'text'"),
        ('{"text": "x", "domain": 3}\n', "domain_field 'domain'"),
        ("[1, 2]\n", "expected a JSON object"),
        ("\n\n", "no records"),
    ]:
        path.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=match):
            sources.load_jsonl(str(path))
    with pytest.raises(ValueError, match="not a file"):
        sources.load_jsonl(str(tmp_path / "missing.jsonl"))


def test_split_records_keep_their_split_across_sources(jsonl_path):
    records = sources.load_source(f"jsonl:{jsonl_path}")
    train = sources.load_source_split(
        f"jsonl:{jsonl_path}", "train", validation_fraction=0.4
    )
    assert train.records == select_split(records, "train", 0.4)


def test_chunk_bounds_overlap_by_one_token():
    offsets = np.array([0, 1, 3, 8, 17])  # Documents of 1, 2, 5 and 9 tokens.
    starts, ends, doc = data.chunk_bounds(offsets, seq_len=4)
    assert starts.tolist() == [1, 3, 8, 12]
    assert ends.tolist() == [3, 8, 13, 17]
    assert doc.tolist() == [1, 2, 3, 3]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"source": "hf:wikitext"}, "source must be"),
        ({"source": "embedded:x"}, r"takes a domain of the embedded corpus \(.code., .prose.\)"),
        ({"source": "text:"}, "needs an argument"),
        ({"seq_len": 0}, "seq_len must be a positive int"),
        ({"seq_len": -4}, "seq_len must be a positive int"),
        ({"seq_len": 8.0}, "seq_len must be a positive int"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"seed": -1}, "seed must be an int"),
        ({"seed": 2**32}, "seed must be an int"),
        ({"num_packing_bins": 0}, "num_packing_bins"),
        ({"process_index": 2, "process_count": 2}, "process_index must be in"),
        ({"process_count": 0}, "process_count must be a positive int"),
        ({"tokenizer": "wordpiece"}, "tokenizer must be one of"),
        ({"validation_fraction": 1.5}, "validation_fraction"),
    ],
)
def test_bad_train_arguments_raise(jsonl_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        data.make_train_iterator(**jsonl_kwargs(jsonl_path, **overrides))


def test_empty_validation_split_raises(jsonl_path):
    with pytest.raises(ValueError, match="split of source .* is empty"):
        data.make_eval_iterator(**jsonl_kwargs(jsonl_path, validation_fraction=0.0))


def test_restore_rejects_non_dict_state(jsonl_path):
    iterator = data.make_train_iterator(**jsonl_kwargs(jsonl_path))
    with pytest.raises(TypeError, match="state must be a dict"):
        data.restore_iterator_state(iterator, "[]")
