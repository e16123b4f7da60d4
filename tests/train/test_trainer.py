"""Train step, optimizer, gin handling and a tiny end-to-end run of scripts/train.py."""

import functools
import gc
import json
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.reporting import sweep  # noqa: F401  sweep: registers Sweep
from experiments.reporting.metrics import read_jsonl
from experiments.runtime import gin_utils
from experiments.train import optim
from experiments.train.train_step import LossWeights, make_train_step, split_microbatches
from experiments.train.trainer import split_model
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM
from moe.layer_aux import MoeAux, reduce_layers
from tests.helpers import REPO, run_script, shared_training_run

TINY_GIN = "gin_configs/experiments/test_tiny.gin"
NUM_DOMAINS = 2


def _micro_model(moe_every=1):
    moe_block = functools.partial(MoeLayer, num_experts=4, k=2, d_ff=16)
    return TransformerLM(vocab_size=40, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                         moe_every=moe_every, moe_block=moe_block, dtype="float32",
                         rngs=nnx.Rngs(params=0))


def _batch(batch_size=4, seq=8, seed=0):
    rng = np.random.default_rng(seed)
    weights = np.ones((batch_size, seq), np.float32)
    weights[:, -2:] = 0  # padding at the end of each row
    segment_ids = (weights > 0).astype(np.int32)
    domain = np.where(weights > 0, np.arange(batch_size)[:, None] % NUM_DOMAINS, -1)
    return {"inputs": rng.integers(3, 40, (batch_size, seq)).astype(np.int32),
                "targets": rng.integers(3, 40, (batch_size, seq)).astype(np.int32),
                "weights": weights, "segment_ids": segment_ids,
                "positions": np.tile(np.arange(seq, dtype=np.int32), (batch_size, 1)) * segment_ids,
                "domain": domain.astype(np.int32)}


@functools.cache
def _micro_split():
    return split_model(nnx.jit(_micro_model)())


def _step(num_microbatches, loss_weights, tx=None):
    graphdef, params, rest = _micro_split()
    tx = tx or optax.sgd(0.1)
    step = jax.jit(make_train_step(graphdef, rest, tx, loss_weights=loss_weights,
                                   num_microbatches=num_microbatches, num_domains=NUM_DOMAINS))
    return step(params, tx.init(params), _batch(), jax.random.PRNGKey(0))


# No LBL: it is a per-routing-group quantity, so only it may differ between
# one group of 4 rows and two of 2. The z-loss is a per-token mean and the
# micro-batches hold equal token counts, so it must match.
ACCUMULATION_WEIGHTS = LossWeights(lbl_weight=0.0, z_loss_weight=1e-3)


@pytest.fixture(scope="module")
def full_and_accumulated():
    return _step(1, ACCUMULATION_WEIGHTS), _step(2, ACCUMULATION_WEIGHTS)


def test_gradient_accumulation_matches_full_batch(full_and_accumulated):
    (p1, _, m1), (p2, _, m2) = full_and_accumulated
    for key in ("loss", "ce", "z_loss", "grad_norm"):
        assert float(m1[key]) == pytest.approx(float(m2[key]), rel=1e-5), key
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_step_outputs_moe_statistics_summed_over_microbatches(full_and_accumulated):
    _, (_, _, metrics) = full_and_accumulated
    batch = _batch()
    real = batch["weights"].sum()
    assert float(metrics["num_tokens"]) == real
    assert set(metrics["moe"]) == {"layer_0", "layer_1"}
    for stats in metrics["moe"].values():
        assert stats.counts.shape == (4,)
        assert float(stats.counts.sum()) == pytest.approx(2 * real)  # k=2, dropless
        assert float(stats.kept_counts.sum()) == pytest.approx(2 * real)
        assert float(stats.num_tokens) == real
        assert float(stats.dropped_fraction) == 0.0
    # loss = CE + 0 * LBL + 1e-3 * sum of the layers' z-losses.
    assert float(metrics["lbl"]) > 0
    expected = float(metrics["ce"]) + 1e-3 * float(metrics["z_loss"])
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-6)
    # Per-domain CE sums add up to the batch CE.
    assert float(metrics["domain_tokens"].sum()) == real
    assert float(metrics["domain_ce_sum"].sum()) / real == pytest.approx(float(metrics["ce"]),
                                                                         rel=1e-5)


def test_layer_reduction_sum_and_mean():
    aux = {"layer_1": MoeAux(lbl=jnp.array(1.0)), "layer_3": MoeAux(lbl=jnp.array(3.0))}
    assert float(reduce_layers(aux, "lbl", "sum")) == 4.0
    assert float(reduce_layers(aux, "lbl", "mean")) == 2.0
    assert float(reduce_layers({}, "lbl", "sum")) == 0.0


def test_loss_weights_validation():
    with pytest.raises(ValueError, match="layer_reduction"):
        LossWeights(layer_reduction="max")


def test_microbatches_must_divide_batch():
    with pytest.raises(ValueError, match="num_microbatches=3"):
        split_microbatches(_batch(), 3)


def test_decay_mask_excludes_norms_biases_and_vectors():
    _, params, _ = split_model(nnx.eval_shape(_micro_model))
    flat = {k: v for k, v in zip(
        ["/".join(str(getattr(p, "key", p)) for p in path)
         for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]],
        jax.tree.leaves(optim.decay_mask(params)))}
    assert flat["embedding"] is True
    norm_keys = [k for k in flat if "norm" in k]
    assert norm_keys and not any(flat[k] for k in norm_keys)
    shapes = {"/".join(str(getattr(p, "key", p)) for p in path): leaf.ndim
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not any(flat[k] for k, ndim in shapes.items() if ndim < 2)
    assert any(flat[k] for k in flat if "experts" in k)


def test_weight_decay_leaves_masked_params_alone():
    params = {"dense": {"kernel": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones((2, 2))},
              "bias": jnp.ones(2)}
    tx = optim.make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5, clip_norm=None)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.05)
    np.testing.assert_allclose(updates["norm"]["scale"], 0.0)
    np.testing.assert_allclose(updates["bias"], 0.0)


def test_schedule_warmup_then_cosine():
    s = optim.learning_rate_schedule(100, peak_learning_rate=1.0, warmup_steps=10, end_ratio=0.1)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(100)) == pytest.approx(0.1)
    assert 0.1 < float(s(55)) < 1.0
    with pytest.raises(ValueError, match="peak_learning_rate"):
        optim.learning_rate_schedule(10, peak_learning_rate=0.0)



def test_unknown_gin_binding_is_named(clean_gin):
    with pytest.raises(gin_utils.GinConfigError, match="num_stepz"):
        gin_utils.parse([], ["train.num_stepz = 3"])
    with pytest.raises(gin_utils.GinConfigError, match="NoSuchThing"):
        gin_utils.parse([], ["NoSuchThing.x = 3"])


def test_missing_gin_file_is_named(clean_gin, tmp_path):
    with pytest.raises(gin_utils.GinConfigError, match="nope.gin"):
        gin_utils.parse([str(tmp_path / "nope.gin")], [])
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'models/does_not_exist.gin'\n")
    with pytest.raises(gin_utils.GinConfigError, match="does_not_exist.gin"):
        gin_utils.parse([str(bad)], [])


GIN_FILES = sorted((REPO / "gin_configs").rglob("*.gin"))


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(REPO / "gin_configs")))
def test_every_gin_config_parses_and_includes_one_level(clean_gin, path):
    for included in gin_utils.included_files(path):
        target = gin_utils.GIN_CONFIGS_DIR / included
        assert target.is_file(), f"{path} includes missing {included}"
        assert not gin_utils.included_files(target), f"{included} includes further files"
    gin_utils.parse([str(path)], [])


def test_tiny_models_of_every_variant_build(clean_gin):
    for variant in ("dense", "switch_top1", "top2", "top8of64"):
        gin.clear_config()
        gin_utils.parse([str(REPO / f"gin_configs/models/{variant}_tiny.gin")], [])
        model = nnx.eval_shape(lambda: TransformerLM(vocab_size=259, rngs=nnx.Rngs(0)))
        assert bool(model.moe_layer_names) == (variant != "dense")


# --- End to end: one tiny run shared by the tests below. ---

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "tiny_run", f"--gin_file={TINY_GIN}",
                               "--gin_param=train.num_steps = 30")


def test_tiny_run_loss_decreases(tiny_run):
    workdir, _ = tiny_run
    train = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == list(range(1, 31))
    first, last = np.mean([r["ce"] for r in train[:3]]), np.mean([r["ce"] for r in train[-3:]])
    assert last < first - 0.3, (first, last)
    assert all(math.isfinite(r["loss"]) for r in train)


def test_tiny_run_domain_losses_reach_evaluation(tiny_run):
    workdir, stdout = tiny_run
    valid = read_jsonl(workdir / "metrics.jsonl", "valid")
    assert [r["step"] for r in valid] == [10, 20, 30]
    for record in valid:
        assert {"loss", "code/loss", "prose/loss"} <= set(record)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["domains"] == ["code", "prose"]
    assert all(summary["valid_tokens"][d] > 0 for d in ("code", "prose"))
    assert summary["unigram_entropy"]["bits_per_byte"] > 3
    assert set(summary["moe"]) == {"layer_1"}
    for text in ("unigram entropy", "prose", "layer_1: expert load", str(workdir)):
        assert text in stdout
    assert (workdir / "config.gin").read_text().count("train.num_steps = 30") == 1
    assert "TransformerLM.d_model = 32" in (workdir / "operative_config.gin").read_text()


def test_tiny_run_tensorboard_scalars_read_back(tiny_run):
    from tbparse import SummaryReader

    workdir, _ = tiny_run
    scalars = SummaryReader(str(workdir / "tensorboard")).scalars
    tags = set(scalars["tag"])
    for tag in ("train/loss", "train/ce", "train/lbl", "train/z_loss", "train/learning_rate",
                "train/tokens_per_sec", "valid/loss", "valid/code/loss", "valid/prose/loss",
                "moe/layer_1/load/expert_0", "moe/layer_1/load/expert_3",
                "moe/layer_1/dropped_fraction", "moe/layer_1/max_violation",
                "moe/layer_1/router_entropy"):
        assert tag in tags, tag
    loss = scalars[scalars["tag"] == "train/loss"].sort_values("step")
    jsonl = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl", "train")]
    np.testing.assert_allclose(loss["value"].to_numpy(), jsonl, rtol=1e-6)
    loads = scalars[(scalars["tag"].str.startswith("moe/layer_1/load/")) & (scalars["step"] == 30)]
    assert float(loads["value"].sum()) == pytest.approx(1.0, abs=1e-5)
    hist = SummaryReader(str(workdir / "tensorboard")).histograms
    assert "moe/layer_1/load_histogram" in set(hist["tag"])


def test_analyze_routing_writes_heatmaps_and_json(tiny_run, tmp_path):
    workdir, _ = tiny_run
    result = run_script("scripts/analyze_routing.py", f"--workdir={workdir}",
                        f"--output_dir={tmp_path}", "--max_batches=2")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "routing.json").read_text())
    assert report["step"] == 30
    layer = report["layers"]["layer_1"]
    assert layer["domains"] == ["code", "prose"]
    assert np.array(layer["counts"]).shape == (2, 4)
    assert 0.0 <= layer["mutual_information_nats"] <= math.log(2) + 1e-9
    for name in ("routing_layer_1.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "I(domain; expert)" in result.stdout


def test_trainer_holds_one_copy_of_the_training_state(tmp_path, clean_gin, monkeypatch):
    # The initial parameters and optimizer state are handed to the loop, not kept
    # beside it: during training exactly three arrays have the embedding's shape
    # (the parameter and Adam's two moments), not six.
    from experiments.reporting.metrics import MetricsWriter
    from experiments.train import trainer

    gin_utils.parse([str(REPO / TINY_GIN)], [
        "train.num_steps = 3", "train.eval_every = 3", "Checkpointer.save_every = 100",
        "Checkpointer.async_save = False"])
    embedding_shape = (259, 32)  # byte vocabulary x test_tiny's d_model
    counts = []
    gc.collect()
    # Arrays of that shape that other tests in this process still hold (module fixtures).
    before = sum(a.shape == embedding_shape for a in jax.live_arrays())
    real_write = MetricsWriter.write

    def write(self, step, split, *args, **kwargs):
        if split == "train":
            gc.collect()  # count what is referenced, not what awaits the cycle collector
            counts.append(sum(a.shape == embedding_shape for a in jax.live_arrays()) - before)
        return real_write(self, step, split, *args, **kwargs)

    monkeypatch.setattr(MetricsWriter, "write", write)
    trainer.train(tmp_path / "run", quiet=True)
    assert counts == [3, 3, 3]
