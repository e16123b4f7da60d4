"""DeepSeek-V2/V3 routing as `TopKRouter` options (the mapping in docs/model.md).

Scenarios: a hand-built token whose best group differs between DeepSeek-V3's group
score (sum of the two best) and DeepSeek-V2's (the best one); and V3's router as
transformers writes it (sigmoid scores, e_score_correction_bias for selection only,
top-2-sum groups, renormalised, scaled by routed_scaling_factor), re-implemented
here in numpy from its definition, against `TopKRouter` with the mapped options
and the bias as our loss-free `selection_bias`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import TopKRouter
from moe.router_state import SELECTION_BIAS


def _router(num_experts, k, **options) -> TopKRouter:
    """d_model = E with an identity kernel: the router's logits are its input."""
    router = TopKRouter(num_experts, num_experts, k, **options, rngs=nnx.Rngs(0))
    router.kernel[...] = jnp.eye(num_experts, dtype=jnp.float32)
    return router


def _route(router, logits, bias=None):
    state = {} if bias is None else {SELECTION_BIAS: jnp.asarray(bias, jnp.float32)}
    return router(jnp.asarray(logits, jnp.float32), mask=jnp.ones(len(logits)), capacity=None,
                  deterministic=True, rng=None, state=state)


def test_v2_max_and_v3_top2_sum_group_scores_pick_different_groups():
    # Groups {0, 1} and {2, 3}: best single score in group 0 (0.40), best pair in group 1.
    logits = np.log([[0.40, 0.05, 0.30, 0.25]])
    v3 = _route(_router(4, 1, num_groups=2, top_groups=1), logits)
    v2 = _route(_router(4, 1, num_groups=2, top_groups=1, group_score="max"), logits)
    assert int(v3.expert_index[0, 0]) == 2 and int(v2.expert_index[0, 0]) == 0
    np.testing.assert_allclose(v2.weights[0, 0], 0.40, rtol=1e-6)  # softmax prob, unscaled


def _hf_v3_router(logits, bias, k, n_group, topk_group, scale):
    """transformers' DeepseekV3TopkRouter.forward after the projection, in numpy."""
    scores = 1 / (1 + np.exp(-logits))
    choice = scores + bias
    per = logits.shape[1] // n_group
    grouped = choice.reshape(len(logits), n_group, per)
    group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
    keep = np.argsort(-group_scores, axis=-1, kind="stable")[:, :topk_group]
    mask = np.zeros_like(group_scores, bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    choice = np.where(np.repeat(mask, per, axis=-1), choice, -np.inf)
    index = np.argsort(-choice, axis=-1, kind="stable")[:, :k]
    weights = np.take_along_axis(scores, index, axis=-1)
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return index, weights * scale


def test_v3_router_matches_its_definition_with_the_correction_bias_as_selection_bias():
    num_experts, k = 16, 4
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (32, num_experts)))
    bias = np.asarray(0.3 * jax.random.normal(jax.random.PRNGKey(1), (num_experts,)))
    router = _router(num_experts, k, score="sigmoid", normalize=True, route_scale=2.5,
                     num_groups=4, top_groups=2)
    got = _route(router, logits, bias)
    index, weights = _hf_v3_router(logits, bias, k, 4, 2, 2.5)
    order = np.argsort(np.asarray(got.expert_index), axis=-1)  # compare as sets per token
    np.testing.assert_array_equal(np.sort(got.expert_index, -1), np.sort(index, -1))
    want = np.take_along_axis(weights, np.argsort(index, -1), -1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(got.weights), order, -1), want,
                               rtol=1e-5)
    assert not np.array_equal(np.sort(_route(router, logits).expert_index, -1),
                              np.sort(index, -1))  # the bias changes the selection


@pytest.mark.parametrize("options, message", [
    (dict(group_score="max"), "TopKRouter.group_score='max' needs TopKRouter.num_groups"),
    (dict(num_groups=2, top_groups=1, group_score="mean"), "TopKRouter.group_score must be one of"),
])
def test_bad_group_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        _router(4, 1, **options)
