"""Loss-free balancing in the trainer: bias outside params, checkpoint round trip, exact resume."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.reporting.metrics import read_jsonl
from experiments.runtime.checkpoints import LOSS_FREE_HOOK, Checkpointer
from experiments.runtime.checksums import tree_digest
from experiments.train import loss_free
from experiments.train.trainer import split_model
from layers.transformer import TransformerLM
from moe.router_state import SELECTION_BIAS, RouterState
from tests.helpers import run_script

RATE = 0.01


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    # Values with full float32 mantissas (not short decimals) come back bit for bit.
    biases = {"layer_1": np.float32([1 / 3, -2e-7, 0.1, 7.0]),
              "layer_3": np.float32(np.random.default_rng(0).normal(size=8))}
    params = {"w": np.ones((2, 2), np.float32)}
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=False)
    ckpt.save(1, params=params, opt_state={"m": np.zeros(2, np.float32)}, data_state={},
              rng_key_data=np.zeros(2, np.uint32), hook_state={LOSS_FREE_HOOK: biases})
    ckpt.save(2, params=params, opt_state={"m": np.zeros(2, np.float32)}, data_state={},
              rng_key_data=np.zeros(2, np.uint32))
    ckpt.close()
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=False)
    abstract = jax.eval_shape(lambda: params)
    assert ckpt.restore_latest(abstract, None).balance_state is None  # step 2 has none
    restored = ckpt.restore_step(1, abstract, None).balance_state
    assert set(restored) == set(biases)
    for layer, bias in biases.items():
        assert restored[layer].dtype == np.float32
        np.testing.assert_array_equal(restored[layer].view(np.uint32), bias.view(np.uint32))
    ckpt.close()


def test_bias_is_not_a_parameter_and_gets_no_gradient():
    model = nnx.jit(lambda: TransformerLM(vocab_size=16, d_model=8, num_layers=1, num_heads=2,
                                          d_ff=16, moe_every=1, num_experts=4, k=2,
                                          dtype="float32", rngs=nnx.Rngs(params=0)))()
    _, params, _ = split_model(model)
    assert not any("selection" in str(path) for path, _ in
                   jax.tree_util.tree_flatten_with_path(params)[0])
    inputs = jnp.arange(12).reshape(2, 6) % 16

    def loss(bias):
        logits, aux = model(inputs, router_state=RouterState(
            layers={"layer_0": {SELECTION_BIAS: bias}}))
        return jnp.mean(logits ** 2) + aux["layer_0"].lbl + aux["layer_0"].z_loss

    grad = jax.jit(jax.grad(loss))(jnp.array([0.5, -0.5, 0.0, 0.1]))
    np.testing.assert_array_equal(grad, np.zeros(4))


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="LossFreeBalancing: bias update rule must be one of"):
        loss_free.LossFreeBalancing(rule="multiplicative")


@pytest.fixture(scope="module")
def biased_run(tmp_path_factory):
    """6 steps of the tiny job with sign-rule biases (u=0.01), global-batch LBL over
    2 micro-batches, checkpoints at steps 3 and 6."""
    workdir = tmp_path_factory.mktemp("loss_free") / "run"
    args = ["--gin_file=gin_configs/experiments/test_tiny.gin",
            "--gin_param=LossFreeBalancing.enabled = True",
            f"--gin_param=LossFreeBalancing.rate = {RATE}",
            "--gin_param=LossWeights.lbl_scope = 'global_batch'",
            "--gin_param=train.num_steps = 6", "--gin_param=Checkpointer.save_every = 3",
            "--gin_param=train.eval_every = 6", "--gin_param=Checkpointer.async_save = False",
            "--quiet", f"--workdir={workdir}"]
    result = run_script("scripts/train.py", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, args


def _meta(workdir, step):
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def _biases(workdir, step):
    """The loss-free hook's state saved at `step`: `{layer: [E] values}`."""
    state = _meta(workdir, step)["hook_state"][LOSS_FREE_HOOK]
    return {layer: entry["values"] for layer, entry in state.items()}


def test_biases_move_by_multiples_of_u_and_are_logged(biased_run):
    workdir, _ = biased_run
    bias = np.asarray(_biases(workdir, 6)["layer_1"])
    assert np.any(bias != 0)
    np.testing.assert_allclose(bias / RATE, np.round(bias / RATE), atol=1e-4)
    assert np.all(np.abs(bias) <= 6 * RATE + 1e-6)
    train = read_jsonl(workdir / "metrics.jsonl", "train")
    assert all("batch_max_violation" in r and "sequence_max_violation" in r for r in train)
    valid = read_jsonl(workdir / "metrics.jsonl", "valid")
    assert "max_violation" in valid[-1] and "layer_1/max_violation" in valid[-1]


def test_resume_restores_biases_exactly(biased_run, tmp_path):
    # Resume a copy from step 3: steps 4..6 recomputed with the restored biases give
    # the same losses and the same final biases, bit for bit.
    workdir, args = biased_run
    copy = tmp_path / "resumed"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "6")
    args = [a for a in args if not a.startswith("--workdir")] + [f"--workdir={copy}"]
    result = run_script("scripts/train.py", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _biases(copy, 6) == _biases(workdir, 6)
    first = {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl", "train")}
    second = {r["step"]: r["loss"] for r in read_jsonl(copy / "metrics.jsonl", "train")}
    assert second == pytest.approx(first, rel=1e-6)


def test_routing_analysis_routes_with_the_checkpointed_biases(biased_run, tmp_path):
    # Large biases on experts 2 and 3 (top-2 of 4) pull every token to them: the
    # analysis must route as the trainer does, selection biases included.
    workdir, _ = biased_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    meta_path = copy / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    biases = {"layer_1": np.float32([0.0, 0.0, 100.0, 100.0])}
    meta["hook_state"] = {LOSS_FREE_HOOK: {
        k: {"dtype": "float32", "shape": [4], "values": v.astype(np.float64).tolist()}
        for k, v in biases.items()}}
    meta["hook_state_digest"] = tree_digest({LOSS_FREE_HOOK: biases})
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "analysis"
    result = run_script("scripts/analyze_routing.py", f"--workdir={copy}",
                        f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "routing.json").read_text())
    assert report["step"] == 6 and report["selection_biases"] is True
    fractions = np.asarray(report["layers"]["layer_1"]["routing_fractions"])
    np.testing.assert_allclose(fractions, [[0.0, 0.0, 0.5, 0.5]] * len(fractions), atol=1e-6)
