"""The train step's finiteness flags (`experiments.train.train_step.finite_checks`):
an update may be applied only when the loss, the gradient norm and the updated
parameters are all finite. The step returns the candidate state either way; the
trainer keeps its old state when `applied` is False (tests/train/test_reliability.py
runs that end to end: a NaN step skipped, the run going on, every checkpoint
finite), and `experiments.train.nonfinite.describe` says what was not finite."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.bench.step import synthetic_batch
from experiments.train.nonfinite import describe
from experiments.train.train_step import LossWeights, finite_checks, make_train_step
from experiments.train.trainer import split_model
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM

GRADS = {"embedding": {"w": jnp.ones((2, 3))}, "layer_0": {"w": jnp.ones((3,)),
                                                          "b": jnp.zeros((2,))}}


def _with(tree, path, value):
    """`tree` with element [0] of the leaf at `path` set to `value`."""
    group, leaf = path
    out = jax.tree.map(lambda x: x, tree)
    out[group] = dict(out[group], **{leaf: out[group][leaf].ravel().at[0].set(value)
                                     .reshape(out[group][leaf].shape)})
    return out


def _checks(loss=1.0, grads=GRADS, params=GRADS):
    return jax.device_get(finite_checks(jnp.float32(loss), optax.tree.norm(grads), grads,
                                        params))


def test_all_finite_is_applied():
    checks = _checks()
    assert checks["applied"] and checks["loss"] and checks["grad_norm"] and checks["params"]
    assert checks["grad_groups"] == {"embedding": True, "layer_0": True}


def test_a_nan_gradient_names_its_group_and_is_not_applied():
    # One NaN in layer_0's bias: the global norm is NaN and only layer_0 is named.
    checks = _checks(grads=_with(GRADS, ("layer_0", "b"), jnp.nan))
    assert not checks["applied"] and not checks["grad_norm"] and checks["params"]
    assert checks["grad_groups"] == {"embedding": True, "layer_0": False}


def test_an_infinite_updated_parameter_is_not_applied():
    # Finite loss and gradients, but the update overflowed one parameter to inf.
    checks = _checks(params=_with(GRADS, ("embedding", "w"), jnp.inf))
    assert not checks["applied"] and checks["grad_norm"] and not checks["params"]


def test_a_nan_loss_is_not_applied():
    checks = _checks(loss=jnp.nan)
    assert not checks["applied"] and not checks["loss"] and checks["grad_norm"]


def _inf_update() -> optax.GradientTransformation:
    """An optimizer whose update is +inf from finite gradients (with a state to keep)."""
    def init(params):
        return {"count": jnp.zeros((), jnp.int32)}

    def update(grads, state, params=None):
        return (jax.tree.map(lambda g: jnp.full_like(g, jnp.inf), grads),
                {"count": state["count"] + 1})

    return optax.GradientTransformation(init, update)


def test_step_flags_a_non_finite_update_from_finite_gradients():
    # SGD applies; an optimizer whose update is inf from finite gradients is flagged
    # by the updated parameters alone (the loss and the gradients are finite).
    model = TransformerLM(vocab_size=16, d_model=8, num_layers=2, num_heads=2, d_ff=16,
                          moe_every=2,
                          moe_block=functools.partial(MoeLayer, num_experts=4, k=2, d_ff=8),
                          dtype="float32", rngs=nnx.Rngs(params=0))
    graphdef, params, rest = split_model(model)
    batch = synthetic_batch(2, 6, 16)
    for tx, applied in ((optax.sgd(1e-2), True), (_inf_update(), False)):
        step = jax.jit(make_train_step(graphdef, rest, tx, loss_weights=LossWeights(),
                                       num_microbatches=1, num_domains=1))
        new_params, _, metrics = step(params, tx.init(params), batch,
                                              jax.random.key(0))
        metrics = jax.device_get(metrics)
        assert bool(metrics["finite"]["applied"]) == applied
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
        assert all(metrics["finite"]["grad_groups"].values())
        finite = [bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_params)]
        assert all(finite) == applied  # the candidate the trainer keeps or drops
        if not applied:
            assert describe(metrics).endswith("updated parameters not finite")
            assert "non-finite gradients" not in describe(metrics)
