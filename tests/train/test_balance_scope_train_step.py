"""Balance scopes in the train step: micro-batches, accumulation, 8 data-parallel devices."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.train.balance_loss import StepBalance
from experiments.train.train_step import LossWeights, make_train_step
from experiments.train.trainer import split_model
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM
from moe import balance
from moe.layer_aux import MoeAux

NUM_EXPERTS = 4


def _model():
    # One layer, a MoE FFN (layer_0), top-2 of 4, dropless.
    moe_block = functools.partial(MoeLayer, num_experts=NUM_EXPERTS, k=2, d_ff=16)
    return TransformerLM(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                         moe_every=1, moe_block=moe_block, dtype="float32",
                         rngs=nnx.Rngs(params=0))


@functools.cache
def _split():
    return split_model(nnx.jit(_model)())


def _batch(rows=16, seq=8, seed=0):
    rng = np.random.default_rng(seed)
    weights = np.ones((rows, seq), np.float32)
    weights[:, -1] = 0  # one padding token per row: equal real tokens per row
    segment_ids = (weights > 0).astype(np.int32)
    return {"inputs": rng.integers(0, 32, (rows, seq)).astype(np.int32),
            "targets": rng.integers(0, 32, (rows, seq)).astype(np.int32),
            "weights": weights, "segment_ids": segment_ids,
            "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)) * segment_ids,
            "domain": np.zeros((rows, seq), np.int32)}


TX = optax.sgd(1.0)


@functools.cache
def _step_fn(scope, num_microbatches, mode, data_parallel_size):
    # Cached: every configuration compiles once per session, whatever the inputs.
    graphdef, _, rest = _split()
    weights = LossWeights(lbl_weight=1.0, z_loss_weight=0.0, lbl_scope=scope,
                          lbl_global_mode=mode)
    return jax.jit(make_train_step(graphdef, rest, TX, loss_weights=weights,
                                   num_microbatches=num_microbatches, num_domains=1,
                                   data_parallel_size=data_parallel_size))


def _run(scope, num_microbatches, mode="exact", data_parallel_size=1, params=None,
         sharded=False):
    _, default_params, _ = _split()
    params = default_params if params is None else params
    batch = _batch()
    tx = TX
    step = _step_fn(scope, num_microbatches, mode, data_parallel_size)
    if sharded:
        mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
        batch = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
        params = jax.device_put(params, NamedSharding(mesh, P()))
    return step(params, tx.init(params), batch, jax.random.PRNGKey(0))


def _assert_same(run_a, run_b, rtol=1e-5, atol=1e-6):
    (pa, _, ma), (pb, _, mb) = run_a, run_b
    assert float(ma["lbl"]) == pytest.approx(float(mb["lbl"]), rel=rtol)
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=rtol)
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def concatenated():
    """Reference: the whole batch as one micro-batch on one device, global scope."""
    return _run("global_batch", 1)


def test_global_equals_micro_batch_with_one_microbatch_on_one_device(concatenated):
    _assert_same(_run("micro_batch", 1), concatenated, rtol=1e-6, atol=1e-7)
    # ...and both equal the MoE layer's own LBL over the call.
    _, _, metrics = concatenated
    assert float(metrics["lbl"]) == pytest.approx(float(metrics["moe"]["layer_0"].lbl),
                                                  rel=1e-6)


def test_global_lbl_over_4_microbatches_equals_concatenated_batch(concatenated):
    # Exact mode: a first pass counts the whole step, then the gradient pass.
    accumulated = _run("global_batch", 4)
    _assert_same(accumulated, concatenated)


def test_global_lbl_on_8_data_parallel_devices_equals_one_device(concatenated):
    assert jax.device_count() == 8
    sharded = _run("global_batch", 2, data_parallel_size=8, sharded=True)
    _assert_same(sharded, concatenated)


def test_micro_batch_scope_on_8_devices_is_per_device():
    # With D=8 and A=2 each device sees one row per micro-batch, so micro_batch ==
    # sequence, and the sharded step computes the same as the unsharded one.
    sharded = _run("micro_batch", 2, data_parallel_size=8, sharded=True)
    _assert_same(sharded, _run("sequence", 1))


@pytest.mark.parametrize("scope, num_microbatches, mode, data_parallel_size", [
    ("global_batch", 4, "exact", 1),
    ("global_batch", 2, "causal", 1), ("shuffled:16", 2, "exact", 1),
    ("global_batch", 2, "exact", 8), ("micro_batch", 2, "exact", 8)])
def test_loss_is_one_at_balance_for_any_microbatches_and_devices(
        scope, num_microbatches, mode, data_parallel_size):
    # A zero router kernel gives uniform probabilities P_i = 1/E, for which the
    # LBL is exactly 1 whatever the counts (no 1/D or 1/A scaling as in Megatron).
    _, params, _ = _split()
    params = jax.tree.map(lambda x: x, params)
    params["layer_0"]["ffn"]["router"]["kernel"] = jnp.zeros_like(
        params["layer_0"]["ffn"]["router"]["kernel"])
    _, _, metrics = _run(scope, num_microbatches, mode, data_parallel_size, params=params,
                         sharded=data_parallel_size > 1)
    assert float(metrics["lbl"]) == pytest.approx(1.0, abs=1e-6)


def test_causal_buffer_uses_running_counts_and_is_exact_at_the_last_microbatch():
    # A=2 causal: micro-batch 1 uses its own counts, micro-batch 2 the counts of
    # both (the true global f). Recomputed here from the model's per-micro-batch aux.
    graphdef, params, rest = _split()
    batch = _batch()

    @jax.jit
    def layer_aux(h):
        model = nnx.merge(graphdef, params, rest)
        return model(h["inputs"], segment_ids=h["segment_ids"], positions=h["positions"],
                     deterministic=False)[1]["layer_0"]

    auxes = [layer_aux({k: v[i * 8:(i + 1) * 8] for k, v in batch.items()}) for i in range(2)]
    counts = [a.counts for a in auxes]
    lbl_1 = balance.load_balancing_loss(auxes[0].token_probs, counts[0],
                                        mask=auxes[0].token_mask)
    lbl_2 = balance.load_balancing_loss(auxes[1].token_probs, counts[0] + counts[1],
                                        mask=auxes[1].token_mask)
    _, _, causal = _run("global_batch", 2, mode="causal")
    assert float(causal["lbl"]) == pytest.approx(float(lbl_1 + lbl_2) / 2, rel=1e-5)
    # The exact mode would use the global counts for micro-batch 1 too: a different value.
    lbl_1_global = balance.load_balancing_loss(auxes[0].token_probs, counts[0] + counts[1],
                                               mask=auxes[0].token_mask)
    assert abs(float(lbl_1_global) - float(lbl_1)) > 1e-4


def test_step_reports_batch_and_sequence_max_violation(concatenated):
    _, _, metrics = concatenated
    stats = metrics["moe"]["layer_0"]
    expected = float(balance.max_violation(stats.counts))
    assert float(stats.batch_max_violation) == pytest.approx(expected, rel=1e-6)
    # Per-sequence MaxVio is at least the batch one on average (fewer tokens per group).
    assert float(stats.sequence_max_violation) >= expected - 1e-6


def test_scope_errors_name_the_option():
    with pytest.raises(ValueError, match="LossWeights.lbl_scope"):
        LossWeights(lbl_scope="global")
    with pytest.raises(ValueError, match="lbl_global_mode"):
        LossWeights(lbl_global_mode="megatron")
    with pytest.raises(ValueError, match="lbl_global_mode"):
        StepBalance(global_mode="approx")


def test_layers_without_token_routing_keep_their_lbl_and_the_scope_warns():
    # An expert-choice layer's aux has an `lbl` but no per-token routing: a
    # global-batch scope cannot regroup it, so its own LBL is kept (averaged over
    # the 2 micro-batches) and a warning names the layer; 'micro_batch' is silent.
    aux = {"layer_1": MoeAux(lbl=jnp.float32(3.0))}
    segment_ids = jnp.ones((4, 8), jnp.int32)
    for scope, expect_warning in (("global_batch", True), ("micro_batch", False)):
        balance = StepBalance(scope, num_microbatches=2)
        groups = balance.groups(segment_ids, jax.random.PRNGKey(0))
        group = groups.lbl_group[:2]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, own = balance.terms(aux, group, groups.row_group[:2], groups, None, True)
        # One aux group (the layer, stacked as [1]) without counts.
        assert own == (None,) and out[0]["lbl"].tolist() == [1.5]
        messages = [str(w.message) for w in caught]
        assert any("'layer_1'" in m and "global_batch" in m for m in messages) == expect_warning
