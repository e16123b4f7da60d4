"""Hugging Face `config.json` <-> `ModelSpec` <-> our gin bindings.

`ModelSpec` is the family-independent description of a decoder both sides
share. `parse_config` reads a HF config (transformers 5 `rope_parameters` or the
older top-level `rope_theta`/`rope_scaling`; Qwen3-MoE `num_experts` or
`num_local_experts`) and refuses, naming key and value, whatever our model
cannot express. `model_bindings` gives the gin bindings of the matching
`TransformerLM`; `hf_config` writes the spec back as a HF config dict.
DeepSeek-V2/V3 configs are read and written by `deepseek.py` (the spec then
carries a `deepseek.DeepseekSpec`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Architectures, and what each may carry beyond a Llama decoder.
DENSE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MOE = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
SUPPORTED = DENSE + MOE
DEEPSEEK = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")  # experiments/convert/hf/deepseek.py
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
               "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
               "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe"}
# Q/K/V biases: always (Qwen2 families), from `attention_bias` (others), never.
# `attention_bias` also gives the output projection a bias (o_proj.bias) in
# every family that reads it; the Qwen2 families never have one.
_ALWAYS_QKV_BIAS = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
BIAS_FROM_FLAG = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
                  "OlmoeForCausalLM")
_QK_NORM = {"Qwen3ForCausalLM": "head", "Qwen3MoeForCausalLM": "head",
            "OlmoeForCausalLM": "projection"}
_SLIDING = ("MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "relu": "reglu"}
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh")
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


class UnsupportedConfigError(ValueError):
    """A config key/value our model cannot express."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A decoder both sides can describe. `moe_layers`: 0-based MoE layer indices."""

    architecture: str
    vocab_size: int
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    activation: str = "swiglu"
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False          # Q/K/V projection biases
    attention_out_bias: bool = False      # output projection bias (o_proj.bias)
    qk_norm: str | None = None            # None | 'head' | 'projection'
    sliding_window: int | None = None
    num_experts: int = 0
    k: int = 0
    moe_d_ff: int = 0
    normalize: bool = False
    moe_layers: tuple[int, ...] = ()
    shared_d_ff: int | None = None        # Qwen2-MoE shared expert (with its sigmoid gate)
    max_position_embeddings: int | None = None
    deepseek: Any = None                  # deepseek.DeepseekSpec of a DeepSeek-V2/V3 (MLA) model

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)


def _refuse(key: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"config.json {key}={value!r}: {why}")


def architecture_of(cfg: Mapping[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED + DEEPSEEK:
        raise _refuse("architectures", archs, f"supported: {', '.join(SUPPORTED + DEEPSEEK)}")
    return archs[0]


def _rope(cfg: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, llama3 scaling or None) from either layout."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling")
    if legacy:  # transformers 5 folds a legacy rope_scaling into rope_parameters too
        params.update(legacy)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", "default")
    if legacy:
        rope_type = legacy.get("rope_type", legacy.get("type", rope_type))
    key = "rope_scaling.rope_type" if legacy else "rope_parameters.rope_type"
    if rope_type not in ROPE_TYPES:
        raise _refuse(key, rope_type, f"supported rope types: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise _refuse(key, rope_type, f"llama3 scaling needs {missing}")
    scaling = (("rope_type", "llama3"),) + tuple((k, params[k]) for k in _LLAMA3_KEYS)
    return float(theta), scaling


def _attention_features(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    if arch in _ALWAYS_QKV_BIAS:
        bias = bool(cfg.get("qkv_bias", True))  # transformers 5 Qwen2-MoE has the flag
    elif arch in BIAS_FROM_FLAG:
        bias = bool(cfg.get("attention_bias", False))
    elif cfg.get("attention_bias"):
        raise _refuse("attention_bias", cfg["attention_bias"], f"{arch} has no attention biases")
    else:
        bias = False
    check_common_keys(cfg)
    window = None
    if arch in _SLIDING:
        window = _sliding_window(cfg, arch)
    elif cfg.get("sliding_window"):
        raise _refuse("sliding_window", cfg["sliding_window"], f"{arch} has no sliding window")
    return {"attention_bias": bias, "attention_out_bias": bias and arch in BIAS_FROM_FLAG,
            "qk_norm": _QK_NORM.get(arch), "sliding_window": window}


def check_common_keys(cfg: Mapping[str, Any]) -> None:
    """Refuses `mlp_bias`, `clip_qkv` and `pretraining_tp` other than 1 (every family)."""
    if cfg.get("mlp_bias"):
        raise _refuse("mlp_bias", cfg["mlp_bias"], "our MLPs have no biases")
    if cfg.get("clip_qkv") is not None:
        raise _refuse("clip_qkv", cfg["clip_qkv"], "QKV clipping is not supported")
    if cfg.get("pretraining_tp", 1) != 1:
        raise _refuse("pretraining_tp", cfg["pretraining_tp"], "only 1 is supported")


def _sliding_window(cfg: Mapping[str, Any], arch: str) -> int | None:
    """The window when every layer slides, None when none does; refuses a mix."""
    window = cfg.get("sliding_window") or None
    if arch in ("MistralForCausalLM", "MixtralForCausalLM") or window is None:
        return window
    if not cfg.get("use_sliding_window", False):
        return None
    layers = cfg["num_hidden_layers"]
    key, value = "layer_types", cfg.get("layer_types")
    types = value
    if not types:
        key, value = "max_window_layers", cfg.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= value else "full_attention" for i in range(layers)]
    if set(types) == {"full_attention"}:
        return None
    if set(types) != {"sliding_attention"}:
        raise _refuse(key, value, f"with use_sliding_window=true and {layers} layers, a sliding "
                      "window on only some layers is not supported (set max_window_layers=0 "
                      "or use_sliding_window=false)")
    return int(window)


def _moe_features(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    if arch not in MOE:
        return {}
    layers = cfg["num_hidden_layers"]
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    if experts is None:
        raise KeyError("num_experts")
    out: dict[str, Any] = {"num_experts": int(experts), "k": int(cfg["num_experts_per_tok"])}
    if arch == "MixtralForCausalLM":
        out.update(moe_d_ff=cfg["intermediate_size"], normalize=True)
        if cfg.get("router_jitter_noise"):
            # training-only in HF; our TopKRouter.jitter_eps is the same idea but not bound here
            raise _refuse("router_jitter_noise", cfg["router_jitter_noise"],
                          "router jitter is not imported (set it to 0.0)")
    elif arch == "OlmoeForCausalLM":
        out.update(moe_d_ff=cfg["intermediate_size"],
                   normalize=bool(cfg.get("norm_topk_prob", False)))
    else:
        out.update(moe_d_ff=cfg["moe_intermediate_size"],
                   normalize=bool(cfg.get("norm_topk_prob", False)))
    step = int(cfg.get("decoder_sparse_step", 1))
    dense_only = set(cfg.get("mlp_only_layers") or [])
    if step < 1:
        raise _refuse("decoder_sparse_step", step, "must be >= 1")
    out["moe_layers"] = tuple(i for i in range(layers)
                              if i not in dense_only and (i + 1) % step == 0)
    if arch == "Qwen2MoeForCausalLM":
        shared = cfg.get("shared_expert_intermediate_size", 0)
        if not shared:
            raise _refuse("shared_expert_intermediate_size", shared, "Qwen2-MoE needs one")
        out["shared_d_ff"] = int(shared)
    return out


def parse_config(cfg: Mapping[str, Any]) -> ModelSpec:
    """The spec of a supported HF config; UnsupportedConfigError or KeyError otherwise."""
    arch = architecture_of(cfg)
    if arch in DEEPSEEK:
        from experiments.convert.hf import deepseek  # pylint: disable=g-import-not-at-top
        return deepseek.parse(cfg, arch)
    act = cfg.get("hidden_act", "silu")
    if act in _TANH_GELUS:
        raise _refuse("hidden_act", act, "a gated tanh-approximate GELU is not supported "
                      "(moe/experts.py has geglu with exact GELU only: hidden_act='gelu')")
    if act not in ACTIVATIONS:
        raise _refuse("hidden_act", act, f"supported: {', '.join(sorted(ACTIVATIONS))}")
    if ACTIVATIONS[act] != "swiglu" and arch in MOE:
        raise _refuse("hidden_act", act, "MoE families are imported with silu experts only")
    theta, scaling = _rope(cfg)
    heads = int(cfg["num_attention_heads"])
    return ModelSpec(
        architecture=arch, vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["hidden_size"]),
        d_ff=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        activation=ACTIVATIONS[act], rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        **_attention_features(cfg, arch), **_moe_features(cfg, arch))


def model_bindings(spec: ModelSpec) -> list[str]:
    """Gin bindings of the TransformerLM for `spec` (vocab_size is passed at build time).

    Tied HF embeddings become an untied `lm_head` copy: our tied head scales
    logits by d_model**-0.5, HF's does not, so the copy keeps logits exact.
    """
    if spec.deepseek is not None:
        from experiments.convert.hf import deepseek  # pylint: disable=g-import-not-at-top
        return deepseek.bindings(spec)
    b = [f"TransformerLM.d_model = {spec.d_model}", f"TransformerLM.d_ff = {spec.d_ff}",
         f"TransformerLM.num_layers = {spec.num_layers}",
         f"TransformerLM.num_heads = {spec.num_heads}",
         f"TransformerLM.num_kv_heads = {spec.num_kv_heads}",
         f"TransformerLM.head_dim = {spec.head_dim}",
         f"TransformerLM.activation = '{spec.activation}'",
         f"TransformerLM.norm_eps = {spec.norm_eps!r}",
         f"TransformerLM.rope_max_wavelength = {spec.rope_theta!r}",
         "TransformerLM.tie_embeddings = False", "TransformerLM.causal = True"]
    if spec.attention_bias:
        b.append("TransformerLM.attention_bias = True")
    if spec.attention_out_bias:
        b.append("TransformerLM.attention_out_bias = True")
    if spec.qk_norm:
        b.append(f"TransformerLM.qk_norm = '{spec.qk_norm}'")
    if spec.sliding_window:
        b.append(f"TransformerLM.sliding_window = {spec.sliding_window}")
    if spec.rope_scaling:
        b.append(f"TransformerLM.rope_scaling = {dict(spec.rope_scaling)!r}")
    if not spec.is_moe:
        return b + ["TransformerLM.moe_every = 0", "TransformerLM.moe_layers = None"]
    if len(spec.moe_layers) == spec.num_layers:
        b += ["TransformerLM.moe_every = 1", "TransformerLM.moe_layers = None"]
    else:
        b += ["TransformerLM.moe_every = 0", f"TransformerLM.moe_layers = {spec.moe_layers!r}"]
    b += ["TransformerLM.moe_block = @MoeLayer", f"MoeLayer.num_experts = {spec.num_experts}",
          f"MoeLayer.k = {spec.k}", f"MoeLayer.d_ff = {spec.moe_d_ff}",
          "MoeLayer.activation = 'swiglu'", "MoeLayer.router = @TopKRouter",
          "MoeLayer.capacity_factor = None", "TopKRouter.score = 'softmax'",
          f"TopKRouter.normalize = {spec.normalize}"]
    if spec.shared_d_ff:
        b += ["MoeLayer.num_shared_experts = 1", f"MoeLayer.shared_d_ff = {spec.shared_d_ff}",
              "MoeLayer.shared_gate = True"]
    return b


def hf_config(spec: ModelSpec, *, dtype: str = "float32") -> dict[str, Any]:
    """A HF config.json dict for `spec` (transformers 5 layout, read by 4.x too)."""
    if spec.deepseek is not None:
        from experiments.convert.hf import deepseek  # pylint: disable=g-import-not-at-top
        return deepseek.hf_config(spec, dtype=dtype)
    arch = spec.architecture
    act = {v: k for k, v in ACTIVATIONS.items() if k != "swish"}[spec.activation]
    rope: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    if spec.rope_scaling:
        rope.update(dict(spec.rope_scaling))
    cfg: dict[str, Any] = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model, "intermediate_size": spec.d_ff,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "hidden_act": act, "rms_norm_eps": spec.norm_eps, "rope_theta": spec.rope_theta,
        "rope_parameters": rope, "tie_word_embeddings": False, "torch_dtype": dtype,
        "dtype": dtype, "max_position_embeddings": spec.max_position_embeddings or 4096}
    if spec.rope_scaling:
        cfg["rope_scaling"] = dict(spec.rope_scaling)
    if arch in BIAS_FROM_FLAG:
        cfg["attention_bias"] = spec.attention_bias
    if arch in _SLIDING:
        cfg["sliding_window"] = spec.sliding_window
        if arch.startswith("Qwen"):
            cfg["use_sliding_window"] = spec.sliding_window is not None
            cfg["max_window_layers"] = 0 if spec.sliding_window else spec.num_layers
            cfg["layer_types"] = spec.num_layers * [
                "sliding_attention" if spec.sliding_window else "full_attention"]
    if arch == "Qwen2MoeForCausalLM":
        cfg["qkv_bias"] = True
    if arch in MOE:
        cfg["num_experts_per_tok"] = spec.k
        cfg["num_local_experts" if arch in ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
            else "num_experts"] = spec.num_experts
        if arch == "Qwen3MoeForCausalLM":
            cfg["num_experts"] = spec.num_experts  # transformers 4.x name
        if arch != "MixtralForCausalLM":
            cfg["norm_topk_prob"] = spec.normalize
        if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
            cfg["moe_intermediate_size"] = spec.moe_d_ff
            cfg["decoder_sparse_step"] = 1
            cfg["mlp_only_layers"] = [i for i in range(spec.num_layers)
                                      if i not in spec.moe_layers]
        else:
            cfg["intermediate_size"] = spec.moe_d_ff
        if arch == "Qwen2MoeForCausalLM":
            cfg["shared_expert_intermediate_size"] = spec.shared_d_ff
        cfg["router_aux_loss_coef"] = 0.0
        cfg["output_router_logits"] = False
    return cfg
