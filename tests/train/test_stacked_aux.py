"""The scanned model's aux stays stacked through the train step (`moe.layer_aux.
StackedLayerAux`): the traced step does not grow with depth, and the stacked form
reads and reduces like the per-layer dict."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.train.train_step import LossWeights, make_train_step
from experiments.train.trainer import split_model
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM
from moe.layer_aux import MoeAux, StackedLayerAux, reduce_layers


def _equations(jaxpr) -> int:
    """Equations of a jaxpr and of every jaxpr nested in its equations' parameters."""
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _equations(inner)
    return count


def _step_equations(num_layers: int) -> int:
    """Equations of the traced train step (AdamW, 2 micro-batches, a global-batch
    LBL scope with its counting pass) of a scanned [dense, MoE] * n model."""
    model = nnx.eval_shape(lambda: TransformerLM(
        vocab_size=11, d_model=8, num_layers=num_layers, num_heads=2, d_ff=16, moe_every=2,
        moe_block=functools.partial(MoeLayer, num_experts=4, k=2, d_ff=8),
        dtype="float32", scan_layers=True, rngs=nnx.Rngs(params=0)))
    graphdef, params, rest = split_model(model)
    tx = optax.adamw(1e-3)
    step = make_train_step(graphdef, rest, tx, num_microbatches=2, num_domains=1,
                           loss_weights=LossWeights(lbl_scope="global_batch",
                                                    seq_balance_weight=1e-4))
    ints = jax.ShapeDtypeStruct((4, 6), jnp.int32)
    batch = dict(inputs=ints, targets=ints, segment_ids=ints, positions=ints, domain=ints,
                 weights=jax.ShapeDtypeStruct((4, 6), jnp.float32))
    jaxpr = jax.make_jaxpr(step)(params, jax.eval_shape(tx.init, params), batch,
                                 jax.random.key(0))
    return _equations(jaxpr.jaxpr)


def test_traced_train_step_does_not_grow_with_depth():
    # 4 and 12 layers scan the same [dense, MoE] unit 2 and 6 times: with the aux
    # stacked through losses, balance scopes and metrics, only shapes change. (Before,
    # every MoE layer's aux was sliced out and reduced on its own: 4 more layers of ops
    # per extra MoE layer, which made the compile time grow with depth.)
    assert _step_equations(4) == _step_equations(12)


def test_stacked_aux_reads_and_reduces_like_the_per_layer_dict():
    # Two groups: layer_0 alone (unscanned) and layers 1 and 3 stacked (a scanned unit
    # position); iteration follows the given layer order, not the group order.
    lone = MoeAux(lbl=jnp.float32(1.0), counts=jnp.array([1.0, 3.0]))
    stacked = MoeAux(lbl=jnp.array([2.0, 4.0]), counts=jnp.array([[2.0, 2.0], [0.0, 4.0]]))
    aux = StackedLayerAux([(("layer_1", "layer_3"), stacked),
                           (("layer_0",), jax.tree.map(lambda a: a[None], lone))],
                          order=["layer_0", "layer_1", "layer_3"])
    assert list(aux) == ["layer_0", "layer_1", "layer_3"]
    np.testing.assert_array_equal(aux["layer_3"].counts, [0.0, 4.0])
    as_dict = {"layer_0": lone, "layer_1": aux["layer_1"], "layer_3": aux["layer_3"]}
    for reduction, expected in (("sum", 7.0), ("mean", 7.0 / 3)):
        np.testing.assert_allclose(reduce_layers(aux, "lbl", reduction), expected, rtol=1e-6)
        np.testing.assert_allclose(reduce_layers(as_dict, "lbl", reduction), expected,
                                   rtol=1e-6)
    # A pytree: the layout survives a round trip (e.g. jax.device_get), and `of` wraps a
    # plain dict as groups of one.
    again = jax.tree.map(np.asarray, aux)
    assert list(again) == list(aux) and float(again["layer_1"].lbl) == 2.0
    wrapped = StackedLayerAux.of(as_dict)
    assert [names for names, _ in wrapped.groups] == [("layer_0",), ("layer_1",), ("layer_3",)]
    assert float(reduce_layers(wrapped, "lbl", "sum")) == 7.0
