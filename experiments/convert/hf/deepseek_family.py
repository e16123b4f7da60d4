"""The DeepSeek family (V2 or V3) and `ModelSpec` of one of our MLA models, for export.

A model with `TransformerLM.attention = @MLAttention` exports as:

- `DeepseekV3ForCausalLM` when its routers score with sigmoid (`TopKRouter.score =
  'sigmoid'`): groups scored by their two best biased scores (`group_score =
  'top2_sum'`; no groups is written as `n_group = topk_group = 1`), `normalize` ->
  `norm_topk_prob`, the loss-free selection biases -> `e_score_correction_bias`
  (zeros when the run has none);
- `DeepseekV2ForCausalLM` when they score with softmax: `greedy`, or
  `group_limited_greedy` with `group_score = 'max'`; no renormalisation (transformers'
  V2 has none) and no selection biases (refused unless `--drop_selection_bias`).

Both need: dense layers only before the first MoE layer (`first_k_dense_replace`),
identical MoE layers with ungated shared experts whose width is a multiple of the
experts' (`n_shared_experts`), dropless SwiGLU experts, no router logit bias,
`norm_eps` 1e-6 (transformers' latent norms), SwiGLU dense layers, a causal model.
"""

from __future__ import annotations

from typing import Any

from experiments.convert.hf.config import ModelSpec
from experiments.convert.hf.deepseek import LATENT_NORM_EPS, V2, V3, DeepseekSpec
from experiments.convert.hf.family import UnsupportedModelError, bound


def _moe(model: Any) -> dict[str, Any]:
    """The (identical) MoE layers' options; refuses what DeepSeek families cannot hold."""
    options = set()
    for name in model.moe_layer_names:
        moe = model.moe_layer(name)
        router = moe.router
        if type(router).__name__ != "TopKRouter":
            raise UnsupportedModelError(f"{name}: router {type(router).__name__} has no "
                                        "DeepSeek equivalent (TopKRouter only)")
        if getattr(router, "bias", None) is not None:
            raise UnsupportedModelError("TopKRouter.use_bias=True: DeepSeek routers have no "
                                        "logit bias")
        if moe.capacity_factor is not None or moe.activation != "swiglu":
            raise UnsupportedModelError(
                f"MoeLayer.capacity_factor={moe.capacity_factor!r}, activation="
                f"{moe.activation!r}: DeepSeek experts are dropless SwiGLU (None, 'swiglu')")
        if moe.shared is None or moe.shared_gate is not None:
            raise UnsupportedModelError("DeepSeek MoE layers have ungated shared experts: "
                                        "MoeLayer.num_shared_experts >= 1, shared_gate=False")
        f, shared = int(moe.experts.wo.shape[-2]), int(moe.shared.wo.shape[-2])
        if shared % f:
            raise UnsupportedModelError(f"shared experts of total width {shared} are not "
                                        f"n_shared_experts x moe_intermediate_size={f}")
        options.add((moe.num_experts, moe.k, f, shared // f, router.score, bool(router.normalize),
                     float(router.route_scale), router.num_groups, router.top_groups,
                     router.group_score))
    if len(options) != 1:
        raise UnsupportedModelError(f"MoE layers differ ({sorted(options, key=str)}): DeepSeek "
                                    "families need identical MoE layers")
    keys = ("num_experts", "k", "moe_d_ff", "shared", "score", "normalize", "route_scale",
            "num_groups", "top_groups", "group_score")
    return dict(zip(keys, options.pop()))


def _routing(moe: dict[str, Any], biases: bool, drop: bool) -> tuple[str, dict[str, Any]]:
    """(architecture, DeepseekSpec routing fields)."""
    groups = moe["num_groups"]
    if moe["score"] == "sigmoid":
        if groups and moe["group_score"] != "top2_sum":
            raise UnsupportedModelError(f"TopKRouter.group_score={moe['group_score']!r} with "
                                        "sigmoid scores: DeepseekV3 scores groups by 'top2_sum'")
        if groups and moe["num_experts"] // groups < 2:
            raise UnsupportedModelError(f"TopKRouter.num_groups={groups}: DeepseekV3 needs "
                                        "groups of >= 2 experts (it sums each group's top 2)")
        return V3, {"score": "sigmoid", "num_groups": groups or 1,
                    "top_groups": moe["top_groups"] or 1, "group_score": "top2_sum"}
    if biases and not drop:
        raise UnsupportedModelError(
            "the checkpoint holds loss-free selection biases with softmax routers: "
            "DeepseekV2 has no correction bias (only V3, with sigmoid scores): pass "
            "--drop_selection_bias to export without them (routing then changes)")
    if moe["normalize"]:
        raise UnsupportedModelError("TopKRouter.normalize=True with softmax scores: "
                                    "transformers' DeepseekV2 never renormalises")
    if groups and moe["group_score"] != "max":
        raise UnsupportedModelError(f"TopKRouter.group_score={moe['group_score']!r} with "
                                    "softmax scores: DeepseekV2's group_limited_greedy scores "
                                    "groups by 'max'")
    return V2, {"score": "softmax", "num_groups": groups, "top_groups": moe["top_groups"],
                "group_score": "max" if groups else "top2_sum"}


def spec_of_model(model: Any, *, selection_biases: bool = False,
                  drop_selection_bias: bool = False) -> ModelSpec:
    """The DeepSeek spec of `model` (abstract TransformerLM with MLAttention layers)."""
    attention = model.block("layer_0").attention
    if not model.causal:
        raise UnsupportedModelError("TransformerLM.causal=False: HF causal LMs are decoders")
    if float(model.final_norm.eps) != LATENT_NORM_EPS:
        raise UnsupportedModelError(f"TransformerLM.norm_eps={model.final_norm.eps!r}: "
                                    "transformers' DeepSeek latent norms use "
                                    f"{LATENT_NORM_EPS}; only that is exact")
    names, moe_names = list(model.layer_names), set(model.moe_layer_names)
    if not moe_names:
        raise UnsupportedModelError("an MLA model without MoE layers: DeepSeek families "
                                    "export MoE models (dense MLA export is not done)")
    first = min(i for i, n in enumerate(names) if n in moe_names)
    if any(n not in moe_names for n in names[first:]):
        raise UnsupportedModelError("DeepSeek families have dense layers only before the MoE "
                                    "ones (first_k_dense_replace): set TransformerLM.moe_layers "
                                    f"= ({first}, ..., {len(names) - 1})")
    activation = bound("TransformerLM.activation", "relu")
    if first and activation != "swiglu":
        raise UnsupportedModelError(f"TransformerLM.activation={activation!r}: DeepSeek dense "
                                    "layers are SwiGLU")
    moe = _moe(model)
    arch, routing = _routing(moe, selection_biases, drop_selection_bias)
    if arch == V2 and model.d_model % attention.num_heads:
        raise UnsupportedModelError(f"TransformerLM.d_model={model.d_model} is not a multiple "
                                    f"of num_heads={attention.num_heads}: transformers' "
                                    "DeepseekV2Config refuses it")
    scaling = bound("TransformerLM.rope_scaling")
    if scaling and scaling.get("rope_type", "default") not in ("default", "yarn"):
        raise UnsupportedModelError(f"TransformerLM.rope_scaling rope_type "
                                    f"{scaling['rope_type']!r}: DeepSeek families take yarn")
    ds = DeepseekSpec(
        q_lora_rank=attention.q_lora_rank, kv_lora_rank=attention.kv_lora_rank,
        qk_nope_head_dim=attention.nope_dim, qk_rope_head_dim=attention.rope_dim,
        v_head_dim=attention.v_dim, route_scale=moe["route_scale"],
        num_shared_experts=moe["shared"], **routing)
    return ModelSpec(
        architecture=arch, vocab_size=model.vocab_size, d_model=model.d_model,
        d_ff=int(model.block(names[0]).ffn.wo.shape[-2]) if first else 0,
        num_layers=model.num_layers, num_heads=attention.num_heads,
        num_kv_heads=attention.num_heads, head_dim=attention.rope_dim,
        norm_eps=float(model.final_norm.eps), rope_theta=float(attention.rope_max_wavelength),
        rope_scaling=attention.rope_scaling, num_experts=moe["num_experts"], k=moe["k"],
        moe_d_ff=moe["moe_d_ff"], normalize=moe["normalize"],
        moe_layers=tuple(range(first, len(names))), deepseek=ds)
