"""Checkpoints across layer layouts: written scanned, restored unscanned, and vice versa.

Scenario: a 5-layer [dense, MoE] * 2 + dense model takes one AdamW step (so the
optimizer moments are not zero) and is checkpointed; the other layout restores
that checkpoint (`Checkpointer.restore_latest` with its own abstract targets) and
takes the next step on the same batch: the loss, and the parameters after it,
must equal the writer's own next step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.runtime.checkpoints import Checkpointer
from experiments.train.optim import decay_mask, make_optimizer
from experiments.train.train_step import LossWeights, make_train_step
from experiments.train.trainer import split_model
from layers import scan as scan_lib
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM

TX = make_optimizer(1e-2, weight_decay=0.1)


@functools.cache
def _runtime(scan: bool):
    model = nnx.jit(lambda: TransformerLM(
        vocab_size=16, d_model=8, num_layers=5, num_heads=2, d_ff=16, moe_every=2,
        moe_block=functools.partial(MoeLayer, num_experts=4, k=2, d_ff=8),
        dtype="float32", scan_layers=scan, rngs=nnx.Rngs(params=0)))()
    graphdef, params, rest = split_model(model)
    step = jax.jit(make_train_step(graphdef, rest, TX, loss_weights=LossWeights(),
                                   num_microbatches=1, num_domains=1))
    return params, step


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ones = np.ones((2, 6), np.int32)
    return {"inputs": rng.integers(0, 16, (2, 6)).astype(np.int32),
            "targets": rng.integers(0, 16, (2, 6)).astype(np.int32),
            "weights": ones.astype(np.float32), "segment_ids": ones,
            "positions": np.tile(np.arange(6, dtype=np.int32), (2, 1)),
            "domain": np.zeros((2, 6), np.int32)}


@pytest.mark.parametrize("write_scanned", [True, False])
def test_checkpoint_restores_into_the_other_layout(tmp_path, write_scanned):
    key = jax.random.key(0)
    params, step = _runtime(write_scanned)
    params, opt_state, _ = step(params, TX.init(params), _batch(0), key)
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    ck.save(1, params=params, opt_state=opt_state, data_state={},
            rng_key_data=np.asarray(jax.random.key_data(key)), force=True)
    ck.wait()
    next_params, _, metrics = step(params, opt_state, _batch(1), key)

    read_params, read_step = _runtime(not write_scanned)
    abstract = jax.eval_shape(lambda: read_params)
    restored = Checkpointer(tmp_path / "checkpoints", read_only=True).restore_latest(
        abstract, jax.eval_shape(TX.init, abstract))
    assert ("scanned" in restored.params) is (not write_scanned)
    assert jax.tree.structure(restored.params) == jax.tree.structure(read_params)
    read_next, _, read_metrics = read_step(restored.params, restored.opt_state, _batch(1), key)

    np.testing.assert_allclose(read_metrics["loss"], metrics["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 scan_lib.unscan_tree(read_next), scan_lib.unscan_tree(next_params))


def test_weight_decay_mask_ignores_the_layers_axis():
    """A `[d]` gate is not decayed; stacked to `[R, d]` by the scan, it still is not."""
    plain = decay_mask({"layer_0": {"ffn": {"shared_gate": jnp.ones(4), "wi": jnp.ones((4, 2))}}})
    scanned = decay_mask({"scanned": {"unit_0": {"ffn": {
        "shared_gate": jnp.ones((3, 4)), "wi": jnp.ones((3, 4, 2))}}}})
    assert plain["layer_0"]["ffn"] == scanned["scanned"]["unit_0"]["ffn"] == {
        "shared_gate": False, "wi": True}
