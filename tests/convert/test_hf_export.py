"""experiments/convert/hf: streaming safetensors (sharded, bfloat16, truncated),
the exporter's family choice and refusals (abstract models from gin, nothing
allocated), and import -> export of a tiny Mixtral giving back the same
tensors."""

import dataclasses
import json

import gin
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from experiments.convert.hf import config as config_lib
from experiments.convert.hf import family, mapping
from experiments.convert.hf.exporter import export_hf
from experiments.convert.hf.importer import import_hf
from experiments.convert.hf.safetensors_io import (
    INDEX,
    SafetensorsError,
    SafetensorsReader,
    write_sharded,
)
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from layers.transformer import TransformerLM
from tests.convert.test_hf_mapping import _random_tree
from tests.convert.test_hf_mapping import _spec as mapping_spec

TINY = ["TransformerLM.d_model = 16", "TransformerLM.num_layers = 2", "TransformerLM.num_heads = 2",
        "TransformerLM.d_ff = 24", "TransformerLM.activation = 'swiglu'",
        "TransformerLM.moe_every = 1", "TransformerLM.moe_block = @MoeLayer",
        "MoeLayer.num_experts = 4", "MoeLayer.k = 2",
        "MoeLayer.d_ff = 8", "MoeLayer.activation = 'swiglu'", "MoeLayer.router = @TopKRouter",
        "MoeLayer.capacity_factor = None", "TopKRouter.normalize = True"]


def _spec(*extra):
    gin.clear_config()
    try:
        gin_utils.parse([], [*TINY, *extra])
        model = nnx.eval_shape(lambda: TransformerLM(vocab_size=32, rngs=nnx.Rngs(0)))
        return family.spec_of(model)
    finally:
        gin.clear_config()


def test_sharded_write_read_round_trip_bf16(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.normal(size=(8, 16)).astype(np.float32) for i in range(5)}
    files = write_sharded(tmp_path, tensors.items(), dtype="bfloat16", max_shard_bytes=600)
    assert len(files) == 3 and (tmp_path / INDEX).exists()
    index = json.loads((tmp_path / INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors)
    reader = SafetensorsReader(tmp_path)
    for name, value in tensors.items():
        np.testing.assert_array_equal(reader.get(name),
                                      value.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert not list(tmp_path.glob("*.tmp"))


def test_single_file_and_truncation(tmp_path):
    write_sharded(tmp_path, [("a", np.ones((64, 64), np.float32))])
    path = tmp_path / "model.safetensors"
    assert not (tmp_path / INDEX).exists()
    np.testing.assert_array_equal(SafetensorsReader(tmp_path).get("a"), np.ones((64, 64)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match="model.safetensors: truncated"):
        SafetensorsReader(tmp_path)
    path.write_bytes(b"\x05")
    with pytest.raises(SafetensorsError, match="truncated"):
        SafetensorsReader(tmp_path)


@pytest.mark.parametrize("extra,arch", [
    ((), "MixtralForCausalLM"),
    (("TransformerLM.moe_every = 0",), "LlamaForCausalLM"),
    (("TransformerLM.moe_every = 2",), None),
    (("TransformerLM.moe_every = 0", "TransformerLM.attention_bias = True"), "Qwen2ForCausalLM"),
    (("TransformerLM.moe_every = 0", "TransformerLM.attention_bias = True",
      "TransformerLM.attention_out_bias = True",
      "TransformerLM.rope_scaling = {'rope_type': 'llama3', 'factor': 4.0, "
      "'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}"),
     "LlamaForCausalLM"),
    (("TransformerLM.qk_norm = 'projection'", "TransformerLM.attention_bias = True",
      "TransformerLM.attention_out_bias = True", "TopKRouter.normalize = False"),
     "OlmoeForCausalLM"),
])
def test_family_choice(extra, arch):
    if arch is None:
        with pytest.raises(family.UnsupportedModelError, match="Mixtral needs every layer MoE"):
            _spec(*extra)
    else:
        spec = _spec(*extra)
        assert spec.architecture == arch
        if arch == "MixtralForCausalLM":
            assert (spec.num_experts, spec.k, spec.moe_d_ff, spec.moe_layers) == (4, 2, 8, (0, 1))


@pytest.mark.parametrize("extra,match", [
    (("MoeLayer.router = @ExpertChoiceRouter", "TransformerLM.causal = False"),
     "router ExpertChoiceRouter has no HF"),
    (("MoeLayer.router = @DenseToSparseRouter",), "router DenseToSparseRouter"),
    (("MoeLayer.capacity_factor = 1.25",), "MoeLayer.capacity_factor=1.25"),
    (("TopKRouter.score = 'sigmoid'",), "TopKRouter.score='sigmoid'"),
    (("TopKRouter.use_bias = True",), "TopKRouter.use_bias=True"),
    (("TopKRouter.normalize = False",), "TopKRouter.normalize=False"),
    (("TransformerLM.activation = 'relu'", "TransformerLM.moe_every = 0"),
     "TransformerLM.activation='relu'"),
    (("MoeLayer.num_shared_experts = 1",), "num_shared_experts without MoeLayer.shared_gate"),
    (("TransformerLM.causal = False", "TransformerLM.moe_every = 0"), "causal=False"),
    (("TransformerLM.qk_norm = 'head'", "TransformerLM.attention_bias = True"),
     "attention_bias=True, attention_out_bias=False as Qwen3MoeForCausalLM"),
    (("TransformerLM.moe_every = 0", "TransformerLM.attention_out_bias = True",
      "TransformerLM.attention_bias = True", "TransformerLM.sliding_window = 8"),
     "attention_out_bias with sliding_window"),
])
def test_export_refusals_name_the_feature(extra, match):
    with pytest.raises(family.UnsupportedModelError, match=match):
        _spec(*extra)


def test_selection_biases_refused_unless_dropped():
    gin.clear_config()
    try:
        gin_utils.parse([], TINY)
        model = nnx.eval_shape(lambda: TransformerLM(vocab_size=32, rngs=nnx.Rngs(0)))
        with pytest.raises(family.UnsupportedModelError, match="--drop_selection_bias"):
            family.spec_of(model, selection_biases=True)
        assert family.spec_of(model, selection_biases=True, drop_selection_bias=True)
    finally:
        gin.clear_config()


@pytest.mark.parametrize("scan", [False, True])
def test_import_then_export_gives_the_same_tensors(tmp_path, scan):
    """A Mixtral (per-expert layout, 3 shards) imported onto a mesh and exported;
    scan=True: imported into a scanned model (`TransformerLM.scan_layers`, its
    checkpoint stacks the layers), exported unstacked again."""
    spec = dataclasses.replace(mapping_spec("MixtralForCausalLM"), d_ff=12)
    hf = dict(mapping.to_hf(_random_tree(spec).__getitem__, spec))
    src = tmp_path / "src"
    src.mkdir()
    write_sharded(src, hf.items(), max_shard_bytes=20_000)
    (src / "config.json").write_text(json.dumps(config_lib.hf_config(spec)))
    (src / "tokenizer.json").write_text("{}")
    gin.clear_config()
    try:
        # MESH_SHAPE bound: each tensor is placed on its sharding as it is read.
        import_hf(src, tmp_path / "work", gin_params=[
            "MESH_SHAPE = {'data': -1, 'expert': 1}", f"TransformerLM.scan_layers = {scan}"])
        stored = Checkpointer(tmp_path / "work" / "checkpoints",
                              read_only=True).stored_metadata(0, "params").tree
        assert ("scanned" in stored) is scan and ("layer_0" in stored) is not scan
        export_hf(tmp_path / "work", tmp_path / "out", dtype="float32", max_shard_bytes=20_000)
    finally:
        gin.clear_config()
    out = SafetensorsReader(tmp_path / "out")
    assert out.names() == set(hf) and (tmp_path / "out" / INDEX).exists()
    for name, value in hf.items():
        np.testing.assert_array_equal(out.get(name), value, err_msg=name)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config_lib.parse_config(cfg) == dataclasses.replace(spec, max_position_embeddings=4096)
    assert (tmp_path / "out" / "tokenizer.json").exists()
