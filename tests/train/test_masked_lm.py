"""The masked-LM objective (`train.objective = 'masked_lm'`, experiments/train/objective.py):
the batch rewrite on a hand-built batch, its refusals, and a Soft MoE encoder
(gin_configs/models/soft_moe_encoder.gin) trained 3 steps in the trainer, validated,
checkpointed and resumed exactly, refused by generation, and analysed by
scripts/analyze_routing.py (soft routing statistics)."""

import dataclasses
import json
import shutil

import gin
import numpy as np
import pytest
from flax import nnx

from experiments.inference.generate import load_generator
from experiments.reporting.metrics import read_jsonl
from experiments.runtime import gin_utils
from experiments.train.config import TrainSetup
from experiments.train.objective import MaskedLM, check_setup, objective_hooks
from experiments.train.trainer import train
from layers.transformer import TransformerLM
from scripts import analyze_routing
from tests.helpers import REPO

# One row: 6 real tokens (segment 1), then 2 of padding (segment 0); next-token targets.
BATCH = {"inputs": np.array([[11, 12, 13, 14, 15, 16, 0, 0]], np.int32),
         "targets": np.array([[12, 13, 14, 15, 16, 2, 0, 0]], np.int32),
         "weights": np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.float32),
         "segment_ids": np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32),
         "domain": np.zeros((1, 8), np.int32)}


def test_masking_selects_real_tokens_targets_them_and_is_a_function_of_the_step():
    """mask_rate 1: every real token is selected (weight 1, target = its own input), each
    input becomes [MASK] (id 0 here, the padding id), a random id or itself; padding is
    never selected. The same step gives the same masks; validation batches too."""
    hook = MaskedLM(mask_rate=1.0, seed=3, vocab_size=20, pad_id=0)
    out = hook.before_step(5, BATCH)
    np.testing.assert_array_equal(out["targets"], BATCH["inputs"])
    np.testing.assert_array_equal(out["weights"], BATCH["segment_ids"] > 0)
    np.testing.assert_array_equal(out["inputs"][0, 6:], 0)
    assert out["inputs"].dtype == np.int32 and out["weights"].dtype == np.float32
    assert np.all((out["inputs"] >= 0) & (out["inputs"] < 20))
    for name in ("inputs", "weights"):
        np.testing.assert_array_equal(hook.before_step(5, BATCH)[name], out[name])
        np.testing.assert_array_equal(hook.eval_batch(1, BATCH)[name],
                                      hook.eval_batch(1, BATCH)[name])
    half = MaskedLM(mask_rate=0.5, seed=3, vocab_size=20, pad_id=0)
    draws = {tuple(half.before_step(s, BATCH)["weights"][0]) for s in range(1, 9)}
    assert len(draws) > 1  # other steps, other masks
    assert all(w[6:] == (0.0, 0.0) for w in draws)


@pytest.mark.parametrize("make, match", [
    (lambda: MaskedLM(mask_rate=0.0, vocab_size=20), "MaskedLM.mask_rate"),
    (lambda: MaskedLM(mask_id=20, vocab_size=20), "MaskedLM.mask_id"),
    (lambda: objective_hooks("mlm", seed=0, data=None, vocab_size=lambda: 20),
     "train.objective"),
    (lambda: check_setup("masked_lm", ()), "needs the MaskedLM step hook"),
])
def test_bad_options_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_masked_lm_is_refused_for_decoders_mtp_and_unused_bindings():
    hook = MaskedLM(vocab_size=32)
    decoder = nnx.eval_shape(lambda: TransformerLM(32, 16, 1, 2, 32, moe_every=0,
                                                   rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="needs an encoder"):
        hook.check_model("model", decoder)
    with pytest.raises(ValueError, match="multi-token prediction"):
        hook.check_model("model", type("M", (), {"causal": False, "mtp": object()})())
    gin.clear_config()
    try:
        gin.parse_config("MaskedLM.mask_rate = 0.3")
        with pytest.raises(ValueError, match="MaskedLM.mask_rate is bound but train.objective"):
            objective_hooks("next_token", seed=0, data=None, vocab_size=lambda: 20)
    finally:
        gin.clear_config()


def _run(workdir):
    gin.clear_config()
    try:
        gin_utils.parse([str(REPO / "gin_configs/experiments/test_tiny.gin"),
                         str(REPO / "gin_configs/models/soft_moe_encoder.gin")],
                        ["train.num_steps = 3", "Checkpointer.save_every = 2",
                         "train.eval_every = 3", "train.log_every = 1",
                         "Checkpointer.async_save = False", "DataConfig.eval_max_batches = 1",
                         "SoftMoeLayer.d_ff = 32", "train.num_microbatches = 1"])
        setup = TrainSetup.from_gin(quiet=True)
        assert [h.name for h in setup.hooks] == ["masked_lm"]
        return train(workdir, dataclasses.replace(setup))
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The Soft MoE encoder trained 3 steps: (workdir, summary); shared, read-only."""
    workdir = tmp_path_factory.mktemp("soft_moe") / "mlm"
    return workdir, _run(workdir)


def test_soft_moe_encoder_trains_on_masked_lm_and_resumes_exactly(trained, tmp_path):
    workdir, summary = trained
    records = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records)
    # Validation targets: ~15% of the batch's 8 x 32 real tokens (next-token: all of them).
    assert 0 < sum(summary["valid_tokens"].values()) < 0.3 * 8 * 32
    assert np.isfinite(summary["valid_loss"]["all"])
    assert "train.objective = 'masked_lm'" in (workdir / "operative_config.gin").read_text()
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    again = _run(resumed)
    first = {r["step"]: r["loss"] for r in records}
    second = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl", "train")}
    assert second == pytest.approx(first, rel=1e-6)
    assert again["valid_loss"]["all"] == pytest.approx(summary["valid_loss"]["all"], rel=1e-6)
    try:  # an encoder does not generate
        with pytest.raises(ValueError, match="generation need a causal decoder"):
            load_generator(workdir)
    finally:
        gin.clear_config()


def test_analyze_routing_reports_soft_statistics_of_the_soft_moe_encoder(trained, tmp_path,
                                                                         capsys):
    """scripts/analyze_routing.py on the Soft MoE run: the Soft MoE layer (layer_1;
    moe_every = 2) gets a soft report: each domain's soft routing fractions sum to 1 over
    the 4 experts (every token's combine mass is 1; the domain passes add up to the
    all-token pass), I(domain; expert) from them, the dispatch concentration within
    [1, 32] tokens per slot; the console line says the quantities are soft."""
    workdir, _ = trained
    out = tmp_path / "analysis"
    try:
        assert analyze_routing.main([f"--workdir={workdir}", f"--output_dir={out}",
                                     "--max_batches=1"]) == 0
    finally:
        gin.clear_config()
    report = json.loads((out / "routing_layer_1.json").read_text())
    assert report["soft"] and (out / "routing_layer_1.png").stat().st_size > 0
    fractions = np.asarray(report["soft_routing_fractions"])
    assert fractions.shape == (len(report["domains"]), 4)
    present = np.asarray(report["soft_combine_mass"]).sum(axis=1) > 0  # 1 batch: maybe 1 domain
    assert present.any()
    np.testing.assert_allclose(fractions.sum(axis=1)[present], 1.0, rtol=1e-6)
    assert report["num_tokens"] == pytest.approx(np.sum(report["soft_combine_mass"]), rel=1e-5)
    assert 0 <= report["soft_mutual_information_bits"] <= np.log2(4)
    eff = np.asarray(report["dispatch_effective_tokens_per_slot"])
    assert eff.shape == (4,) and np.all((eff >= 1) & (eff <= 32))
    assert 1 <= report["combine_effective_slots"] <= 8
    assert "layer_1 (Soft MoE, soft assignments): I(domain; expert)" in capsys.readouterr().out
