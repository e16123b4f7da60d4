"""A scanned model on a mesh: stacked parameters sharded by the rules (`layers`
unsharded), expert parallelism inside the scan, same step as one device unscanned.

Scenario: 4 layers, MoE every other layer ([dense, MoE] x 2, scanned as one unit
of 2), 8 experts top-2, dropless; one SGD step on 8 host devices with
data=2 x fsdp=2 x expert=2 (the expert-parallel all_to_all runs inside the scan
body) against the unscanned model on one device.
"""

import functools

import jax
import numpy as np
import optax
from flax import nnx

from experiments.runtime import mesh as mesh_lib
from experiments.train.train_step import LossWeights, make_train_step
from experiments.train.trainer import split_model
from layers import scan as scan_lib
from layers.moe_layer import MoeLayer
from layers.params import logical_axes_of
from layers.transformer import TransformerLM


def _model(scan: bool) -> TransformerLM:
    moe_block = functools.partial(MoeLayer, num_experts=8, k=2, d_ff=16)
    return nnx.jit(lambda: TransformerLM(
        vocab_size=48, d_model=16, num_layers=4, num_heads=2, d_ff=32, moe_every=2,
        moe_block=moe_block, dtype="float32", scan_layers=scan, rngs=nnx.Rngs(params=0)))()


def _batch():
    rng = np.random.default_rng(0)
    ones = np.ones((8, 8), np.int32)
    return {"inputs": rng.integers(0, 48, (8, 8)).astype(np.int32),
            "targets": rng.integers(0, 48, (8, 8)).astype(np.int32),
            "weights": ones.astype(np.float32), "segment_ids": ones,
            "positions": np.tile(np.arange(8, dtype=np.int32), (8, 1)),
            "domain": np.zeros((8, 8), np.int32)}


def _step(scan: bool, mesh_shape):
    sharder = mesh_lib.Sharding(mesh_shape, ep_buffer_factor=4.0)
    model = _model(scan)
    line = sharder.configure_dispatch(model)
    graphdef, params, rest = split_model(model)
    placed = sharder.place_params(params, logical_axes_of(model))
    tx = optax.sgd(1.0)
    step = sharder.wrap_train_step(make_train_step(
        graphdef, rest, tx, loss_weights=LossWeights(), num_microbatches=1, num_domains=1))
    new_params, _, metrics = step(placed, sharder.init_opt_state(tx, placed), _batch(),
                                  jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, new_params)
    return float(metrics["loss"]), grads, placed, line


def test_scanned_expert_parallel_step_matches_one_device_unscanned():
    loss, grads, _, _ = _step(False, None)
    mesh_loss, mesh_grads, placed, line = _step(True, {"data": 2, "fsdp": 2, "expert": 2})
    assert "expert_parallel" in line and "layer_1" in line and "layer_3" in line
    np.testing.assert_allclose(mesh_loss, loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 scan_lib.unscan_tree(mesh_grads), grads)
    # Stacked expert weights [R, E, d, f]: `layers` unsharded, then the usual rules.
    wi = placed["scanned"]["unit_1"]["ffn"]["experts"]["wi"]
    assert wi.shape == (2, 8, 16, 16)
    assert tuple(wi.sharding.spec) == (None, "expert", "fsdp", "tensor")
