"""Multi-token prediction (layers/mtp.py): targets, the weightless case, bad input.

Tiny models (vocab 32, d 16, 2 layers); each test compiles one or two small programs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.train.loss_schedule import LossWeightSchedule
from experiments.train.run_state import split_model
from experiments.train.train_step import LossWeights, make_train_step, scheduled_weight_key
from layers.mlp import DenseMLP
from layers.mtp import MTP_AUX, MtpAux, MultiTokenPrediction, mtp_targets
from layers.transformer import TransformerLM
from moe.router_state import RouterState

VOCAB = 32


def tiny(mtp_depth: int | None = 1) -> TransformerLM:
    """A dense 2-layer decoder, with `mtp_depth` MTP modules (None: no MTP)."""
    mtp = None if mtp_depth is None else functools.partial(MultiTokenPrediction, depth=mtp_depth)
    return TransformerLM(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                         moe_every=0, dense_block=DenseMLP, dtype="float32", mtp=mtp,
                         rngs=nnx.Rngs(0))


def test_targets_of_a_packed_row_stay_inside_their_document():
    # Row: doc A = 10 11 12 13, doc B = 20 21 22, one pad. Depth 1 predicts the token two
    # ahead; positions 2 and 3 of A would read B's tokens (20, 21): invalid.
    inputs = jnp.array([[10, 11, 12, 13, 20, 21, 22, 0]], jnp.int32)
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]], jnp.int32)
    targets, valid = mtp_targets(inputs, segments, 1)
    assert targets[0, :5].tolist() == [12, 13, 20, 21, 22]
    assert valid[0].tolist() == [True, True, False, False, True, False, False, False]
    # Depth 2 (three ahead): only A's position 0 (-> 13); B is too short.
    _, valid2 = mtp_targets(inputs, segments, 2)
    assert valid2[0].tolist() == [True] + [False] * 7


def test_mtp_loss_never_reads_the_next_document():
    # Doc A = 4 tokens, then a one-token doc B and padding. With the right shift and the
    # segment mask, depth 1 scores only A's positions 0 and 1 (targets 12, 13); a shift
    # of one, or no segment mask, would score position 2 or 3 against B's token, so
    # changing that token would change the loss.
    model = tiny()
    segments = jnp.array([[1, 1, 1, 1, 2, 0, 0, 0]] * 2, jnp.int32)
    inputs = jnp.array([[10, 11, 12, 13, b, 0, 0, 0] for b in (20, 5)], jnp.int32)

    @nnx.jit
    def per_row(model, inputs):  # one row at a time: the loss is a mean over the batch
        return [model(inputs[i:i + 1], segment_ids=segments[:1], deterministic=False)[1]
                for i in range(2)]

    aux = per_row(model, inputs)
    assert all(isinstance(a[MTP_AUX], MtpAux) for a in aux)
    losses = [float(a[MTP_AUX].loss_depth[0]) for a in aux]
    assert losses[0] == losses[1] and losses[0] > 0
    # Evaluation and inference (deterministic) skip the modules.
    aux = jax.eval_shape(lambda: model(inputs, segment_ids=segments, deterministic=True)[1])
    assert MTP_AUX not in aux


def _step_of(model: TransformerLM):
    """`run(batch, router_state=None) -> (metrics, gradients)`: one SGD(1) step of
    `model`, lambda = 0 unless the router state schedules another."""
    graphdef, params, rest = split_model(model)
    tx = optax.sgd(1.0)
    step = jax.jit(make_train_step(graphdef, rest, tx, loss_weights=LossWeights(mtp_weight=0.0),
                                   num_microbatches=1, num_domains=1))

    def run(batch, router_state=None):
        new_params, _, metrics = step(params, tx.init(params), batch, jax.random.PRNGKey(0),
                                      router_state)
        return metrics, jax.tree.map(lambda a, b: a - b, params, new_params)  # = gradients

    return run


def test_lambda_zero_gives_the_loss_and_gradients_of_the_model_without_mtp():
    inputs = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, VOCAB, jnp.int32)
    segments = jnp.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2], jnp.int32)
    batch = {"inputs": inputs, "targets": jnp.roll(inputs, -1, axis=1),
             "weights": (segments > 0).astype(jnp.float32), "segment_ids": segments,
             "positions": jnp.zeros_like(inputs), "domain": jnp.zeros_like(inputs)}
    plain_metrics, plain_grads = _step_of(tiny(None))(batch)
    with_mtp = _step_of(tiny(1))
    metrics, grads = with_mtp(batch)
    assert float(metrics["mtp_loss"]) > 0  # computed, weighted 0
    assert float(metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), abs=1e-6)
    assert set(grads) == set(plain_grads) | {"mtp"}
    flat = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(plain_grads)[0]:
        np.testing.assert_allclose(flat[path], g, atol=1e-6, err_msg=str(path))
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["mtp"]))
    # A scheduled lambda = 0.3 (LossWeightSchedule's router-state key, same program) adds
    # 0.3 x the MTP loss and moves the shared embedding.
    weighted_metrics, weighted = with_mtp(batch, RouterState(
        shared={scheduled_weight_key("mtp_weight"): np.float32(0.3)}))
    assert float(weighted_metrics["loss"]) == pytest.approx(
        float(plain_metrics["loss"]) + 0.3 * float(weighted_metrics["mtp_loss"]), rel=1e-5)
    assert not np.allclose(weighted["embedding"], plain_grads["embedding"], atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(depth=-1), r"MultiTokenPrediction\.depth must be an int >= 0.*got -1"),
    (dict(depth=1.5), r"MultiTokenPrediction\.depth"),
    (dict(moe="yes"), r"MultiTokenPrediction\.moe must be True or False"),
])
def test_bad_mtp_options_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiTokenPrediction(16, make_block=lambda moe: None, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight="lbl_weight"), r"LossWeightSchedule\.weight must be one of"),
    (dict(values=(0.3, 0.1)), r"one more entry than boundaries"),
    (dict(values=(0.3, -0.1), boundaries=(5,)), r"values must be >= 0"),
    (dict(values=(0.3, 0.1, 0.0), boundaries=(5, 5)), r"boundaries must be increasing"),
])
def test_bad_loss_weight_schedules_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossWeightSchedule(**kwargs)


def test_loss_weight_schedule_steps():
    schedule = LossWeightSchedule(values=(0.3, 0.1), boundaries=(3,))
    assert [schedule.value(s) for s in (1, 2, 3, 4, 9)] == [0.3, 0.3, 0.3, 0.1, 0.1]


def test_flop_counter_counts_the_mtp_module():
    from experiments.train.flops import flop_counter
    plain, with_mtp = (nnx.eval_shape(lambda d=d: tiny(d)) for d in (None, 1))  # shapes only
    extra = (flop_counter(with_mtp, batch_size=1, seq_len=12).dense_per_position
             - flop_counter(plain, batch_size=1, seq_len=12).dense_per_position)
    mtp_matmuls = sum(2.0 * v.size for _, v in nnx.to_flat_state(nnx.state(with_mtp.mtp, nnx.Param))
                      if v.ndim >= 2)
    attention = 4.0 * 12 * 2 * 8  # seq_len x heads x head_dim (16 / 2)
    head = 2.0 * 16 * VOCAB
    assert extra == pytest.approx(mtp_matmuls + attention + head)
