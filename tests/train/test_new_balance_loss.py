"""The worked example of docs/architecture.md, "Add a balance loss": one aux field,
the function that fills it, and a loss weight; the train step picks it up.

The library's own losses are fields of `MoeAux`; to keep the library unchanged
this test declares its toy loss on a `MoeAux` subclass returned by a toy
router, with its weight on a `LossWeights` subclass. The toy loss is the mean
squared router probability, sum_e P_e^2 (1/E at perfect balance).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.train.run_state import split_model
from experiments.train.train_step import LossWeights, make_train_step
from layers.moe_layer import MoeLayer
from layers.routers import TopKRouter
from layers.transformer import TransformerLM
from moe.layer_aux import MoeAux, aux_field
from tests.helpers import packed_batch


@dataclasses.dataclass(frozen=True)
class ToyAux(MoeAux):
    toy_loss: jax.Array | None = aux_field("mean", "loss", weight="toy_weight",  # noqa: RUF009
                                           doc="sum_e P_e^2 of the mean router probabilities")


jax.tree_util.register_dataclass(
    ToyAux, data_fields=[f.name for f in dataclasses.fields(ToyAux)], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class ToyLossWeights(LossWeights):
    toy_weight: float = 0.0


class ToyLossRouter(TopKRouter):
    """Top-k routing whose aux also carries the toy loss."""

    def __call__(self, x, **kwargs):
        routing = super().__call__(x, **kwargs)
        aux = ToyAux(**{f.name: getattr(routing.aux, f.name)
                        for f in dataclasses.fields(MoeAux)})
        aux = aux.replace(toy_loss=jnp.sum(routing.aux.mean_probs ** 2))
        return dataclasses.replace(routing, aux=aux)


def _model():
    moe_block = functools.partial(MoeLayer, num_experts=4, k=2, d_ff=16, router=ToyLossRouter)
    return nnx.jit(lambda: TransformerLM(vocab_size=16, d_model=8, num_layers=2, num_heads=2,
                                         d_ff=16, moe_every=1, moe_block=moe_block,
                                         dtype="float32", rngs=nnx.Rngs(params=0)))()



def test_a_new_loss_is_weighted_into_the_step_loss_and_reported():
    model = _model()
    graphdef, params, rest = split_model(model)
    tx = optax.sgd(0.0)
    outputs = {}
    for weight in (0.0, 2.0):
        step = jax.jit(make_train_step(graphdef, rest, tx, loss_weights=ToyLossWeights(
            toy_weight=weight), num_microbatches=1, num_domains=1))
        _, _, metrics = step(params, tx.init(params), packed_batch(2, 12), jax.random.PRNGKey(0))
        outputs[weight] = jax.device_get(metrics)
    toy = float(outputs[2.0]["toy_loss"])
    # Two MoE layers, each 1/E <= sum_e P_e^2 <= 1, summed over layers (layer_reduction 'sum').
    assert 2 * 0.25 - 1e-6 <= toy <= 2.0
    np.testing.assert_allclose(float(outputs[0.0]["toy_loss"]), toy, rtol=1e-6)
    np.testing.assert_allclose(float(outputs[2.0]["loss"]) - float(outputs[0.0]["loss"]),
                               2.0 * toy, rtol=1e-5)
    assert set(outputs[2.0]["loss_terms"]) == {"z_loss", "dts_loss", "skip_loss", "toy_loss"}
    # The per-layer statistics keep the toy field, reduced over micro-batches as declared.
    assert all(isinstance(s, ToyAux) and s.toy_loss is not None
               for s in outputs[2.0]["moe"].values())


def test_a_loss_without_its_weight_is_refused_naming_it():
    model = _model()
    graphdef, params, rest = split_model(model)
    tx = optax.sgd(0.0)
    step = make_train_step(graphdef, rest, tx, loss_weights=LossWeights(), num_microbatches=1,
                           num_domains=1)
    with pytest.raises(ValueError, match="weighted by LossWeights.toy_weight"):
        jax.eval_shape(step, params, tx.init(params), packed_batch(2, 12), jax.random.PRNGKey(0))
