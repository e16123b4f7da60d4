"""DeepSeek-V2/V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`) configs both ways.

transformers 5's modeling code is the reference (`modeling_deepseek_v2/v3.py`):

- attention: multi-head latent attention (`layers/mla.py`); RoPE on interleaved
  pairs (V2 always, V3 with `rope_interleave`), permuted into our rotate-half
  layout by `deepseek_tensors`; the latent norms' eps is transformers' 1e-6;
- routing: V3 sigmoid scores + `e_score_correction_bias` (selection only) + groups
  scored by their two best biased scores, then `norm_topk_prob`,
  `routed_scaling_factor`; V2 softmax, `topk_method` `greedy` or
  `group_limited_greedy` (groups scored by their best score), never renormalised,
  `routed_scaling_factor`;
- the first `first_k_dense_replace` layers dense, then MoE layers with
  `n_shared_experts` ungated shared experts of `moe_intermediate_size` each.

`parse` reads a config into a `ModelSpec` with a `DeepseekSpec`, refusing, naming
key and value, what neither side can express exactly; `bindings` gives the gin
bindings, `hf_config` the config.json of a spec, `spec_of_model` the spec of one of
our models (refusals name the gin binding).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from experiments.convert.hf.config import ModelSpec, UnsupportedConfigError, check_common_keys

_log = logging.getLogger(__name__)

V2, V3 = "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"
ARCHITECTURES = (V2, V3)
MODEL_TYPES = {V2: "deepseek_v2", V3: "deepseek_v3"}
# transformers builds the q/kv latent norms with its RMSNorm default eps.
LATENT_NORM_EPS = 1e-6
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "attention_factor", "truncate")
# transformers 5.24's defaults for keys a config.json may leave out (applied before
# reading, so an absent key means what it means to transformers). `q_lora_rank` has a
# default there too (1536), but null means "no query LoRA": it must be given.
DEFAULTS = {
    V2: {"first_k_dense_replace": 0, "n_shared_experts": 2, "routed_scaling_factor": 1.0,
         "topk_method": "greedy", "n_group": None, "topk_group": None, "norm_topk_prob": False},
    V3: {"first_k_dense_replace": 3, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
         "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "rope_interleave": True,
         "num_key_value_heads": 128, "num_nextn_predict_layers": 1},
}
# Read by DeepSeek's own training code only (no effect on the forward): not imported.
IGNORED_KEYS = ("aux_loss_alpha", "seq_aux", "ep_size")


@dataclasses.dataclass(frozen=True)
class DeepseekSpec:
    """What a DeepSeek decoder has beyond `ModelSpec` (sizes per `layers/mla.py`)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    score: str = "softmax"              # 'softmax' (V2) | 'sigmoid' (V3)
    num_groups: int | None = None
    top_groups: int | None = None
    group_score: str = "top2_sum"       # 'top2_sum' (V3) | 'max' (V2 group_limited_greedy)
    route_scale: float = 1.0
    num_shared_experts: int = 1
    rope_interleave: bool = True        # V3's flag; V2 is always interleaved
    mtp_layers: int = 0                 # V3 num_nextn_predict_layers (their tensors are ignored)

    @property
    def selection_bias(self) -> bool:
        """V3 routers hold `e_score_correction_bias` (our loss-free selection bias)."""
        return self.score == "sigmoid"


def _refuse(key: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"config.json {key}={value!r}: {why}")


def yarn_scaling(cfg: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(theta, YaRN scaling or None) from `rope_parameters` or the older `rope_scaling`.

    As transformers reads it: a missing `original_max_position_embeddings` is
    `max_position_embeddings`; falsy `beta_fast`/`beta_slow`/`mscale`/`mscale_all_dim`
    and a null `attention_factor` mean their defaults. `factor` is required.
    """
    from layers.attention import check_rope_scaling  # pylint: disable=g-import-not-at-top

    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling")
    if legacy:
        params.update(legacy)
    key = "rope_scaling" if legacy else "rope_parameters"
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(f"{key}.partial_rotary_factor", params["partial_rotary_factor"],
                      "partial rotation is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise _refuse(f"{key}.rope_type", rope_type, "DeepSeek families: supported rope types "
                      "default, yarn")
    if params.get("factor") is None:
        raise _refuse(f"{key}.factor", params.get("factor"), "YaRN needs its factor (the "
                      "context extension ratio)")
    params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    unknown = sorted(set(params) - set(_YARN_KEYS))
    if unknown:
        raise _refuse(f"{key}.{unknown[0]}", params[unknown[0]], "not a YaRN option "
                      f"(supported: {', '.join(_YARN_KEYS)})")
    kept = {k: v for k, v in params.items()
            if not (k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim") and not v)
            and not (k == "attention_factor" and v is None)}
    try:
        scaling = check_rope_scaling({"rope_type": "yarn", **kept})
    except ValueError as e:
        raise _refuse(key, dict(params, rope_type="yarn"), str(e)) from None
    return theta, scaling


def _check_groups(groups: tuple[Any, Any], why: str) -> None:
    for key, value in zip(("n_group", "topk_group"), groups):
        if not value:
            raise _refuse(key, value, why)


def _routing(cfg: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """Score, groups, normalisation and scale of the routed experts."""
    method, scoring = cfg.get("topk_method"), cfg.get("scoring_func")
    groups = (cfg.get("n_group"), cfg.get("topk_group"))
    if arch == V3:
        if method not in (None, "noaux_tc"):
            raise _refuse("topk_method", method, "DeepseekV3 routes with noaux_tc (sigmoid "
                          "scores + e_score_correction_bias, groups by their top-2 sum)")
        if scoring not in (None, "sigmoid"):
            raise _refuse("scoring_func", scoring, "DeepseekV3 scores with sigmoid")
        _check_groups(groups, "DeepseekV3 needs n_group and topk_group >= 1")
        return {"score": "sigmoid", "num_groups": int(groups[0]), "top_groups": int(groups[1]),
                "group_score": "top2_sum", "normalize": bool(cfg.get("norm_topk_prob", True))}
    if method not in V2_TOPK_METHODS:
        raise _refuse("topk_method", method, f"DeepseekV2: supported {', '.join(V2_TOPK_METHODS)}")
    if scoring not in (None, "softmax"):
        raise _refuse("scoring_func", scoring, "DeepseekV2 scores with softmax")
    if cfg.get("norm_topk_prob"):
        raise _refuse("norm_topk_prob", cfg["norm_topk_prob"], "transformers' DeepseekV2 never "
                      "renormalises the top-k weights (DeepSeek's own code would): ambiguous")
    out = {"score": "softmax", "normalize": False, "group_score": "top2_sum",
           "num_groups": None, "top_groups": None}
    if method == "group_limited_greedy":
        _check_groups(groups, "group_limited_greedy needs n_group and topk_group >= 1")
        out.update(num_groups=int(groups[0]), top_groups=int(groups[1]), group_score="max")
    return out


def _check_keys(cfg: Mapping[str, Any], arch: str, layers: int) -> None:
    """Refuses the config values transformers' DeepSeek code or ours cannot run exactly."""
    heads = int(cfg["num_attention_heads"])
    if cfg.get("num_key_value_heads") not in (None, heads):
        raise _refuse("num_key_value_heads", cfg["num_key_value_heads"], "MLA needs "
                      f"num_key_value_heads = num_attention_heads = {heads}")
    if cfg.get("attention_bias"):
        raise _refuse("attention_bias", cfg["attention_bias"], "MLA projections have no biases "
                      "here")
    if float(cfg.get("rms_norm_eps", 1e-6)) != LATENT_NORM_EPS:
        raise _refuse("rms_norm_eps", cfg["rms_norm_eps"], "transformers' q/kv latent norms use "
                      f"eps {LATENT_NORM_EPS}, ours use rms_norm_eps: only {LATENT_NORM_EPS} "
                      "is exact")
    if cfg.get("quantization_config"):
        method = dict(cfg["quantization_config"]).get("quant_method")
        raise _refuse("quantization_config.quant_method", method, "quantized checkpoints "
                      "(DeepSeek-V3's fp8 weights with weight_scale_inv) are not imported: "
                      "dequantize to bf16/fp32 first")
    if int(cfg.get("moe_layer_freq", 1)) != 1:
        raise _refuse("moe_layer_freq", cfg["moe_layer_freq"], "transformers makes every layer "
                      "from first_k_dense_replace on MoE (1 only)")
    dense = int(cfg.get("first_k_dense_replace", 3 if arch == V3 else 0))
    if not 0 <= dense < layers:
        raise _refuse("first_k_dense_replace", dense, f"must be in [0, num_hidden_layers={layers})")
    if int(cfg["n_shared_experts"] or 0) < 1:
        raise _refuse("n_shared_experts", cfg["n_shared_experts"], "must be >= 1 "
                      "(transformers always builds the shared experts)")
    qk = cfg.get("qk_head_dim")
    if qk is not None and qk != cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]:
        raise _refuse("qk_head_dim", qk, "must equal qk_nope_head_dim + qk_rope_head_dim")
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise _refuse("hidden_act", cfg["hidden_act"], "DeepSeek families: silu only")


def parse(cfg: Mapping[str, Any], arch: str) -> ModelSpec:
    """The spec of a DeepseekV2/V3 config.json; UnsupportedConfigError or KeyError."""
    if "num_mtp_layers" in cfg:  # transformers' attribute name for num_nextn_predict_layers
        cfg = {"num_nextn_predict_layers": cfg["num_mtp_layers"], **cfg}
    cfg = {**DEFAULTS[arch], **cfg}  # an explicit null stays null (num_key_value_heads: heads)
    check_common_keys(cfg)
    layers = int(cfg["num_hidden_layers"])
    _check_keys(cfg, arch, layers)
    theta, scaling = yarn_scaling(cfg)
    routing = _routing(cfg, arch)
    normalize = routing.pop("normalize")
    mtp = int(cfg.get("num_nextn_predict_layers") or 0)
    if arch == V2 and mtp:
        raise _refuse("num_nextn_predict_layers", mtp, "DeepseekV2 has no MTP layers")
    q_lora = cfg["q_lora_rank"]
    ds = DeepseekSpec(
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(cfg["kv_lora_rank"]), qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
        qk_rope_head_dim=int(cfg["qk_rope_head_dim"]), v_head_dim=int(cfg["v_head_dim"]),
        route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
        num_shared_experts=int(cfg["n_shared_experts"]),
        rope_interleave=bool(cfg.get("rope_interleave", True)) if arch == V3 else True,
        mtp_layers=mtp, **routing)
    heads = int(cfg["num_attention_heads"])
    dense = int(cfg.get("first_k_dense_replace", 3 if arch == V3 else 0))
    return ModelSpec(
        architecture=arch, vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["hidden_size"]),
        d_ff=int(cfg["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=ds.qk_rope_head_dim,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        num_experts=int(cfg["n_routed_experts"]), k=int(cfg["num_experts_per_tok"]),
        moe_d_ff=int(cfg["moe_intermediate_size"]), normalize=normalize,
        moe_layers=tuple(range(dense, layers)), deepseek=ds)


def bindings(spec: ModelSpec) -> list[str]:
    """Gin bindings of the TransformerLM for a DeepSeek `spec` (V3 also turns on
    loss-free balancing, whose state holds the imported correction biases)."""
    ds = spec.deepseek
    assert ds is not None
    b = [f"TransformerLM.d_model = {spec.d_model}", f"TransformerLM.d_ff = {spec.d_ff}",
         f"TransformerLM.num_layers = {spec.num_layers}",
         f"TransformerLM.num_heads = {spec.num_heads}",
         "TransformerLM.activation = 'swiglu'", f"TransformerLM.norm_eps = {spec.norm_eps!r}",
         f"TransformerLM.rope_max_wavelength = {spec.rope_theta!r}",
         "TransformerLM.tie_embeddings = False", "TransformerLM.causal = True",
         "TransformerLM.attention = @MLAttention",
         f"MLAttention.q_lora_rank = {ds.q_lora_rank!r}",
         f"MLAttention.kv_lora_rank = {ds.kv_lora_rank}",
         f"MLAttention.qk_nope_head_dim = {ds.qk_nope_head_dim}",
         f"MLAttention.qk_rope_head_dim = {ds.qk_rope_head_dim}",
         f"MLAttention.v_head_dim = {ds.v_head_dim}"]
    if spec.rope_scaling:
        b.append(f"TransformerLM.rope_scaling = {dict(spec.rope_scaling)!r}")
    if len(spec.moe_layers) == spec.num_layers:
        b += ["TransformerLM.moe_every = 1", "TransformerLM.moe_layers = None"]
    else:
        b += ["TransformerLM.moe_every = 0", f"TransformerLM.moe_layers = {spec.moe_layers!r}"]
    b += ["TransformerLM.moe_block = @MoeLayer", f"MoeLayer.num_experts = {spec.num_experts}",
          f"MoeLayer.k = {spec.k}", f"MoeLayer.d_ff = {spec.moe_d_ff}",
          "MoeLayer.activation = 'swiglu'", "MoeLayer.router = @TopKRouter",
          "MoeLayer.capacity_factor = None",
          f"MoeLayer.num_shared_experts = {ds.num_shared_experts}",
          f"MoeLayer.shared_d_ff = {spec.moe_d_ff}", "MoeLayer.shared_gate = False",
          f"TopKRouter.score = '{ds.score}'", f"TopKRouter.normalize = {spec.normalize}",
          f"TopKRouter.route_scale = {ds.route_scale!r}",
          f"TopKRouter.num_groups = {ds.num_groups!r}",
          f"TopKRouter.top_groups = {ds.top_groups!r}",
          f"TopKRouter.group_score = '{ds.group_score}'"]
    if ds.selection_bias:
        b.append("LossFreeBalancing.enabled = True")
    return b


def hf_config(spec: ModelSpec, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json for a DeepSeek `spec` (transformers 5 layout; `rope_scaling` too)."""
    ds = spec.deepseek
    assert ds is not None
    arch = spec.architecture
    rope: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    if spec.rope_scaling:
        rope.update(dict(spec.rope_scaling))
    dense = spec.moe_layers[0] if spec.moe_layers else spec.num_layers
    max_len = spec.max_position_embeddings
    if max_len is None and spec.rope_scaling:  # YaRN's extended context, as DeepSeek's configs
        scaling = dict(spec.rope_scaling)
        max_len = int(scaling["factor"] * scaling["original_max_position_embeddings"])
    cfg: dict[str, Any] = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model, "intermediate_size": spec.d_ff or spec.moe_d_ff,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads, "head_dim": ds.qk_rope_head_dim,
        "hidden_act": "silu", "rms_norm_eps": spec.norm_eps, "rope_theta": spec.rope_theta,
        "rope_parameters": rope, "tie_word_embeddings": False, "torch_dtype": dtype,
        "dtype": dtype, "max_position_embeddings": max_len or 4096,
        "attention_bias": False, "q_lora_rank": ds.q_lora_rank,
        "kv_lora_rank": ds.kv_lora_rank, "qk_nope_head_dim": ds.qk_nope_head_dim,
        "qk_rope_head_dim": ds.qk_rope_head_dim, "v_head_dim": ds.v_head_dim,
        "first_k_dense_replace": dense, "n_routed_experts": spec.num_experts,
        "num_experts_per_tok": spec.k, "moe_intermediate_size": spec.moe_d_ff,
        "n_shared_experts": ds.num_shared_experts, "routed_scaling_factor": ds.route_scale,
        "n_group": ds.num_groups, "topk_group": ds.top_groups,
        "norm_topk_prob": spec.normalize, "output_router_logits": False}
    if spec.rope_scaling:
        cfg["rope_scaling"] = dict(spec.rope_scaling)
    if arch == V3:
        cfg.update(topk_method="noaux_tc", scoring_func="sigmoid", rope_interleave=True,
                   num_nextn_predict_layers=0)
    else:
        cfg.update(topk_method="group_limited_greedy" if ds.num_groups else "greedy",
                   scoring_func="softmax", mlp_bias=False)
    return cfg
