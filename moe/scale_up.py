"""Scale-up of a dense transformer's parameters: wider d_ff, more heads, wider d_model,
more layers (pure numpy; AquilaMoE's scale-up stage, docs/surgery.md "Scale-up").

Trees are the unscanned parameter dicts of `layers.transformer.TransformerLM`
with dense FFNs: `embedding [V, d]`, `lm_head [d, V]` (untied), `final_norm/scale
[d]`, and per layer `attention_norm/scale [d]`, `ffn_norm/scale [d]`,
`attention/{query [d, H, h], key, value [d, K, h], out [H, h, d]}` (optional
`query_bias [H, h]`, `key_bias`/`value_bias [K, h]`, `out_bias [d]`,
`query_norm`/`key_norm` `{scale [h]}`), `ffn/{wi [d, f], wi_gate? [d, f], wo [f, d]}`.

Width (d_ff and heads), `width`:
  fpi  Net2Net / bert2BERT function-preserving initialisation: new unit (head) j
       copies unit g(j) = j mod n of the same layer; every copy's output rows
       (`wo` rows, `out` heads) are divided by the number of copies of its source.
       Exact for any elementwise activation (each copy computes the same value).
  aki  bert2BERT advanced knowledge initialisation: new units (heads) copy unit
       g(j) of the *next* layer (the last layer: its own); the old units' output
       rows are kept. Not function-preserving.
d_model, `d_model_scheme`:
  zero the new residual dimensions are zero everywhere: embedding columns and every
       residual write (`out`, `wo`, `out_bias`) are 0 there; the reads (`query`,
       `key`, `value`, `wi`, `lm_head` rows) copy dimension g(j), which meets only
       zeros. RMSNorm over d' = d + Δ then sees mean(x'²) = (d/d') mean(x²): with
       the norm epsilon scaled by d/d' (`norm_eps_factor`) and the old gains by
       sqrt(d/d') it returns exactly the old values (tied embeddings: the final
       norm keeps its gain, since the logits' d_model^-1/2 also changes). Exact,
       except where another norm uses the same epsilon (qk_norm).
  copy Net2Net duplication: dimension j copies g(j) in the embedding and every
       residual write; reads are divided by the copy count. RMSNorm's mean square
       now counts duplicated dimensions twice, a data-dependent change no gain can
       undo, and tied logits double-count them: approximately function-preserving only.
Depth, `depth` (L -> L' layers):
  identity  position p holds source layer floor(p L / L'); a repeated source layer
            is a copy whose attention `out` (and `out_bias`) and FFN `wo` are 0, so
            the pre-norm block is the identity. Exact.
  duplicate the same positions, repeats copied as they are (interpolation). Not exact.
  stack     position p holds source layer p mod L (the whole stack repeated). Not exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from moe.validation import check_one_of

WIDTH_SCHEMES = ("fpi", "aki")
D_MODEL_SCHEMES = ("zero", "copy")
DEPTH_SCHEMES = ("identity", "duplicate", "stack")
EXACT = {"width": "fpi", "d_model_scheme": "zero", "depth": "identity"}
_ATTENTION_KEYS = {"query", "key", "value", "out", "query_bias", "key_bias", "value_bias",
                   "out_bias", "query_norm", "key_norm"}
_FFN_KEYS = {"wi", "wi_gate", "wo"}


@dataclasses.dataclass(frozen=True)
class Shape:
    d_model: int
    d_ff: int
    num_heads: int
    num_layers: int


@dataclasses.dataclass(frozen=True)
class Growth:
    """Source and target shapes and the schemes (module docstring)."""

    source: Shape
    target: Shape
    width: str = "fpi"
    d_model_scheme: str = "zero"
    depth: str = "identity"

    def __post_init__(self):
        check_one_of("width_scheme", self.width, WIDTH_SCHEMES)
        check_one_of("d_model_scheme", self.d_model_scheme, D_MODEL_SCHEMES)
        check_one_of("depth_scheme", self.depth, DEPTH_SCHEMES)
        for name in ("d_model", "d_ff", "num_heads", "num_layers"):
            old, new = getattr(self.source, name), getattr(self.target, name)
            if new < old:
                raise ValueError(f"{name}: the target {new} is smaller than the source {old}; "
                                 f"scale-up only grows (use expert pruning or ToMoE to shrink)")

    def violations(self, tied: bool = False, qk_norm: bool = False) -> list[str]:
        """Why this growth is not function-preserving ([] = exact)."""
        s, t, out = self.source, self.target, []
        if self.width == "aki" and (t.d_ff > s.d_ff or t.num_heads > s.num_heads):
            out.append("width_scheme=aki copies the next layer's units (not function-preserving)")
        if t.d_model > s.d_model:
            if self.d_model_scheme == "copy":
                out.append("d_model_scheme=copy: RMSNorm counts duplicated dimensions twice"
                           + (" and tied logits double-count them" if tied else ""))
            elif qk_norm:
                out.append("qk_norm: the query/key norms share norm_eps, which d_model growth "
                           "rescales")
        if t.num_layers > s.num_layers and self.depth != "identity":
            out.append(f"depth_scheme={self.depth}: the new layers are copies, not identities")
        return out

    @property
    def norm_eps_factor(self) -> float:
        """The factor on norm_eps that keeps RMSNorm exact under d_model growth (zero)."""
        if self.d_model_scheme == "zero":
            return self.source.d_model / self.target.d_model
        return 1.0


def unit_map(old: int, new: int) -> np.ndarray:
    """`[new]` g(j) = j mod old: new units copy old ones round-robin."""
    return np.arange(new) % old


def split_counts(g: np.ndarray, old: int) -> np.ndarray:
    """`[new]` the number of copies of each new unit's source."""
    return np.bincount(g, minlength=old)[g].astype(np.float64)


def _take(a: Any, idx: np.ndarray, axis: int) -> np.ndarray:
    return np.take(np.asarray(a), idx, axis=axis)


def _divide(a: np.ndarray, counts: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * a.ndim
    shape[axis] = -1
    return (a / counts.reshape(shape)).astype(a.dtype)


def grow_units(block: Mapping[str, Any], next_block: Mapping[str, Any], keys_in: dict[str, int],
               keys_out: dict[str, int], old: int, new: int, scheme: str) -> dict[str, Any]:
    """Width growth of one block's units (FFN hidden units or attention heads).

    keys_in: {leaf: unit axis} of leaves whose units are copied (inputs, biases);
    keys_out: {leaf: unit axis} of leaves read out (divided by the copy counts for
    fpi). Other leaves are kept.
    """
    out = dict(block)
    if new == old:
        return out
    g = unit_map(old, new)
    counts = split_counts(g, old)
    for key, axis in {**keys_in, **keys_out}.items():
        if key not in block:
            continue
        grown = _take(block[key], g, axis)
        if scheme == "aki":
            donor = _take(next_block[key], g, axis)
            fresh = (slice(None),) * axis + (slice(old, None),)
            grown[fresh] = donor[fresh]
        elif key in keys_out:
            grown = _divide(grown, counts, axis)
        out[key] = grown
    return out


def _check_block(layer: Mapping[str, Any], name: str) -> None:
    unknown = sorted(set(layer["attention"]) - _ATTENTION_KEYS) + sorted(
        set(layer["ffn"]) - _FFN_KEYS)
    if unknown:
        raise ValueError(f"{name}: scale-up knows dense FFNs and the standard attention; it "
                         f"has no rule for {unknown} (MoE layers, MLA are not supported)")


def grow_width(tree: Mapping[str, Any], growth: Growth, layer_names: list[str]) -> dict[str, Any]:
    """d_ff and head growth of every layer (d_model and depth unchanged)."""
    s, t = growth.source, growth.target
    out = dict(tree)
    for i, name in enumerate(layer_names):
        layer, nxt = tree[name], tree[layer_names[min(i + 1, len(layer_names) - 1)]]
        _check_block(layer, name)
        ffn = grow_units(layer["ffn"], nxt["ffn"], {"wi": 1, "wi_gate": 1}, {"wo": 0},
                         s.d_ff, t.d_ff, growth.width)
        attention = grow_units(
            layer["attention"], nxt["attention"],
            {"query": 1, "key": 1, "value": 1, "query_bias": 0, "key_bias": 0,
             "value_bias": 0}, {"out": 0}, s.num_heads, t.num_heads, growth.width)
        out[name] = {**layer, "ffn": ffn, "attention": attention}
    return out


# (leaf path suffix, d_model axis, role): role "read" = input rows, "write" = residual
# output, "norm" = RMSNorm gain.
_D_MODEL_LEAVES = {("attention", "query"): (0, "read"), ("attention", "key"): (0, "read"),
                   ("attention", "value"): (0, "read"), ("attention", "out"): (2, "write"),
                   ("attention", "out_bias"): (0, "write"), ("ffn", "wi"): (0, "read"),
                   ("ffn", "wi_gate"): (0, "read"), ("ffn", "wo"): (1, "write"),
                   ("attention_norm", "scale"): (0, "norm"), ("ffn_norm", "scale"): (0, "norm")}


def _grow_dim(a: Any, axis: int, role: str, g: np.ndarray, old: int, scheme: str,
              gain: float) -> np.ndarray:
    a = np.asarray(a)
    grown = _take(a, g, axis)
    fresh = (slice(None),) * axis + (slice(old, None),)
    if scheme == "zero":
        if role == "write":
            grown[fresh] = 0
        elif role == "norm":
            grown = (grown * gain).astype(a.dtype)
    elif role == "read":
        grown = _divide(grown, split_counts(g, old), axis)
    return grown


def grow_d_model(tree: Mapping[str, Any], growth: Growth, layer_names: list[str],
                 tied: bool) -> dict[str, Any]:
    """d_model growth (module docstring); heads, d_ff and depth unchanged."""
    d, d2 = growth.source.d_model, growth.target.d_model
    if d2 == d:
        return dict(tree)
    scheme, g = growth.d_model_scheme, unit_map(d, d2)
    gain = math.sqrt(d / d2)
    out = dict(tree)
    out["embedding"] = _grow_dim(tree["embedding"], 1, "write", g, d, scheme, gain)
    if "lm_head" in tree:
        out["lm_head"] = _grow_dim(tree["lm_head"], 0, "read", g, d, scheme, gain)
    out["final_norm"] = {"scale": _grow_dim(tree["final_norm"]["scale"], 0, "norm", g, d, scheme,
                                            1.0 if tied else gain)}
    for name in layer_names:
        layer = {k: dict(v) for k, v in tree[name].items()}
        for (part, leaf), (axis, role) in _D_MODEL_LEAVES.items():
            if leaf in layer.get(part, {}):
                layer[part][leaf] = _grow_dim(layer[part][leaf], axis, role, g, d, scheme, gain)
        out[name] = layer
    return out


def depth_map(old: int, new: int, scheme: str) -> list[tuple[int, bool]]:
    """`[(source layer, is_new)]` for each of the `new` positions (module docstring)."""
    check_one_of("depth_scheme", scheme, DEPTH_SCHEMES)
    sources = ([p % old for p in range(new)] if scheme == "stack"
               else [p * old // new for p in range(new)])
    seen, out = set(), []
    for s in sources:
        out.append((s, s in seen))
        seen.add(s)
    return out


def _identity_block(layer: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the block whose residual writes are zero (the block is the identity)."""
    layer = {k: dict(v) for k, v in layer.items()}
    for part, leaf in (("attention", "out"), ("attention", "out_bias"), ("ffn", "wo")):
        if leaf in layer[part]:
            layer[part][leaf] = np.zeros_like(np.asarray(layer[part][leaf]))
    return layer


def grow_depth(tree: Mapping[str, Any], growth: Growth, layer_name) -> dict[str, Any]:
    """The layers of the target depth; `layer_name(i)` names layer i."""
    old, new = growth.source.num_layers, growth.target.num_layers
    out = {k: v for k, v in tree.items() if not str(k).startswith("layer_")}
    for p, (src, is_new) in enumerate(depth_map(old, new, growth.depth)):
        layer = tree[layer_name(src)]
        out[layer_name(p)] = (_identity_block(layer) if is_new and growth.depth == "identity"
                              else {k: dict(v) for k, v in layer.items()})
    return out


def scale_up(tree: Mapping[str, Any], growth: Growth, *, tied: bool, layer_name) -> dict[str, Any]:
    """The grown parameter tree: width, then d_model, then depth."""
    names = [layer_name(i) for i in range(growth.source.num_layers)]
    missing = [n for n in names if n not in tree]
    if missing:
        raise ValueError(f"the parameter tree lacks layers {missing}")
    tree = grow_width(tree, growth, names)
    tree = grow_d_model(tree, growth, names, tied)
    return grow_depth(tree, growth, layer_name)
