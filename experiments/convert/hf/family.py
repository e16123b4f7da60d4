"""Which HF family can hold one of our models, as a `ModelSpec`; refusals name the feature.

Dense: Llama (Q/K/V + output biases allowed); Mistral (sliding window); Qwen2
(Q/K/V biases only); Qwen3 (per-head Q/K norm). MoE (softmax top-k, dropless,
SwiGLU experts): Mixtral (renormalised top-k, every layer MoE); Qwen2-MoE (a
shared expert with its sigmoid gate; zero Q/K/V biases when ours has none);
Qwen3-MoE (per-head Q/K norm); OLMoE (whole-projection Q/K norm, every layer MoE).
"""

from __future__ import annotations

from typing import Any

import gin

from experiments.convert.hf.config import ModelSpec

_GLU = {"swiglu": "swiglu", "geglu": "geglu", "reglu": "reglu"}


class UnsupportedModelError(ValueError):
    """Our model uses a feature no supported HF family represents."""


def bound(name: str, default: Any = None) -> Any:
    """The gin binding `name`, or `default` when it is unbound or unknown to gin."""
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def _moe_options(model: Any) -> dict[str, Any]:
    """E, k, d_ff, normalize, shared sizes of the (identical) MoE layers; refuses the rest."""
    options = []
    for name in model.moe_layer_names:
        moe = model.moe_layer(name)
        router = moe.router
        kind = type(router).__name__
        if kind != "TopKRouter":
            raise UnsupportedModelError(f"{name}: router {kind} has no HF equivalent (top-k "
                                        "token choice only; expert choice and DTS are refused)")
        checks = {"TopKRouter.score": (router.score, "softmax"),
                  "TopKRouter.route_scale": (router.route_scale, 1.0),
                  "TopKRouter.num_groups": (router.num_groups, None),
                  "MoeLayer.capacity_factor": (moe.capacity_factor, None),
                  "MoeLayer.activation": (moe.activation, "swiglu")}
        for key, (value, want) in checks.items():
            if value != want and not (want == 1.0 and value in (1, None)):
                raise UnsupportedModelError(f"{key}={value!r} cannot be exported (HF MoE "
                                            f"families need {want!r})")
        if getattr(router, "bias", None) is not None:
            raise UnsupportedModelError("TopKRouter.use_bias=True: HF routers have no logit bias")
        shared = moe.shared
        options.append((moe.num_experts, moe.k, int(moe.experts.wo.shape[-2]), router.normalize,
                        None if shared is None else int(shared.wo.shape[-2]),
                        shared is not None and bound("MoeLayer.shared_gate", False)))
    if len(set(options)) > 1:
        raise UnsupportedModelError(f"MoE layers differ ({sorted(set(options))}): HF families "
                                    "need identical MoE layers")
    e, k, f, normalize, shared_f, gate = options[0]
    if shared_f and not gate:
        raise UnsupportedModelError("MoeLayer.num_shared_experts without MoeLayer.shared_gate: "
                                    "only Qwen2-MoE has a shared expert, and it is gated")
    return {"num_experts": e, "k": k, "moe_d_ff": f, "normalize": bool(normalize),
            "shared_d_ff": shared_f}


_FLAG_BIASES = ("these families' attention_bias gives Q/K/V and o_proj biases together: set "
                 "TransformerLM.attention_out_bias to TransformerLM.attention_bias")


def _check_flag_biases(arch: str, bias: bool, out_bias: bool) -> None:
    """Llama/Qwen3/Qwen3-MoE/OLMoE have Q/K/V and output biases together or none."""
    if bias != out_bias:
        raise UnsupportedModelError(f"TransformerLM.attention_bias={bias}, attention_out_bias="
                                    f"{out_bias} as {arch}: {_FLAG_BIASES}")


def _dense_family(bias: bool, out_bias: bool, qk_norm: str | None, window: int | None,
                  scaling: Any) -> str:
    if qk_norm == "projection":
        raise UnsupportedModelError("TransformerLM.qk_norm='projection' on a dense model: no "
                                    "supported HF family (OLMoE is MoE)")
    if scaling and ((bias and not out_bias) or qk_norm or window):
        raise UnsupportedModelError("TransformerLM.rope_scaling is exported as Llama only, "
                                    "which has no qk-norm/sliding window/Q/K/V biases without "
                                    "an output bias")
    if qk_norm == "head":
        _check_flag_biases("Qwen3ForCausalLM", bias, out_bias)
        return "Qwen3ForCausalLM"
    if out_bias:
        if window:
            raise UnsupportedModelError("TransformerLM.attention_out_bias with sliding_window: "
                                        "Llama (output bias) has no sliding window")
        return "LlamaForCausalLM"
    if bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if window else "LlamaForCausalLM"


def _moe_family(spec_kw: dict[str, Any], moe: dict[str, Any], all_moe: bool) -> str:
    qk_norm, bias, window = spec_kw["qk_norm"], spec_kw["attention_bias"], spec_kw["sliding_window"]
    out_bias = spec_kw["attention_out_bias"]
    if spec_kw["rope_scaling"]:
        raise UnsupportedModelError("TransformerLM.rope_scaling with MoE: no supported HF family")
    if moe["shared_d_ff"]:
        if qk_norm or out_bias:
            raise UnsupportedModelError(f"TransformerLM.qk_norm={qk_norm!r}, attention_out_bias="
                                        f"{out_bias} with a shared expert: Qwen2-MoE has no Q/K "
                                        "norm and no output bias")
        return "Qwen2MoeForCausalLM"
    if qk_norm == "head":
        _check_flag_biases("Qwen3MoeForCausalLM", bias, out_bias)
        return "Qwen3MoeForCausalLM"
    where = "every layer MoE (TransformerLM.moe_every=1)"
    if qk_norm == "projection":
        if not all_moe or window:
            raise UnsupportedModelError(f"OLMoE (qk_norm='projection') needs {where} and no "
                                        "sliding window")
        _check_flag_biases("OlmoeForCausalLM", bias, out_bias)
        return "OlmoeForCausalLM"
    if not moe["normalize"]:
        raise UnsupportedModelError("TopKRouter.normalize=False without qk_norm or a shared "
                                    "expert: Mixtral renormalises the top-k weights")
    if not all_moe or bias or out_bias:
        raise UnsupportedModelError(f"Mixtral needs {where} and no attention biases")
    return "MixtralForCausalLM"


def spec_of(model: Any, *, selection_biases: bool = False,
            drop_selection_bias: bool = False) -> ModelSpec:
    """The HF family and spec of `model` (an abstract TransformerLM built from gin).

    `selection_biases`: the checkpoint holds non-zero loss-free selection
    biases; HF routers have none, so they are refused unless dropped.
    """
    attention = model.block("layer_0").attention
    if type(attention).__name__ == "MLAttention":
        from experiments.convert.hf import deepseek_family  # pylint: disable=g-import-not-at-top
        return deepseek_family.spec_of_model(model, selection_biases=selection_biases,
                                             drop_selection_bias=drop_selection_bias)
    if selection_biases and not drop_selection_bias:
        raise UnsupportedModelError(
            "the checkpoint holds loss-free selection biases (train.loss_free / "
            "selection_bias router state); HF routers have none (DeepseekV3's have, with "
            "MLA and sigmoid scores): pass --drop_selection_bias to export without them "
            "(routing then changes)")
    if type(attention).__name__ != "Attention":
        raise UnsupportedModelError(f"TransformerLM.attention = @{type(attention).__name__}: no "
                                    "supported HF family holds it")
    activation = bound("TransformerLM.activation", "relu")
    if activation not in _GLU:
        raise UnsupportedModelError(f"TransformerLM.activation={activation!r}: HF decoders "
                                    f"have gated MLPs ({', '.join(_GLU)})")
    scaling = bound("TransformerLM.rope_scaling")
    kw: dict[str, Any] = dict(
        vocab_size=model.vocab_size, d_model=model.d_model, num_layers=model.num_layers,
        num_heads=attention.num_heads, num_kv_heads=attention.num_kv_heads,
        head_dim=attention.head_dim, norm_eps=float(model.final_norm.eps),
        rope_theta=float(attention.rope_max_wavelength), activation=activation,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        attention_bias=bool(bound("TransformerLM.attention_bias", False)),
        qk_norm=bound("TransformerLM.qk_norm"),
        sliding_window=bound("TransformerLM.sliding_window"),
        attention_out_bias=bool(bound("TransformerLM.attention_out_bias", False)))
    dense = [n for n in model.layer_names if n not in model.moe_layer_names]
    kw["d_ff"] = int(model.block(dense[0]).ffn.wo.shape[-2]) if dense else 0
    moe_idx = tuple(i for i, n in enumerate(model.layer_names) if n in model.moe_layer_names)
    moe = _moe_options(model) if moe_idx else {}
    if not model.causal:
        raise UnsupportedModelError("TransformerLM.causal=False: HF causal LMs are decoders")
    if not moe_idx:
        arch = _dense_family(kw["attention_bias"], kw["attention_out_bias"], kw["qk_norm"],
                             kw["sliding_window"], scaling)
        return ModelSpec(architecture=arch, **kw)
    if moe["num_experts"] and activation != "swiglu" and dense:
        raise UnsupportedModelError(f"TransformerLM.activation={activation!r}: HF MoE families "
                                    "use silu (swiglu)")
    arch = _moe_family(kw, moe, len(moe_idx) == model.num_layers)
    if arch == "Qwen2MoeForCausalLM":
        kw["attention_bias"] = True  # Qwen2-MoE always has Q/K/V biases: written as zeros
    return ModelSpec(architecture=arch, moe_layers=moe_idx, **kw, **moe)
