"""MaskRouter: the k best experts by logit (plus selection bias), each with weight exactly 1."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.routers import MaskRouter
from moe.router_state import SELECTION_BIAS


def test_top_k_by_logit_and_bias_with_unit_weights():
    """d=2, E=3: the kernel makes the logits of token [1, 0] equal (3, 1, 2); top-2 picks
    experts 0 and 2 with weight 1 each; a selection bias of +5 on expert 1 makes it
    chosen instead of 2; a padded token gets weight 0."""
    router = MaskRouter(2, 3, 2, rngs=nnx.Rngs(0))
    router.kernel[...] = jnp.asarray([[3.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    x = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])
    mask = jnp.asarray([1.0, 0.0])
    out = router(x, mask=mask, capacity=None, deterministic=True, rng=None, state={})
    assert sorted(np.asarray(out.expert_index[0]).tolist()) == [0, 2]
    np.testing.assert_array_equal(out.weights, [[1.0, 1.0], [0.0, 0.0]])
    biased = router(x, mask=mask, capacity=None, deterministic=True, rng=None,
                    state={SELECTION_BIAS: jnp.asarray([0.0, 5.0, 0.0])})
    assert sorted(np.asarray(biased.expert_index[0]).tolist()) == [0, 1]
