"""Scale-up transforms (moe/scale_up.py) on a tiny random TransformerLM: the grown model's
logits against the source's, at four growth shapes and all at once, for the
function-preserving schemes (equal within fp32 rounding) and the others (different)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import scan as scan_lib
from layers.transformer import TransformerLM
from moe import scale_up as su

V, EPS = 23, 1e-6
SOURCE = su.Shape(d_model=16, d_ff=24, num_heads=2, num_layers=2)


def _model(shape: su.Shape, *, tied=False, eps=EPS, glu=False) -> TransformerLM:
    """The model's structure only (`nnx.eval_shape`: nothing initialised)."""
    return nnx.eval_shape(lambda: TransformerLM(
        vocab_size=V, d_model=shape.d_model, num_layers=shape.num_layers,
        num_heads=shape.num_heads, d_ff=shape.d_ff, head_dim=8, moe_every=0,
        activation="swiglu" if glu else "relu", tie_embeddings=tied, norm_eps=eps,
        dtype="float32", rngs=nnx.Rngs(0)))


def _source_params(tied: bool, glu: bool = False):
    """Random parameters, norm gains in [0.5, 1.5] (ones would hide gain errors)."""
    model = _model(SOURCE, tied=tied, glu=glu)
    abstract = nnx.split(model, nnx.Param)[1].to_pure_dict()
    rng = np.random.default_rng(0)
    return model, jax.tree_util.tree_map_with_path(
        lambda p, a: (rng.uniform(0.5, 1.5, a.shape) if "scale" in str(p[-1])
                      else rng.normal(0.0, 0.3, a.shape)).astype(np.float32), abstract)


def _logits(model, params, inputs):
    graphdef = nnx.split(model, nnx.Param)[0]
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])(params, inputs)


def _grow(target: su.Shape, *, tied=False, glu=False, **schemes):
    model, params = _source_params(tied, glu)
    growth = su.Growth(SOURCE, target, **schemes)
    grown = su.scale_up(params, growth, tied=tied, layer_name=scan_lib.layer_name)
    big = _model(target, tied=tied, eps=EPS * growth.norm_eps_factor, glu=glu)
    like = nnx.split(big, nnx.Param)[1].to_pure_dict()
    assert jax.tree.map(np.shape, grown) == jax.tree.map(np.shape, like)
    inputs = jnp.asarray(np.random.default_rng(1).integers(0, V, (2, 7)), jnp.int32)
    ref = _logits(model, params, inputs)
    diff = float(jnp.max(jnp.abs(_logits(big, grown, inputs) - ref)))
    return diff, float(jnp.max(jnp.abs(ref))), growth


GROWTHS = {
    "d_ff 24->40": su.Shape(16, 40, 2, 2),
    "heads 2->3": su.Shape(16, 24, 3, 2),
    "d_model 16->24": su.Shape(24, 24, 2, 2),
    "depth 2->5": su.Shape(16, 24, 2, 5),
    "all": su.Shape(24, 40, 3, 5),
}


@pytest.mark.parametrize("name", list(GROWTHS))
def test_function_preserving_schemes_keep_the_logits(name):
    """fpi widths (uneven copy counts: 40 = 24 + 16), zero d_model (norm eps x d/d'),
    identity layers: max |dlogit| at fp32 rounding."""
    diff, scale, growth = _grow(GROWTHS[name], glu=name == "all")
    assert growth.violations() == []
    assert diff <= 1e-5 * max(1.0, scale), (name, diff)


def test_zero_d_model_growth_with_tied_embeddings_is_exact():
    diff, scale, _ = _grow(su.Shape(24, 24, 2, 2), tied=True)
    assert diff <= 1e-5 * max(1.0, scale)


@pytest.mark.parametrize("schemes,target", [
    ({"width": "aki"}, su.Shape(16, 40, 2, 2)),
    ({"d_model_scheme": "copy"}, su.Shape(24, 24, 2, 2)),
    ({"depth": "stack"}, su.Shape(16, 24, 2, 4)),
    ({"depth": "duplicate"}, su.Shape(16, 24, 2, 3)),
])
def test_the_other_schemes_change_the_function_and_say_so(schemes, target):
    diff, scale, growth = _grow(target, **schemes)
    assert growth.violations() and diff > 1e-3 * max(1.0, scale)


def test_depth_map_and_refusals():
    assert su.depth_map(2, 5, "identity") == [(0, False), (0, True), (0, True), (1, False),
                                              (1, True)]
    assert su.depth_map(2, 4, "stack") == [(0, False), (1, False), (0, True), (1, True)]
    with pytest.raises(ValueError, match="d_ff: the target 16 is smaller than the source 24"):
        su.Growth(SOURCE, su.Shape(16, 16, 2, 2))
    with pytest.raises(ValueError, match="depth_scheme must be one of"):
        su.Growth(SOURCE, SOURCE, depth="magic")
