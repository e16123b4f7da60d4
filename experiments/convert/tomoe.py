"""ToMoE: a dense checkpoint of our trainer -> a MoE checkpoint with a fixed number of
active hidden units per token, by dynamic structural pruning (docs/surgery.md, "ToMoE").

`tomoe(dense_workdir, out_workdir, config)`:

  1. restore the dense checkpoint (unscanned, whatever its layout);
  2. one pass over `config.data_batches` training batches of `config.data_source`
     (default: the run's own) recording, per layer, the dense MLP's input x, output
     y and hidden activations h (real tokens only, at most `max_tokens`);
  3. per layer: the hidden units partitioned into E equal groups by co-activation
     (`moe.tomoe.coactivation_groups`), the FFN split into E experts
     (`partition_ffn`: a permutation of the units, nothing deleted), and the router
     learned by the dynamic structural pruning objective (`moe.tomoe.router_loss`:
     straight-through top-k mask, penalty on the soft active fraction), the
     experts frozen (`weight_learning_rate = 0`) or lightly tuned;
  4. a new workdir written in a temporary directory beside `out_workdir` and
     renamed into place: `checkpoints/<step>` (dense step, data position and RNG
     key; fresh AdamW moments, the schedule step kept), `config.gin` (the dense
     config plus every layer a `MoeLayer` of E experts of d_ff/E units, k of them
     active, `MaskRouter`: weight 1 per selected expert, dropless), `tomoe.json`,
     the tokenizer.

With k = E every group is active with weight 1: the MoE computes the dense model
(`verify=True` reports max |Δlogit|, expected exact).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.convert import dense_to_moe
from experiments.convert.expert_surgery import _check_out, _read_full, write_workdir
from experiments.convert.verify import VerifyReport, verify_models
from experiments.data.config import DataConfig
from experiments.inference.restore import model_cls, parse_run_config
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from experiments.train.config import model_vocab_size
from experiments.train.optim import make_optimizer
from layers import scan as scan_lib
from layers.mlp import DenseMLP
from moe import tomoe as tm
from moe.experts import ExpertFFN, activation_fn

TOMOE_FILE = "tomoe.json"


class NotDenseError(ValueError):
    """The source checkpoint already has MoE layers."""


@dataclasses.dataclass(frozen=True)
class ToMoEConfig:
    """num_experts: E per MLP (must divide d_ff). k / active_fraction: experts per
    token, or the target fraction of active hidden units (k = fraction x E, an
    integer); one of them, or both agreeing. steps, learning_rate: router
    training (Adam) per layer, `tokens_per_step` tokens a step. tau: temperature
    of the soft mask; penalty: weight of the active-fraction penalty; noise:
    logistic noise on the logits in training. weight_learning_rate: 0 = experts
    frozen, else they are tuned by Adam at this rate on the same objective.
    data_source (None = the run's), data_batches, max_tokens: the recorded tokens.
    seed: partition, router init, noise, token sampling. step: dense step (None = latest).
    """

    num_experts: int
    k: int | None = None
    active_fraction: float | None = None
    steps: int = 200
    learning_rate: float = 1e-2
    weight_learning_rate: float = 0.0
    tau: float = 0.5
    penalty: float = 1.0
    noise: bool = True
    tokens_per_step: int = 1024
    data_source: str | None = None
    data_batches: int = 8
    max_tokens: int = 16384
    seed: int = 0
    step: int | None = None

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.k is None and self.active_fraction is None:
            raise ValueError("give k or active_fraction (the target fraction of active units)")
        if self.active_fraction is not None and not 0.0 < self.active_fraction <= 1.0:
            raise ValueError(f"active_fraction must be in (0, 1], got {self.active_fraction}")
        if self.k is not None and not 1 <= self.k <= self.num_experts:
            raise ValueError(f"k must be in [1, num_experts={self.num_experts}], got {self.k}")
        if self.active_fraction is not None:
            k = self.active_fraction * self.num_experts
            if abs(k - round(k)) > 1e-6 or round(k) < 1:
                raise ValueError(f"active_fraction={self.active_fraction} x num_experts="
                                 f"{self.num_experts} = {k:g} must be a whole number >= 1 of "
                                 f"active experts")
            if self.k is not None and self.k != round(k):
                raise ValueError(f"k={self.k} disagrees with active_fraction="
                                 f"{self.active_fraction} x num_experts={self.num_experts}")
        for name in ("steps", "data_batches"):
            if getattr(self, name) < 0 or (name == "data_batches" and self.data_batches < 1):
                raise ValueError(f"{name} must be >= {1 if name == 'data_batches' else 0}, "
                                 f"got {getattr(self, name)}")
        if self.tokens_per_step < 1 or self.max_tokens < 1:
            raise ValueError("tokens_per_step and max_tokens must be >= 1")
        if not self.tau > 0 or self.penalty < 0 or self.learning_rate < 0 \
                or self.weight_learning_rate < 0:
            raise ValueError("tau must be > 0; penalty, learning_rate and weight_learning_rate "
                             "must be >= 0")

    @property
    def active_k(self) -> int:
        return self.k if self.k is not None else round(self.active_fraction * self.num_experts)


@dataclasses.dataclass
class ToMoEResult:
    out_workdir: Path
    step: int
    num_experts: int
    k: int
    d_ff: int
    layers: dict[str, dict[str, Any]]
    verify: VerifyReport | None = None
    static_loss: float | None = None  # the magnitude-pruned dense model's loss (k < E)


# ---------------------------------------------------------------------------
# The dense model, unscanned, and one recording pass.


@dataclasses.dataclass
class _Dense:
    workdir: Path
    step: int
    vocab_size: int
    graphdef: nnx.GraphDef  # unscanned, parameters only
    params: dict[str, Any]  # unscanned
    layout: dict[str, Any]  # the checkpoint's own layout (shapes)
    model: Any  # abstract unscanned model
    d_ff: int
    activation: str


def read_dense(workdir: Path, step: int | None) -> _Dense:
    """The dense checkpoint, its parameters unscanned. Leaves gin with the dense config."""
    parse_run_config(workdir)
    vocab_size = model_vocab_size()
    own = nnx.eval_shape(lambda: model_cls()(vocab_size=vocab_size, rngs=nnx.Rngs(0)))
    if getattr(own, "moe_layer_names", ()):
        raise NotDenseError(f"{workdir}: the checkpoint is not dense (MoE layers "
                            f"{list(own.moe_layer_names)}); ToMoE converts a dense model")
    layout = nnx.split(own, nnx.Param)[1].to_pure_dict()
    tx = make_optimizer(optax.constant_schedule(0.0))
    checkpointer = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        step = checkpointer.pick_step(step, option="step")
    finally:
        checkpointer.close()
    full = _read_full(workdir, step, jax.eval_shape(lambda: layout), tx)
    with gin.unlock_config():
        gin.bind_parameter("TransformerLM.scan_layers", False)
    model = nnx.eval_shape(lambda: model_cls()(vocab_size=vocab_size, rngs=nnx.Rngs(0)))
    ffns = [model.block(n).ffn for n in model.layer_names]
    if not all(isinstance(f, DenseMLP) for f in ffns):
        raise NotDenseError(f"{workdir}: every layer's FFN must be a DenseMLP for ToMoE")
    graphdef = nnx.split(model, nnx.Param)[0]
    params = scan_lib.unscan_tree(jax.device_get(full.params))
    return _Dense(workdir, step, vocab_size, graphdef, params, layout, model,
                  ffns[0].wi.shape[-1], ffns[0].activation)


def _recording_mlp(name: str, sink: dict[str, tuple]) -> type:
    class Recording(DenseMLP):
        def __call__(self, x):
            y = DenseMLP.__call__(self, x)
            xf = x.astype(self.dtype)
            up = xf @ self.wi[...].astype(self.dtype)
            act = activation_fn(self.activation)
            hidden = act(xf @ self.wi_gate[...].astype(self.dtype)) * up if self.glu else act(up)
            d = x.shape[-1]
            sink[name] = (x.reshape(-1, d), y.reshape(-1, d), hidden.reshape(-1, hidden.shape[-1]))
            return y
    return Recording


def record_layers(dense: _Dense, batches: list[Mapping[str, np.ndarray]], max_tokens: int,
                  seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per layer `{x [N, d], y [N, d], hidden [N, f]}` over the real tokens (float32;
    at most `max_tokens`, a seeded sample when there are more)."""
    graphdef = dense.graphdef

    @jax.jit
    def step(params, batch):
        model = nnx.merge(graphdef, params)
        sink: dict[str, tuple] = {}
        for name in model.layer_names:
            model.block(name).ffn.__class__ = _recording_mlp(name, sink)
        model(batch["inputs"], segment_ids=batch["segment_ids"],
              positions=batch.get("positions"), deterministic=True)
        return sink

    parts: dict[str, list] = {}
    for batch in batches:
        batch = {k: jnp.asarray(v) for k, v in batch.items()
                 if k in ("inputs", "segment_ids", "positions")}
        real = np.asarray(batch["segment_ids"]).reshape(-1) > 0
        for name, arrays in step(dense.params, batch).items():
            parts.setdefault(name, []).append([np.asarray(a, np.float32)[real] for a in arrays])
    rng = np.random.default_rng(seed)
    out = {}
    for name, chunks in parts.items():
        x, y, h = (np.concatenate([c[i] for c in chunks]) for i in range(3))
        if len(x) > max_tokens:
            pick = np.sort(rng.choice(len(x), max_tokens, replace=False))
            x, y, h = x[pick], y[pick], h[pick]
        out[name] = {"x": x, "y": y, "hidden": h}
    return out


# ---------------------------------------------------------------------------
# Router learning.


def learn_router(experts: Mapping[str, np.ndarray], activation: str, data: Mapping[str, np.ndarray],
                 config: ToMoEConfig, key: jax.Array) -> tuple[np.ndarray, dict, dict]:
    """(router kernel `[d, E]`, experts (tuned or as given), final metrics) of one layer."""
    x_all, y_all = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    n, d = x_all.shape
    e, k = config.num_experts, config.active_k
    init_key, key = jax.random.split(key)
    params = {"kernel": 0.02 * jax.random.normal(init_key, (d, e), jnp.float32),
              "experts": {w: jnp.asarray(v, jnp.float32) for w, v in experts.items()}}
    labels = ("router" if config.weight_learning_rate == 0 else "both")
    tx = optax.multi_transform(
        {"router": optax.adam(config.learning_rate),
         "experts": (optax.set_to_zero() if labels == "router"
                     else optax.adam(config.weight_learning_rate))},
        {"kernel": "router", "experts": jax.tree.map(lambda _: "experts", params["experts"])})
    opt = tx.init(params)
    batch = min(config.tokens_per_step, n)

    def loss_fn(p, x, y, noise):
        ffn = ExpertFFN(wi=p["experts"]["wi"], wo=p["experts"]["wo"],
                        wi_gate=p["experts"].get("wi_gate"), activation=activation)
        return tm.router_loss(p["kernel"], ffn, x, y, jnp.ones(x.shape[0]), k=k, tau=config.tau,
                              penalty=config.penalty, active_fraction=k / e, noise=noise)

    @jax.jit
    def train_step(p, opt, key):
        pick_key, noise_key = jax.random.split(key)
        idx = jax.random.choice(pick_key, n, (batch,), replace=False)
        noise = (jax.random.logistic(noise_key, (batch, e)) if config.noise else None)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            p, x_all[idx], y_all[idx], noise)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, metrics

    for i in range(config.steps):
        params, opt, _ = train_step(params, opt, jax.random.fold_in(key, i))
    _, metrics = jax.jit(loss_fn)(params, x_all, y_all, None)
    tuned = {w: np.asarray(v) for w, v in params["experts"].items()}
    return np.asarray(params["kernel"]), tuned, {m: float(v) for m, v in metrics.items()}


def static_pruning_loss(dense: _Dense, keep: int, num_batches: int) -> float:
    """Validation loss of the dense model with every MLP cut to its `keep` largest-magnitude
    hidden units (`moe.tomoe.magnitude_keep`): static structural pruning with the same
    number of active units. Leaves gin with that model's config."""
    parse_run_config(dense.workdir)
    gin_utils.parse([], [f"TransformerLM.d_ff = {keep}", "TransformerLM.scan_layers = False"])
    model = nnx.eval_shape(lambda: model_cls()(vocab_size=dense.vocab_size, rngs=nnx.Rngs(0)))
    params = {k: v for k, v in dense.params.items()}
    for name in model.layer_names:
        ffn = dense.params[name]["ffn"]
        params[name] = {**dense.params[name],
                        "ffn": tm.prune_units(ffn, tm.magnitude_keep(ffn, keep))}
    report = verify_models(dense.graphdef, dense.params, nnx.split(model, nnx.Param)[0], params,
                           DataConfig().eval_batches()[:num_batches], violated=["static"])
    return report.moe_loss


# ---------------------------------------------------------------------------
# The target model and the write.


def target_bindings(config: ToMoEConfig, d_ff: int, activation: str) -> list[str]:
    """Gin bindings that turn the dense config into the ToMoE model's."""
    return ["TransformerLM.moe_every = 1", "TransformerLM.moe_layers = None",
            "TransformerLM.dense_baseline = False", "TransformerLM.moe_block = @MoeLayer",
            f"MoeLayer.num_experts = {config.num_experts}", f"MoeLayer.k = {config.active_k}",
            f"MoeLayer.d_ff = {d_ff // config.num_experts}",
            f"MoeLayer.activation = {activation!r}", "MoeLayer.router = @MaskRouter",
            "MoeLayer.capacity_factor = None", "MoeLayer.eval_capacity_factor = None",
            "MoeLayer.num_shared_experts = 0", "MoeLayer.shared_gate = False"]


def _target(dense: _Dense, config: ToMoEConfig) -> tuple[Any, nnx.GraphDef, dict[str, Any]]:
    """(abstract target model, graphdef, parameter layout); leaves gin with its config."""
    parse_run_config(dense.workdir)
    gin_utils.parse([], target_bindings(config, dense.d_ff, dense.activation))
    model = nnx.eval_shape(lambda: model_cls()(vocab_size=dense.vocab_size, rngs=nnx.Rngs(0)))
    graphdef, layout = nnx.split(model, nnx.Param)[:2]
    return model, graphdef, layout.to_pure_dict()


def convert_params(dense_params: Mapping[str, Any], layers: Mapping[str, Mapping[str, Any]],
                   target_layout: Mapping[str, Any]) -> dict[str, Any]:
    """The target tree (target layout): each layer's `ffn` = {router: {kernel}, experts},
    every other leaf copied from the dense tree (same path and shape, or an error)."""
    flat_dense = dense_to_moe.flatten(scan_lib.unscan_tree(dense_params))
    moe = {name: {"router": {"kernel": layer["kernel"]}, "experts": layer["experts"]}
           for name, layer in layers.items()}
    flat_moe = dense_to_moe.flatten({n: {"ffn": v} for n, v in moe.items()})
    out = {}
    for path, leaf in dense_to_moe.flatten(scan_lib.unscan_tree(target_layout)).items():
        value = flat_moe.get(path, flat_dense.get(path))
        if value is None or tuple(np.shape(value)) != tuple(leaf.shape):
            raise ValueError(f"ToMoE has no value of shape {tuple(leaf.shape)} for the target "
                             f"parameter {dense_to_moe.path_str(path)}")
        out[path] = np.asarray(value).astype(leaf.dtype)
    return scan_lib.match_layer_layout(dense_to_moe.unflatten(out), target_layout)


def tomoe(dense_workdir: str | Path, out_workdir: str | Path, config: ToMoEConfig, *,
          verify: bool = False, verify_batches: int = 2) -> ToMoEResult:
    """The whole conversion (module docstring); leaves gin with the target config."""
    workdir, out = Path(dense_workdir).absolute(), Path(out_workdir).absolute()
    _check_out(workdir, out)
    dense = read_dense(workdir, config.step)
    if dense.d_ff % config.num_experts:
        raise ValueError(f"num_experts={config.num_experts} must divide the dense d_ff="
                         f"{dense.d_ff} (experts are equal groups of hidden units)")
    data = DataConfig()
    if config.data_source is not None:
        data = dataclasses.replace(data, source=config.data_source)
    it = data.train_iterator(config.seed)
    batches = [dict(next(it)) for _ in range(config.data_batches)]
    recorded = record_layers(dense, batches, config.max_tokens, config.seed)
    key = jax.random.PRNGKey(config.seed)
    layers, report = {}, {}
    for i, name in enumerate(dense.model.layer_names):
        rec = recorded[name]
        groups = tm.coactivation_groups(rec["hidden"], config.num_experts, config.seed + i)
        ffn = {w: v for w, v in dense.params[name]["ffn"].items()}
        experts = tm.partition_ffn(ffn, groups)
        kernel, experts, metrics = learn_router(experts, dense.activation, rec, config,
                                                jax.random.fold_in(key, i))
        layers[name] = {"kernel": kernel, "experts": experts}
        report[name] = {"groups": groups.tolist(), "tokens": len(rec["x"]), **metrics}

    static = (static_pruning_loss(dense, config.active_k * dense.d_ff // config.num_experts,
                                  verify_batches)
              if verify and config.active_k < config.num_experts else None)
    _, target_graphdef, target_layout = _target(dense, config)
    params = convert_params(dense.params, layers, target_layout)
    tx = make_optimizer(optax.constant_schedule(0.0))
    full = _read_full(workdir, dense.step, jax.eval_shape(lambda: dense.layout), tx)
    opt_state = dense_to_moe.fresh_opt_state(jax.device_get(full.opt_state), tx.init(params))
    result = ToMoEResult(out_workdir=out, step=dense.step, num_experts=config.num_experts,
                         k=config.active_k, d_ff=dense.d_ff, layers=report)
    if verify:
        violated = ([] if config.active_k == config.num_experts else
                    [f"k={config.active_k} < E={config.num_experts}: only the selected groups "
                     f"of hidden units are active"])
        if config.weight_learning_rate > 0:
            violated.append("the experts' weights were tuned (weight_learning_rate > 0)")
        result.verify = verify_models(dense.graphdef, dense.params, target_graphdef, params,
                                      DataConfig().eval_batches()[:verify_batches],
                                      violated=violated)
        result.static_loss = static
    _write(workdir, out, full, params, opt_state, config, result)
    return result


def _write(workdir: Path, out: Path, full: Any, params: Any, opt_state: Any,
           config: ToMoEConfig, result: ToMoEResult) -> None:
    """The new workdir, written in a temporary directory and renamed into place."""
    record = {"dense_workdir": str(workdir), "step": result.step,
              "config": dataclasses.asdict(config), "num_experts": result.num_experts,
              "k": result.k, "d_ff": result.d_ff, "expert_d_ff": result.d_ff // result.num_experts,
              "layers": result.layers}
    if result.verify is not None:
        v = result.verify
        record["verify"] = {"max_abs_logit_diff": v.max_abs_logit_diff,
                            "dense_loss": v.dense_loss, "moe_loss": v.moe_loss,
                            "expected_exact": v.expected_exact, "ok": v.ok,
                            "static_pruning_loss": result.static_loss}
    write_workdir(workdir, out, result.step, full, params, opt_state,
                  lambda tmp: (tmp / TOMOE_FILE).write_text(json.dumps(record, indent=2),
                                                     encoding="utf-8"))
