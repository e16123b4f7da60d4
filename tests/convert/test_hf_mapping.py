"""experiments/convert/hf/mapping.py on random numpy trees: for every family our
tree -> HF names/shapes (checked against hand-written HF shapes) -> our tree
again, values equal; fused transformers-5 experts and tied embeddings import."""

import dataclasses

import numpy as np
import pytest

from experiments.convert.hf import mapping
from experiments.convert.hf.config import ModelSpec
from experiments.convert.hf.importer import tensor_getter

D, F, H, K, HD, V, E, MF, SF = 16, 24, 4, 2, 8, 32, 3, 12, 20
BASE = ModelSpec(architecture="LlamaForCausalLM", vocab_size=V, d_model=D, d_ff=F, num_layers=3,
                 num_heads=H, num_kv_heads=K, head_dim=HD, norm_eps=1e-6, rope_theta=1e4)
SPECS = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {"sliding_window": 8},
    "Qwen2ForCausalLM": {"attention_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": "head"},
    "MixtralForCausalLM": {"num_experts": E, "k": 2, "moe_d_ff": MF, "normalize": True,
                           "moe_layers": (0, 1, 2)},
    "Qwen2MoeForCausalLM": {"num_experts": E, "k": 2, "moe_d_ff": MF, "moe_layers": (0, 2),
                            "shared_d_ff": SF, "attention_bias": True},
    "Qwen3MoeForCausalLM": {"num_experts": E, "k": 2, "moe_d_ff": MF, "moe_layers": (1,),
                            "qk_norm": "head", "attention_bias": True,
                            "attention_out_bias": True},
    "OlmoeForCausalLM": {"num_experts": E, "k": 2, "moe_d_ff": MF, "moe_layers": (0, 1, 2),
                         "qk_norm": "projection"},
}


def _spec(arch):
    return dataclasses.replace(BASE, architecture=arch, **SPECS[arch])


def _our_shapes(spec):
    """Our parameter shapes, written out independently of the mapping."""
    s = {("embedding",): (V, D), ("final_norm", "scale"): (D,), ("lm_head",): (D, V)}
    for i in range(spec.num_layers):
        o = f"layer_{i}"
        s |= {(o, "attention_norm", "scale"): (D,), (o, "ffn_norm", "scale"): (D,),
              (o, "attention", "query"): (D, H, HD), (o, "attention", "key"): (D, K, HD),
              (o, "attention", "value"): (D, K, HD), (o, "attention", "out"): (H, HD, D)}
        if spec.attention_bias:
            s |= {(o, "attention", "query_bias"): (H, HD), (o, "attention", "key_bias"): (K, HD),
                  (o, "attention", "value_bias"): (K, HD)}
        if spec.attention_out_bias:
            s |= {(o, "attention", "out_bias"): (D,)}
        if spec.qk_norm:
            q, k = (HD, HD) if spec.qk_norm == "head" else (H * HD, K * HD)
            s |= {(o, "attention", "query_norm", "scale"): (q,),
                  (o, "attention", "key_norm", "scale"): (k,)}
        if i in spec.moe_layers:
            s |= {(o, "ffn", "router", "kernel"): (D, E),
                  (o, "ffn", "experts", "wi_gate"): (E, D, MF),
                  (o, "ffn", "experts", "wi"): (E, D, MF), (o, "ffn", "experts", "wo"): (E, MF, D)}
            if spec.shared_d_ff:
                s |= {(o, "ffn", "shared", "wi_gate"): (D, SF), (o, "ffn", "shared", "wi"): (D, SF),
                      (o, "ffn", "shared", "wo"): (SF, D), (o, "ffn", "shared_gate"): (D,)}
        else:
            s |= {(o, "ffn", "wi_gate"): (D, F), (o, "ffn", "wi"): (D, F), (o, "ffn", "wo"): (F, D)}
    return s


# Hand-written HF names and shapes of layer 0 (and the MoE-specific ones).
HF_LAYER0 = {
    "LlamaForCausalLM": {"model.layers.0.self_attn.q_proj.weight": (H * HD, D),
                         "model.layers.0.self_attn.k_proj.weight": (K * HD, D),
                         "model.layers.0.self_attn.o_proj.weight": (D, H * HD),
                         "model.layers.0.mlp.down_proj.weight": (D, F)},
    "Qwen2ForCausalLM": {"model.layers.0.self_attn.q_proj.bias": (H * HD,),
                         "model.layers.0.self_attn.v_proj.bias": (K * HD,)},
    "Qwen3ForCausalLM": {"model.layers.0.self_attn.q_norm.weight": (HD,),
                         "model.layers.0.self_attn.k_norm.weight": (HD,)},
    "MixtralForCausalLM": {"model.layers.0.block_sparse_moe.gate.weight": (E, D),
                           "model.layers.0.block_sparse_moe.experts.2.w1.weight": (MF, D),
                           "model.layers.0.block_sparse_moe.experts.2.w2.weight": (D, MF),
                           "model.layers.0.block_sparse_moe.experts.2.w3.weight": (MF, D)},
    "Qwen2MoeForCausalLM": {"model.layers.0.mlp.shared_expert_gate.weight": (1, D),
                            "model.layers.0.mlp.shared_expert.up_proj.weight": (SF, D),
                            "model.layers.0.mlp.experts.1.down_proj.weight": (D, MF),
                            "model.layers.1.mlp.gate_proj.weight": (F, D)},
    "Qwen3MoeForCausalLM": {"model.layers.1.mlp.gate.weight": (E, D),
                            "model.layers.2.self_attn.o_proj.bias": (D,),
                            "model.layers.2.self_attn.k_proj.bias": (K * HD,),
                            "model.layers.0.mlp.up_proj.weight": (F, D)},
    "OlmoeForCausalLM": {"model.layers.0.self_attn.q_norm.weight": (H * HD,),
                         "model.layers.0.self_attn.k_norm.weight": (K * HD,),
                         "model.layers.0.mlp.experts.0.gate_proj.weight": (MF, D)},
}


def _random_tree(spec, seed=0):
    rng = np.random.default_rng(seed)
    return {p: rng.normal(size=s).astype(np.float32) for p, s in _our_shapes(spec).items()}


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_round_trip_ours_hf_ours(arch):
    spec = _spec(arch)
    ours = _random_tree(spec)
    hf = dict(mapping.to_hf(ours.__getitem__, spec))
    assert set(hf) == set(mapping.hf_names(spec)) and len(hf) == len(list(mapping.hf_names(spec)))
    for name, shape in HF_LAYER0.get(arch, {}).items():
        assert hf[name].shape == shape, name
    assert hf["lm_head.weight"].shape == (V, D) and hf["model.embed_tokens.weight"].shape == (V, D)
    back = dict(mapping.to_ours(hf.__getitem__, spec))
    assert set(back) == set(ours)
    for path, value in ours.items():
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))


def test_layouts_are_the_hf_matmuls():
    """q_proj [H*h, d] applied as x @ W.T equals our einsum over query [d, H, h]."""
    spec = _spec("MixtralForCausalLM")
    ours = _random_tree(spec)
    hf = dict(mapping.to_hf(ours.__getitem__, spec))
    x = np.random.default_rng(1).normal(size=(5, D)).astype(np.float32)
    q = x @ hf["model.layers.0.self_attn.q_proj.weight"].T
    np.testing.assert_allclose(q.reshape(5, H, HD),
                               np.einsum("sd,dhk->shk", x, ours[("layer_0", "attention", "query")]),
                               rtol=1e-5, atol=1e-5)
    w1 = hf["model.layers.0.block_sparse_moe.experts.1.w1.weight"]
    np.testing.assert_array_equal(x @ w1.T, x @ ours[("layer_0", "ffn", "experts", "wi_gate")][1])


class _FakeReader:
    def __init__(self, tensors):
        self.tensors = tensors

    def names(self):
        return set(self.tensors)

    def get(self, name):
        return self.tensors[name]


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def test_fused_transformers5_experts_import(arch):
    spec = _spec(arch)
    ours = _random_tree(spec)
    hf = dict(mapping.to_hf(ours.__getitem__, spec))
    module, (gate, up, down) = mapping._MOE_NAMES[arch]  # pylint: disable=protected-access
    fused = {n: v for n, v in hf.items() if ".experts." not in n}
    for i in spec.moe_layers:
        p, m = f"model.layers.{i}.", f"model.layers.{i}.{module}."
        fused[p + "mlp.experts.gate_up_proj"] = np.stack([
            np.concatenate([hf[f"{m}experts.{e}.{gate}.weight"], hf[f"{m}experts.{e}.{up}.weight"]])
            for e in range(E)])
        fused[p + "mlp.experts.down_proj"] = np.stack([hf[f"{m}experts.{e}.{down}.weight"]
                                                       for e in range(E)])
        if module != "mlp":
            fused[p + "mlp.gate.weight"] = fused.pop(m + "gate.weight")
    get, used = tensor_getter(_FakeReader(fused), spec)
    back = dict(mapping.to_ours(get, spec))
    assert used == set(fused)
    for path, value in ours.items():
        np.testing.assert_array_equal(back[path], value, err_msg="/".join(path))


def test_tied_embeddings_import_as_an_untied_copy():
    spec = dataclasses.replace(_spec("LlamaForCausalLM"), tie_embeddings=True)
    hf = dict(mapping.to_hf(_random_tree(spec).__getitem__, spec))
    del hf["lm_head.weight"]
    back = dict(mapping.to_ours(hf.__getitem__, spec))
    np.testing.assert_array_equal(back[("lm_head",)], hf["model.embed_tokens.weight"].T)
    untied = dataclasses.replace(spec, tie_embeddings=False)
    with pytest.raises(KeyError, match="lm_head.weight"):
        dict(mapping.to_ours(hf.__getitem__, untied))
