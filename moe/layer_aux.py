"""The typed auxiliary output of one MoE layer call, and how each field reduces.

Every MoE layer returns `(y, MoeAux)`. A field declares once, in its
metadata, how it combines across the micro-batches of a training step
(`over_microbatches`) and across MoE layers when it becomes a loss or a
summary scalar (`over_layers`). Devices need no declaration: the step runs
under `jit` on global arrays, so a count is already the sum over devices.
Consumers (the train step, evaluation, metrics, FLOP counter, balance scopes,
summary) iterate these declarations instead of listing key strings, so adding
a statistic or a balance loss is one field here plus the function that fills it
(docs/architecture.md shows the worked example).

Reductions:
  "sum"      counts: added up (counts, kept_counts, num_tokens);
  "mean"     averaged (losses whose micro-batch shares are equal-weighted, and
             the per-call statistics reported as their mean);
  "per_token" per-token routing of one call (token_probs, token_experts,
             token_mask): consumed inside the step (balance scopes), never
             reduced nor reported;
  "loss"     (over_layers only) summed or averaged over layers as
             `LossWeights.layer_reduction` says;
  "layer_mean" (over_layers only) the mean over layers of a reported scalar.

Fields a router does not produce are None (expert choice has no per-token
routing; a dense-to-sparse gate has no LBL but a `dts_loss`). A layer that is not
a MoE layer may report an aux too (a dense `layers.skip.SkipBlock`: its skip
fields only; `MoeAux.is_moe` False), and the consumers of expert statistics pass
over it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

MICROBATCH_REDUCTIONS = ("sum", "mean", "per_token")
LAYER_REDUCTIONS = ("loss", "layer_mean", "none")


def aux_field(over_microbatches: str, over_layers: str = "none", *, optional: bool = True,
           weight: str | None = None, scoped: bool = False, doc: str = "") -> Any:
    """A field and its reductions. Loss fields (`over_layers="loss"`) name their
    `LossWeights` attribute (`weight`); `scoped` losses are recomputed by the train
    step over the configured balance groups (`LossWeights.lbl_scope`) instead of
    being taken from the layer as they are."""
    assert over_microbatches in MICROBATCH_REDUCTIONS, over_microbatches
    assert over_layers in LAYER_REDUCTIONS, over_layers
    assert (over_layers == "loss") == (weight is not None), (over_layers, weight)
    metadata = {"over_microbatches": over_microbatches, "over_layers": over_layers, "doc": doc,
                "weight": weight, "scoped": scoped}
    if optional:
        return dataclasses.field(default=None, metadata=metadata)
    return dataclasses.field(metadata=metadata)


@dataclasses.dataclass(frozen=True)
class MoeAux:
    """Auxiliary outputs of one MoE layer call over T tokens (all float32 unless noted)."""

    # Losses (weighted by `LossWeights`): scalars.
    lbl: Array | None = aux_field("mean", "loss", weight="lbl_weight", scoped=True,
                               doc="load-balancing loss, 1.0 at balance")
    z_loss: Array | None = aux_field("mean", "loss", weight="z_loss_weight", doc="router z-loss")
    dts_loss: Array | None = aux_field("mean", "loss", weight="dts_weight",
                                    doc="EvoMoE dense-to-sparse balance loss E*sum(ce*me)")
    skip_loss: Array | None = aux_field("mean", "loss", weight="skip_weight",
                                     doc="Learning to Skip compute-budget loss (layers.skip)")
    # Counts: `[E]` and a scalar.
    counts: Array | None = aux_field("sum", doc="[E] assignments per expert before dropping")
    kept_counts: Array | None = aux_field("sum", doc="[E] assignments per expert after dropping")
    num_tokens: Array | None = aux_field("sum", doc="real (non-padding) tokens routed")
    # Statistics reported per layer (and their mean over layers).
    mean_probs: Array | None = aux_field("mean", doc="[E] mean unbiased router probability P_i")
    dropped_fraction: Array | None = aux_field("mean", "layer_mean",
                                            doc="fraction of assignments dropped")
    max_violation: Array | None = aux_field("mean", "layer_mean", doc="MaxVio of `counts`")
    router_entropy: Array | None = aux_field("mean", "layer_mean",
                                          doc="mean entropy of the router distribution")
    active_experts: Array | None = aux_field("mean", "layer_mean",
                                          doc="experts per token after dropping")
    null_fraction: Array | None = aux_field(
        "mean", "layer_mean", doc="fraction of the k choices that went to zero-computation "
        "experts (layers.routers.null_experts)")
    attention_skip_rate: Array | None = aux_field(
        "mean", "layer_mean", doc="fraction of real tokens that skipped the attention")
    ffn_skip_rate: Array | None = aux_field(
        "mean", "layer_mean", doc="fraction of real tokens that skipped the FFN / MoE block")
    attention_skipped: Array | None = aux_field(
        "sum", doc="real tokens that skipped the attention (FLOP counter)")
    ffn_skipped: Array | None = aux_field(
        "sum", doc="real tokens that skipped the FFN / MoE block (FLOP counter)")
    sequence_max_violation: Array | None = aux_field(
        "mean", "layer_mean", doc="mean MaxVio per sequence (filled by the train step)")
    batch_max_violation: Array | None = aux_field(
        "mean", "layer_mean", doc="MaxVio of the step's summed counts (filled by the train step)")
    # Per-token routing of this call, for balance groups other than the call.
    token_probs: Array | None = aux_field("per_token", doc="[T, E] unbiased scores (sum 1)")
    token_experts: Array | None = aux_field("per_token", doc="[T, k] int32 selected experts")
    token_mask: Array | None = aux_field("per_token", doc="[T] 1 = real token")

    # -- declarations ------------------------------------------------------
    @classmethod
    def field_names(cls, *, over_microbatches: str | None = None,
                    over_layers: str | None = None) -> tuple[str, ...]:
        """Names of the fields with the given reductions (None = any)."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if (over_microbatches is None
                         or f.metadata["over_microbatches"] == over_microbatches)
                     and (over_layers is None or f.metadata["over_layers"] == over_layers))

    @classmethod
    def loss_names(cls) -> tuple[str, ...]:
        return cls.field_names(over_layers="loss")

    @classmethod
    def unscoped_loss_names(cls) -> tuple[str, ...]:
        """Losses the train step takes from each layer as they are (not regrouped)."""
        return tuple(n for n in cls.loss_names() if not cls._metadata(n)["scoped"])

    @classmethod
    def loss_weight_name(cls, name: str) -> str:
        """The `LossWeights` attribute that weights the loss field `name`."""
        return cls._metadata(name)["weight"]

    @classmethod
    def _metadata(cls, name: str) -> Mapping[str, Any]:
        return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)

    @classmethod
    def stat_names(cls) -> tuple[str, ...]:
        """Fields reported as step statistics (everything but per-token routing)."""
        return tuple(n for n in cls.field_names() if n not in cls.field_names(
            over_microbatches="per_token"))

    # -- helpers -----------------------------------------------------------
    def replace(self, **changes: Any) -> MoeAux:
        return dataclasses.replace(self, **changes)

    def items(self) -> Iterator[tuple[str, Array]]:
        """(name, value) of the fields that are set."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                yield f.name, value

    @property
    def is_moe(self) -> bool:
        """Whether a MoE block produced this aux (it has expert counts, per-token routing
        or a router loss); a layer of another kind (e.g. a dense `layers.skip.SkipBlock`)
        reports only its own fields."""
        return any(getattr(self, name) is not None
                   for name in ("counts", "token_experts", "lbl", "z_loss", "dts_loss"))

    def has_token_routing(self) -> bool:
        return all(getattr(self, n) is not None
                   for n in self.field_names(over_microbatches="per_token"))

    def stats(self) -> MoeAux:
        """The reported statistics: per-token fields dropped, stop-gradient, float32."""
        per_token = self.field_names(over_microbatches="per_token")
        return type(self)(**{name: (None if name in per_token or value is None else
                                jax.lax.stop_gradient(jnp.asarray(value, jnp.float32)))
                         for name, value in self._asdict().items()})

    def _asdict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


jax.tree_util.register_dataclass(
    MoeAux, data_fields=[f.name for f in dataclasses.fields(MoeAux)], meta_fields=[])


LayerAux = Mapping[str, MoeAux]


class StackedLayerAux(Mapping):
    """`{layer name: MoeAux}` kept as groups of layers whose aux is stacked along
    a leading axis: the layers of one unit position of a scanned model
    (`layers.scan`) are one group of R, an unscanned layer a group of one.

    Reading `aux[name]` (or iterating) slices that layer's aux out of its group,
    so code written for a plain dict works unchanged; the train step reduces the
    groups along their stacked axis instead (`groups`, `map_groups`,
    `reduce_layers`), with one op per group rather than one per layer, which
    keeps the compile time of a scanned model flat in its depth.

    A pytree (groups are the children): after a `lax.scan` over micro-batches the
    leaves are `[A, R, ...]`; reduce the micro-batch axis (`map_groups(
    reduce_microbatches)`) before reading layers.
    """

    def __init__(self, groups: Sequence[tuple[Sequence[str], Any]],
                 order: Sequence[str] | None = None):
        self.groups: tuple[tuple[tuple[str, ...], Any], ...] = tuple(
            (tuple(names), aux) for names, aux in groups)
        self._index: dict[str, tuple[int, int]] = {}
        for g, (names, _) in enumerate(self.groups):
            for r, name in enumerate(names):
                if name in self._index:
                    raise ValueError(f"layer {name!r} is in two aux groups")
                self._index[name] = (g, r)
        self.order: tuple[str, ...] = tuple(self._index) if order is None else tuple(order)
        if sorted(self.order) != sorted(self._index):
            raise ValueError(f"order {list(self.order)} does not name the grouped layers "
                             f"{sorted(self._index)}")

    @classmethod
    def of(cls, aux: Mapping[str, Any]) -> StackedLayerAux:
        """`aux` itself if stacked already, else every layer a group of one (`[1, ...]`)."""
        if isinstance(aux, StackedLayerAux):
            return aux
        return cls([((name, ), jax.tree.map(lambda a: a[None], a)) for name, a in aux.items()])

    def __getitem__(self, name: str) -> Any:
        g, r = self._index[name]
        return jax.tree.map(lambda a: a[r], self.groups[g][1])

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def __repr__(self) -> str:
        return f"StackedLayerAux({[(names, type(a).__name__) for names, a in self.groups]})"

    def with_groups(self, values: Sequence[Any]) -> StackedLayerAux:
        """The same layers with new group values (one per group, stacked alike)."""
        if len(values) != len(self.groups):
            raise ValueError(f"{len(values)} values for {len(self.groups)} groups")
        return StackedLayerAux([(names, v) for (names, _), v in zip(self.groups, values)],
                               self.order)

    def map_groups(self, fn: Callable[[Any], Any]) -> StackedLayerAux:
        """`fn` applied to every group's stacked value."""
        return self.with_groups([fn(a) for _, a in self.groups])


def _flatten_stacked(aux: StackedLayerAux):
    children = [(jax.tree_util.DictKey("|".join(names)), a) for names, a in aux.groups]
    return children, (tuple(names for names, _ in aux.groups), aux.order)


def _unflatten_stacked(meta, children) -> StackedLayerAux:
    names, order = meta
    return StackedLayerAux(list(zip(names, children)), order)


jax.tree_util.register_pytree_with_keys(
    StackedLayerAux, _flatten_stacked, _unflatten_stacked,
    lambda aux: ([a for _, a in aux.groups], _flatten_stacked(aux)[1]))


def reduce_microbatches(stacked: MoeAux) -> MoeAux:
    """Statistics stacked over micro-batches `[A, ...]` -> one step's statistics."""
    out = {}
    for f in dataclasses.fields(stacked):
        value = getattr(stacked, f.name)
        rule = f.metadata["over_microbatches"]
        if value is None or rule == "per_token":
            out[f.name] = None
        elif rule == "sum":
            out[f.name] = jnp.sum(value, axis=0)
        else:
            out[f.name] = jnp.mean(value, axis=0)
    return type(stacked)(**out)


def reduce_layers(aux: LayerAux, name: str, reduction: str = "sum") -> Array:
    """Sum or mean over MoE layers of the loss field `name` (0 when no layer sets it)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be one of ('sum', 'mean'), got {reduction!r}")
    if isinstance(aux, StackedLayerAux):  # one sum per group of stacked layers
        stacked = [getattr(a, name) for _, a in aux.groups
                   if getattr(a, name, None) is not None]
        values = [jnp.sum(v, axis=0) for v in stacked]
        count = sum(v.shape[0] for v in stacked)
    else:
        values = [getattr(a, name) for a in aux.values() if getattr(a, name, None) is not None]
        count = len(values)
    if not values:
        return jnp.zeros((), jnp.float32)
    total = sum(values)
    return total / count if reduction == "mean" else total


def split_model_aux(aux: LayerAux) -> tuple[LayerAux, dict[str, MoeAux]]:
    """(the MoE layers' aux, the model-level aux) of a model's aux. A model-level aux
    (a `MoeAux` subclass with `model_level = True`, e.g. `layers.mtp.MtpAux`) carries losses
    and statistics of the whole model: its loss fields are weighted like the layers', it
    takes no part in balance losses or routing statistics. A `StackedLayerAux` stays
    stacked: its model-level groups (groups of one) are taken out."""
    def is_model(value: Any) -> bool:
        return getattr(type(value), "model_level", False)

    if isinstance(aux, StackedLayerAux):
        model = {names[0]: jax.tree.map(lambda a: a[0], value)
                 for names, value in aux.groups if is_model(value)}
        groups = [(names, value) for names, value in aux.groups if not is_model(value)]
        return StackedLayerAux(groups, [n for n in aux.order if n not in model]), model
    layers, model = {}, {}
    for name, value in aux.items():
        (model if is_model(value) else layers)[name] = value
    return layers, model


def layer_means(aux: LayerAux) -> dict[str, float]:
    """Mean over layers of each `layer_mean` scalar (host values), for step scalars."""
    out = {}
    for name in MoeAux.field_names(over_layers="layer_mean"):
        values = [float(getattr(a, name)) for a in aux.values() if getattr(a, name) is not None]
        if values:
            out[name] = sum(values) / len(values)
    return out
