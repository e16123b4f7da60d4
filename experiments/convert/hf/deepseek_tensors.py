"""DeepSeek-V2/V3 tensors <-> our MLA/MoE leaves (`mapping.SplitRule`s and `Rule`s).

H heads, r = kv_lora_rank, dn/dr = qk_nope/qk_rope_head_dim, dv = v_head_dim,
ql = q_lora_rank; HF `[out, in]`:

| HF tensor (`model.layers.{i}.self_attn.`) | ours (`layer_i/attention/`) |
|---|---|
| `q_proj.weight [H(dn+dr), d]` (ql None) | `query [d, H, dn+dr]` |
| `q_a_proj.weight [ql, d]`, `q_a_layernorm.weight` | `query_down [d, ql]`, `query_norm/scale` |
| `q_b_proj.weight [H(dn+dr), ql]` | `query_up [ql, H, dn+dr]` |
| `kv_a_proj_with_mqa.weight [r+dr, d]` | rows :r `kv_down [d, r]`, rows r: `key_rope [d, dr]` |
| `kv_a_layernorm.weight` | `kv_norm/scale` |
| `kv_b_proj.weight [H(dn+dv), r]` | per head rows :dn `key_up [r, H, dn]`, dn: `value_up [r, H, dv]` |
| `o_proj.weight [d, H dv]` | `out [H, dv, d]` |

RoPE layout: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... (V2's
complex rotation; V3's `apply_rotary_pos_emb_interleave` when `rope_interleave`),
we rotate halves (x_j, x_{j+dr/2}). The RoPE rows of the query and of the shared
key are therefore permuted on import, evens first then odds (`ROPE_ORDER`), and
back on export. Only q . k enters attention, so applying the same permutation to
both keeps every score; V3's interleaved rotation even returns the rotate-half
layout, so ours is its output bit for bit.

MLP: dense `mlp.{gate,up,down}_proj` as Llama; MoE `mlp.gate.weight [E, d]` ->
`ffn/router/kernel`, `mlp.experts.{e}.{gate,up,down}_proj` (or transformers 5's
fused `gate_up_proj`/`down_proj`) -> `ffn/experts/*`, `mlp.shared_experts.*` ->
`ffn/shared/*`. V3's `mlp.gate.e_score_correction_bias [E]` is not a parameter
here: it is the layer's loss-free selection bias (`selection_bias_names`).
"""

from __future__ import annotations

import numpy as np

from experiments.convert.hf.config import ModelSpec
from experiments.convert.hf.mapping import ExpertRule, Rule, SplitRule


def rope_order(dr: int) -> np.ndarray:
    """Our RoPE dim j holds DeepSeek's dim ROPE_ORDER[j]: `[0, 2, ..., dr-2, 1, 3, ..., dr-1]`."""
    return np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)])


def _deinterleave(x: np.ndarray, dr: int, axis: int) -> np.ndarray:
    """The last `dr` entries along `axis` from DeepSeek's pair layout to rotate-half."""
    x = np.moveaxis(x, axis, -1)
    rope = x[..., -dr:][..., rope_order(dr)]
    return np.moveaxis(np.concatenate([x[..., :-dr], rope], axis=-1), -1, axis)


def _interleave(x: np.ndarray, dr: int, axis: int) -> np.ndarray:
    """Inverse of `_deinterleave`."""
    x = np.moveaxis(x, axis, -1)
    rope = np.empty_like(x[..., -dr:])
    rope[..., rope_order(dr)] = x[..., -dr:]
    return np.moveaxis(np.concatenate([x[..., :-dr], rope], axis=-1), -1, axis)


def _attention(spec: ModelSpec, a: str, o: tuple[str, ...]) -> list[Rule | SplitRule]:
    ds = spec.deepseek
    d, heads = spec.d_model, spec.num_heads
    dn, dr, dv, r = ds.qk_nope_head_dim, ds.qk_rope_head_dim, ds.v_head_dim, ds.kv_lora_rank
    perm = ds.rope_interleave  # V3 with rope_interleave=False rotates halves already

    def q_in(x: np.ndarray, rows: int) -> np.ndarray:  # [H(dn+dr), rows] -> [rows, H, dn+dr]
        q = x.T.reshape(rows, heads, dn + dr)
        return _deinterleave(q, dr, -1) if perm else q

    def q_out(q: np.ndarray) -> np.ndarray:
        q = _interleave(q, dr, -1) if perm else q
        return q.reshape(q.shape[0], -1).T

    def kv_a_in(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [r+dr, d]
        rope = x[r:].T
        return x[:r].T, (_deinterleave(rope, dr, -1) if perm else rope)

    def kv_a_out(down: np.ndarray, rope: np.ndarray) -> np.ndarray:
        rope = _interleave(rope, dr, -1) if perm else rope
        return np.concatenate([down.T, rope.T], axis=0)

    def kv_b_in(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [H(dn+dv), r]
        y = x.reshape(heads, dn + dv, r)
        return y[:, :dn].transpose(2, 0, 1), y[:, dn:].transpose(2, 0, 1)

    def kv_b_out(key_up: np.ndarray, value_up: np.ndarray) -> np.ndarray:
        y = np.concatenate([key_up.transpose(1, 2, 0), value_up.transpose(1, 2, 0)], axis=1)
        return y.reshape(heads * (dn + dv), r)

    att = o + ("attention",)
    if ds.q_lora_rank is None:
        rules: list[Rule | SplitRule] = [SplitRule(
            a + "q_proj.weight", (att + ("query",),), lambda x: (q_in(x, d),), q_out)]
    else:
        rules = [Rule(a + "q_a_proj.weight", att + ("query_down",), "T"),
                 Rule(a + "q_a_layernorm.weight", att + ("query_norm", "scale")),
                 SplitRule(a + "q_b_proj.weight", (att + ("query_up",),),
                           lambda x: (q_in(x, ds.q_lora_rank),), q_out)]
    return rules + [
        SplitRule(a + "kv_a_proj_with_mqa.weight", (att + ("kv_down",), att + ("key_rope",)),
                  kv_a_in, kv_a_out),
        Rule(a + "kv_a_layernorm.weight", att + ("kv_norm", "scale")),
        SplitRule(a + "kv_b_proj.weight", (att + ("key_up",), att + ("value_up",)),
                  kv_b_in, kv_b_out),
        SplitRule(a + "o_proj.weight", (att + ("out",),),
                  lambda x: (x.T.reshape(heads, dv, d),), lambda w: w.reshape(-1, d).T)]


def _mlp(hf: str, ours: tuple[str, ...]) -> list[Rule]:
    return [Rule(hf + "gate_proj.weight", ours + ("wi_gate",), "T"),
            Rule(hf + "up_proj.weight", ours + ("wi",), "T"),
            Rule(hf + "down_proj.weight", ours + ("wo",), "T")]


def _moe(spec: ModelSpec, m: str, f: tuple[str, ...]) -> list[Rule | ExpertRule]:
    e = spec.num_experts
    return [Rule(m + "gate.weight", f + ("router", "kernel"), "T"),
            ExpertRule(m + "experts.", ".gate_proj.weight", f + ("experts", "wi_gate"), "in", e),
            ExpertRule(m + "experts.", ".up_proj.weight", f + ("experts", "wi"), "in", e),
            ExpertRule(m + "experts.", ".down_proj.weight", f + ("experts", "wo"), "out", e),
            *_mlp(m + "shared_experts.", f + ("shared",))]


def layer_rules(spec: ModelSpec, i: int) -> list[Rule | ExpertRule | SplitRule]:
    """Every tensor of decoder layer `i` (not the selection bias), in HF order."""
    p, o = f"model.layers.{i}.", f"layer_{i}"
    rules: list[Rule | ExpertRule | SplitRule] = [
        Rule(p + "input_layernorm.weight", (o, "attention_norm", "scale")),
        Rule(p + "post_attention_layernorm.weight", (o, "ffn_norm", "scale"))]
    rules += _attention(spec, p + "self_attn.", (o,))
    if i in spec.moe_layers:
        rules += _moe(spec, p + "mlp.", (o, "ffn"))
    else:
        rules += _mlp(p + "mlp.", (o, "ffn"))
    return rules


def selection_bias_names(spec: ModelSpec) -> dict[str, str]:
    """{our MoE layer name: HF `e_score_correction_bias` tensor} (V3; empty for V2)."""
    if spec.deepseek is None or not spec.deepseek.selection_bias:
        return {}
    return {f"layer_{i}": f"model.layers.{i}.mlp.gate.e_score_correction_bias"
            for i in spec.moe_layers}


def mtp_prefixes(spec: ModelSpec) -> tuple[str, ...]:
    """`model.layers.{N}.` ... for V3's `num_nextn_predict_layers` MTP layers (N =
    num_hidden_layers, ...): transformers 5.24 builds no module for them and drops
    their tensors; so does the importer (named in a warning and in hf_import.json)."""
    if spec.deepseek is None:
        return ()
    return tuple(f"model.layers.{spec.num_layers + j}." for j in range(spec.deepseek.mtp_layers))
