"""Prepared token shards (scripts/prepare_data.py, experiments/data/prepare.py) and the
'shards:<dir>' reader (experiments/data/shards.py) against the in-memory pipeline."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments.data import inputs, prepare, shards
from experiments.data import pipeline as data
from experiments.data.config import DataConfig
from tests.helpers import REPO, path_with_both_splits, script_env

FRACTION = 0.4
SEQ_LEN = 8
LETTERS = string.ascii_letters[:24]


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "scripts/prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_data = _load_script()


def _jsonl_lines(seed: int) -> list[str]:
    """Each document repeats one letter (so a token tells its document); some span
    several rows; one is empty (no chunk) and one has a non-ASCII character."""
    rng = np.random.default_rng(seed)
    lines = []
    for i, letter in enumerate(LETTERS):
        text = letter * int(rng.integers(1, 3 * SEQ_LEN))
        text = "" if i == 5 else text + ("é" if i == 7 else "")
        lines.append(json.dumps({"text": text, "domain": "alpha" if i % 3 else "beta"}))
    return lines


def _write_jsonl(directory: Path, name: str, seed: int = 0) -> str:
    path = path_with_both_splits(
        lambda i: directory / f"{name}{i}.jsonl",
        lambda p: [[f"{p}:{n}" for n in range(1, len(LETTERS) + 1)]], FRACTION)
    path.write_text("\n".join(_jsonl_lines(seed)) + "\n\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> str:
    return _write_jsonl(tmp_path_factory.mktemp("jsonl"), "docs")


@pytest.fixture(scope="module")
def prepared(jsonl, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("prepared") / "out"
    prepare.prepare([jsonl], out, prepare.Options(validation_fraction=FRACTION), progress=False)
    return str(out)


def _assert_same_batches(a, b, n: int | None = None) -> None:
    batches = list(itertools.islice(zip(a, b), n)) if n else list(zip(a, b, strict=True))
    assert batches
    for x, y in batches:
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("add_bos,process_index,process_count",
                         [(False, 0, 1), (True, 0, 1), (False, 1, 2)])
def test_same_batches_as_the_in_memory_jsonl_source(jsonl, prepared, add_bos, process_index,
                                                    process_count):
    """Existing experiments stay reproducible: for the same corpus, seed, BOS choice and
    process shard, 'shards:' gives the training and eval batches of 'jsonl:'."""
    common = {"seq_len": SEQ_LEN, "batch_size": 3, "add_bos": add_bos,
              "validation_fraction": FRACTION, "process_index": process_index,
              "process_count": process_count}
    _assert_same_batches(data.make_train_iterator(f"jsonl:{jsonl}", seed=7, **common),
                         data.make_train_iterator(f"shards:{prepared}", seed=7, **common), 40)
    _assert_same_batches(data.make_eval_iterator(f"jsonl:{jsonl}", **common),
                         data.make_eval_iterator(f"shards:{prepared}", **common))


def test_data_config_domains_and_entropy_match(jsonl, prepared):
    memory = DataConfig(source=f"jsonl:{jsonl}", validation_fraction=FRACTION)
    disk = DataConfig(source=f"shards:{prepared}", validation_fraction=FRACTION)
    assert disk.domains() == memory.domains() == ["alpha", "beta"]
    assert disk.unigram_entropy("train") == memory.unigram_entropy("train")
    assert disk.vocab_size() == memory.vocab_size()


def test_text_files_match_the_text_source(tmp_path):
    """Text files: one document each, CRLF read as the text source reads it, grouped
    into several shards by --shard_bytes; the batches equal 'text:<glob>'."""
    names = path_with_both_splits(
        lambda i: tmp_path / f"t{i}",
        lambda p: [[str(p / f"{c}.txt") for c in "abcdefgh"]], FRACTION)
    names.mkdir()
    for i, c in enumerate("abcdefgh"):
        (names / f"{c}.txt").write_bytes((c * (5 + 4 * i) + "\r\nend\r").encode())
    pattern = str(names / "*.txt")
    manifest = prepare.prepare([pattern], tmp_path / "out", prepare.Options(
        validation_fraction=FRACTION, shard_bytes=40), progress=False)
    assert len(manifest["shards"]) > 2
    common = {"seq_len": SEQ_LEN, "batch_size": 2, "validation_fraction": FRACTION,
              "process_index": 0, "process_count": 1}
    _assert_same_batches(data.make_train_iterator(f"text:{pattern}", seed=1, **common),
                         data.make_train_iterator(f"shards:{tmp_path / 'out'}", seed=1,
                                                  **common), 20)


def test_resume_mid_epoch_is_exact(prepared):
    """Save the iterator state after 5 batches (mid second epoch), rebuild, restore:
    the next batches are those the first iterator goes on to produce."""
    kwargs = {"seq_len": SEQ_LEN, "batch_size": 3, "seed": 2, "validation_fraction": FRACTION,
              "process_index": 0, "process_count": 1}
    first = data.make_train_iterator(f"shards:{prepared}", **kwargs)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(data.iterator_state(first)))
    second = data.make_train_iterator(f"shards:{prepared}", **kwargs)
    data.restore_iterator_state(second, state)
    _assert_same_batches(first, second, 6)


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


_STALL_AFTER_FIRST_SHARD = """
import pathlib, sys, time
from experiments.data import prepare
def stall(meta):
    pathlib.Path(sys.argv[3]).write_text(meta["name"])
    time.sleep(600)
prepare.prepare(sys.argv[1].split(","), sys.argv[2],
                prepare.Options(validation_fraction=0.4, shard_bytes=1),
                progress=False, on_shard_done=stall)
"""


def test_kill_then_rerun_gives_byte_identical_shards(tmp_path):
    """prepare is SIGKILLed after its first shard (and a half-written shard of a killed
    worker lies around); rerunning the command keeps that shard, finishes, and the
    output equals, byte for byte, one clean run with 2 worker processes."""
    files = [_write_jsonl(tmp_path, f"part{k}-", seed=k) for k in range(3)]
    killed, marker = tmp_path / "killed", tmp_path / "first_shard_done"
    proc = subprocess.Popen([sys.executable, "-c", _STALL_AFTER_FIRST_SHARD, ",".join(files),
                             str(killed), str(marker)], cwd=REPO, env=script_env())
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == "shard-00000"
    finally:
        proc.kill()
        proc.wait()
    assert (killed / "shard-00000").is_dir() and not (killed / "shard-00001").exists()
    assert not (killed / shards.MANIFEST).exists()
    (killed / ".tmp-shard-00001-12345").mkdir()
    (killed / ".tmp-shard-00001-12345" / "train.tokens").write_bytes(b"partial")
    first_shard = _tree(killed / "shard-00000")
    argv = [f"--input={f}" for f in files] + ["--validation_fraction=0.4", "--shard_bytes=1"]
    assert prepare_data.main(argv + [f"--output={killed}", "--workers=1", "--no_progress"]) == 0
    assert _tree(killed / "shard-00000") == first_shard
    clean = tmp_path / "clean"  # With the progress bar fed by the workers.
    assert prepare_data.main(argv + [f"--output={clean}", "--workers=2"]) == 0
    assert _tree(killed) == _tree(clean)
    assert len(json.loads((clean / shards.MANIFEST).read_text())["shards"]) == 3


def test_rerun_with_other_settings_is_refused(prepared, jsonl, capsys):
    assert prepare_data.main([f"--input={jsonl}", f"--output={prepared}",
                              "--validation_fraction=0.3", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "other settings or inputs" in err and "options" in err


def _copy(src: str, dst: Path) -> Path:
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.copytree(src, dst)
    return dst


def _flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))


def test_checksum_mismatch_is_refused_naming_the_file(prepared, tmp_path, capsys):
    """An offsets index with one flipped bit is refused when the run opens the shards;
    a flipped token byte by open_split(verify='full') and by prepare_data.py --verify;
    a truncated token file by its size, always."""
    index = _copy(prepared, tmp_path / "index")
    _flip_last_byte(index / "shard-00000" / "train.offsets.npy")
    with pytest.raises(ValueError, match=r"train\.offsets\.npy.*does not match its checksum"):
        shards.open_split(index, "train")
    tokens = _copy(prepared, tmp_path / "tokens")
    _flip_last_byte(tokens / "shard-00000" / "train.tokens")
    shards.open_split(tokens, "train")  # Default 'index': token files by size only.
    with pytest.raises(ValueError, match=r"shard-00000/train\.tokens.*does not match"):
        shards.open_split(tokens, "train", verify="full")
    assert prepare_data.main([f"--verify={tokens}"]) == 2
    assert "shard-00000/train.tokens" in capsys.readouterr().err
    truncated = _copy(prepared, tmp_path / "truncated")
    path = truncated / "shard-00000" / "validation.tokens"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"validation\.tokens.*has \d+ bytes, the manifest"):
        data.make_eval_iterator(f"shards:{truncated}", seq_len=SEQ_LEN,
                                validation_fraction=FRACTION, process_index=0, process_count=1)


def test_tokenizer_mismatch_names_both(prepared, tmp_path):
    other = _copy(prepared, tmp_path / "spm")
    manifest = json.loads((other / shards.MANIFEST).read_text())
    manifest["tokenizer"] = {**manifest["tokenizer"], "spec": "sentencepiece:code8k.model",
                             "kind": "sentencepiece", "sha256": "ab" * 32, "vocab_size": 8192}
    (other / shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"DataConfig.tokenizer 'byte' \(vocab 259\) does not "
                                         r"match .*'sentencepiece:code8k.model' \(vocab 8192"):
        DataConfig(source=f"shards:{other}", validation_fraction=FRACTION).train_iterator(0)


def test_validation_fraction_must_match(prepared):
    with pytest.raises(ValueError, match=r"DataConfig.validation_fraction=0.05 differs .*0.4"):
        DataConfig(source=f"shards:{prepared}").train_iterator(0)


def test_compressed_jsonl_and_parquet_read_like_plain_jsonl(tmp_path):
    """.gz, .zst and Parquet (text column + domain column) give the plain file's
    documents, keyed by their own path and line/row."""
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    import zstandard  # pylint: disable=g-import-not-at-top

    lines = _jsonl_lines(0)
    raw = ("\n".join(lines) + "\n").encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    rows = [json.loads(line) for line in lines]
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.table({"body": [r["text"] for r in rows],
                             "lang": [r["domain"] for r in rows]}), tmp_path / "hub/a.parquet")
    pq.write_table(pa.table({"text": [r["text"] for r in rows],
                             "domain": [r["domain"] for r in rows]}), tmp_path / "a.parquet")
    expected = [(r["text"], r["domain"]) for r in rows]
    fields = inputs.FieldOptions()
    for name in ("a.jsonl.gz", "a.jsonl.zst"):
        path = str(tmp_path / name)
        docs = list(inputs.read_documents(path, inputs.file_format(path), fields))
        assert [(d.text, d.domain) for d in docs] == expected
        assert docs[2].key == f"{path}:3"
    path = str(tmp_path / "hub/a.parquet")
    docs = list(inputs.read_documents(path, "parquet", inputs.FieldOptions("body", "lang")))
    assert [(d.text, d.domain) for d in docs] == expected and docs[0].key == f"{path}:1"
    manifest = prepare.prepare([str(tmp_path / "a.*")], tmp_path / "out", progress=False)
    # Grouped by format: the two JSONL files in one shard, the Parquet file in another.
    assert manifest["domains"] == ["alpha", "beta"]
    assert [[Path(p).name for p in s["inputs"]] for s in manifest["shards"]] == [
        ["a.jsonl.gz", "a.jsonl.zst"], ["a.parquet"]]
    assert sum(manifest["splits"][s]["documents"] for s in shards.SPLITS) == 3 * len(rows)


# --- Bad input: one line naming the file (exit status 2) ----------------------


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = prepare_data.main([*argv, "--no_progress", "--workers=1"])
    return code, capsys.readouterr().err


def test_non_utf8_file_is_fatal_by_default_and_skipped_by_flag(tmp_path, capsys):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b not gzip")
    code, err = _run_cli(capsys, f"--input={tmp_path}/*.txt", f"--output={tmp_path}/o1")
    assert code == 2 and f"{tmp_path}/bad.txt" in err and "not valid UTF-8" in err
    assert "--skip_bad_files" in err
    code, err = _run_cli(capsys, f"--input={tmp_path}/*", f"--output={tmp_path}/o2",
                         "--skip_bad_files", "--validation_fraction=0")
    assert code == 0, err
    assert "bad.txt" in err and "broken.jsonl.gz" in err  # The warnings.
    manifest = json.loads((tmp_path / "o2" / shards.MANIFEST).read_text())
    assert sorted(Path(s["path"]).name for s in manifest["skipped_files"]) == [
        "bad.txt", "broken.jsonl.gz"]
    assert manifest["splits"]["train"]["documents"] == 1


def test_skipped_jsonl_file_leaves_nothing_of_it(tmp_path):
    """A JSONL file whose 3rd line is not UTF-8 is skipped whole: its first two
    documents (and their new domain) are rolled back."""
    (tmp_path / "a.txt").write_text("kept")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "x", "domain": "d"}\n{"text": "y"}\n'
                                       b'{"text": "\xff"}\n')
    manifest = prepare.prepare([str(tmp_path / "*")], tmp_path / "out", prepare.Options(
        validation_fraction=0.0, skip_bad_files=True, shard_bytes=1), progress=False)
    assert manifest["domains"] == ["text"]
    assert manifest["splits"]["train"]["documents"] == 1
    assert manifest["skipped_files"] == [{"path": str(tmp_path / "b.jsonl"),
                                          "reason": "line 3 is not valid UTF-8 (byte 10)"}]


def test_parquet_without_the_column_names_its_columns(tmp_path, capsys):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    pq.write_table(pa.table({"content": ["a"], "lang": ["en"]}), tmp_path / "x.parquet")
    code, err = _run_cli(capsys, f"--input={tmp_path}/x.parquet", f"--output={tmp_path}/o")
    assert code == 2
    assert "x.parquet" in err and "'text'" in err and "['content', 'lang']" in err


def test_bad_jsonl_line_names_file_and_line(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n')
    code, err = _run_cli(capsys, f"--input={tmp_path}/d.jsonl", f"--output={tmp_path}/o")
    assert code == 2 and f"{tmp_path}/d.jsonl:3: not a JSON line" in err


def test_empty_corpus_is_an_error(tmp_path, capsys):
    (tmp_path / "blank.jsonl").write_text("\n\n")
    code, err = _run_cli(capsys, f"--input={tmp_path}/blank.jsonl", f"--output={tmp_path}/o")
    assert code == 2 and "the corpus is empty" in err
    code, err = _run_cli(capsys, f"--input={tmp_path}/none*.jsonl", f"--output={tmp_path}/p")
    assert code == 2 and "matches no files" in err


def test_vocabulary_exceeding_the_dtype_is_refused(tmp_path, capsys, monkeypatch):
    """A tokenizer of 70,000 ids does not fit uint16: refused before any work;
    --dtype auto picks uint32 for it."""
    (tmp_path / "a.txt").write_text("text")
    big = dict(shards.tokenizer_identity("byte"), vocab_size=70_000)
    monkeypatch.setattr(shards, "tokenizer_identity", lambda spec: big)
    code, err = _run_cli(capsys, f"--input={tmp_path}/a.txt", f"--output={tmp_path}/o",
                         "--dtype=uint16")
    assert code == 2
    assert "vocabulary (70000 ids) exceeds dtype uint16 (at most 65536 ids)" in err
    assert not (tmp_path / "o").exists()
    assert shards.dtype_for(70_000) == "uint32" and shards.dtype_for(65_536) == "uint16"


def test_sentencepiece_shards_check_the_model_file(jsonl, tmp_path):
    """Shards prepared with a SentencePiece model: the same model copied elsewhere is
    accepted (identity = file hash, not path) and gives the in-memory batches; another
    model of the same vocabulary size is refused naming both specs."""
    from experiments.data import tokenizers  # pylint: disable=g-import-not-at-top

    pytest.importorskip("sentencepiece")
    texts = [json.loads(line)["text"] * 3 + " the cat sat on the mat." for line in
             _jsonl_lines(0)] * 4
    first = tokenizers.train_sentencepiece(texts, tmp_path / "a.model", vocab_size=300)
    tokenizers.train_sentencepiece(texts + ["other words"] * 9, tmp_path / "b.model",
                                   vocab_size=first.vocab_size)
    prepare.prepare([jsonl], tmp_path / "out", prepare.Options(
        tokenizer=f"sentencepiece:{tmp_path / 'a.model'}", validation_fraction=FRACTION),
        progress=False)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy/a.model").write_bytes((tmp_path / "a.model").read_bytes())
    common = {"seq_len": SEQ_LEN, "batch_size": 2, "validation_fraction": FRACTION,
              "process_index": 0, "process_count": 1}
    copied = f"sentencepiece:{tmp_path / 'copy/a.model'}"
    _assert_same_batches(
        data.make_train_iterator(f"jsonl:{jsonl}", seed=0, tokenizer=copied, **common),
        data.make_train_iterator(f"shards:{tmp_path / 'out'}", seed=0, tokenizer=copied,
                                 **common), 10)
    with pytest.raises(ValueError, match=r"DataConfig.tokenizer 'sentencepiece:.*b\.model' "
                                         r"\(vocab \d+, sha256 \w+\) does not match the "
                                         r"tokenizer .* 'sentencepiece:.*a\.model'"):
        data.make_train_iterator(f"shards:{tmp_path / 'out'}", seed=0,
                                 tokenizer=f"sentencepiece:{tmp_path / 'b.model'}", **common)


def test_tokenizer_without_eos_is_refused(tmp_path, capsys, monkeypatch):
    """The reader ends every document with EOS: a tokenizer without one (e.g. a
    tokenizer.json whose config names no eos_token) is refused before any work."""
    (tmp_path / "a.txt").write_text("text")
    monkeypatch.setattr(shards, "tokenizer_identity",
                        lambda spec: {"spec": "hf:t.json", "vocab_size": 50, "eos_id": -1})
    code, err = _run_cli(capsys, f"--input={tmp_path}/a.txt", f"--output={tmp_path}/o")
    assert code == 2 and "tokenizer 'hf:t.json' has no EOS id" in err
    assert not (tmp_path / "o").exists()


def test_text_tools_refuse_a_shards_source():
    from experiments.data import sources  # pylint: disable=g-import-not-at-top

    with pytest.raises(ValueError, match="holds prepared tokens, not text"):
        sources.load_source("shards:some/dir")


def test_bench_data_runs(tmp_path):
    """scripts/bench_data.py end to end at 1 MB (the figures themselves are not checked)."""
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "scripts/bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes_mb", "1", "--batches", "5", "--steps", "0", "--workdir",
                       str(tmp_path / "w"), "--json", str(out)]) == 0
    entry = json.loads(out.read_text())["sizes"]["1"]
    assert entry["prepare"][0]["documents"] > 100 and entry["validation_fraction"] == 0.05
    assert entry["read"]["batches_per_s"] > 0 and entry["read"]["peak_rss_mb"] > 0
    assert not (tmp_path / "w" / "corpus_1mb").exists()  # Deleted without --keep.


def test_a_tokenizer_instance_is_identified_like_its_spec(prepared):
    """Python callers may pass a Tokenizer instead of a spec: same identity, accepted."""
    from experiments.data.tokenizers import ByteTokenizer  # pylint: disable=g-import-not-at-top

    assert shards.tokenizer_identity(ByteTokenizer()) == shards.tokenizer_identity("byte")
    next(data.make_train_iterator(f"shards:{prepared}", seq_len=SEQ_LEN, batch_size=2,
                                  tokenizer=ByteTokenizer(), validation_fraction=FRACTION,
                                  process_index=0, process_count=1))


def test_a_directory_input_means_every_file_under_it(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("first")
    (tmp_path / "in" / "sub" / "b.jsonl").write_text('{"text": "second"}\n')
    assert inputs.expand_inputs([str(tmp_path / "in")]) == [
        str(tmp_path / "in" / "a.txt"), str(tmp_path / "in" / "sub" / "b.jsonl")]


def test_hf_tokenizer_json_shards(jsonl, tmp_path):
    """Shards prepared with an HF tokenizer.json give the in-memory batches with that
    tokenizer; the same file with `HFTokenizer.add_special_tokens = True` (its
    post-processor adds <s>: other ids) is refused, naming the option."""
    import gin  # pylint: disable=g-import-not-at-top

    pytest.importorskip("tokenizers")
    from tests.tokenizer_files import write_bpe_tokenizer  # pylint: disable=g-import-not-at-top

    spec = f"hf:{write_bpe_tokenizer(tmp_path / 'tok', bos_template=True)}"
    manifest = prepare.prepare([jsonl], tmp_path / "out", prepare.Options(
        tokenizer=spec, validation_fraction=FRACTION), progress=False)
    assert manifest["tokenizer"]["add_special_tokens"] is False
    common = {"seq_len": SEQ_LEN, "batch_size": 2, "validation_fraction": FRACTION,
              "process_index": 0, "process_count": 1, "tokenizer": spec}
    _assert_same_batches(data.make_train_iterator(f"jsonl:{jsonl}", seed=0, **common),
                         data.make_train_iterator(f"shards:{tmp_path / 'out'}", seed=0,
                                                  **common), 10)
    gin.bind_parameter("HFTokenizer.add_special_tokens", True)
    try:
        with pytest.raises(ValueError, match=r"add_special_tokens=True\) does not match .*"
                                             r"add_special_tokens=False\)"):
            data.make_train_iterator(f"shards:{tmp_path / 'out'}", seed=0, **common)
    finally:
        gin.clear_config()
