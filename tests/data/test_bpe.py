"""Byte-level BPE tokenizer.json training (experiments/data/bpe.py, scripts/train_tokenizer.py
--format hf), end to end: train a tiny BPE on a generated corpus, prepare token shards with
it, and train 2 steps on the shards with the same `hf:` tokenizer."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from experiments.data import bpe, prepare
from experiments.data.tokenizers import make_tokenizer
from tests.helpers import REPO, path_with_both_splits, run_script

FRACTION = 0.25
VOCAB = 300
# Multi-byte characters, tabs, CRLF and a string that is not in any training document.
SAMPLE = "def unseen(y):\n\treturn 'ünïcode ☃'  # 😀\r\n"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tokenizer",
                                                  REPO / "scripts/train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documents() -> list[dict[str, str]]:
    """60 small Python-like documents in two domains."""
    return [{"text": f"def f{i}(x):\n    return x * {i} + {i % 7}  # héllo\n" * (1 + i % 3),
             "domain": "code" if i % 2 else "prose"} for i in range(60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe_corpus")
    docs = _documents()
    path = path_with_both_splits(lambda i: directory / f"docs{i}.jsonl",
                                 lambda p: [[f"{p}:{n}" for n in range(1, len(docs) + 1)]],
                                 FRACTION)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def test_bpe_tokenizer_prepares_shards_and_trains(corpus, tmp_path, capsys):
    # 1. train_tokenizer.py --format hf writes tokenizer.json + tokenizer_config.json.
    out = tmp_path / "bpe"
    script = _load_script()
    assert script.main(["--format", "hf", "--source", f"jsonl:{corpus}", "--output", str(out),
                        "--vocab_size", str(VOCAB), "--validation_fraction", str(FRACTION)]) == 0
    printed = capsys.readouterr().out
    assert f"vocab_size={VOCAB}" in printed and "bytes per token" in printed, printed
    tok = make_tokenizer(f"hf:{out}")
    # The ids HFTokenizer reads from tokenizer_config.json; BPE merges learnt (a code line
    # is far fewer tokens than bytes); any string round-trips (byte-level, no unknowns).
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (VOCAB, 0, 1, 2)
    line = "    return x * 12 + 5  # héllo\n"
    assert len(tok.encode(line)) < len(line.encode("utf-8")) / 2
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE

    # 2. Token shards with it; the manifest records the tokenizer.
    shards = tmp_path / "shards"
    manifest = prepare.prepare([str(corpus)], shards, prepare.Options(
        tokenizer=f"hf:{out}", validation_fraction=FRACTION), progress=False)
    assert json.dumps(manifest).count("hf:") >= 1, manifest

    # 3. Two train steps on the shards with the same tokenizer (the vocabulary is its 300).
    workdir = tmp_path / "run"
    result = run_script(
        "scripts/train.py", "--gin_file=gin_configs/experiments/test_tiny.gin",
        f"--gin_param=DataConfig.source = 'shards:{shards}'",
        f"--gin_param=DataConfig.tokenizer = 'hf:{out}'",
        f"--gin_param=DataConfig.validation_fraction = {FRACTION}",
        "--gin_param=train.num_steps = 2", "--gin_param=train.num_microbatches = 1",
        "--gin_param=train.eval_every = 2",
        "--gin_param=Checkpointer.save_every = 2", "--quiet", f"--workdir={workdir}",
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    train = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in train if r["split"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    # The loss starts near ln(300) = 5.7 nats per token, the model's uniform guess.
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert abs(steps[0]["ce"] - math.log(VOCAB)) < 1.0, steps[0]


def test_bpe_refuses_bad_arguments_and_foreign_flags(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 260"):
        bpe.train_byte_level_bpe(["x"], tmp_path / "a", vocab_size=259)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        bpe.train_byte_level_bpe(["x"], tmp_path / "b", vocab_size=270)
    script = _load_script()
    for argv in (["--format", "hf", "--seed", "1"], ["--format", "hf", "--model_type", "unigram"],
                 ["--min_frequency", "3"]):
        with pytest.raises(SystemExit) as exit_info:
            script.parse_args([*argv, "--output", str(tmp_path / "c")])
        assert exit_info.value.code == 2
