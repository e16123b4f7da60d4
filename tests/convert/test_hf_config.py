"""experiments/convert/hf/config.py: both config layouts per family (hand-written
dicts shaped like transformers 5 and 4.x `save_pretrained` output), the gin
bindings, and refusals that name key and value."""

import pytest

from experiments.convert.hf import config as c

BASE = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "max_position_embeddings": 2048}
NEW = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}   # transformers 5
OLD = {"rope_theta": 5e5}                                                 # transformers 4.x
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True}
FAMILIES = {
    "LlamaForCausalLM": ({"attention_bias": False}, {}),
    "MistralForCausalLM": ({"sliding_window": None}, {}),
    "Qwen2ForCausalLM": ({"use_sliding_window": False, "sliding_window": 4096,
                          "max_window_layers": 28}, {"attention_bias": True}),
    "Qwen3ForCausalLM": ({"attention_bias": False}, {"qk_norm": "head"}),
    "MixtralForCausalLM": ({"num_local_experts": 4, "num_experts_per_tok": 2},
                           {"num_experts": 4, "moe_d_ff": 48, "normalize": True}),
    "Qwen2MoeForCausalLM": (dict(MOE, num_experts=4, shared_expert_intermediate_size=24,
                                 decoder_sparse_step=1, mlp_only_layers=[1]),
                            {"num_experts": 4, "moe_d_ff": 16, "shared_d_ff": 24,
                             "attention_bias": True, "moe_layers": (0, 2, 3)}),
    "Qwen3MoeForCausalLM": (dict(MOE, num_local_experts=4, decoder_sparse_step=2),
                            {"num_experts": 4, "qk_norm": "head", "moe_layers": (1, 3)}),
    "OlmoeForCausalLM": ({"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False,
                          "clip_qkv": None},
                         {"num_experts": 4, "moe_d_ff": 48, "normalize": False,
                          "qk_norm": "projection"}),
}


@pytest.mark.parametrize("layout", [NEW, OLD], ids=["rope_parameters", "rope_theta"])
@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_both_layouts_parse(arch, layout):
    extra, want = FAMILIES[arch]
    spec = c.parse_config({**BASE, **layout, **extra, "architectures": [arch]})
    assert spec.architecture == arch and spec.rope_theta == 5e5
    assert (spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (32, 4, 2, 8)
    for key, value in want.items():
        assert getattr(spec, key) == value, key
    if arch in c.MOE and "moe_layers" not in want:
        assert spec.moe_layers == (0, 1, 2, 3)
    assert spec.is_moe == (arch in c.MOE)


def test_qwen3_moe_old_num_experts_name():
    cfg = {**BASE, **OLD, **MOE, "num_experts": 6, "architectures": ["Qwen3MoeForCausalLM"]}
    assert c.parse_config(cfg).num_experts == 6


def test_bindings_moe_and_dense():
    moe = c.parse_config({**BASE, **NEW, **FAMILIES["Qwen2MoeForCausalLM"][0],
                          "architectures": ["Qwen2MoeForCausalLM"]})
    b = c.model_bindings(moe)
    for line in ("TransformerLM.moe_layers = (0, 2, 3)", "MoeLayer.num_experts = 4",
                 "MoeLayer.d_ff = 16", "TopKRouter.normalize = True",
                 "MoeLayer.shared_d_ff = 24", "MoeLayer.shared_gate = True",
                 "TransformerLM.attention_bias = True", "MoeLayer.capacity_factor = None",
                 "TransformerLM.rope_max_wavelength = 500000.0"):
        assert line in b, line
    dense = c.model_bindings(c.parse_config({**BASE, **OLD, "architectures": ["LlamaForCausalLM"],
                                             "tie_word_embeddings": True}))
    assert "TransformerLM.moe_every = 0" in dense and "TransformerLM.tie_embeddings = False" in dense
    assert not any(line.startswith("MoeLayer") for line in dense)


def test_llama3_rope_scaling_both_layouts():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    new = {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", **scaling}}
    old = {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}}
    specs = [c.parse_config({**BASE, **lay, "architectures": ["LlamaForCausalLM"]})
             for lay in (new, old)]
    assert specs[0] == specs[1] and dict(specs[0].rope_scaling)["factor"] == 8.0
    assert ("TransformerLM.rope_scaling = {'rope_type': 'llama3', 'factor': 8.0, "
            "'low_freq_factor': 1.0, 'high_freq_factor': 4.0, "
            "'original_max_position_embeddings': 8192}") in c.model_bindings(specs[0])


def test_qwen_sliding_window_round_trip_and_qwen2_moe_qkv_bias_flag():
    spec = c.parse_config({**BASE, **NEW, "use_sliding_window": True, "sliding_window": 64,
                           "max_window_layers": 0, "architectures": ["Qwen3ForCausalLM"]})
    assert c.parse_config(c.hf_config(spec)) == spec and spec.sliding_window == 64
    cfg = {**BASE, **NEW, **FAMILIES["Qwen2MoeForCausalLM"][0], "qkv_bias": False,
           "architectures": ["Qwen2MoeForCausalLM"]}
    assert not c.parse_config(cfg).attention_bias


def test_sliding_window():
    mistral = c.parse_config({**BASE, **NEW, "sliding_window": 4096,
                              "architectures": ["MistralForCausalLM"]})
    assert mistral.sliding_window == 4096
    qwen_all = c.parse_config({**BASE, **NEW, "use_sliding_window": True, "sliding_window": 64,
                               "max_window_layers": 0, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen_all.sliding_window == 64


@pytest.mark.parametrize("arch,extra,match", [
    ("GPT2LMHeadModel", {}, "architectures=.*supported: LlamaForCausalLM, Mistral"),
    ("LlamaForCausalLM", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    ("LlamaForCausalLM", {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn"}},
     "rope_parameters.rope_type='yarn'.*default, llama3"),
    ("LlamaForCausalLM", {"rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type='linear'"),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 2.0}},
     "llama3 scaling needs"),
    ("MistralForCausalLM", {"attention_bias": True}, "attention_bias=True.*no attention biases"),
    ("LlamaForCausalLM", {"mlp_bias": True}, "mlp_bias=True"),
    ("OlmoeForCausalLM", {"num_experts": 4, "num_experts_per_tok": 2, "clip_qkv": 8.0},
     "clip_qkv=8.0"),
    ("LlamaForCausalLM", {"sliding_window": 128}, "sliding_window=128.*no sliding window"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64,
                          "max_window_layers": 2}, "max_window_layers=2: .*only some layers"),
    ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 64,
                          "layer_types": ["full_attention", "sliding_attention"] * 2},
     r"layer_types=\['full_attention', 'sliding_attention'.*only some layers"),
    ("LlamaForCausalLM", {"hidden_act": "gelu_pytorch_tanh"},
     "hidden_act='gelu_pytorch_tanh'.*tanh-approximate GELU"),
    ("Qwen2ForCausalLM", {"hidden_act": "gelu_new"}, "hidden_act='gelu_new'.*tanh"),
    ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2,
                            "router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ("MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2,
                            "hidden_act": "gelu"}, "hidden_act='gelu'.*silu"),
    ("Qwen2MoeForCausalLM", dict(MOE, num_experts=4, shared_expert_intermediate_size=0),
     "shared_expert_intermediate_size=0"),
])
def test_refusals_name_key_and_value(arch, extra, match):
    with pytest.raises(c.UnsupportedConfigError, match=match):
        c.parse_config({**BASE, **NEW, **extra, "architectures": [arch]})


@pytest.mark.parametrize("arch,out_bias", [
    ("LlamaForCausalLM", True), ("Qwen3ForCausalLM", True), ("OlmoeForCausalLM", True),
    ("Qwen2ForCausalLM", False)])
def test_attention_bias_flag_includes_the_output_bias(arch, out_bias):
    """Llama/Qwen3/Qwen3-MoE/OLMoE `attention_bias` also biases o_proj; Qwen2's never does."""
    extra = {k: v for k, v in FAMILIES[arch][0].items() if k != "attention_bias"}
    spec = c.parse_config({**BASE, **NEW, **extra, "attention_bias": True,
                           "architectures": [arch]})
    assert spec.attention_bias and spec.attention_out_bias == out_bias
    assert ("TransformerLM.attention_out_bias = True" in c.model_bindings(spec)) == out_bias
    assert c.parse_config(c.hf_config(spec)) == spec


def test_hf_config_round_trips_the_spec():
    for arch, (extra, _) in FAMILIES.items():
        spec = c.parse_config({**BASE, **NEW, **extra, "architectures": [arch]})
        assert c.parse_config(c.hf_config(spec)) == spec, arch
