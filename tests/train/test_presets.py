"""Pod presets (gin_configs/models/olmoe_1b_7b.gin, mixtral_8x7b.gin) with the pod mesh
(sharding/pod_fsdp_ep.gin) and the pretraining hyperparameters (experiments/pod_pretrain.gin):
the three files parse together, the model builds abstractly (`nnx.eval_shape`, nothing
allocated) with the published parameter counts, every layer is in the scan, and every
parameter shards evenly on a 64-chip slice of that mesh with its scanned `layers` axis
unsharded.

Published counts (total / active, billions): OLMoE-1B-7B 6.9 / 1.3 (arXiv 2409.02060,
Table 1); Mixtral-8x7B 46.7 / 12.9 (Mistral AI, "Mixtral of experts"). Matching rule as in
tests/convert/test_zoo.py: within 0.5%, or within the figure's own rounding.
"""

from __future__ import annotations

import math

import gin
import numpy as np
import pytest
from flax import nnx

from experiments.runtime import gin_utils, mesh
from experiments.train import trainer  # noqa: F401  (registers train, DataConfig, ...)
from layers.params import logical_axes_of
from layers.transformer import TransformerLM
from moe import sharding
from tests.convert.test_zoo import _matches

POD = ["gin_configs/sharding/pod_fsdp_ep.gin", "gin_configs/experiments/pod_pretrain.gin"]
CHIPS = 64  # e.g. a TPU v5p-128 slice: fsdp 2 x expert 8 x tensor 4
# preset: (vocabulary, published total, published active, layers, fp32 params + 2 Adam
# moments per chip must stay under this many GiB: the model replicated would be 12 B x total)
PRESETS = {"olmoe_1b_7b": (50304, "6.9", "1.3", 16, 2.0),
           "mixtral_8x7b": (32000, "46.7", "12.9", 32, 10.0)}



@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_pod_preset_builds_abstractly_and_shards_on_the_pod_mesh(clean_gin, preset):
    vocab, total, active, num_layers, max_gib = PRESETS[preset]
    gin_utils.parse([f"gin_configs/models/{preset}.gin", *POD], [])
    model = nnx.eval_shape(lambda: TransformerLM(vocab_size=vocab, rngs=nnx.Rngs(0)))
    assert _matches(model.param_count(), total), (preset, model.param_count())
    assert _matches(model.active_param_count(), active), (preset, model.active_param_count())
    # Every layer in one scan (one MoE block, num_layers repeats); remat and bf16 compute.
    assert (model.plan.start, model.plan.unit, model.plan.repeats) == (0, 1, num_layers)
    assert (model.remat_policy, model.dtype) == ("full", "bfloat16")

    mesh_shape = dict(zip(sharding.MESH_AXES, mesh.resolve_mesh_shape(
        mesh.mesh_shape_from_gin(), CHIPS)))
    assert mesh_shape["fsdp"] * mesh_shape["expert"] * mesh_shape["tensor"] == CHIPS
    rules = sharding.normalize_rules(gin.query_parameter("Sharding.rules"), sharding.MESH_AXES)
    shapes = {path: v.shape for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    per_chip = 0
    for path, axes in logical_axes_of(model).items():
        # Raises naming the parameter if a dimension does not divide by its mesh axes.
        spec = sharding.logical_to_spec(axes, rules, shape=shapes[path], mesh_shape=mesh_shape,
                                        name="/".join(map(str, path)))
        if "scanned" in path:
            assert axes[0] == "layers" and spec[0] is None, (path, spec)
        ways = math.prod(mesh_shape[a] for entry in spec for a in sharding.spec_axes(entry))
        per_chip += int(np.prod(shapes[path])) // ways
    gib = 12 * per_chip / 2**30  # float32 parameter + Adam's two moments
    assert gib < max_gib, (preset, gib)
