"""DeepSeek-V2/V3 configs and tensors, without torch (experiments/convert/hf/deepseek*.py).

Configs are hand-written dicts shaped like the published config.json files
(deepseek-ai/DeepSeek-V3: legacy `rope_scaling` with `type`, `topk_method`,
`scoring_func` and training-only keys; DeepSeek-V2-Lite: no query LoRA, greedy
softmax) at tiny sizes. The transformers comparison is tests/interop/test_deepseek.py.
"""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.convert.hf import config as c
from experiments.convert.hf import deepseek, family, mapping
from experiments.convert.hf.deepseek_tensors import rope_order
from experiments.convert.hf.importer import load_params
from experiments.convert.hf.safetensors_io import write_sharded
from experiments.runtime import gin_utils
from experiments.train import trainer  # noqa: F401  registers LossFreeBalancing
from layers.attention import apply_rope
from layers.transformer import TransformerLM

V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
      "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 8,
      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
      "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 2.5,
      "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "v_head_dim": 12,
      "qk_nope_head_dim": 8, "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2,
      "num_experts_per_tok": 2, "moe_layer_freq": 1, "first_k_dense_replace": 1,
      "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001,
      "seq_aux": True, "ep_size": 1, "hidden_act": "silu", "max_position_embeddings": 64,
      "rms_norm_eps": 1e-6, "rope_theta": 10000, "tie_word_embeddings": False,
      "num_nextn_predict_layers": 1,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 1.0,
                       "mscale_all_dim": 1.0, "original_max_position_embeddings": 16,
                       "type": "yarn"}}
V2_LITE = {**{k: v for k, v in V3.items() if k not in ("num_nextn_predict_layers",)},
           "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
           "q_lora_rank": None, "n_shared_experts": 2, "routed_scaling_factor": 1.0,
           "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
           "scoring_func": "softmax",
           "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 0.707,
                            "mscale_all_dim": 0.707, "original_max_position_embeddings": 16,
                            "type": "yarn"}}


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _model(spec: c.ModelSpec, *extra: str) -> TransformerLM:
    gin_utils.parse([], [*c.model_bindings(spec), *extra])
    return nnx.eval_shape(lambda: TransformerLM(vocab_size=spec.vocab_size, rngs=nnx.Rngs(0)))


def test_v3_config_maps_every_routing_and_attention_key():
    spec = c.parse_config(V3)
    ds = spec.deepseek
    assert (spec.num_experts, spec.k, spec.moe_d_ff, spec.normalize) == (8, 2, 8, True)
    assert spec.moe_layers == (1, 2)  # first_k_dense_replace = 1
    assert (ds.score, ds.num_groups, ds.top_groups, ds.group_score) == ("sigmoid", 4, 2,
                                                                        "top2_sum")
    assert (ds.route_scale, ds.num_shared_experts, ds.mtp_layers) == (2.5, 1, 1)
    assert (ds.q_lora_rank, ds.kv_lora_rank, ds.qk_nope_head_dim, ds.qk_rope_head_dim,
            ds.v_head_dim) == (24, 16, 8, 8, 12)
    assert dict(spec.rope_scaling) == {"rope_type": "yarn", "factor": 4, "beta_fast": 32,
                                       "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                       "original_max_position_embeddings": 16}
    bindings = c.model_bindings(spec)
    for line in ("TopKRouter.score = 'sigmoid'", "TopKRouter.route_scale = 2.5",
                 "TopKRouter.num_groups = 4", "MoeLayer.num_shared_experts = 1",
                 "MLAttention.q_lora_rank = 24", "LossFreeBalancing.enabled = True",
                 "TransformerLM.moe_layers = (1, 2)"):
        assert line in bindings, line
    model = _model(spec)
    assert type(model.layer_0.attention).__name__ == "MLAttention"
    assert model.moe_layer("layer_1").router.group_score == "top2_sum"


def test_v2_lite_config_greedy_softmax_without_query_lora():
    spec = c.parse_config(V2_LITE)
    ds = spec.deepseek
    assert (ds.score, ds.num_groups, ds.q_lora_rank, ds.num_shared_experts) == (
        "softmax", None, None, 2)
    assert not spec.normalize and not ds.selection_bias
    assert "LossFreeBalancing.enabled = True" not in c.model_bindings(spec)
    limited = c.parse_config({**V2_LITE, "topk_method": "group_limited_greedy", "n_group": 4,
                              "topk_group": 2})
    assert (limited.deepseek.num_groups, limited.deepseek.group_score) == (4, "max")


@pytest.mark.parametrize("cfg", [V3, V2_LITE], ids=["v3", "v2_lite"])
def test_written_config_reads_back_as_the_same_spec(cfg):
    spec = c.parse_config(cfg)
    back = c.parse_config(c.hf_config(spec))
    # Export writes no MTP layers and YaRN's extended length factor x original (64 here).
    assert back == dataclasses.replace(spec, deepseek=dataclasses.replace(spec.deepseek,
                                                                          mtp_layers=0))


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 16}},
     "rope_scaling.factor=None: YaRN needs its factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "magic": 1}}, "rope_scaling.magic=1"),
    ({"rope_scaling": {"type": "llama3", "factor": 4}}, "rope_scaling.rope_type='llama3'"),
    ({"topk_method": "greedy"}, "topk_method='greedy': DeepseekV3 routes with noaux_tc"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ({"n_group": None}, "n_group=None"),
    ({"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config.quant_method='fp8'"),
    ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ({"n_shared_experts": 0}, "n_shared_experts=0"),
    ({"first_k_dense_replace": 3}, "first_k_dense_replace=3"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_v3_refusals_name_key_and_value(change, message):
    with pytest.raises(c.UnsupportedConfigError, match=message.replace("(", r"\(")):
        c.parse_config({**V3, **change})


@pytest.mark.parametrize("change, message", [
    ({"norm_topk_prob": True}, "norm_topk_prob=True: transformers' DeepseekV2 never"),
    ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
    ({"topk_method": "group_limited_greedy", "n_group": None}, "n_group=None"),
    ({"num_nextn_predict_layers": 1}, "num_nextn_predict_layers=1"),
])
def test_v2_refusals_name_key_and_value(change, message):
    with pytest.raises(c.UnsupportedConfigError, match=message):
        c.parse_config({**V2_LITE, **change})


def test_rope_permutation_turns_deepseeks_interleaved_pairs_into_our_halves():
    """Scenario: one query and one key RoPE part (dr = 8) at positions 5 and 2, rotated as
    DeepSeek does (pairs (x0, x1), (x2, x3), ... as complex numbers), against ours
    (rotate-half) on the same vectors permuted by `rope_order`: equal scores; without the
    permutation they differ."""
    rng = np.random.default_rng(0)
    dr, theta = 8, 500.0
    q, k = rng.normal(size=dr).astype(np.float32), rng.normal(size=dr).astype(np.float32)
    freq = theta ** (-np.arange(0, dr, 2) / dr)

    def deepseek_rotate(x, pos):
        z = (x[0::2] + 1j * x[1::2]) * np.exp(1j * pos * freq)
        return np.stack([z.real, z.imag], -1).reshape(-1)

    def ours(x, pos):
        return np.asarray(apply_rope(jnp.asarray(x)[None, None, None], jnp.asarray([[pos]]),
                                     theta))[0, 0, 0]

    want = deepseek_rotate(q, 5) @ deepseek_rotate(k, 2)
    order = rope_order(dr)
    np.testing.assert_allclose(ours(q[order], 5) @ ours(k[order], 2), want, rtol=1e-5)
    assert abs(ours(q, 5) @ ours(k, 2) - want) > 1e-3


def _hf_tensors(spec: c.ModelSpec, rng) -> dict[str, np.ndarray]:
    """Random tensors under every HF name of `spec` (shapes from `mapping.to_hf` of a
    random model), the V3 correction biases and an MTP layer's tensors."""
    model = _model(spec)
    abstract = nnx.state(model, nnx.Param).to_pure_dict()
    from flax import traverse_util  # pylint: disable=g-import-not-at-top

    flat = {k: rng.normal(size=v.shape).astype(np.float32)
            for k, v in traverse_util.flatten_dict(abstract).items()}
    tensors = dict(mapping.to_hf(lambda path: flat[path], spec))
    for i in spec.moe_layers:
        tensors[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] = rng.normal(
            size=spec.num_experts).astype(np.float32)
    tensors[f"model.layers.{spec.num_layers}.eh_proj.weight"] = np.zeros((32, 64), np.float32)
    return tensors


def test_load_params_fills_the_model_takes_the_biases_and_skips_mtp(tmp_path):
    """Scenario: a V3 safetensors file with every tensor, correction biases and one MTP
    tensor (`model.layers.3.eh_proj.weight`): our params round-trip to the same HF
    tensors, the biases land in the loss-free state by layer, the MTP tensor is skipped;
    without num_nextn_predict_layers the same tensor is refused as unused."""
    spec = c.parse_config(V3)
    tensors = _hf_tensors(spec, np.random.default_rng(0))
    write_sharded(tmp_path, tensors.items(), dtype="float32")
    abstract = nnx.state(_model(spec), nnx.Param).to_pure_dict()
    biases: dict[str, np.ndarray] = {}
    params = load_params(tmp_path, spec, abstract, biases=biases)
    from flax import traverse_util  # pylint: disable=g-import-not-at-top

    flat = traverse_util.flatten_dict(params)
    back = dict(mapping.to_hf(lambda path: np.asarray(flat[path]), spec))
    for name, value in back.items():
        np.testing.assert_array_equal(value, tensors[name], err_msg=name)
    assert sorted(biases) == ["layer_1", "layer_2"]
    np.testing.assert_array_equal(
        biases["layer_2"], tensors["model.layers.2.mlp.gate.e_score_correction_bias"])
    no_mtp = c.parse_config({**V3, "num_nextn_predict_layers": 0})
    with pytest.raises(ValueError, match="model.layers.3.eh_proj.weight"):
        load_params(tmp_path, no_mtp, abstract)


@pytest.mark.parametrize("bindings, message", [
    (("TopKRouter.score = 'softmax'", "TopKRouter.group_score = 'max'",
      "TopKRouter.normalize = True"), "TopKRouter.normalize=True with softmax"),
    (("TopKRouter.group_score = 'max'",), "group_score='max' with sigmoid"),
    (("TransformerLM.moe_layers = (0, 2)",), "dense layers only before the MoE"),
    (("MoeLayer.shared_gate = True",), "ungated shared experts"),
    (("TransformerLM.norm_eps = 1e-05",), "TransformerLM.norm_eps=1e-05"),
])
def test_export_refusals_name_the_binding(bindings, message):
    model = _model(c.parse_config(V3), *bindings)
    with pytest.raises(family.UnsupportedModelError, match=message):
        family.spec_of(model)


def test_export_of_softmax_routing_with_selection_biases_needs_dropping():
    model = _model(c.parse_config(V2_LITE))
    with pytest.raises(family.UnsupportedModelError, match="--drop_selection_bias"):
        family.spec_of(model, selection_biases=True)
    assert family.spec_of(model, selection_biases=True,
                          drop_selection_bias=True).architecture == deepseek.V2
    assert family.spec_of(_model(c.parse_config(V3)),
                          selection_biases=True).architecture == deepseek.V3


def test_absent_keys_take_transformers_defaults():
    """A V3 config.json without the routing keys means transformers' defaults (8 groups,
    top 4, x2.5, renormalised, 3 dense layers: here 2 of 8 experts per group, top 4 of 4
    groups); a missing q_lora_rank is not guessed (null means no query LoRA)."""
    keys = ("n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob",
            "first_k_dense_replace")
    cfg = {k: v for k, v in V3.items() if k not in keys}
    spec = c.parse_config({**cfg, "n_routed_experts": 16, "num_hidden_layers": 4})
    assert (spec.deepseek.num_groups, spec.deepseek.top_groups, spec.deepseek.route_scale,
            spec.normalize, spec.moe_layers) == (8, 4, 2.5, True, (3,))
    with pytest.raises(KeyError, match="q_lora_rank"):
        c.parse_config({k: v for k, v in V3.items() if k != "q_lora_rank"})
    v2 = c.parse_config({k: v for k, v in V2_LITE.items() if k != "topk_method"})
    assert v2.deepseek.num_groups is None  # greedy
