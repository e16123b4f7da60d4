"""Routers: NNX modules that turn tokens into a `Routing` for `layers.MoeLayer`.

Each router is one file and one `@register_router("name")` line (which also
registers it in gin, so `MoeLayer.router = @TopKRouter` selects it).
"""

from layers.routers.base import (
    ROUTER_DENYLIST,
    BaseRouter,
    Routing,
    available_routers,
    get_router,
    register_router,
)
from layers.routers.dense_to_sparse import DenseToSparseRouter
from layers.routers.expert_choice import ExpertChoiceRouter
from layers.routers.hash import HashRouter
from layers.routers.mask import MaskRouter
from layers.routers.null_experts import NullExpertRouter
from layers.routers.top_k import TopKRouter

__all__ = [
    "ROUTER_DENYLIST", "BaseRouter", "DenseToSparseRouter", "ExpertChoiceRouter", "HashRouter",
    "MaskRouter", "NullExpertRouter", "Routing", "TopKRouter", "available_routers", "get_router",
    "register_router",
]
