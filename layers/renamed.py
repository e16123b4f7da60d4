"""Binding names that moved when routers became modules (kept for one release).

Old `MoeLayer` router arguments (`routing_type`, `gating`, `router_*`, ...) and
the old `TransformerLM` MoE arguments (`num_experts`, `k`, `expert_d_ff`,
`moe_kwargs`) still take effect, with a `DeprecationWarning` naming the new
binding. Bindings on the removed `Router` configurable are refused with a
ValueError naming the new one (`TopKRouter.<name>`).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import gin

from layers.routers import get_router

# Old MoeLayer argument -> (router registry name or None for "the chosen router", new argument).
_ROUTER_ARGS = {
    "normalize": "normalize", "score": "score", "route_scale": "route_scale",
    "batch_prioritized": "batch_prioritized", "router_jitter": "jitter_eps",
    "router_noise_std": "noise_std", "router_init_std": "init_std",
    "num_groups": "num_groups", "top_groups": "top_groups",
    "dts_threshold": "threshold", "dts_gumbel_weights": "gumbel_weights",
}
_ROUTER_CHOICE = ("routing_type", "gating")
# Old TransformerLM argument -> new MoeLayer argument.
_MODEL_ARGS = {"num_experts": "num_experts", "k": "k", "expert_d_ff": "d_ff"}
# Arguments of the removed `Router` configurable.
_OLD_ROUTER_PARAMS = ("init_std", "jitter_eps", "use_bias", "param_dtype")


def _warn(old: str, new: str) -> None:
    warnings.warn(f"the gin binding / argument {old} is deprecated and will be removed in the "
                  f"next release; use {new}", DeprecationWarning, stacklevel=4)


def router_name(options: Mapping[str, Any]) -> str:
    """Registry name of the router the old routing_type/gating pair meant."""
    if options.get("gating", "top_k") == "dense_to_sparse":
        if options.get("routing_type", "token_choice") != "token_choice":
            raise ValueError("gating='dense_to_sparse' needs routing_type='token_choice', "
                             f"got {options['routing_type']!r}")
        return "dense_to_sparse"
    if options.get("gating", "top_k") != "top_k":
        raise ValueError(f"gating must be one of ('top_k', 'dense_to_sparse'), "
                         f"got {options['gating']!r}; use MoeLayer.router = @<Router class>")
    routing_type = options.get("routing_type", "token_choice")
    if routing_type not in ("token_choice", "expert_choice"):
        raise ValueError(f"routing_type must be one of ('token_choice', 'expert_choice'), "
                         f"got {routing_type!r}; use MoeLayer.router = @<Router class>")
    return "top_k" if routing_type == "token_choice" else "expert_choice"


def router_from_old_args(old: Mapping[str, Any], owner: str) -> Callable[..., Any]:
    """A router factory from old MoeLayer router arguments (each warns with its new name)."""
    unknown = sorted(set(old) - set(_ROUTER_ARGS) - set(_ROUTER_CHOICE))
    if unknown:
        raise ValueError(f"{owner} got unknown arguments {unknown}")
    router = get_router(router_name(old))
    cls_name = router.__name__
    for key in old:
        if key in _ROUTER_CHOICE:
            _warn(f"{owner}.{key}", f"MoeLayer.router = @{cls_name}")
        else:
            _warn(f"{owner}.{key}", f"{cls_name}.{_ROUTER_ARGS[key]}")
    kwargs = {_ROUTER_ARGS[k]: v for k, v in old.items() if k in _ROUTER_ARGS}
    accepted = inspect.signature(router.__init__).parameters
    for old_name, new in _ROUTER_ARGS.items():
        if old_name in old and new not in accepted:
            raise ValueError(f"{owner}.{old_name} does not apply to {cls_name} (the router the "
                             f"old routing_type/gating arguments select)")
    return functools.partial(router, **kwargs)


def moe_block_from_old_args(moe_block: Callable[..., Any], old: Mapping[str, Any], *,
                            dense_d_ff: int | None = None, activation: str | None = None,
                            ) -> Callable[..., Any]:
    """`moe_block` with the old TransformerLM MoE arguments applied (each warns).

    A model configured the old way also keeps the old defaults where the new
    bindings are absent: the experts' hidden size was `TransformerLM.d_ff` and
    their activation `TransformerLM.activation`.
    """
    kwargs: dict[str, Any] = {}
    for key, new in _MODEL_ARGS.items():
        if old.get(key) is not None:
            _warn(f"TransformerLM.{key}", f"MoeLayer.{new}")
            kwargs[new] = old[key]
    if any(value is not None for value in old.values()):
        moe_kwargs_keys = set(old.get("moe_kwargs") or {})
        if "d_ff" not in kwargs and dense_d_ff is not None and not gin_bound("MoeLayer.d_ff"):
            kwargs["d_ff"] = dense_d_ff
        if (activation is not None and "activation" not in moe_kwargs_keys
                and not gin_bound("MoeLayer.activation")):
            kwargs["activation"] = activation
    moe_kwargs = dict(old.get("moe_kwargs") or {})
    if moe_kwargs:
        _warn("TransformerLM.moe_kwargs", "MoeLayer.<argument> and <Router class>.<argument> "
              "bindings (e.g. MoeLayer.capacity_factor, TopKRouter.normalize)")
    for reserved in ("d_model", "d_ff", "num_experts", "k", "causal", "dtype", "param_dtype",
                     "rngs"):
        if reserved in moe_kwargs:
            raise ValueError(f"moe_kwargs may not set {reserved!r}: set MoeLayer.{reserved} "
                             f"(sizes) or leave it to TransformerLM")
    kwargs.update(moe_kwargs)
    return functools.partial(moe_block, **kwargs) if kwargs else moe_block


def gin_bound(binding: str) -> bool:
    """Whether gin holds a binding for `binding` (e.g. "MoeLayer.d_ff")."""
    try:
        gin.query_parameter(binding)
    except ValueError:
        return False
    return True


@gin.configurable("Router")
def _removed_router(**kwargs: Any) -> None:
    """The removed `Router` configurable: registered only so that its bindings are refused
    with the new name instead of gin's "no configurable matching 'Router'"."""
    del kwargs
    raise ValueError("Router was removed; use TopKRouter (or the class bound to MoeLayer.router)")


def refuse_removed_router_bindings() -> None:
    """ValueError if gin has a binding on the removed `Router` configurable."""
    bound = gin.get_bindings("Router")
    if bound:
        names = ", ".join(f"Router.{k} -> TopKRouter.{k}" for k in sorted(bound))
        raise ValueError(f"the Router configurable was removed (routers are modules now): "
                         f"rename {names} (or bind the router class you set in MoeLayer.router)")
