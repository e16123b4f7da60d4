"""Expert pruning and merging on hand-made layers and a tiny model (`moe.expert_surgery`,
`moe.expert_stats`, the collector `experiments.inference.routing_stats`).

The model tests use a 2-layer TransformerLM whose only MoE layer is the last
one (layer_1), so a token's logits depend on its own routing in that layer
only: changing which experts exist can change exactly the tokens that used them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.inference.restore import RestoredModel
from experiments.inference.routing_stats import collect_stats
from layers.moe_layer import MoeLayer
from layers.routers import TopKRouter
from layers.transformer import TransformerLM
from moe import expert_stats
from moe import expert_surgery as es
from moe.experts import ExpertFFN
from moe.router_state import SELECTION_BIAS, RouterState

V, S = 23, 12


def _labelled_layer(num_experts: int = 4, d: int = 3, f: int = 2) -> dict:
    """Expert e's weights are all e (+0.5 in wo), router column e is all 10 + e."""
    e = np.arange(num_experts, dtype=np.float32)
    return {"router": {"kernel": np.tile(10 + e, (d, 1)), "bias": 100 + e},
            "experts": {"wi": np.broadcast_to(e[:, None, None], (num_experts, d, f)).copy(),
                        "wo": np.broadcast_to(e[:, None, None] + 0.5,
                                              (num_experts, f, d)).copy()}}


def test_prune_keeps_the_chosen_experts_in_their_original_order():
    layer = _labelled_layer()
    pruned, bias = es.prune_layer(layer, [3, 1], selection_bias=np.float32([0, 1, 2, 3]))
    assert pruned["experts"]["wi"][:, 0, 0].tolist() == [1.0, 3.0]
    assert pruned["experts"]["wo"][:, 0, 0].tolist() == [1.5, 3.5]
    assert pruned["router"]["kernel"][0].tolist() == [11.0, 13.0]
    assert pruned["router"]["bias"].tolist() == [101.0, 103.0]
    assert bias.tolist() == [1.0, 3.0]


def test_prune_keeping_every_expert_is_the_identity():
    layer = _labelled_layer()
    pruned, bias = es.prune_layer(layer, range(4), selection_bias=np.float32([4, 3, 2, 1]))
    for part in ("router", "experts"):
        for name, value in layer[part].items():
            np.testing.assert_array_equal(pruned[part][name], value)
    assert bias.tolist() == [4, 3, 2, 1]


def test_shared_experts_and_the_shared_gate_are_left_alone():
    layer = {**_labelled_layer(), "shared": {"wi": np.ones((3, 4)), "wo": np.ones((4, 3))},
             "shared_gate": np.arange(3.0)}
    for out, _ in (es.prune_layer(layer, [0, 2]), es.merge_layer(layer, [[0, 1], [2, 3]])):
        assert out["shared"] is layer["shared"] and out["shared_gate"] is layer["shared_gate"]
        assert out["router"]["kernel"].shape == (3, 2)


def test_router_parameters_surgery_does_not_know_are_refused_by_name():
    """A router with a parameter surgery has no rule for (the zero-computation experts'
    null_kernel [d, m]): both operations refuse, naming the parameter."""
    layer = _labelled_layer()
    layer["router"] = {**layer["router"], "null_kernel": np.zeros((3, 2), np.float32)}
    for operation in (lambda: es.prune_layer(layer, [0, 2]),
                      lambda: es.merge_layer(layer, [[0, 1], [2, 3]])):
        with pytest.raises(ValueError, match=r"does not know the router/expert parameters "
                                             r"\['null_kernel'\]"):
            operation()


@pytest.mark.parametrize("keep", [[], [0, 0], [4], [-1]])
def test_prune_refuses_bad_keep(keep):
    with pytest.raises(ValueError, match="keep must be distinct expert indices in"):
        es.prune_layer(_labelled_layer(), keep)


def test_merge_averages_by_frequency_and_combines_router_columns():
    """Experts 0 and 2 (values 0 and 2) used 3:1 -> merged weights 0.5; expert 1 and 3 alone."""
    layer = _labelled_layer()
    merged, bias = es.merge_layer(layer, [[2, 0], [1], [3]], frequency=np.float64([3, 5, 1, 7]),
                                  selection_bias=np.float32([4, 0, 8, 0]))
    assert merged["experts"]["wi"][:, 0, 0].tolist() == [0.5, 1.0, 3.0]
    assert merged["router"]["kernel"][0].tolist() == [10.5, 11.0, 13.0]
    assert merged["router"]["bias"].tolist() == [100.5, 101.0, 103.0]
    assert bias.tolist() == [5.0, 0.0, 0.0]
    uniform, _ = es.merge_layer(layer, [[0, 2], [1], [3]])
    assert uniform["experts"]["wi"][:, 0, 0].tolist() == [1.0, 1.0, 3.0]


def test_merge_alias_keeps_every_router_column():
    merged, bias = es.merge_layer(_labelled_layer(), [[0, 2], [1, 3]], router="alias",
                                  selection_bias=np.float32([1, 2, 3, 4]))
    assert merged["experts"]["wi"][:, 0, 0].tolist() == [1.0, 2.0, 1.0, 2.0]
    assert merged["router"]["kernel"][0].tolist() == [10.0, 11.0, 12.0, 13.0]
    assert bias.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("groups", [[[0, 1], [2]], [[0, 1], [1, 2, 3]], [[0, 1, 2, 3], []]])
def test_merge_refuses_groups_that_do_not_partition(groups):
    with pytest.raises(ValueError, match="groups must partition the experts 0..3"):
        es.merge_layer(_labelled_layer(), groups)


def test_layer_stats_by_hand():
    """3 tokens, 3 experts, k=2; expert e scales its input by (e + 1) (relu, positive x)."""
    d = 2
    eye = np.eye(d, dtype=np.float32)
    ffn = ExpertFFN(wi=jnp.stack([eye * (e + 1) for e in range(3)]),
                    wo=jnp.stack([eye] * 3), activation="relu")
    x = jnp.float32([[3, 4], [1, 0], [0, 2]])
    index = jnp.int32([[0, 1], [2, 0], [1, 3]])  # token 2's second choice: the sentinel
    weights = jnp.float32([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]])
    mask = jnp.float32([1, 1, 0])  # token 2 is padding
    logits = jnp.float32([[1, 2, 3], [0, 1, -1], [5, 5, 5]])
    probs = jax.nn.softmax(logits)
    s = expert_stats.layer_stats(x, mask, logits, probs, index, weights, ffn).to_numpy()
    assert s.num_tokens == 2
    assert s.counts.tolist() == [2, 1, 1]
    np.testing.assert_allclose(s.gate_sum, [1.1, 0.4, 0.5], rtol=1e-6)
    assert s.coselect.tolist() == [[2, 1, 1], [1, 1, 0], [1, 0, 1]]
    # ||E_e(x)|| = (e + 1) ||x||: token 0 -> 5 (e0), 10 (e1); token 1 -> 3 (e2), 1 (e0).
    np.testing.assert_allclose(s.output_norm_sum, [6, 10, 3], rtol=1e-6)
    np.testing.assert_allclose(s.gated_norm_sum, [0.6 * 5 + 0.5, 4, 1.5], rtol=1e-6)
    np.testing.assert_allclose(s.mean_output_norm, [3, 10, 3], rtol=1e-6)
    z = np.float64([[1, 2, 3], [0, 1, -1]])
    np.testing.assert_allclose(s.logit_gram, z.T @ z, rtol=1e-6)
    np.testing.assert_allclose(s.mean_prob, np.asarray(probs[:2]).mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.mean_routed_logits[1], z[0], rtol=1e-6)


def test_spectral_clusters_recover_two_blocks_and_uncurl_keeps_the_most_used():
    # Experts {0, 2} and {1, 3} have (nearly) parallel logit columns; the blocks are orthogonal.
    z = np.float64([[1, 0, 1.1, 0], [0, 1, 0, 0.9], [1, 0, 0.9, 0.1]])
    gram = z.T @ z
    stats = expert_stats.zeros(4)
    stats = expert_stats.RoutingStats(**{**stats.as_dict(), "logit_gram": gram,
                                         "counts": np.float64([5, 1, 9, 2])})
    assert es.spectral_clusters(es.logit_affinity(stats), 2) == [[0, 2], [1, 3]]
    kept, clusters = es.uncurl_keep(stats, 2)
    assert clusters == [[0, 2], [1, 3]] and kept == [2, 3]
    # MC-SMoE's centres are the two most-used experts, 2 and 0, both of the first block;
    # 1 and 3 are orthogonal to both and join the lower-index centre.
    assert es.dominant_groups(stats, 2) == [[0, 1, 3], [2]]
    assert es.frequency_keep(stats, 2) == [0, 2]
    assert len(es.spectral_clusters(np.ones((5, 5)), 5)) == 5  # never an empty cluster


# ---------------------------------------------------------------------------
# On a model: statistics from the collector, surgery, the new model's logits.


def _model(num_experts: int, k: int, *, normalize: bool = True) -> TransformerLM:
    router = functools.partial(TopKRouter, normalize=normalize)
    model = TransformerLM(vocab_size=V, d_model=16, num_layers=2, num_heads=4, d_ff=24,
                          moe_every=2, moe_block=functools.partial(
                              MoeLayer, d_ff=8, num_experts=num_experts, k=k, router=router),
                          dtype="float32", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [p + 0.3 * jax.random.normal(key, p.shape, p.dtype) for p, key in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)


def _params(model):
    return nnx.split(model, nnx.Param, ...)[1].to_pure_dict()


def _with_params(model, params):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params), rest)


def _inputs() -> np.ndarray:
    return np.random.default_rng(0).integers(0, V, (3, S)).astype(np.int32)


def _forward(model, bias=None):
    state = RouterState() if bias is None else RouterState(
        layers={"layer_1": {SELECTION_BIAS: jnp.asarray(bias)}})
    logits, aux = model(jnp.asarray(_inputs()), router_state=state)
    return np.asarray(logits), np.asarray(aux["layer_1"].token_experts).reshape(3, S, -1)


def _stats(model, bias):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    restored = RestoredModel(workdir=Path("."), step=0, vocab_size=V, graphdef=graphdef,
                             params=params.to_pure_dict(), rest=rest, router_state=RouterState(
                                 layers={"layer_1": {SELECTION_BIAS: jnp.asarray(bias)}}))
    batch = {"inputs": _inputs(), "segment_ids": np.ones((3, S), np.int32)}
    return collect_stats(restored, [batch, batch])["layer_1"]


def _pruned_model(model, keep, bias):
    params = _params(model)
    ffn, new_bias = es.prune_layer(jax.device_get(params["layer_1"]["ffn"]), keep, bias)
    params["layer_1"]["ffn"] = ffn
    return _with_params(_model(len(keep), model.moe_layer("layer_1").k), params), new_bias


def test_pruning_never_routed_experts_leaves_every_token_unchanged():
    """top-1 of 4, renormalised; selection biases keep experts 1 and 3 from ever being
    chosen: the statistics say so, frequency pruning removes exactly them, and the
    pruned model (E = 2, biases of the kept experts) gives the same logits."""
    model = _model(4, 1)
    bias = np.float32([0.0, -100.0, 0.0, -100.0])
    stats = _stats(model, bias)
    assert stats.num_tokens == 2 * 3 * S
    assert stats.counts[1] == stats.counts[3] == 0 and stats.counts[[0, 2]].min() > 0
    keep = es.frequency_keep(stats, 2)
    assert keep == [0, 2]
    pruned, new_bias = _pruned_model(model, keep, bias)
    np.testing.assert_allclose(_forward(pruned, new_bias)[0], _forward(model, bias)[0],
                               atol=1e-5, rtol=1e-5)


def test_pruning_a_used_expert_changes_only_the_tokens_that_used_it():
    model = _model(4, 1)
    bias = np.float32([0.0, 0.0, 0.0, -100.0])
    logits, experts = _forward(model, bias)
    used_1 = experts[..., 0] == 1
    assert used_1.any() and (~used_1).any()
    pruned, new_bias = _pruned_model(model, [0, 2], bias)
    new_logits = _forward(pruned, new_bias)[0]
    np.testing.assert_allclose(new_logits[~used_1], logits[~used_1], atol=1e-5, rtol=1e-5)
    assert np.abs(new_logits[used_1] - logits[used_1]).max(axis=-1).min() > 1e-4


def _twin_model(k: int, normalize: bool):
    """Experts 0 and 1 identical (weights and router column)."""
    model = _model(4, k, normalize=normalize)
    params = jax.device_get(_params(model))
    ffn = params["layer_1"]["ffn"]
    for name in ffn["experts"]:
        ffn["experts"][name] = np.asarray(ffn["experts"][name]).copy()
        ffn["experts"][name][1] = ffn["experts"][name][0]
    kernel = np.asarray(ffn["router"]["kernel"]).copy()
    kernel[:, 1] = kernel[:, 0]
    ffn["router"]["kernel"] = kernel
    return _with_params(model, params), params


def test_alias_merging_two_identical_experts_leaves_the_function_unchanged():
    """top-2 of 4, softmax without renormalisation: the members keep their router columns."""
    model, params = _twin_model(2, normalize=False)
    ffn, _ = es.merge_layer(params["layer_1"]["ffn"], [[0, 1], [2], [3]],
                            frequency=np.float64([7, 1, 3, 3]), router="alias")
    merged = _with_params(_model(4, 2, normalize=False), {**params, "layer_1": {
        **params["layer_1"], "ffn": ffn}})
    np.testing.assert_allclose(_forward(merged)[0], _forward(model)[0], atol=1e-5, rtol=1e-5)


def test_combined_merging_of_identical_experts_is_exact_for_top1_renormalised():
    """top-1 renormalised: a token choosing either twin now chooses the merged expert,
    weight 1 either way; E goes 4 -> 3."""
    model, params = _twin_model(1, normalize=True)
    ffn, _ = es.merge_layer(params["layer_1"]["ffn"], [[0, 1], [2], [3]],
                            frequency=np.float64([7, 1, 3, 3]))
    merged = _with_params(_model(3, 1), {**params, "layer_1": {**params["layer_1"], "ffn": ffn}})
    logits, experts = _forward(model)
    assert np.isin(experts, [0, 1]).any()
    np.testing.assert_allclose(_forward(merged)[0], logits, atol=1e-5, rtol=1e-5)


def test_statistics_refuse_expert_choice_routing():
    from experiments.inference.routing_stats import NoTokenRoutingError
    from layers.routers import ExpertChoiceRouter
    model = TransformerLM(vocab_size=V, d_model=16, num_layers=2, num_heads=4, d_ff=24,
                          moe_every=2, causal=False, moe_block=functools.partial(
                              MoeLayer, d_ff=8, num_experts=4, k=2, capacity_factor=1.0,
                              router=ExpertChoiceRouter), dtype="float32", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    restored = RestoredModel(workdir=Path("."), step=0, vocab_size=V, graphdef=graphdef,
                             params=params.to_pure_dict(), rest=rest, router_state=RouterState())
    batch = {"inputs": _inputs(), "segment_ids": np.ones((3, S), np.int32)}
    with pytest.raises(NoTokenRoutingError, match="layer_1: routing statistics need token-choice"):
        collect_stats(restored, [batch])
