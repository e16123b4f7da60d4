"""Dense checkpoint -> MoE checkpoint (sparse upcycling, docs/upcycling.md), and `--verify`.

`upcycle(dense_workdir, out_workdir, ...)` reads the latest (or a chosen)
checkpoint of a dense run of our trainer, builds the MoE model described by the
dense run's `config.gin` plus the given gin files/bindings and `UpcycleConfig`,
and writes `out_workdir/checkpoints/<step>` and `out_workdir/config.gin`, so
that `scripts/train.py --workdir=<out_workdir>` resumes from it (at the dense
step, same data position and RNG key; raise `train.num_steps` to train on).

Conversion of the parameter tree:
  * every parameter outside the MoE layers' FFNs is copied unchanged (shapes
    must match the target config exactly);
  * MoE layer i's experts come from dense layer i's FFN through
    `moe.upcycle.upcycle_ffn` (virtual groups, weight scaling,
    diversification); its router is new (`moe.upcycle.init_router`), a router
    bias starts at zero.
Optimizer state: "reset" starts AdamW afresh (zero moments, Adam count 0) but
keeps the learning-rate schedule's step; "copy" maps the dense first and
second moments into every expert exactly like the weights (shards of them,
unscaled, not diversified) and starts the router's moments at zero.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.convert import dense_to_moe
from experiments.convert.verify import VerifyReport, verify_models
from experiments.data.config import DataConfig
from experiments.inference.tokenizer import copy_tokenizer_files
from experiments.runtime import gin_utils, paths
from experiments.runtime import mesh as mesh_lib
from experiments.runtime.checkpoints import Checkpointer
from experiments.runtime.workdir_lock import check_workdir
from experiments.train import trainer  # noqa: F401  (registers `train`, read from config.gin)
from experiments.train.config import model_vocab_size
from experiments.train.optim import make_optimizer
from layers import scan as scan_lib
from layers.params import logical_axes_of
from layers.renamed import gin_bound
from layers.routers import ExpertChoiceRouter
from layers.transformer import TransformerLM
from moe import upcycle as up
from moe.validation import check_one_of

_log = logging.getLogger(__name__)

LAYER_SELECTIONS = ("every_other", "all")
OPTIMIZER_STATE_MODES = ("reset", "copy")
UPCYCLE_FILE = "upcycle.json"
_FFN_WEIGHTS = ("wi", "wi_gate", "wo")


class NotDenseError(ValueError):
    """The source checkpoint already has MoE layers."""


@dataclasses.dataclass(frozen=True)
class UpcycleConfig:
    """How to turn the dense FFNs into MoE layers.

    moe_layers: "every_other" (layers 1, 3, ...), "all", a tuple of 0-based
      layer indices, or None to keep the target gin config's choice.
    num_experts, k: E and k; None keeps the target gin config's values.
    granularity: G (fine-grained experts via virtual groups: expert hidden
      size = dense d_ff / G); None derives it from the target config's
      `expert_d_ff` (1 when unset).
    router_init: "normal", "zero" or "virtual_group"; None = "virtual_group"
      when G > 1, else "normal".
    router_init_std: std of the normal router init (flaxformer: 0.02).
    diversify, diversify_ratio, noise_std: `moe.upcycle.spawn_experts`
      strategy and its parameters.
    weight_scaling: "balanced" (Megatron: a^(1/2) or a^(1/3) on fc1 and fc2),
      "output" (all of a on fc2; exact for any activation) or "none".
    optimizer_state: "reset" or "copy" (see the module docstring).
    seed: seeds the router init and the diversification.
    dense_step: the dense checkpoint step to read (None = latest).
    mesh_shape: e.g. {"expert": 4}: write parameters and moments placed on
      that mesh (`experiments.runtime.mesh`, axes data/fsdp/expert/tensor), expert
      weights split over `expert` (None = one device).
    """

    moe_layers: str | tuple[int, ...] | None = None
    num_experts: int | None = None
    k: int | None = None
    granularity: int | None = None
    router_init: str | None = None
    router_init_std: float = 0.02
    diversify: str = "copy"
    diversify_ratio: float = 0.5
    noise_std: float = 0.01
    weight_scaling: str = "balanced"
    optimizer_state: str = "reset"
    seed: int = 0
    dense_step: int | None = None
    mesh_shape: Mapping[str, int] | None = None

    def __post_init__(self):
        if isinstance(self.moe_layers, str) and self.moe_layers not in LAYER_SELECTIONS:
            raise ValueError(f"moe_layers must be one of {LAYER_SELECTIONS}, a list of layer "
                             f"indices or None, got {self.moe_layers!r}")
        if self.router_init is not None:
            check_one_of("router_init", self.router_init, up.ROUTER_INITS)
        check_one_of("diversify", self.diversify, up.DIVERSIFY_STRATEGIES)
        check_one_of("weight_scaling", self.weight_scaling, up.WEIGHT_SCALINGS)
        check_one_of("optimizer_state", self.optimizer_state, OPTIMIZER_STATE_MODES)
        if not 0.0 <= self.diversify_ratio <= 1.0:
            raise ValueError(f"diversify_ratio must be in [0, 1], got {self.diversify_ratio}")
        if self.router_init_std < 0 or self.noise_std < 0:
            raise ValueError("router_init_std and noise_std must be >= 0")
        for name in ("num_experts", "k", "granularity"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")


@dataclasses.dataclass
class UpcycleResult:
    step: int
    out_workdir: paths.Path
    moe_layers: tuple[str, ...]
    num_experts: int
    k: int
    granularity: int
    router_init: str
    scales: dict[str, float]
    dense_param_count: int
    moe_param_count: int
    exactness_violations: list[str]
    verify: VerifyReport | None = None


# ---------------------------------------------------------------------------
# Models from gin.


def _dense_config_file(dense_workdir: paths.Path) -> paths.Path:
    path = dense_workdir / gin_utils.CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: dense_workdir must be a workdir written by "
                                f"scripts/train.py (or scripts/import_hf.py)")
    return path


def _abstract_model(vocab_size: int) -> TransformerLM:
    return nnx.eval_shape(lambda: TransformerLM(vocab_size=vocab_size, rngs=nnx.Rngs(0)))


def _dense_ffn_info(model: TransformerLM) -> tuple[int, str]:
    layer = model.block(model.layer_names[0]).ffn
    return layer.wi.shape[-1], layer.activation


def target_bindings(config: UpcycleConfig, *, num_layers: int, dense_d_ff: int,
                    dense_activation: str | None = None) -> list[str]:
    """The gin bindings `config` adds on top of the dense run's config (the experts
    take the dense FFN's activation: upcycling copies the FFN as it is)."""
    bindings = []
    if dense_activation is not None:
        bindings.append(f"MoeLayer.activation = {dense_activation!r}")
    if config.moe_layers == "every_other":
        bindings += ["TransformerLM.moe_every = 2", "TransformerLM.moe_layers = None"]
    elif config.moe_layers == "all":
        bindings += ["TransformerLM.moe_every = 1", "TransformerLM.moe_layers = None"]
    elif config.moe_layers is not None:
        layers = tuple(int(i) for i in config.moe_layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if not layers or bad:
            raise ValueError(f"moe_layers {layers} out of range: the dense model has "
                             f"{num_layers} layers (valid indices 0..{num_layers - 1})")
        bindings.append(f"TransformerLM.moe_layers = {layers!r}")
    if config.num_experts is not None:
        bindings.append(f"MoeLayer.num_experts = {config.num_experts}")
    if config.k is not None:
        bindings.append(f"MoeLayer.k = {config.k}")
    if config.granularity is not None:
        if dense_d_ff % config.granularity:
            raise ValueError(f"granularity G={config.granularity} must divide the dense d_ff="
                             f"{dense_d_ff}")
        bindings.append(f"MoeLayer.d_ff = {dense_d_ff // config.granularity}")
    return bindings


@dataclasses.dataclass
class LayerPlan:
    """What one MoE layer of the target needs from upcycling."""

    name: str
    num_experts: int
    k: int
    granularity: int
    activation: str
    normalize: bool
    score: str
    route_scale: float
    violations: list[str]


def plan_layers(dense: TransformerLM, target: TransformerLM, config: UpcycleConfig,
                 router_init: str | None) -> list[LayerPlan]:
    """Checks the target against the dense model; one plan per MoE layer."""
    if target.num_layers != dense.num_layers:
        raise ValueError(f"the target config has {target.num_layers} layers, the dense "
                         f"checkpoint {dense.num_layers}")
    if not target.moe_layer_names:
        raise ValueError("the target config has no MoE layers: pass moe_layers (every_other, "
                         "all or a list) or set TransformerLM.moe_every / moe_layers in the "
                         "MoE gin file")
    plans = []
    for name in target.moe_layer_names:
        moe = target.moe_layer(name)
        dense_ffn = dense.block(name).ffn
        d_ff, activation = dense_ffn.wi.shape[-1], dense_ffn.activation
        expert_act = moe.experts.activation
        if expert_act != activation:
            raise ValueError(f"{name}: expert activation {expert_act!r} differs from the dense "
                             f"FFN's {activation!r}; upcycling copies the FFN as it is")
        if moe.shared is not None:
            raise ValueError(f"{name}: num_shared_experts > 0 is not supported by upcycling "
                             "(the dense FFN becomes the routed experts)")
        if moe.d_model != dense.d_model:
            raise ValueError(f"{name}: target d_model {moe.d_model} != dense {dense.d_model}")
        if d_ff % moe.d_ff:
            raise ValueError(f"{name}: expert_d_ff={moe.d_ff} must divide the dense d_ff={d_ff} "
                             f"(granularity G = d_ff / expert_d_ff)")
        granularity = d_ff // moe.d_ff
        if config.granularity is not None and config.granularity != granularity:
            raise ValueError(f"{name}: granularity {config.granularity} disagrees with "
                             f"expert_d_ff={moe.d_ff} of the target config (d_ff {d_ff})")
        up.check_virtual_groups(moe.num_experts, moe.k, granularity, d_ff)
        init = router_init or ("virtual_group" if granularity > 1 else "normal")
        router = _router_options(moe.router)
        violations = up.exactness_conditions(
            activation=activation, granularity=granularity, k=moe.k,
            normalize=router["normalize"], router_init=init,
            weight_scaling=config.weight_scaling, routing_type=router["routing_type"],
            dropless=moe.eval_capacity_factor is None, num_shared_experts=0,
            route_scale=router["route_scale"], diversify=config.diversify)
        plans.append(LayerPlan(name=name, num_experts=moe.num_experts, k=moe.k,
                                granularity=granularity, activation=activation,
                                normalize=router["normalize"], score=router["score"],
                                route_scale=router["route_scale"], violations=violations))
    return plans


def _router_options(router: Any) -> dict[str, Any]:
    """The routing options the exactness conditions depend on, from a router module
    (routers without a score option use softmax without renormalisation)."""
    return {"routing_type": ("expert_choice" if isinstance(router, ExpertChoiceRouter)
                             else "token_choice"),
            "normalize": getattr(router, "normalize", False),
            "score": getattr(router, "score", "softmax"),
            "route_scale": getattr(router, "route_scale", 1.0)}


# ---------------------------------------------------------------------------
# Parameter and optimizer-state conversion.


def _convert_tree(dense: Mapping, target_abstract: Mapping, plans: Sequence[LayerPlan],
                  experts_for, router_for) -> dict:
    """A target-shaped tree: MoE FFN leaves from `experts_for(plan, dense_ffn)`
    (`{name: [E, ...]}`) and `router_for(plan, leaf_name, abstract)`, every
    other leaf copied from `dense` (same path, same shape), cast to the target dtype."""
    by_name = {p.name: p for p in plans}
    flat_dense = dense_to_moe.flatten(dense)

    def checked(path, value, abstract):
        if tuple(value.shape) != tuple(abstract.shape):
            raise ValueError(f"shape mismatch for {dense_to_moe.path_str(path)}: the target "
                             f"config wants {tuple(abstract.shape)}, the upcycled dense "
                             f"checkpoint gives {tuple(value.shape)}")
        return jnp.asarray(value).astype(abstract.dtype)

    def experts(layer, ffn, targets):
        ffn = {w: ffn[w] for w in _FFN_WEIGHTS if w in ffn}
        out = experts_for(by_name[layer], ffn)
        return {w: checked((layer, dense_to_moe.FFN, dense_to_moe.EXPERTS, w), out[w], t)
                for w, t in targets.items()}

    def missing(path, abstract):
        part = dense_to_moe.moe_ffn_part(path, list(by_name))
        if part == "router":
            return checked(path, router_for(by_name[path[0]], path[3], abstract), abstract)
        if part is not None:
            raise ValueError(f"target parameter {dense_to_moe.path_str(path)} has no "
                             f"upcycling rule")
        if path not in flat_dense:
            raise ValueError(f"target parameter {dense_to_moe.path_str(path)} {abstract.shape} "
                             f"does not exist in the dense checkpoint")
        return checked(path, flat_dense[path], abstract)

    out = dense_to_moe.map_tree(dense, target_abstract, list(by_name), experts_for=experts,
                                missing=missing,
                                copy=lambda source, abstract: checked((), source, abstract))
    unmapped = dense_to_moe.unmapped_dense_paths(dense, target_abstract, list(by_name))
    if unmapped:
        raise ValueError(f"the target config has no place for dense parameters "
                         f"{[dense_to_moe.path_str(p) for p in unmapped[:5]]}: shapes don't match")
    return out


def _layer_index(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def upcycle_params(dense_params: Mapping, target_abstract: Mapping,
                   plans: Sequence[LayerPlan], config: UpcycleConfig,
                   router_init: str | None) -> tuple[dict, dict[str, dict[str, float]]]:
    """MoE parameters and, per MoE layer, the scales used."""
    key = jax.random.PRNGKey(config.seed)
    spawn_key, router_key = jax.random.split(key)
    scales = {}

    def experts_for(plan: LayerPlan, ffn: Mapping) -> dict:
        s = up.upcycle_scales(plan.num_experts, plan.k, plan.granularity, plan.activation,
                              normalize=plan.normalize, score=plan.score,
                              route_scale=plan.route_scale, mode=config.weight_scaling)
        scales[plan.name] = s
        return up.upcycle_ffn(
            ffn, plan.num_experts, granularity=plan.granularity, scale_in=s["scale_in"],
            scale_out=s["scale_out"], out_bias_scale=s["out_bias_scale"],
            strategy=config.diversify, ratio=config.diversify_ratio,
            noise_std=config.noise_std,
            rng=jax.random.fold_in(spawn_key, _layer_index(plan.name)))

    def router_for(plan: LayerPlan, leaf: str, abstract) -> jax.Array:
        if leaf != "kernel":  # a router bias starts at zero
            return jnp.zeros(abstract.shape, abstract.dtype)
        method = router_init or ("virtual_group" if plan.granularity > 1 else "normal")
        return up.init_router(jax.random.fold_in(router_key, _layer_index(plan.name)),
                              abstract.shape[0], plan.num_experts, method=method,
                              std=config.router_init_std, granularity=plan.granularity)

    params = _convert_tree(dense_params, target_abstract, plans, experts_for, router_for)
    return params, scales


def _moments(dense_moment: Mapping, target_abstract: Mapping,
             plans: Sequence[LayerPlan]) -> dict:
    """A dense first/second-moment tree mapped like the weights (copies of the
    shards, unscaled); router moments zero."""
    def experts_for(plan, ffn):
        return up.upcycle_ffn(ffn, plan.num_experts, granularity=plan.granularity)

    def router_for(plan, leaf, abstract):
        return jnp.zeros(abstract.shape, abstract.dtype)

    return _convert_tree(dense_moment, target_abstract, plans, experts_for, router_for)


def upcycle_opt_state(dense_opt_state: Any, moe_opt_template: Any, target_abstract: Mapping,
                      plans: Sequence[LayerPlan], mode: str) -> Any:
    """The MoE optimizer state (see the module docstring for `mode`).

    Works on any optax state whose per-parameter parts are trees shaped like
    the parameters (AdamW's mu and nu here); `ScaleByScheduleState` counts are
    always carried over so the learning-rate schedule continues.
    """
    check_one_of("optimizer_state", mode, OPTIMIZER_STATE_MODES)
    copy = mode == "copy"
    return dense_to_moe.map_opt_state(
        dense_opt_state, moe_opt_template, set(target_abstract),
        moments=lambda dense, fresh: (_moments(dense, target_abstract, plans) if copy
                                      else fresh),
        other=lambda dense, fresh: dense if copy else fresh)


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Sharded write.


def place_on_mesh(params: Mapping, opt_state: Any, model: nnx.Module,
                  mesh_shape: Mapping[str, int]) -> tuple[Any, Any]:
    """`params` and `opt_state` placed on a mesh with the given axis sizes, by
    the logical axis rules of `experiments.runtime.mesh.Sharding` (experts over
    `expert`; the moments take their parameter's sharding)."""
    if "expert" not in mesh_shape:
        raise ValueError(f"mesh_shape must have an 'expert' axis, got {dict(mesh_shape)}")
    size = math.prod(int(v) for v in mesh_shape.values())
    if size < 1 or size > len(jax.devices()):
        raise ValueError(f"mesh_shape {dict(mesh_shape)} needs {size} devices; there are "
                         f"{len(jax.devices())}")
    sharder = mesh_lib.Sharding(dict(mesh_shape), devices=jax.devices()[:size])
    params = sharder.place_params(params, logical_axes_of(model))
    moments = sharder.like_params(opt_state, params, mesh_lib.shardings_of(params))
    return params, jax.device_put(opt_state, moments)


# ---------------------------------------------------------------------------
# The whole conversion.


def upcycle(dense_workdir: paths.PathLike, out_workdir: paths.PathLike, *,
            gin_files: Sequence[str] = (), gin_params: Sequence[str] = (),
            gin_search_paths: Sequence[str] = (), config: UpcycleConfig = UpcycleConfig(),
            verify: bool = False, verify_batches: int = 2) -> UpcycleResult:
    """Writes the upcycled MoE checkpoint and config; see the module docstring.

    Gin files and bindings are applied on top of the dense run's config.gin,
    then `config`'s own bindings, then `gin_params` (later ones win). Leaves gin
    configured with the target config.
    """
    dense_workdir, out_workdir = paths.as_path(dense_workdir), paths.as_path(out_workdir)
    check_workdir(out_workdir)
    dense_config = _dense_config_file(dense_workdir)
    if (out_workdir / "checkpoints").exists() and any((out_workdir / "checkpoints").iterdir()):
        raise FileExistsError(f"{out_workdir}/checkpoints already holds checkpoints; choose a "
                              f"new out_workdir")

    dense = _read_dense(dense_workdir, dense_config, config.dense_step)
    target = _target_model(dense, config, dense_config, gin_files, gin_params, gin_search_paths)
    plans = plan_layers(dense.model, target, config, config.router_init)
    target_graphdef, target_layout = nnx.split(target, nnx.Param)[:2]
    target_layout = target_layout.to_pure_dict()
    # The mapping works on unscanned trees (`layer_{i}`); either model may be scanned.
    target_abstract = scan_lib.unscan_tree(target_layout)
    unscanned = scan_lib.LayerPlan(dense.model.num_layers)

    restored = dense.restored
    params, scales = upcycle_params(scan_lib.unscan_tree(restored.params), target_abstract,
                                    plans, config, config.router_init)
    opt_state = upcycle_opt_state(scan_lib.to_layer_plan(restored.opt_state, unscanned),
                                  dense.tx.init(params), target_abstract, plans,
                                  config.optimizer_state)
    params = scan_lib.match_layer_layout(params, target_layout)
    opt_state = scan_lib.to_layer_plan(opt_state, target.plan)
    saved_params, saved_opt_state = params, opt_state
    if config.mesh_shape:
        saved_params, saved_opt_state = place_on_mesh(params, opt_state, target,
                                                      config.mesh_shape)
    _write_checkpoint(out_workdir, dense.step, saved_params, saved_opt_state, restored)
    copy_tokenizer_files(dense_workdir, out_workdir)  # an imported model keeps its tokenizer
    step = dense.step

    violations = sorted({v for p in plans for v in p.violations})
    if jnp.dtype(target.dtype) != jnp.float32:
        violations.append(f"compute dtype {jnp.dtype(target.dtype).name}: the fp32 tolerance "
                          "does not apply")
    result = UpcycleResult(
        step=step, out_workdir=out_workdir, moe_layers=tuple(p.name for p in plans),
        num_experts=plans[0].num_experts, k=plans[0].k, granularity=plans[0].granularity,
        router_init=config.router_init or ("virtual_group" if plans[0].granularity > 1
                                           else "normal"),
        scales=scales[plans[0].name], dense_param_count=_count(restored.params),
        moe_param_count=_count(params), exactness_violations=violations)
    if verify:
        batches = DataConfig().eval_batches()[:verify_batches]
        result.verify = verify_models(dense.graphdef, restored.params, target_graphdef, params,
                                      batches, violated=violations)
    _write_record(out_workdir, dense_workdir, config, result)
    return result


@dataclasses.dataclass
class _Dense:
    """The dense run: its model (shapes only), restored checkpoint and optimizer."""

    model: TransformerLM
    graphdef: nnx.GraphDef
    restored: Any
    step: int
    vocab_size: int
    tx: optax.GradientTransformation


def _read_dense(dense_workdir: paths.Path, dense_config: paths.Path, dense_step: int | None) -> _Dense:
    """The dense model exactly as the dense run built it, and its checkpoint."""
    gin.clear_config()
    gin_utils.parse([str(dense_config)], [])
    vocab_size = model_vocab_size()
    model = _abstract_model(vocab_size)
    if model.moe_layer_names:
        raise NotDenseError(f"the checkpoint in {dense_workdir} is not dense: its config has MoE "
                            f"layers {list(model.moe_layer_names)}")
    graphdef, abstract = nnx.split(model, nnx.Param)[:2]
    abstract = abstract.to_pure_dict()
    tx = make_optimizer(optax.constant_schedule(0.0))
    # Read-only: the dense trainer may still be running and saving.
    checkpointer = Checkpointer(dense_workdir / "checkpoints", async_save=False, max_to_keep=None,
                                read_only=True)
    try:
        step = checkpointer.pick_step(dense_step, option="dense_step")
        restored = checkpointer.restore_step(step, abstract, jax.eval_shape(tx.init, abstract))
    finally:
        checkpointer.close()
    if any("router" in path or "experts" in path
           for path in dense_to_moe.flatten(restored.params)):
        raise NotDenseError(f"the checkpoint in {dense_workdir} is not dense: it holds router "
                            f"or expert parameters")
    return _Dense(model, graphdef, restored, step, vocab_size, tx)


def _target_model(dense: _Dense, config: UpcycleConfig, dense_config: paths.Path,
                  gin_files: Sequence[str], gin_params: Sequence[str],
                  gin_search_paths: Sequence[str]) -> TransformerLM:
    """The MoE model (shapes only) of the dense config + gin files + `config` + bindings;
    leaves gin configured with it."""
    dense_d_ff, dense_activation = _dense_ffn_info(dense.model)
    bindings = target_bindings(config, num_layers=dense.model.num_layers, dense_d_ff=dense_d_ff,
                               dense_activation=dense_activation)
    gin.clear_config()
    gin_utils.parse([str(dense_config), *gin_files], [*bindings, *gin_params], gin_search_paths)
    if not gin_bound("MoeLayer.d_ff"):  # no granularity asked for: G = 1
        gin.bind_parameter("MoeLayer.d_ff", dense_d_ff)
    if model_vocab_size() != dense.vocab_size:
        raise ValueError("the target config changes the model's vocabulary size "
                         f"(train.vocab_size or the data tokenizer's: {dense.vocab_size} -> "
                         f"{model_vocab_size()})")
    return _abstract_model(dense.vocab_size)


def _write_checkpoint(out_workdir: paths.Path, step: int, params: Any, opt_state: Any,
                      restored: Any) -> None:
    """The upcycled state as checkpoint `step` of `out_workdir` (data position and RNG
    key of the dense run), and the target config."""
    out_workdir.mkdir(parents=True, exist_ok=True)
    writer = Checkpointer(out_workdir / "checkpoints", async_save=False, max_to_keep=None)
    try:
        writer.save(step, params=params, opt_state=opt_state, data_state=restored.data_state,
                    rng_key_data=restored.rng_key_data, force=True)
    finally:
        writer.close()
    gin_utils.write_config(out_workdir)


def _write_record(out_workdir: paths.Path, dense_workdir: paths.Path, config: UpcycleConfig,
                  result: UpcycleResult) -> None:
    record = {
        "dense_workdir": str(dense_workdir), "step": result.step,
        "config": {k: (dict(v) if isinstance(v, Mapping) else v)
                   for k, v in dataclasses.asdict(config).items()},
        "moe_layers": list(result.moe_layers), "num_experts": result.num_experts,
        "k": result.k, "granularity": result.granularity, "router_init": result.router_init,
        "scales": result.scales, "dense_param_count": result.dense_param_count,
        "moe_param_count": result.moe_param_count,
        "exactness_violations": result.exactness_violations,
    }
    if result.verify is not None:
        v = result.verify
        record["verify"] = {"max_abs_logit_diff": v.max_abs_logit_diff,
                            "dense_loss": v.dense_loss, "moe_loss": v.moe_loss,
                            "loss_diff": v.loss_diff, "expected_exact": v.expected_exact,
                            "ok": v.ok, "violated": v.violated, "num_tokens": v.num_tokens,
                            "max_dropped_fraction": v.max_dropped_fraction}
    paths.write_text(out_workdir / UPCYCLE_FILE, json.dumps(record, indent=2))
