"""The routing-statistics pass (`experiments.inference.routing_stats`, which the routing
analysis and expert surgery read) on the MoE blocks of issue 20 that are not one
`MoeLayer` per layer.

WideNet: one MoE module serves every layer. The pass must record one entry per
layer, each the routing of that layer's own call (the per-layer norms make the
inputs, so the routing, differ by depth): checked against the counts each layer
reports in its own aux on the same batch. Zero-computation experts: only FFN
assignments count. Learning to Skip: the skipped tokens are left out. Soft MoE has no per-token expert
choices: the analysis gets its soft statistics, surgery's pass refuses it by name.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from experiments.inference.restore import RestoredModel
from experiments.inference.routing_stats import (
    NoTokenRoutingError,
    collect_stats,
    unscanned_view,
)
from layers import scan as scan_lib
from layers.moe_layer import MoeLayer
from layers.routers import NullExpertRouter
from layers.skip import SkipBlock
from layers.soft_moe import SoftMoeLayer
from layers.transformer import TransformerLM
from layers.widenet import widenet_lm
from moe.router_state import RouterState
from moe.soft_stats import SoftRoutingStats

V, B, S = 32, 2, 6
BATCH = {"inputs": np.random.default_rng(0).integers(1, V, (B, S)).astype(np.int32),
         "segment_ids": np.ones((B, S), np.int32)}


def _restored(model) -> RestoredModel:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return RestoredModel(workdir=Path("."), step=0, vocab_size=V, graphdef=graphdef,
                         params=params.to_pure_dict(), rest=rest, router_state=RouterState())


BASE = functools.partial(TransformerLM, vocab_size=V, d_model=8, num_layers=3, num_heads=2,
                         d_ff=16, moe_every=1, dtype="float32")


def _moe(**router) -> functools.partial:
    return functools.partial(MoeLayer, num_experts=4, k=2, d_ff=8, **router)


def _check_counts_match_the_layers_own(model, all_tokens: bool = True) -> dict:
    """The pass's per-layer counts equal what each MoE layer reports in its own aux on
    the same batch (inference mode, as the pass runs); -> the statistics."""
    _, aux = nnx.jit(lambda m, x: m(x, deterministic=True))(model, BATCH["inputs"])
    stats = collect_stats(_restored(model), [BATCH])
    assert sorted(stats) == sorted(model.moe_layer_names)
    for name in stats:
        assert stats[name].num_tokens == (B * S if all_tokens else aux[name].num_tokens)
        np.testing.assert_array_equal(stats[name].counts, np.asarray(aux[name].counts))
    return stats


def test_widenet_shared_moe_gets_one_entry_per_layer_with_that_layers_routing():
    model = widenet_lm(V, rngs=nnx.Rngs(0), base=functools.partial(BASE, moe_block=_moe()))
    # Distinct per-layer norm gains, so the shared router sees different inputs by depth.
    for i, name in enumerate(model.layer_names):
        norm = getattr(model, name).ffn_norm
        norm.scale[...] = norm.scale[...] * (1.0 + i) * np.linspace(0.2, 2.0, 8, dtype=np.float32)
    assert model.moe_layer("layer_0") is model.moe_layer("layer_2")  # one shared module
    stats = _check_counts_match_the_layers_own(model)
    # Not one layer's routing copied three times.
    assert len({tuple(stats[n].counts) for n in stats}) > 1


def test_null_experts_count_the_ffn_experts_only():
    """Zero-computation choices are no FFN assignment: 4 FFN columns, fewer than k per
    token in total (null_kernel scaled up so that null experts win often)."""
    model = BASE(rngs=nnx.Rngs(0), num_layers=2, moe_block=_moe(router=functools.partial(
        NullExpertRouter, null_experts=("zero", "copy"))))
    for name in model.moe_layer_names:
        kernel = model.moe_layer(name).router.null_kernel
        kernel[...] = 50.0 * kernel[...]
    stats = _check_counts_match_the_layers_own(model)
    assert all(stats[n].counts.shape == (4,) and 0 < stats[n].counts.sum() < 2 * B * S
               for n in stats)


def test_skip_routers_leave_skipped_tokens_out_of_the_statistics():
    """Learning to Skip (unit 'ffn', router bias 0: mixed decisions): the pass sees the
    MoE blocks as inference runs them, the skipped tokens masked out."""
    model = BASE(rngs=nnx.Rngs(0), num_layers=2, moe_block=_moe(),
                 block=functools.partial(SkipBlock, unit="ffn", init_bias=0.0))
    stats = _check_counts_match_the_layers_own(model, all_tokens=False)
    assert all(0 < stats[n].num_tokens < B * S for n in stats)


def test_soft_moe_gets_soft_statistics_and_is_refused_for_surgery():
    """The analysis (allow_soft) records `SoftRoutingStats`: the soft load equals the
    mean combine weight per expert the layer reports in its own aux; surgery's default
    refuses the layer by name."""
    model = TransformerLM(vocab_size=V, d_model=8, num_layers=2, num_heads=2, d_ff=16,
                          moe_every=2, causal=False, dtype="float32", rngs=nnx.Rngs(0),
                          moe_block=functools.partial(SoftMoeLayer, num_experts=2,
                                                      slots_per_expert=2, d_ff=8))
    with pytest.raises(NoTokenRoutingError,
                       match="layer_1: SoftMoeLayer has no per-token expert choices"):
        collect_stats(_restored(model), [BATCH])
    stats = collect_stats(_restored(model), [BATCH], allow_soft=True)
    _, aux = nnx.jit(lambda m, x: m(x, deterministic=True))(model, BATCH["inputs"])
    assert list(stats) == ["layer_1"] and isinstance(stats["layer_1"], SoftRoutingStats)
    assert stats["layer_1"].num_tokens == B * S
    np.testing.assert_allclose(stats["layer_1"].soft_load, aux["layer_1"].mean_probs, rtol=1e-5)
    np.testing.assert_allclose(stats["layer_1"].num_slots, [B * 2, B * 2])
    assert np.all((1 <= stats["layer_1"].effective_tokens_per_slot)
                  & (stats["layer_1"].effective_tokens_per_slot <= S))


def test_a_scanned_run_on_a_mesh_is_refused_by_name():
    """The unscanned view rebuilds the model without its sharding: a scanned checkpoint
    restored on a mesh is refused (the fields besides params and sharding are unused)."""
    restored = RestoredModel(workdir=Path("scanned_on_mesh"), step=0, vocab_size=V,
                             graphdef=None, params={scan_lib.SCANNED: {}}, rest=None,
                             router_state=RouterState(), sharding=object())
    with pytest.raises(ValueError, match=r"scanned_on_mesh: routing statistics .* of a scanned "
                                         r"run on a mesh \(MESH_SHAPE bound\)"):
        unscanned_view(restored)
