"""Checkpoint upcycling end to end: a tiny dense run of scripts/train.py, converted
by scripts/upcycle.py (and experiments.convert.upcycle_checkpoint in process), resumed by the trainer."""

import base64
import json
import re
import shutil

import gin
import jax
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from experiments.convert import upcycle_checkpoint as ex
from experiments.data.config import DataConfig
from experiments.reporting.metrics import read_jsonl
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from experiments.train.optim import make_optimizer
from tests.helpers import run_script, run_script_once, shared_dir, shared_training_run

TINY_GIN = "gin_configs/experiments/test_tiny.gin"
DENSE_STEPS = 6
# test_tiny.gin: d_model 32, 2 layers, d_ff 64, expert_d_ff 32 -> G = 2 when upcycled.
NORMALIZED = "TransformerLM.moe_kwargs = {'dispatch': 'sort', 'capacity_factor': None, " \
             "'normalize': True}"


# The shared dense run (also copied into a bucket by tests/runtime/test_gcs_workdir.py).
DENSE_ARGS = (f"--gin_file={TINY_GIN}", "--gin_param=TransformerLM.moe_every = 0",
              f"--gin_param=train.num_steps = {DENSE_STEPS}",
              "--gin_param=Checkpointer.save_every = 3", "--gin_param=train.eval_every = 6",
              "--gin_param=Checkpointer.async_save = False", "--quiet")


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    workdir, _ = shared_training_run(tmp_path_factory, "upcycle_dense", *DENSE_ARGS)
    return workdir



@pytest.fixture(scope="module")
def cli_upcycled(dense_run, tmp_path_factory):
    """scripts/upcycle.py with --verify, expert weights written sharded over 4 devices."""
    out = shared_dir(tmp_path_factory, "upcycle_cli") / "moe"
    result = run_script_once(tmp_path_factory, "upcycle_cli", "scripts/upcycle.py",
                             f"--dense_workdir={dense_run}", f"--out_workdir={out}",
                             "--moe_layers=every_other", "--num_experts=4", "--k=2",
                             f"--gin_param={NORMALIZED}", "--mesh=expert=4", "--verify",
                             num_devices=8)
    return out, result


def test_cli_upcycles_and_verifies_exactness(cli_upcycled):
    out, result = cli_upcycled
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"expected exact \(<= 1e-05 x max \|logit\| .* in fp32\): OK", result.stdout), (
        result.stdout)
    record = json.loads((out / ex.UPCYCLE_FILE).read_text())
    assert record["step"] == DENSE_STEPS and record["moe_layers"] == ["layer_1"]
    assert record["granularity"] == 2 and record["router_init"] == "virtual_group"
    assert record["verify"]["max_abs_logit_diff"] <= 1e-5
    assert abs(record["verify"]["loss_diff"]) <= 1e-5
    assert "TransformerLM.moe_every = 2" in (out / "config.gin").read_text()


def test_cli_writes_expert_weights_sharded_over_expert(cli_upcycled):
    out, _ = cli_upcycled
    shardings = json.loads((out / "checkpoints" / str(DENSE_STEPS) / "params" /
                            "_sharding").read_text())
    by_name = {base64.b64decode(k).decode(): json.loads(v) for k, v in shardings.items()}
    experts = by_name["layer_1.ffn.experts.wi"]
    assert experts["sharding_type"] == "NamedSharding"
    assert experts["partition_spec"][0] == "expert"
    assert dict(zip(experts["axis_names"], experts["shape"]))["expert"] == 4
    # Nothing else uses the expert axis (the other axes have size 1 here).
    assert "expert" not in json.dumps(by_name["embedding"].get("partition_spec"))


def test_trainer_resumes_from_upcycled_checkpoint_and_loss_decreases(cli_upcycled, tmp_path):
    # A private copy: other xdist workers read the shared upcycled workdir meanwhile.
    out = tmp_path / "moe"
    shutil.copytree(cli_upcycled[0], out)
    # No --gin_file: the trainer reads <workdir>/config.gin; it runs on one
    # device although the experts were written over four.
    result = run_script("scripts/train.py", f"--workdir={out}",
                        "--gin_param=train.num_steps = 18", "--gin_param=train.log_every = 6",
                        "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == list(range(DENSE_STEPS + 1, 19))
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert all(r["lbl"] > 0 for r in records)  # the MoE layer routes


def _restore(workdir, abstract_params, step):
    tx = make_optimizer(optax.constant_schedule(0.0))
    checkpointer = Checkpointer(workdir / "checkpoints")
    try:
        return checkpointer.restore_step(step, abstract_params,
                                         jax.eval_shape(tx.init, abstract_params))
    finally:
        checkpointer.close()


def test_dense_step_and_optimizer_copy(dense_run, tmp_path, clean_gin):
    out = tmp_path / "moe"
    result = ex.upcycle(dense_run, out, gin_params=[NORMALIZED], config=ex.UpcycleConfig(
        moe_layers="every_other", num_experts=4, k=2, dense_step=3, optimizer_state="copy",
        diversify="noise",
        noise_std=0.1))
    assert result.step == 3 and result.verify is None
    assert any("diversify='noise'" in v for v in result.exactness_violations)
    dense_flat = traverse_util.flatten_dict(_restore(dense_run, _abstract_params(dense_run),
                                                     3).params)
    moe = _restore(out, _abstract_params(out), 3)
    mu = traverse_util.flatten_dict(moe.opt_state[1][0].mu)
    assert int(moe.opt_state[1][0].count) == 3 and int(moe.opt_state[1][2].count) == 3
    assert not np.any(np.asarray(mu[("layer_1", "ffn", "router", "kernel")]))
    assert np.any(np.asarray(mu[("layer_1", "ffn", "experts", "wi")]))
    moe_flat = traverse_util.flatten_dict(moe.params)
    np.testing.assert_array_equal(moe_flat[("embedding",)], dense_flat[("embedding",)])
    noisy = moe_flat[("layer_1", "ffn", "experts", "wi")]
    assert not np.allclose(noisy[0], noisy[2])  # same shard, independent noise


def _abstract_params(workdir):
    """The abstract parameters of the model a workdir's config.gin describes."""
    gin.clear_config()
    gin_utils.parse([str(workdir / "config.gin")], [])
    model = ex._abstract_model(DataConfig().vocab_size())
    return nnx.split(model, nnx.Param)[1].to_pure_dict()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(config=ex.UpcycleConfig(moe_layers="all", k=3)), ValueError,
     "k=3 must be a multiple of granularity G=2"),
    (dict(config=ex.UpcycleConfig(moe_layers=(0, 5))), ValueError,
     r"moe_layers \(0, 5\) out of range: the dense model has 2 layers"),
    (dict(gin_params=["TransformerLM.num_heads = 4", "TransformerLM.moe_every = 2"]), ValueError,
     "shape mismatch for layer_0/attention/key"),
    (dict(config=ex.UpcycleConfig(dense_step=4)), ValueError,
     r"dense_step=4 not found; checkpoints at steps \[3, 6\]"),
])
def test_refusals(dense_run, tmp_path, clean_gin, kwargs, error, match):
    with pytest.raises(error, match=match):
        ex.upcycle(dense_run, tmp_path / "moe", **kwargs)


def test_refuses_a_source_that_is_not_dense(cli_upcycled, tmp_path, clean_gin):
    out, _ = cli_upcycled
    with pytest.raises(ex.NotDenseError, match="is not dense: its config has MoE layers"):
        ex.upcycle(out, tmp_path / "again")


def test_refuses_a_non_empty_output(dense_run, cli_upcycled, clean_gin):
    out, _ = cli_upcycled
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        ex.upcycle(dense_run, out, config=ex.UpcycleConfig(moe_layers="all"))


def test_cli_error_exit_status(dense_run, tmp_path):
    result = run_script("scripts/upcycle.py", f"--dense_workdir={dense_run}",
                        f"--out_workdir={tmp_path / 'moe'}", "--moe_layers=7")
    assert result.returncode == 2
    assert "moe_layers (7,) out of range" in result.stderr


def test_upcycle_into_a_scanned_model_verifies(dense_run, tmp_path, clean_gin):
    """The dense run (unscanned, 2 layers) upcycled into an all-MoE target with
    `TransformerLM.scan_layers = True`: the mapping runs unscanned, the written
    checkpoint is scanned (`scanned/unit_0`, 2 repeats), and --verify's exactness
    check (dense vs upcycled logits) passes on the scanned model."""
    out = tmp_path / "moe"
    result = ex.upcycle(dense_run, out, gin_params=[NORMALIZED, "TransformerLM.scan_layers = True"],
                        config=ex.UpcycleConfig(moe_layers="all", num_experts=4, k=2),
                        verify=True, verify_batches=1)
    assert result.moe_layers == ("layer_0", "layer_1")
    assert result.verify.max_abs_logit_diff <= 1e-5 * max(result.verify.logit_scale, 1.0)
    moe = _restore(out, _abstract_params(out), DENSE_STEPS)
    assert set(moe.params) >= {"scanned"} and "layer_0" not in moe.params
    assert moe.params["scanned"]["unit_0"]["ffn"]["experts"]["wi"].shape[:2] == (2, 4)
    mu = moe.opt_state[1][0].mu
    assert mu["scanned"]["unit_0"]["ffn"]["router"]["kernel"].shape[0] == 2
