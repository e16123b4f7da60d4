"""Tensor name/layout mappings between HF checkpoints and our parameter tree.

Each family is a small table of `Rule`s built from a `ModelSpec`; one generic
walker applies it in either direction. A rule maps one HF tensor to one of our
leaves through a named layout transform (`_TO_OURS`/`_TO_HF`); the MoE experts,
stored per expert by HF (`experts.{e}.w1` Mixtral, `experts.{e}.gate_proj`
Qwen/OLMoE) and stacked `[E, ...]` by us, are `ExpertRule`s. transformers 5
in-memory fused experts (`mlp.experts.gate_up_proj [E, 2f, d]`,
`mlp.experts.down_proj [E, d, f]`) are accepted on import (`unfuse_experts`);
export writes the per-expert layout `save_pretrained` writes. A `SplitRule`
maps one HF tensor to several of our leaves through functions (DeepSeek's
fused MLA projections and permuted RoPE rows: `deepseek_tensors.py`).

Our names: `embedding [V,d]`, `final_norm/scale [d]`, `lm_head [d,V]`,
`layer_i/attention_norm/scale`, `layer_i/ffn_norm/scale`,
`layer_i/attention/{query [d,H,h], key [d,K,h], value [d,K,h], out [H,h,d]}`,
`layer_i/attention/{query_bias [H,h], key_bias [K,h], value_bias [K,h]}`,
`layer_i/attention/out_bias [d]` (o_proj.bias),
`layer_i/attention/{query_norm,key_norm}/scale` (`[h]` 'head', `[H*h]`/`[K*h]`
'projection'), dense `layer_i/ffn/{wi_gate,wi [d,f], wo [f,d]}`, MoE
`layer_i/ffn/router/kernel [d,E]`, `layer_i/ffn/experts/{wi_gate,wi [E,d,f],
wo [E,f,d]}`, `layer_i/ffn/shared/{wi_gate,wi,wo}`, `layer_i/ffn/shared_gate [d]`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from experiments.convert.hf.config import ModelSpec

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensor `hf` <-> our leaf `ours`, through layout `kind` (see `_TO_OURS`)."""

    hf: str
    ours: Path
    kind: str = "same"


@dataclasses.dataclass(frozen=True)
class ExpertRule:
    """HF `prefix.{e}.suffix` for e < E <-> our stacked `[E, ...]` leaf."""

    prefix: str
    suffix: str
    ours: Path
    kind: str  # 'in' ([f,d] -> [d,f]) or 'out' ([d,f] -> [f,d]) per expert
    num_experts: int


@dataclasses.dataclass(frozen=True)
class SplitRule:
    """HF tensor `hf` <-> our leaves `ours` (one or more), through `split(hf array) ->
    tuple of ours` and `join(*ours) -> hf array` (DeepSeek's fused projections)."""

    hf: str
    ours: tuple[Path, ...]
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    join: Callable[..., np.ndarray]


def _heads(spec: ModelSpec, kind: str) -> int:
    return spec.num_heads if kind.startswith("q") or kind == "o" else spec.num_kv_heads


def _to_ours(kind: str, x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    d, h = spec.d_model, spec.head_dim
    if kind == "same":
        return x
    if kind == "T":                          # [out, in] -> [in, out]
        return x.T
    if kind in ("q", "kv"):                  # [H*h, d] -> [d, H, h]
        return x.T.reshape(d, _heads(spec, kind), h)
    if kind == "o":                          # [d, H*h] -> [H, h, d]
        return x.T.reshape(spec.num_heads, h, d)
    if kind in ("q_bias", "kv_bias"):        # [H*h] -> [H, h]
        return x.reshape(_heads(spec, kind), h)
    if kind == "row":                        # [1, d] -> [d]
        return x.reshape(-1)
    raise ValueError(f"unknown layout {kind!r}")


def _to_hf(kind: str, x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    d = spec.d_model
    if kind == "same":
        return x
    if kind == "T":
        return x.T
    if kind in ("q", "kv"):                  # [d, H, h] -> [H*h, d]
        return x.reshape(d, -1).T
    if kind == "o":                          # [H, h, d] -> [d, H*h]
        return x.reshape(-1, d).T
    if kind in ("q_bias", "kv_bias"):
        return x.reshape(-1)
    if kind == "row":
        return x.reshape(1, -1)
    raise ValueError(f"unknown layout {kind!r}")


# --- family tables ---------------------------------------------------------


def _attention(spec: ModelSpec, p: str, o: str) -> list[Rule]:
    a = p + "self_attn."
    rules = [Rule(p + "input_layernorm.weight", (o, "attention_norm", "scale")),
             Rule(p + "post_attention_layernorm.weight", (o, "ffn_norm", "scale")),
             Rule(a + "q_proj.weight", (o, "attention", "query"), "q"),
             Rule(a + "k_proj.weight", (o, "attention", "key"), "kv"),
             Rule(a + "v_proj.weight", (o, "attention", "value"), "kv"),
             Rule(a + "o_proj.weight", (o, "attention", "out"), "o")]
    if spec.attention_bias:
        rules += [Rule(a + "q_proj.bias", (o, "attention", "query_bias"), "q_bias"),
                  Rule(a + "k_proj.bias", (o, "attention", "key_bias"), "kv_bias"),
                  Rule(a + "v_proj.bias", (o, "attention", "value_bias"), "kv_bias")]
    if spec.attention_out_bias:
        rules.append(Rule(a + "o_proj.bias", (o, "attention", "out_bias")))
    if spec.qk_norm:
        rules += [Rule(a + "q_norm.weight", (o, "attention", "query_norm", "scale")),
                  Rule(a + "k_norm.weight", (o, "attention", "key_norm", "scale"))]
    return rules


def _mlp(hf: str, ours: Path) -> list[Rule]:
    return [Rule(hf + "gate_proj.weight", ours + ("wi_gate",), "T"),
            Rule(hf + "up_proj.weight", ours + ("wi",), "T"),
            Rule(hf + "down_proj.weight", ours + ("wo",), "T")]


# Per MoE family: the module holding the MoE, and the per-expert names of
# (gate, up, down).
_MOE_NAMES = {"MixtralForCausalLM": ("block_sparse_moe", ("w1", "w3", "w2")),
              "Qwen2MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj")),
              "Qwen3MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj")),
              "OlmoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj")),
              "DeepseekV2ForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj")),
              "DeepseekV3ForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def _moe(spec: ModelSpec, p: str, o: str) -> list[Rule | ExpertRule]:
    module, (gate, up, down) = _MOE_NAMES[spec.architecture]
    m, f = p + module + ".", (o, "ffn")
    e = spec.num_experts
    rules: list[Rule | ExpertRule] = [
        Rule(m + "gate.weight", f + ("router", "kernel"), "T"),
        ExpertRule(m + "experts.", f".{gate}.weight", f + ("experts", "wi_gate"), "in", e),
        ExpertRule(m + "experts.", f".{up}.weight", f + ("experts", "wi"), "in", e),
        ExpertRule(m + "experts.", f".{down}.weight", f + ("experts", "wo"), "out", e)]
    if spec.shared_d_ff:
        rules += _mlp(m + "shared_expert.", f + ("shared",))
        rules.append(Rule(m + "shared_expert_gate.weight", f + ("shared_gate",), "row"))
    return rules


def rules(spec: ModelSpec) -> list[Rule | ExpertRule | SplitRule]:
    """Every tensor of `spec`'s family, in HF order."""
    out: list[Rule | ExpertRule | SplitRule] = [Rule("model.embed_tokens.weight", ("embedding",))]
    for i in range(spec.num_layers):
        if spec.deepseek is not None:
            from experiments.convert.hf import deepseek_tensors  # pylint: disable=g-import-not-at-top
            out += deepseek_tensors.layer_rules(spec, i)
            continue
        p, o = f"model.layers.{i}.", f"layer_{i}"
        out += _attention(spec, p, o)
        out += _moe(spec, p, o) if i in spec.moe_layers else _mlp(p + "mlp.", (o, "ffn"))
    out += [Rule("model.norm.weight", ("final_norm", "scale")), Rule("lm_head.weight",
                                                                    ("lm_head",), "T")]
    return out


# --- the walker --------------------------------------------------------------


def hf_names(spec: ModelSpec) -> Iterator[str]:
    for r in rules(spec):
        if isinstance(r, (Rule, SplitRule)):
            yield r.hf
        else:
            yield from (f"{r.prefix}{e}{r.suffix}" for e in range(r.num_experts))


def to_ours(get: Callable[[str], np.ndarray], spec: ModelSpec) -> Iterator[tuple[Path, np.ndarray]]:
    """(our path, array) for every leaf; `get(hf_name)` reads one tensor (may raise KeyError).

    Tied embeddings (no `lm_head.weight`, `spec.tie_embeddings`) give an
    untied copy: see `config.model_bindings`.
    """
    for r in rules(spec):
        if isinstance(r, ExpertRule):
            stack = [get(f"{r.prefix}{e}{r.suffix}").T for e in range(r.num_experts)]
            yield r.ours, np.stack(stack)
        elif isinstance(r, SplitRule):
            yield from zip(r.ours, r.split(get(r.hf)))
        elif r.hf == "lm_head.weight" and spec.tie_embeddings:
            try:
                yield r.ours, get(r.hf).T
            except KeyError:
                yield r.ours, get("model.embed_tokens.weight").T
        else:
            yield r.ours, _to_ours(r.kind, get(r.hf), spec)


def to_hf(get: Callable[[Path], np.ndarray], spec: ModelSpec) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every tensor; `get(our path)` reads one leaf."""
    for r in rules(spec):
        if isinstance(r, ExpertRule):
            stacked = get(r.ours)
            for e in range(r.num_experts):
                yield f"{r.prefix}{e}{r.suffix}", np.ascontiguousarray(stacked[e].T)
        elif isinstance(r, SplitRule):
            yield r.hf, np.ascontiguousarray(r.join(*(get(path) for path in r.ours)))
        else:
            yield r.hf, np.ascontiguousarray(_to_hf(r.kind, get(r.ours), spec))


_FUSED = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def fused_expert_names(names: Mapping[str, object] | set[str], spec: ModelSpec) -> dict[str, str]:
    """{per-expert HF name: fused tensor name} for fused tensors present in `names`.

    transformers 5 keeps experts fused in memory: `gate_up_proj [E, 2f, d]`
    (gate rows first) and `down_proj [E, d, f]`; Mixtral's module is then `mlp`.
    """
    out: dict[str, str] = {}
    if not spec.is_moe:
        return out
    module, (gate, up, down) = _MOE_NAMES[spec.architecture]
    for name in names:
        m = _FUSED.match(name)
        if not m:
            continue
        for e in range(spec.num_experts):
            base = f"{m.group(1)}.{module}.experts.{e}."
            parts = (gate, up) if m.group(2) == "gate_up_proj" else (down,)
            for part in parts:
                out[f"{base}{part}.weight"] = name
        if module != "mlp":  # Mixtral's router then lives under `mlp.gate` too
            out[f"{m.group(1)}.{module}.gate.weight"] = f"{m.group(1)}.mlp.gate.weight"
    return out


def unfuse(hf_name: str, fused_name: str, fused: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The per-expert tensor `hf_name` cut out of the fused tensor `fused`."""
    if fused_name.endswith(".gate.weight"):
        return fused
    e = int(hf_name.split(".experts.")[1].split(".")[0])
    if fused_name.endswith("down_proj"):
        return fused[e]
    f = fused.shape[1] // 2
    _, (gate, _, _) = _MOE_NAMES[spec.architecture]
    return fused[e, :f] if f".{gate}." in hf_name else fused[e, f:]
