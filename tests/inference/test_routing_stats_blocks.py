"""The routing-statistics pass (`experiments.inference.routing_stats`, which the routing
analysis and expert surgery read) on the MoE blocks of issue 20 that are not one
`MoeLayer` per layer.

WideNet: one MoE module serves every layer. The pass must record one entry per
layer, each the routing of that layer's own call (the per-layer norms make the
inputs, so the routing, differ by depth): checked against the counts each layer
reports in its own aux on the same batch. Soft MoE has no per-token expert
choices: the pass refuses it by name instead of failing inside the layer.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from experiments.inference.restore import RestoredModel
from experiments.inference.routing_stats import NoTokenRoutingError, collect_stats
from layers.moe_layer import MoeLayer
from layers.soft_moe import SoftMoeLayer
from layers.transformer import TransformerLM
from layers.widenet import widenet_lm
from moe.router_state import RouterState

V, B, S = 32, 2, 6
BATCH = {"inputs": np.random.default_rng(0).integers(1, V, (B, S)).astype(np.int32),
         "segment_ids": np.ones((B, S), np.int32)}


def _restored(model) -> RestoredModel:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return RestoredModel(workdir=Path("."), step=0, vocab_size=V, graphdef=graphdef,
                         params=params.to_pure_dict(), rest=rest, router_state=RouterState())


def test_widenet_shared_moe_gets_one_entry_per_layer_with_that_layers_routing():
    base = functools.partial(TransformerLM, d_model=8, num_layers=3, num_heads=2, d_ff=16,
                             moe_every=1, dtype="float32",
                             moe_block=functools.partial(MoeLayer, num_experts=4, k=2, d_ff=8))
    model = widenet_lm(V, rngs=nnx.Rngs(0), base=base)
    # Distinct per-layer norm gains, so the shared router sees different inputs by depth.
    for i, name in enumerate(model.layer_names):
        norm = getattr(model, name).ffn_norm
        norm.scale[...] = norm.scale[...] * (1.0 + i) * np.linspace(0.2, 2.0, 8, dtype=np.float32)
    assert model.moe_layer("layer_0") is model.moe_layer("layer_2")  # one shared module
    _, aux = nnx.jit(lambda m, x: m(x))(model, BATCH["inputs"])  # jitted: eager is slow
    stats = collect_stats(_restored(model), [BATCH])
    assert sorted(stats) == ["layer_0", "layer_1", "layer_2"]
    for name in stats:
        assert stats[name].num_tokens == B * S
        np.testing.assert_array_equal(stats[name].counts, np.asarray(aux[name].counts))
    # Not one layer's routing copied three times.
    assert len({tuple(stats[n].counts) for n in stats}) > 1


def test_soft_moe_is_refused_by_name():
    model = TransformerLM(vocab_size=V, d_model=8, num_layers=2, num_heads=2, d_ff=16,
                          moe_every=2, causal=False, dtype="float32", rngs=nnx.Rngs(0),
                          moe_block=functools.partial(SoftMoeLayer, num_experts=2,
                                                      slots_per_expert=2, d_ff=8))
    with pytest.raises(NoTokenRoutingError,
                       match="layer_1: .*SoftMoeLayer has no per-token expert choices"):
        collect_stats(_restored(model), [BATCH])
