"""A model with its own vocabulary (300 rows, a 294-id byte-level BPE tokenizer.json,
under the byte data config's 259 ids): import writes `train.vocab_size = 300`, then
scripts/upcycle.py upcycles it, and scripts/score.py --text scores the upcycled
model with the model's tokenizer, equal to the dense import's scores (the
upcycling is function-preserving). Training refuses a data tokenizer with more
ids than the model has rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gin
import numpy as np
import pytest

from experiments.convert.hf.importer import import_hf
from experiments.data.config import DataConfig
from experiments.data.tokenizers import HFTokenizer
from experiments.train.config import TrainConfig, check_data_vocab, model_vocab_size
from tests.convert.test_upcycle_import import CONFIG, DATA, _hf_weights
from tests.helpers import run_script
from tests.tokenizer_files import write_bpe_tokenizer

safetensors_numpy = pytest.importorskip("safetensors.numpy")

VOCAB = 300
TEXT = "the cat sat on the mat"


def write_own_vocab_llama(model_dir: Path) -> Path:
    """A tiny HF Llama dir with VOCAB embedding rows and a byte-level BPE tokenizer.json
    (fewer tokens than rows, as released models pad); returns the tokenizer.json path."""
    tokenizer_path = write_bpe_tokenizer(model_dir)
    rng = np.random.default_rng(1)
    tensors = dict(_hf_weights(), **{n: (0.2 * rng.normal(size=(VOCAB, 32))).astype(np.float32)
                                     for n in ("model.embed_tokens.weight", "lm_head.weight")})
    safetensors_numpy.save_file(tensors, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps(dict(CONFIG, vocab_size=VOCAB)))
    return tokenizer_path


@pytest.fixture(scope="module")
def own_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_vocab")
    model_dir = root / "hf"
    tokenizer = HFTokenizer(write_own_vocab_llama(model_dir))
    gin.clear_config()
    try:
        dense = import_hf(model_dir, root / "dense",
                          gin_files=["gin_configs/data/embedded_byte.gin"], gin_params=DATA)
    finally:
        gin.clear_config()
    return root, dense, tokenizer


def _score(workdir, *args):
    result = run_script("scripts/score.py", f"--workdir={workdir}", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_import_binds_the_model_vocabulary(own_vocab):
    _, dense, tokenizer = own_vocab
    assert "train.vocab_size = 300" in (dense / "config.gin").read_text()
    assert tokenizer.vocab_size < VOCAB  # padded beyond the tokenizer, as real models are
    gin.clear_config()
    try:
        gin.parse_config_file(str(dense / "config.gin"))
        assert model_vocab_size() == VOCAB and DataConfig().vocab_size() == 259
    finally:
        gin.clear_config()


def test_upcycle_then_score_with_the_models_tokenizer(own_vocab):
    root, dense, tokenizer = own_vocab
    moe = root / "moe"
    result = run_script("scripts/upcycle.py", f"--dense_workdir={dense}", f"--out_workdir={moe}",
                        "--moe_layers=1", "--num_experts=4", "--k=2", "--verify",
                        "--verify_batches=1", "--gin_param=TransformerLM.moe_kwargs = "
                        "{'capacity_factor': None, 'normalize': True}", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (moe / "tokenizer.json").is_file() and (moe / "tokenizer_config.json").is_file()
    assert "train.vocab_size = 300" in (moe / "config.gin").read_text()
    by_text = _score(moe, f"--text={TEXT}")
    assert by_text["ids"] == tokenizer.encode(TEXT)  # the BPE's ids, not bytes
    dense_scores = _score(dense, "--ids=" + ",".join(map(str, by_text["ids"])))
    np.testing.assert_allclose(by_text["logprobs"], dense_scores["logprobs"], atol=1e-4)
    # An id the tokenizer never produces but the model has (294 <= id < 300) scores.
    assert len(_score(moe, f"--ids=5,{VOCAB - 1}")["logprobs"]) == 1


def test_training_refuses_a_data_tokenizer_larger_than_the_model(tmp_path):
    """train.vocab_size = 100 under the byte tokenizer (259 ids): one error line naming both."""
    with pytest.raises(ValueError, match=r"DataConfig.tokenizer = 'byte'\) has 259 ids, more "
                                         r"than the model's vocabulary \(train.vocab_size = 100"):
        check_data_vocab(model_vocab_size(TrainConfig(vocab_size=100), DataConfig()),
                         DataConfig())
    result = run_script("scripts/train.py", "--gin_file=gin_configs/experiments/test_tiny.gin",
                        "--gin_param=train.vocab_size = 100", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "train.vocab_size = 100" in result.stderr and "259 ids" in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
    with pytest.raises(ValueError, match="train.vocab_size must be None or an int >= 1"):
        TrainConfig(vocab_size=0)


def test_import_refuses_a_conflicting_vocab_binding(own_vocab, tmp_path):
    """--gin_param train.vocab_size = 299 against config.json's 300: refused, nothing written."""
    root, _, _ = own_vocab
    gin.clear_config()
    try:
        with pytest.raises(ValueError, match=r"train.vocab_size = 299 disagrees with .*config.json "
                                             r"vocab_size = 300"):
            import_hf(root / "hf", tmp_path / "out", gin_params=[*DATA, "train.vocab_size = 299"])
    finally:
        gin.clear_config()
    assert not (tmp_path / "out").exists()


def test_train_on_new_text_with_the_models_tokenizer(own_vocab, tmp_path):
    """scripts/train.py continues the import on the embedded corpus encoded by the model's
    tokenizer.json (DataConfig.tokenizer = 'hf:...', 294 ids under 300 rows)."""
    _, dense, tokenizer = own_vocab
    workdir = tmp_path / "run"
    shutil.copytree(dense, workdir)
    result = run_script(
        "scripts/train.py", f"--gin_file={workdir / 'config.gin'}", f"--workdir={workdir}",
        f"--gin_param=DataConfig.tokenizer = 'hf:{workdir / 'tokenizer.json'}'",
        "--gin_param=train.num_steps = 2", "--gin_param=train.eval_every = 2",
        "--gin_param=Checkpointer.save_every = 2", "--quiet", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 2 and summary["tokenizer"].startswith("hf:")
    gin.clear_config()
    try:
        gin.parse_config_file(str(workdir / "config.gin"))
        data = DataConfig()
        assert data.tokenizer.startswith("hf:") and data.vocab_size() == tokenizer.vocab_size
        assert model_vocab_size() == VOCAB
    finally:
        gin.clear_config()
    assert (workdir / "checkpoints" / "2").is_dir()
