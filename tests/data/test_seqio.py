"""seqio Tasks/Mixtures (experiments.data.seqio_tasks) and the trainer bridge
(experiments.data.seqio_bridge). Skipped unless the `seqio` extra is installed; CI
runs them in a second virtual environment (`make test-seqio`)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

seqio = pytest.importorskip(
    "seqio", reason="the optional seqio extra is not installed (pip install -e '.[seqio]'); "
                    "`make test-seqio` runs these tests")
tf = pytest.importorskip("tensorflow")


from experiments.data import corpus, seqio_bridge, seqio_tasks  # noqa: E402
from experiments.data.config import DataConfig  # noqa: E402
from experiments.data.pipeline import iterator_state, restore_iterator_state  # noqa: E402
from experiments.data.tokenizers import ByteTokenizer, train_sentencepiece  # noqa: E402
from experiments.reporting.metrics import read_jsonl  # noqa: E402
from tests.helpers import path_with_both_splits, run_script  # noqa: E402

# Two domains of small text files. The split is a hash of the (temporary,
# so different every run) path: the fixture picks a directory under which both
# splits of both domains are non-empty with validation_fraction=0.3 (validation with
# two documents per domain, so each of two processes gets one).
DOCS = {
    "math": {f"m{i}.txt": f"{i} + {i} = {2 * i}\n" * (3 + i) for i in range(8)},
    "poem": {f"p{i}.txt": "roses are red, violets are blue\n" * (1 + i % 3) + f"#{i}\n"
             for i in range(8)},
}
VALIDATION_FRACTION = 0.3
SEQ_LEN = 16


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("seqio_text")
    root = path_with_both_splits(
        lambda i: base / f"set{i}",
        lambda r: [[str(r / domain / n) for n in files] for domain, files in DOCS.items()],
        VALIDATION_FRACTION, min_validation=2)  # 2 processes each get a validation document
    for domain, files in DOCS.items():
        (root / domain).mkdir(parents=True)
        for name, text in files.items():
            (root / domain / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def text_mixture(text_dir):
    seqio_tasks.register_text_files_mixture(
        "test_text_mix", {d: str(text_dir / d / "*.txt") for d in DOCS},
        validation_fraction=VALIDATION_FRACTION, overwrite=True)
    return "test_text_mix"


def _examples(name, split, seq_len=SEQ_LEN):
    ds = seqio.get_mixture_or_task(name).get_dataset(
        {"targets": seq_len, "domain": seq_len}, split=split, shuffle=False, num_epochs=1)
    return list(ds.as_numpy_iterator())


def test_byte_vocabulary_has_the_byte_tokenizer_ids():
    vocab = seqio_tasks.make_vocabulary("byte")
    tok = ByteTokenizer()
    text = "def f(x):\n\treturn 'é'"
    assert list(vocab.encode(text)) == tok.encode(text)
    assert (vocab.vocab_size, vocab.pad_id, vocab.eos_id) == (tok.vocab_size, tok.pad_id,
                                                              tok.eos_id)
    assert vocab.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="vocabulary must be one of"):
        seqio_tasks.make_vocabulary("bpe")
    with pytest.raises(ValueError, match="not a file"):
        seqio_tasks.make_vocabulary("sentencepiece:/no/such.model")


def test_sentencepiece_vocabulary_matches_the_tokenizer(tmp_path):
    texts = [t for files in DOCS.values() for t in files.values()] * 4
    tok = train_sentencepiece(texts, tmp_path / "spm.model", vocab_size=300, num_threads=1)
    vocab = seqio_tasks.make_vocabulary(f"sentencepiece:{tmp_path / 'spm.model'}")
    sample = "roses are red\n  7 + 7 = 14"
    assert list(vocab.encode(sample)) == tok.encode(sample)
    assert vocab.eos_id == tok.eos_id and vocab.vocab_size == tok.vocab_size


def test_split_into_chunks_keeps_every_token():
    # Documents of 7 and 6 tokens, chunk length 3: [3, 3, 1] and [3, 3].
    ds = tf.data.Dataset.from_generator(
        lambda: iter([{"targets": np.arange(1, 8, dtype=np.int32)},
                      {"targets": np.arange(10, 16, dtype=np.int32)}]),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    chunks = [c["targets"].tolist()
              for c in seqio_tasks.split_into_chunks(ds, {"targets": 3}).as_numpy_iterator()]
    assert chunks == [[1, 2, 3], [4, 5, 6], [7], [10, 11, 12], [13, 14, 15]]
    unchanged = list(seqio_tasks.split_into_chunks(ds, None).as_numpy_iterator())
    assert [len(c["targets"]) for c in unchanged] == [7, 6]


def test_text_files_tasks_chunk_whole_documents_per_domain(text_mixture, text_dir):
    assert seqio_tasks.domain_names(text_mixture) == ["math", "poem"]
    mixture = seqio.get_mixture_or_task(text_mixture)
    assert sorted(t.name for t in mixture.tasks) == ["test_text_mix_math", "test_text_mix_poem"]
    tok = ByteTokenizer()
    for domain_id, domain in enumerate(["math", "poem"]):
        for split in ("train", "validation"):
            examples = _examples(f"test_text_mix_{domain}", split)
            assert all(len(e["targets"]) <= SEQ_LEN for e in examples)
            assert all((e["domain"] == domain_id).all() and e["domain"].shape == e["targets"].shape
                       for e in examples)
            # Unshuffled, a document's chunks are consecutive: the concatenation is
            # every document of the split, tokenized, each followed by EOS.
            names = sorted(n for n in DOCS[domain]
                           if corpus.split_of(str(text_dir / domain / n),
                                              VALIDATION_FRACTION) == split)
            expected = [t for n in names for t in tok.encode(DOCS[domain][n]) + [tok.eos_id]]
            assert np.concatenate([e["targets"] for e in examples]).tolist() == expected


def test_tsv_mixture_reads_one_document_per_row(tmp_path):
    rows = {"train": ["1\tfirst row", "2\tsecond, longer row of text"], "validation": ["3\tv"]}
    for split, lines in rows.items():
        (tmp_path / f"{split}.tsv").write_text("id\ttext\n" + "\n".join(lines) + "\n")
    seqio_tasks.register_tsv_mixture(
        "test_tsv_mix", {"rows": {s: str(tmp_path / f"{s}.tsv") for s in rows}},
        field_names=["id", "text"], skip_header_lines=1, overwrite=True)
    tok = ByteTokenizer()
    for split, lines in rows.items():
        got = np.concatenate([e["targets"] for e in _examples("test_tsv_mix_rows", split)])
        texts = [line.split("\t")[1] for line in lines]
        assert got.tolist() == [t for x in texts for t in tok.encode(x) + [tok.eos_id]]
        assert list(seqio_tasks.raw_texts("test_tsv_mix", split)) == texts
    with pytest.raises(ValueError, match="text_field 'body'"):
        seqio_tasks.register_tsv_mixture("bad", {"rows": {"train": str(tmp_path / "*.tsv")}},
                                         field_names=["id", "text"], text_field="body")
    with pytest.raises(ValueError, match="matched no files"):
        seqio_tasks.register_tsv_mixture("bad", {"rows": {"train": str(tmp_path / "*.csv")}},
                                         field_names=["text"])


def test_registering_a_taken_name_needs_overwrite(text_mixture, text_dir):
    # Same arguments: a no-op. Other arguments: refused unless overwrite=True.
    seqio_tasks.register_text_files_mixture(
        text_mixture, {d: str(text_dir / d / "*.txt") for d in DOCS},
        validation_fraction=VALIDATION_FRACTION)
    with pytest.raises(ValueError, match="already registered"):
        seqio_tasks.register_text_files_mixture(text_mixture, {"math": str(text_dir / "math/*")})


@pytest.fixture(scope="module")
def text_data(text_mixture):
    return seqio_bridge.SeqioData(text_mixture, seq_len=SEQ_LEN, process_index=0,
                                  process_count=1)


def test_bridge_batches_have_the_grain_layout(text_data):
    batches = [next(it) for it in [text_data.train_iterator(0, 4)] for _ in range(6)]
    for b in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            "inputs": ((4, SEQ_LEN), "int32"), "targets": ((4, SEQ_LEN), "int32"),
            "weights": ((4, SEQ_LEN), "float32"), "segment_ids": ((4, SEQ_LEN), "int32"),
            "positions": ((4, SEQ_LEN), "int32"), "domain": ((4, SEQ_LEN), "int32")}
        real = b["segment_ids"] > 0
        np.testing.assert_array_equal(b["weights"], real.astype(np.float32))
        np.testing.assert_array_equal(b["domain"] < 0, ~real)
        assert set(np.unique(b["domain"][real])) <= {0, 1}
        # Decoder-only LM packing: within a segment the input is the previous
        # target, and 0 at the segment start (position 0).
        start = real & (b["positions"] == 0)
        np.testing.assert_array_equal(b["inputs"][start], 0)
        inner = real[:, 1:] & ~start[:, 1:]
        np.testing.assert_array_equal(b["inputs"][:, 1:][inner], b["targets"][:, :-1][inner])
        # A segment has one domain.
        for row in range(4):
            for seg in set(b["segment_ids"][row][real[row]]):
                assert len(set(b["domain"][row][b["segment_ids"][row] == seg])) == 1
    domains_seen = np.concatenate([b["domain"][b["domain"] >= 0] for b in batches])
    assert set(domains_seen) == {0, 1}


def test_bridge_resume_skips_to_the_same_batches(text_data):
    it = text_data.train_iterator(3, 2)
    reference = [next(it) for _ in range(7)]
    it = text_data.train_iterator(3, 2)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(iterator_state(it)))
    assert state == {"batches_consumed": 3, "batch_size": 2}
    resumed = text_data.train_iterator(3, 2)
    restore_iterator_state(resumed, state)
    for expected in reference[3:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    with pytest.raises(ValueError, match="batch_size=2"):
        text_data.train_iterator(3, 2).set_state({"batches_consumed": 1, "batch_size": 5})
    other_seed = next(text_data.train_iterator(4, 2))
    assert any((other_seed[k] != reference[0][k]).any() for k in reference[0])


def test_bridge_shards_validation_by_process(text_mixture, text_data):
    def real_tokens(data):
        return sum(float(b["weights"].sum()) for b in data.eval_batches(2))

    shards = [seqio_bridge.SeqioData(text_mixture, seq_len=SEQ_LEN, process_index=i,
                                     process_count=2) for i in range(2)]
    total = real_tokens(text_data)
    expected = sum(len(ByteTokenizer().encode(t)) + 1
                   for t in seqio_tasks.raw_texts(text_mixture, "validation"))
    assert total == expected
    per_shard = [real_tokens(s) for s in shards]
    assert sum(per_shard) == total and all(0 < n < total for n in per_shard)
    for b in text_data.eval_batches(2):
        assert b["inputs"].shape == (2, SEQ_LEN)  # the last batch is padded to 2 rows
    with pytest.raises(ValueError, match="process_index"):
        seqio_bridge.SeqioData(text_mixture, seq_len=SEQ_LEN, process_index=2, process_count=2)


def test_unknown_provider_is_named():
    with pytest.raises(ValueError, match="no seqio Task or Mixture named 'nope'"):
        seqio_bridge.SeqioData("nope", seq_len=8, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seqio:<task or mixture name>"):
        seqio_bridge.provider_name("seqio:")


SMALL_CORPUS = 300_000


def test_data_config_takes_a_seqio_source():
    grain = DataConfig(source="embedded", seq_len=32, max_bytes_per_domain=SMALL_CORPUS)
    config = DataConfig(source="seqio:sparse_moe_embedded", seq_len=32, batch_size=4,
                        eval_batch_size=4, max_bytes_per_domain=SMALL_CORPUS, eval_max_batches=3)
    assert config.domains() == grain.domains() == ["code", "prose"]
    assert config.vocab_size() == grain.vocab_size() == 259
    assert config.unigram_entropy("train") == grain.unigram_entropy("train")
    batch = next(config.train_iterator(0))
    assert batch["inputs"].shape == (4, 32)
    evals = config.eval_batches()
    assert len(evals) == 3
    assert {0, 1} <= set(np.concatenate([b["domain"].ravel() for b in evals]))


TINY_GIN = "gin_configs/experiments/test_tiny.gin"
SEQIO_SOURCE = "--gin_param=DataConfig.source = 'seqio:sparse_moe_embedded'"


def _train(workdir, steps):
    result = run_script("scripts/train.py", f"--gin_file={TINY_GIN}", SEQIO_SOURCE,
                        f"--gin_param=train.num_steps = {steps}",
                        "--gin_param=Checkpointer.async_save = False",
                        f"--workdir={workdir}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_jsonl(workdir / "metrics.jsonl", "train"), result.stderr


def test_train_script_on_a_seqio_mixture_resumes_exactly(tmp_path):
    # A 12-step run (checkpoints at 5, 10, 12); then a copy of its workdir with
    # the checkpoints after step 5 deleted is run again to 12: it restores the
    # data position at step 5 by skipping the consumed batches, so the losses
    # of steps 6..12 must agree with the uninterrupted run.
    full, _ = _train(tmp_path / "full", 12)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    for step in (10, 12):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(step))
    resumed, log = _train(tmp_path / "resumed", 12)
    assert "resuming from checkpoint at step 5" in log
    assert [r["step"] for r in resumed] == list(range(1, 13))
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in full],
                               rtol=1e-5)
    assert np.mean([r["ce"] for r in full[-3:]]) < np.mean([r["ce"] for r in full[:3]]) - 0.3
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["domains"] == ["code", "prose"]
    assert all(summary["valid_tokens"][d] > 0 for d in ("code", "prose"))
    assert summary["unigram_entropy"]["bits_per_byte"] > 3
