"""Routing statistics of a restored checkpoint over a data source (one pass).

`collect_stats(restored, batches)` runs the model (dropless, the checkpoint's
selection biases applied, as `restore_model` prepares it) over the batches and
returns, per MoE layer, a `moe.expert_stats.RoutingStats`: expert load, mean
router probability, co-selection counts, per-expert mean output norm, router
logit similarity and mean routed logit vectors. With `domain=d` only the
tokens of domain d count (the others are padding, as in evaluation's
per-domain routing); `collect_domain_stats` does one pass per domain (the
routing analysis, `experiments.reporting.routing_report`, reads its counts).
A scanned model is run through its unscanned view (`unscanned_view`: the same
function, layer by layer), so each MoE layer of a stack gets its own statistics.

A Soft MoE layer (`layers.soft_moe.SoftMoeLayer`) has no per-token expert choices:
with `allow_soft=True` (the routing analysis) it records a
`moe.soft_stats.SoftRoutingStats` (soft load from the combine weights, dispatch
concentration) instead; by default (expert surgery) it is refused by name.

`save_stats` / `load_stats` keep them next to the checkpoint, in
`<workdir>/routing_stats/<name>.npz` with a JSON sidecar naming the source,
step and token count, so expert pruning and merging reuse one pass.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.inference.restore import RestoredModel, make_dropless, model_cls
from experiments.runtime import paths
from experiments.train.run_state import build_model, split_model
from layers import scan as scan_lib
from layers.moe_layer import MoeLayer
from moe import expert_stats, soft_stats
from moe.expert_stats import RoutingStats
from moe.soft_stats import SoftRoutingStats

AnyStats = RoutingStats | SoftRoutingStats

STATS_DIR = "routing_stats"


class NoTokenRoutingError(ValueError):
    """A MoE layer's router is not token choice with per-token routing (e.g. expert choice)."""


def _next_name(names: tuple[str, ...], sink: Mapping[str, RoutingStats]) -> str:
    """The layer a call of a module used by `names` (in call order) records: the first
    not yet recorded. One module serves several layers when they share it (WideNet)."""
    return next(n for n in names if n not in sink)


def _recording_class(names: tuple[str, ...], sink: dict[str, RoutingStats]) -> type:
    """A MoeLayer subclass whose call also records the layer's routing statistics."""

    class Recording(MoeLayer):
        def __call__(self, x, *, mask=None, deterministic=True, rng=None, router_state=None):
            name = _next_name(names, sink)
            y, aux = MoeLayer.__call__(self, x, mask=mask, deterministic=deterministic, rng=rng,
                                       router_state=router_state)
            tokens = x.reshape(-1, self.d_model)
            token_mask = (jnp.ones((tokens.shape[0],), jnp.float32) if mask is None
                          else mask.reshape(-1).astype(jnp.float32))
            # The layer's own routing again (deterministic, so the same decision).
            decision = self.router(tokens, mask=token_mask,
                                   capacity=self.capacity(tokens.shape[0], deterministic),
                                   deterministic=deterministic, rng=None,
                                   state=dict(router_state or {}))
            if decision.expert_choice or decision.aux.token_probs is None:
                raise NoTokenRoutingError(
                    f"{name}: routing statistics need token-choice routing with per-token "
                    f"probabilities; router {type(self.router).__name__} has none")
            logits = self.router.logits(tokens, deterministic=True)
            sink[name] = expert_stats.layer_stats(
                tokens.astype(self.dtype), token_mask, logits, decision.aux.token_probs,
                decision.expert_index, decision.weights, self.experts.ffn(self.dtype))
            return y, aux

    return Recording


def _block_recording_class(cls: type, names: tuple[str, ...],
                           sink: dict[str, RoutingStats]) -> type:
    """A subclass of a MoE block that computes its own statistics (`routing_stats(x,
    mask=, router_state=) -> RoutingStats`, e.g. `layers.mola.MolaFFN`) recording them."""

    class Recording(cls):
        def __call__(self, x, *, mask=None, deterministic=True, rng=None, router_state=None):
            name = _next_name(names, sink)
            y, aux = cls.__call__(self, x, mask=mask, deterministic=deterministic, rng=rng,
                                  router_state=router_state)
            sink[name] = self.routing_stats(x, mask=mask, router_state=router_state)
            return y, aux

    return Recording


def unscanned_view(restored: RestoredModel) -> RestoredModel:
    """A scanned checkpoint's model rebuilt unscanned (`TransformerLM.scan_layers = False`,
    parameters `layers.scan.unscan_tree`d; same function), for the layer-by-layer
    statistics pass; gin keeps `scan_layers = True`. Unscanned: returned as is."""
    if scan_lib.SCANNED not in restored.params:
        return restored
    if restored.sharding is not None:
        raise ValueError(f"{restored.workdir}: routing statistics (expert surgery, the routing "
                         "analysis) of a scanned run on a mesh (MESH_SHAPE bound) are not "
                         "supported")
    gin.bind_parameter("TransformerLM.scan_layers", False)
    try:
        model = build_model(model_cls(), restored.vocab_size, seed=0)
    finally:
        gin.bind_parameter("TransformerLM.scan_layers", True)
    make_dropless(model)
    graphdef, _, rest = split_model(model)
    return dataclasses.replace(restored, graphdef=graphdef, rest=rest,
                               params=scan_lib.unscan_tree(jax.device_get(restored.params)))


def _check_soft(layer: Any, name: str, allow_soft: bool) -> None:
    if getattr(layer, "dispatch", None) == "soft" and not allow_soft:
        raise NoTokenRoutingError(
            f"{name}: {type(layer).__name__} has no per-token expert choices (soft routing: "
            "only the routing analysis reads its soft statistics; expert surgery does not "
            "apply)")


def make_stats_step(restored: RestoredModel, allow_soft: bool = False) -> Callable:
    """`step(params, batch, domain) -> {layer: RoutingStats | SoftRoutingStats}` (jitted;
    domain < 0 = all). A Soft MoE layer is refused unless `allow_soft`."""
    graphdef, rest, router_state = restored.graphdef, restored.rest, restored.router_state

    def step(params, batch, domain):
        model = nnx.merge(graphdef, params, rest)
        sink: dict[str, RoutingStats] = {}
        users: dict[int, tuple[Any, tuple[str, ...]]] = {}  # module id -> (module, its layers)
        for name in getattr(model, "moe_layer_names", ()):
            layer = model.moe_layer(name)
            users[id(layer)] = (layer, users.get(id(layer), (layer, ()))[1] + (name,))
        for layer, names in users.values():
            _check_soft(layer, names[0], allow_soft)
            if hasattr(layer, "routing_stats"):
                layer.__class__ = _block_recording_class(type(layer), names, sink)
            elif isinstance(layer, MoeLayer):
                layer.__class__ = _recording_class(names, sink)
            else:
                raise NoTokenRoutingError(
                    f"{names[0]}: routing statistics need token-choice routing; "
                    f"{type(layer).__name__} has no per-token expert choices and no "
                    "routing_stats method")
        segment_ids = batch["segment_ids"]
        if "domain" in batch:
            segment_ids = jnp.where((domain < 0) | (batch["domain"] == domain), segment_ids, 0)
        model(batch["inputs"], segment_ids=segment_ids, positions=batch.get("positions"),
              deterministic=True, router_state=router_state)
        return sink

    return jax.jit(step)


def collect_stats(restored: RestoredModel, batches: Iterable[Mapping[str, np.ndarray]], *,
                  domain: int | None = None, step_fn: Callable | None = None,
                  allow_soft: bool = False) -> dict[str, AnyStats]:
    """Sums over `batches` (dicts with inputs, segment_ids, positions [B, S], and
    domain [B, S] when filtering): `{moe layer: RoutingStats}` (float64, host);
    `SoftRoutingStats` for a Soft MoE layer when `allow_soft` (else refused)."""
    restored = unscanned_view(restored)
    step_fn = step_fn or make_stats_step(restored, allow_soft)
    total: dict[str, AnyStats] = {}
    with restored.context():
        for batch in batches:
            batch = {k: jnp.asarray(v) for k, v in batch.items()
                     if k in ("inputs", "segment_ids", "positions", "domain")}
            if domain is not None and "domain" not in batch:
                raise ValueError("domain filtering needs batches with a 'domain' field")
            out = step_fn(restored.params, batch, jnp.int32(-1 if domain is None else domain))
            for layer, stats in out.items():
                stats = stats.to_numpy()
                add = soft_stats.add if isinstance(stats, SoftRoutingStats) else expert_stats.add
                total[layer] = stats if layer not in total else add(total[layer], stats)
    return total


def collect_domain_stats(restored: RestoredModel, batches: list[Mapping[str, np.ndarray]],
                         num_domains: int, allow_soft: bool = False,
                         ) -> list[dict[str, AnyStats]]:
    """One `collect_stats` per domain id 0..num_domains-1 (one compiled step)."""
    restored = unscanned_view(restored)
    step_fn = make_stats_step(restored, allow_soft)
    return [collect_stats(restored, batches, domain=d, step_fn=step_fn)
            for d in range(num_domains)]


# ---------------------------------------------------------------------------
# On disk, next to the checkpoint.


def stats_path(workdir: paths.PathLike, name: str) -> paths.Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"statistics name must be a plain file name, got {name!r}")
    return paths.as_path(workdir) / STATS_DIR / f"{name}.npz"


def save_stats(workdir: paths.PathLike, name: str, stats: Mapping[str, RoutingStats],
               info: Mapping[str, Any]) -> paths.Path:
    """Writes `<workdir>/routing_stats/<name>.npz` (+ `.json` with `info`), each file
    whole (`experiments.runtime.paths.write_bytes`; the workdir may be `gs://`)."""
    path = stats_path(workdir, name)
    if any(isinstance(s, SoftRoutingStats) for s in stats.values()):
        raise ValueError(f"{path}: soft routing statistics (Soft MoE) are not saved; only "
                         "expert surgery reads saved statistics, and it refuses Soft MoE")
    arrays = {f"{layer}/{field}": value for layer, s in stats.items()
              for field, value in s.as_dict().items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    paths.write_bytes(path, buffer.getvalue())
    paths.write_text(path.with_suffix(".json"),
                     json.dumps({**info, "layers": sorted(stats)}, indent=2))
    return path


def load_stats(workdir: paths.PathLike, name: str,
               ) -> tuple[dict[str, RoutingStats], dict[str, Any]]:
    """What `save_stats` wrote: `({layer: RoutingStats}, info)`; FileNotFoundError if absent."""
    path = stats_path(workdir, name)
    info = json.loads(path.with_suffix(".json").read_text())
    with np.load(io.BytesIO(path.read_bytes())) as data:
        return ({layer: RoutingStats(**{f: np.asarray(data[f"{layer}/{f}"], np.float64)
                                        for f in expert_stats.STAT_FIELDS})
                 for layer in info["layers"]}, info)
