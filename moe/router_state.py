"""Per-step router inputs: one pytree passed once through the model.

Some routers take inputs that change every optimizer step without being
parameters: the loss-free selection biases (one `[E]` vector per MoE layer),
the EvoMoE dense-to-sparse temperature and hard flag (shared by all layers),
and whatever later routers need. They travel as one `RouterState`, traced by
`jit` (new values never recompile), from the step hooks that own them
(`experiments.train.hooks`) through `TransformerLM.__call__` to each router,
which reads the keys it declares in `state_keys` from `state.for_layer(name)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

Array = jax.Array

# Keys of the state the built-in routers read.
SELECTION_BIAS = "selection_bias"      # per layer: [E] float32, selection only
DTS_TEMPERATURE = "dts_temperature"    # shared: scalar float32 tau
DTS_HARD = "dts_hard"                  # shared: scalar bool, hard (top-k) phase
# Model inputs a router may read (TransformerLM adds them for routers that declare them).
TOKEN_IDS = "token_ids"                # shared: [B, S] int32 input token ids (hash routing)
MODEL_INPUT_KEYS = (TOKEN_IDS,)


@dataclasses.dataclass(frozen=True)
class RouterState:
    """Router inputs of one step.

    Attributes:
      layers: `{moe layer name: {key: array}}`, inputs of one layer's router.
      shared: `{key: array}`, inputs of every layer's router.
    """

    layers: Mapping[str, Mapping[str, Array]] = dataclasses.field(default_factory=dict)
    shared: Mapping[str, Array] = dataclasses.field(default_factory=dict)

    def for_layer(self, name: str) -> dict[str, Array]:
        """The inputs of layer `name`'s router: the shared ones, then its own."""
        return {**self.shared, **self.layers.get(name, {})}

    def merge(self, other: RouterState) -> RouterState:
        """Union of two states (hooks contribute theirs); a key set twice is an error."""
        shared = dict(self.shared)
        for key, value in other.shared.items():
            if key in shared:
                raise ValueError(f"router state key {key!r} is set by two step hooks")
            shared[key] = value
        layers = {name: dict(values) for name, values in self.layers.items()}
        for name, values in other.layers.items():
            mine = layers.setdefault(name, {})
            for key, value in values.items():
                if key in mine:
                    raise ValueError(f"router state key {key!r} of layer {name!r} is set by "
                                     f"two step hooks")
                mine[key] = value
        return RouterState(layers=layers, shared=shared)

    def check_layers(self, moe_layers: tuple[str, ...] | list[str]) -> None:
        """Refuses per-layer inputs for layers that are not MoE layers."""
        unknown = sorted(set(self.layers) - set(moe_layers))
        if unknown:
            raise ValueError(f"router state has inputs for {unknown}, which are not MoE "
                             f"layers; MoE layers: {tuple(moe_layers)}")

    def with_model_inputs(self, needed: set[str] | frozenset[str], *,
                          token_ids: Array) -> RouterState:
        """This state plus the model inputs in `needed` (`MODEL_INPUT_KEYS`) as shared
        entries: token_ids `[B, S] int32` under `TOKEN_IDS`. Unchanged when none is needed."""
        if TOKEN_IDS not in needed:
            return self
        return self.merge(RouterState(shared={TOKEN_IDS: token_ids}))

    @property
    def empty(self) -> bool:
        return not self.shared and not any(self.layers.values())


def _flatten(state: RouterState) -> tuple[tuple[Any, Any], None]:
    return (dict(state.layers), dict(state.shared)), None


def _unflatten(_: None, children: tuple[Any, Any]) -> RouterState:
    return RouterState(layers=children[0], shared=children[1])


jax.tree_util.register_pytree_node(RouterState, _flatten, _unflatten)
