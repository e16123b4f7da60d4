"""Expert pruning and merging of a trained MoE checkpoint into a new workdir.

`prune_experts(workdir, out_workdir, config, task)` and `merge_experts(...)`:

  1. restore the checkpoint (`experiments.inference.restore.restore_model`:
     dropless, the loss-free selection biases applied);
  2. routing statistics on the task (`experiments.inference.routing_stats`),
     read from `<workdir>/routing_stats/<name>.npz` when a pass with the same
     source, domain, split, batches and step was saved, else computed and saved;
  3. per MoE layer, the experts to keep (UNCURL, frequency, random) or the
     groups to merge, and the pure transform of `moe.expert_surgery` on the
     layer's parameters, router rows and selection biases;
  4. the optimizer moments transformed like the parameters ("carry") or
     started afresh ("reset"; the learning-rate schedule's step is kept);
  5. a new workdir written in a temporary directory beside `out_workdir` and
     renamed into place: `checkpoints/<step>` (same step, data position, RNG
     key), `config.gin` = the run's config plus `MoeLayer.num_experts = E'`
     (and `MoeLayer.k = E'` when k is clipped), `surgery.json`, the tokenizer.

docs/surgery.md describes the methods and options.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
import optax
from flax import nnx

from experiments.convert import dense_to_moe
from experiments.data.config import DataConfig
from experiments.inference import routing_stats
from experiments.inference.restore import RestoredModel, model_cls, restore_model
from experiments.inference.tokenizer import copy_tokenizer_files
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import LOSS_FREE_HOOK, Checkpointer
from experiments.runtime.workdir_lock import check_workdir
from experiments.train import evaluation
from experiments.train.optim import make_optimizer
from layers import scan as scan_lib
from moe import expert_surgery as es
from moe.expert_stats import RoutingStats
from moe.validation import check_one_of

_log = logging.getLogger(__name__)

SURGERY_FILE = "surgery.json"
OPTIMIZER_STATE_MODES = ("carry", "reset")
TASK_SPLITS = ("train", "validation")


class NotMoeError(ValueError):
    """The source checkpoint has no MoE layer."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """The data the routing statistics come from.

    source: a `DataConfig.source` ('embedded', 'jsonl:<path>', 'text:<glob>');
      None = the run's own. domain: only this domain's tokens count (None = all).
    split: 'train' (the first `batches` training batches, seed `seed`) or
      'validation' (`batches` validation batches evenly spaced over the split).
    """

    source: str | None = None
    domain: str | None = None
    split: str = "train"
    batches: int = 8
    seed: int = 0

    def __post_init__(self):
        check_one_of("task_split", self.split, TASK_SPLITS)
        if self.batches < 1:
            raise ValueError(f"task_batches must be >= 1, got {self.batches}")

    def stats_name(self, step: int) -> str:
        source = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.source or "run_source").strip("._")
        return (f"{source}__{self.domain or 'all'}__{self.split}{self.batches}"
                f"_seed{self.seed}__step{step}")


@dataclasses.dataclass(frozen=True)
class SurgeryConfig:
    """keep / keep_fraction: experts kept per layer (exactly one of them); E' =
    keep, or round(keep_fraction * E). method: prune ('uncurl', 'frequency',
    'random') or merge weighting ('frequency_weighted', 'uniform'). grouping:
    merge groups ('spectral' = UNCURL's clusters, 'dominant' = MC-SMoE), or
    `groups` given explicitly (the same partition for every layer).
    router_merge: 'combine' (E' router rows) or 'alias' (E rows, members share
    the merged weights). clip_k: allow E' < k (k becomes E', with a warning).
    optimizer_state: 'carry' or 'reset'. step: checkpoint step (None = latest).
    """

    keep: int | None = None
    keep_fraction: float | None = None
    method: str = "uncurl"
    grouping: str = "spectral"
    groups: tuple[tuple[int, ...], ...] | None = None
    router_merge: str = "combine"
    clip_k: bool = False
    optimizer_state: str = "carry"
    seed: int = 0
    step: int | None = None

    def __post_init__(self):
        if (self.keep is None) == (self.keep_fraction is None) and self.groups is None:
            raise ValueError("give exactly one of keep and keep_fraction")
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction < 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1), got {self.keep_fraction}")
        check_one_of("optimizer_state", self.optimizer_state, OPTIMIZER_STATE_MODES)
        check_one_of("grouping", self.grouping, es.GROUPINGS)
        check_one_of("router_merge", self.router_merge, es.ROUTER_MERGES)

    def kept(self, num_experts: int) -> int:
        """E' for a layer of E experts; refuses E' >= E."""
        if self.groups is not None:
            n = len(self.groups)
        elif self.keep is not None:
            n = self.keep
        else:
            n = max(1, round(self.keep_fraction * num_experts))
        if n >= num_experts:
            what = f"groups gives {n} groups" if self.groups is not None else f"keep={n}"
            raise ValueError(f"{what}: must be < the current number of experts E={num_experts}")
        return n


@dataclasses.dataclass
class SurgeryResult:
    out_workdir: Path
    step: int
    operation: str
    num_experts: int
    new_num_experts: int
    k: int
    new_k: int
    layers: dict[str, dict[str, Any]]
    stats_file: Path


# ---------------------------------------------------------------------------
# Statistics.


def task_batches(task: TaskSpec) -> tuple[list[dict[str, np.ndarray]], int | None]:
    """The task's batches (run's data settings, `task.source`) and the domain id."""
    data = dataclasses.replace(DataConfig(), eval_max_batches=task.batches)
    if task.source is not None:
        data = dataclasses.replace(data, source=task.source)
    domain_id = None
    if task.domain is not None:
        domains = data.domains()
        check_one_of("task_domain", task.domain, domains)
        domain_id = domains.index(task.domain)
    if task.split == "validation":
        batches = data.eval_batches()
    else:
        it = data.train_iterator(task.seed)
        batches = [dict(next(it)) for _ in range(task.batches)]
    if not batches:
        raise ValueError(f"the task source {task.source!r} has no {task.split} batches")
    return batches, domain_id


def task_stats(restored: RestoredModel, task: TaskSpec,
               ) -> tuple[dict[str, RoutingStats], Path]:
    """Saved statistics of this task at this step, or one pass that saves them."""
    name = task.stats_name(restored.step)
    path = routing_stats.stats_path(restored.workdir, name)
    if path.is_file() and path.with_suffix(".json").is_file():
        return routing_stats.load_stats(restored.workdir, name)[0], path
    batches, domain_id = task_batches(task)
    stats = routing_stats.collect_stats(restored, batches, domain=domain_id)
    if not stats:
        raise NotMoeError(f"{restored.workdir}: the model is dense (no MoE layers)")
    info = {**dataclasses.asdict(task), "step": restored.step,
            "num_tokens": {layer: float(s.num_tokens) for layer, s in stats.items()}}
    return stats, routing_stats.save_stats(restored.workdir, name, stats, info)


def evaluate_workdir(workdir: str | Path, task: TaskSpec, num_batches: int) -> dict[str, Any]:
    """Validation loss of a workdir's model on the task source (`num_batches`
    validation batches evenly spaced over the split, as `DataConfig.eval_max_batches`
    picks them; dropless, selection biases applied):
    `{"loss", "domain_loss": {domain: loss}, "task_loss"}` (task_loss: the task
    domain's loss, or the overall loss without a domain). Leaves gin parsed
    with the workdir's config."""
    restored = restore_model(workdir)
    data = dataclasses.replace(DataConfig(), eval_max_batches=num_batches)
    if task.source is not None:
        data = dataclasses.replace(data, source=task.source)
    domains = data.domains()
    batches = data.eval_batches()
    step = jax.jit(evaluation.make_eval_step(restored.graphdef, restored.rest, len(domains)))
    with restored.context():
        result = evaluation.evaluate(step, restored.params, batches, domains,
                                     restored.router_state)
    task_loss = (result.loss if task.domain is None
                 else result.domain_loss.get(task.domain, float("nan")))
    return {"loss": result.loss, "domain_loss": result.domain_loss, "task_loss": task_loss,
            "num_batches": result.num_batches}


# ---------------------------------------------------------------------------
# Plans: what happens to each layer.


def prune_plan(stats: RoutingStats, n: int, config: SurgeryConfig, layer_seed: int,
               ) -> dict[str, Any]:
    check_one_of("method", config.method, es.PRUNE_METHODS)
    if config.method == "frequency":
        return {"keep": es.frequency_keep(stats, n)}
    if config.method == "random":
        return {"keep": es.random_keep(stats.num_experts, n, layer_seed)}
    keep, clusters = es.uncurl_keep(stats, n, config.seed)
    return {"keep": keep, "clusters": clusters}


def merge_plan(stats: RoutingStats, n: int, config: SurgeryConfig) -> dict[str, Any]:
    check_one_of("method", config.method, es.MERGE_WEIGHTINGS)
    if config.groups is not None:
        groups = es.check_groups(config.groups, stats.num_experts)
    elif config.grouping == "dominant":
        groups = es.dominant_groups(stats, n)
    else:
        groups = es.spectral_groups(stats, n, config.seed)
    return {"groups": groups}


def _layer_transform(operation: str, plan: Mapping[str, Any], stats: RoutingStats,
                     config: SurgeryConfig) -> Callable[[Mapping, Any], tuple[dict, Any]]:
    """`f(layer subtree, selection bias) -> (new subtree, new bias)` for one layer."""
    if operation == "prune":
        return lambda layer, bias: es.prune_layer(layer, plan["keep"], bias)
    freq = np.asarray(stats.counts) if config.method == "frequency_weighted" else None
    return lambda layer, bias: es.merge_layer(layer, plan["groups"], freq, bias,
                                              config.router_merge)


def _apply(tree: Mapping[str, Any], transforms: Mapping[str, Callable]) -> dict[str, Any]:
    """`tree` with each MoE layer's `ffn` subtree transformed (biases ignored)."""
    out = dict(tree)
    for layer, f in transforms.items():
        out[layer] = {**tree[layer], "ffn": f(tree[layer]["ffn"], None)[0]}
    return out


# ---------------------------------------------------------------------------
# The whole operation.


def prune_experts(workdir: str | Path, out_workdir: str | Path, config: SurgeryConfig,
                  task: TaskSpec = TaskSpec()) -> SurgeryResult:
    """Expert pruning (see the module docstring); `config.method` in `PRUNE_METHODS`."""
    check_one_of("method", config.method, es.PRUNE_METHODS)
    return run_surgery("prune", workdir, out_workdir, config, task)


def merge_experts(workdir: str | Path, out_workdir: str | Path, config: SurgeryConfig,
                  task: TaskSpec = TaskSpec()) -> SurgeryResult:
    """Expert merging (see the module docstring); `config.method` in `MERGE_WEIGHTINGS`."""
    check_one_of("method", config.method, es.MERGE_WEIGHTINGS)
    return run_surgery("merge", workdir, out_workdir, config, task)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_out(workdir: Path, out: Path) -> None:
    check_workdir(out)
    if out.exists():
        raise FileExistsError(f"out_workdir {out} already exists; choose a new directory")
    if out == workdir or workdir in out.parents:
        raise ValueError(f"out_workdir {out} must lie outside the source workdir {workdir}")


def _sizes(restored: RestoredModel, config: SurgeryConfig, operation: str,
           ) -> tuple[tuple[str, ...], int, int, int, int]:
    """(MoE layers, E, k, E' (router outputs after surgery), k')."""
    model = restored.model()
    names = tuple(getattr(model, "moe_layer_names", ()))
    if not names:
        raise NotMoeError(f"{restored.workdir}: the checkpoint is dense (no MoE layers); expert "
                          f"pruning and merging need a MoE checkpoint")
    _refuse_shared_experts(model, names, restored.workdir)
    sizes = {(model.moe_layer(n).num_experts, model.moe_layer(n).k) for n in names}
    if len(sizes) != 1:
        raise ValueError(f"MoE layers differ in (E, k): {sorted(sizes)}; one E' cannot be "
                         f"written to config.gin")
    (e, k), = sizes
    n = config.kept(e)
    new_e = e if operation == "merge" and config.router_merge == "alias" else n
    groups = getattr(model.moe_layer(names[0]).router, "num_groups", None)
    if groups and new_e != e:
        _log.warning("TopKRouter.num_groups=%d: the %d kept experts are regrouped by index into "
                     "groups of %d, so group-limited routing of the result differs from the "
                     "source's even for tokens that used no removed expert", groups, new_e,
                     new_e // groups)
    new_k = k
    if new_e < k:
        if not config.clip_k:
            raise ValueError(f"keep={new_e} < k={k}: fewer experts than experts per token; pass "
                             f"--clip_k to set k = {new_e}")
        _log.warning("k=%d exceeds the new number of experts %d: k is clipped to %d", k, new_e,
                     new_e)
        new_k = new_e
    return names, e, k, new_e, new_k


def _refuse_shared_experts(model: Any, names: tuple[str, ...], workdir: Path) -> None:
    """ValueError when MoE layers share their FFN or experts (WideNet, `widenet_lm`): the
    checkpoint holds the shared experts once, under the first layer, and the layers'
    statistics may ask for different experts."""
    owners: dict[int, list[str]] = {}
    for name in names:
        layer = model.moe_layer(name)
        owners.setdefault(id(getattr(layer, "experts", layer)), []).append(name)
    shared = next((group for group in owners.values() if len(group) > 1), None)
    if shared:
        raise ValueError(f"{workdir}: MoE layers {shared} share one set of experts (WideNet: "
                         f"train.model_cls = @widenet_lm); expert pruning and merging transform "
                         f"each layer's own experts and do not support shared ones")


def _read_full(workdir: Path, step: int, abstract_params: Any,
               tx: optax.GradientTransformation) -> Any:
    """The checkpoint with its optimizer state, data position, RNG key and hook state."""
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False, max_to_keep=None,
                                read_only=True)
    try:
        return checkpointer.restore_step(step, abstract_params,
                                         jax.eval_shape(tx.init, abstract_params))
    finally:
        checkpointer.close()


def _check_target(params: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """The model of the current gin config has exactly the shapes of `params` (both
    compared unscanned); -> its parameter layout (scanned when its config scans)."""
    model = nnx.eval_shape(lambda: model_cls()(vocab_size=vocab_size, rngs=nnx.Rngs(0)))
    layout = nnx.split(model, nnx.Param)[1].to_pure_dict()
    want = dense_to_moe.flatten(scan_lib.unscan_tree(layout))
    have = dense_to_moe.flatten(params)
    bad = [dense_to_moe.path_str(p) for p in set(want) | set(have)
           if p not in want or p not in have or tuple(want[p].shape) != tuple(np.shape(have[p]))]
    if bad:
        raise ValueError(f"the run's config.gin with the new MoeLayer.num_experts / k does not "
                         f"give the pruned shapes at {sorted(bad)[:4]}: does the config set "
                         f"the expert count other than by MoeLayer.num_experts?")
    return layout


def run_surgery(operation: str, workdir: str | Path, out_workdir: str | Path,
                config: SurgeryConfig, task: TaskSpec) -> SurgeryResult:
    """Prune or merge (`operation`), writing `out_workdir` atomically."""
    workdir, out = Path(workdir).absolute(), Path(out_workdir).absolute()
    _check_out(workdir, out)
    source = restore_model(workdir, config.step)
    # Statistics and transforms work layer by layer on the unscanned layout; the result
    # is written in the layout of the run's config (scanned or not).
    restored = routing_stats.unscanned_view(source)
    names, e, k, new_e, new_k = _sizes(restored, config, operation)
    stats, stats_file = task_stats(restored, task)
    plans, transforms = {}, {}
    for i, name in enumerate(names):
        n = config.kept(e)
        plans[name] = (prune_plan(stats[name], n, config, config.seed + i) if operation == "prune"
                       else merge_plan(stats[name], n, config))
        transforms[name] = _layer_transform(operation, plans[name], stats[name], config)

    tx = make_optimizer(optax.constant_schedule(0.0))
    full = _read_full(workdir, restored.step, jax.eval_shape(lambda: source.params), tx)
    unscanned = scan_lib.LayerPlan(len(getattr(restored.model(), "layer_names", ())))
    source_params = scan_lib.unscan_tree(jax.device_get(full.params))
    params = _apply(source_params, transforms)
    hooks = {h: dict(s) for h, s in full.hook_state.items()}
    for hook, state in hooks.items():
        if hook != LOSS_FREE_HOOK and set(state) & set(names):
            raise ValueError(f"step hook {hook!r} keeps per-MoE-layer state in the checkpoint; "
                             f"expert surgery only knows how to transform {LOSS_FREE_HOOK!r}'s")
    if LOSS_FREE_HOOK in hooks:
        for name, f in transforms.items():
            if name in hooks[LOSS_FREE_HOOK]:
                bias = f(source_params[name]["ffn"], hooks[LOSS_FREE_HOOK][name])[1]
                hooks[LOSS_FREE_HOOK][name] = np.asarray(bias, np.float32)
    gin.bind_parameter("MoeLayer.num_experts", new_e)
    if new_k != k:
        gin.bind_parameter("MoeLayer.k", new_k)
    layout = _check_target(params, restored.vocab_size)
    opt_state = dense_to_moe.map_opt_state(
        scan_lib.to_layer_plan(jax.device_get(full.opt_state), unscanned), tx.init(params),
        set(params),
        moments=lambda old, fresh: (_apply(old, transforms)
                                    if config.optimizer_state == "carry" else fresh),
        other=lambda old, fresh: old if config.optimizer_state == "carry" else fresh)
    params = scan_lib.match_layer_layout(params, layout)
    target_plan = scan_lib.find_plan(layout)
    if target_plan is not None:
        opt_state = scan_lib.to_layer_plan(opt_state, target_plan)

    result = SurgeryResult(out_workdir=out, step=restored.step, operation=operation,
                           num_experts=e, new_num_experts=new_e, k=k, new_k=new_k,
                           layers=plans, stats_file=stats_file)
    write_workdir(workdir, out, restored.step, full, params, opt_state,
                  lambda tmp: _write_record(tmp, workdir, config, task, result, stats),
                  hook_state=hooks)
    return result


def write_workdir(workdir: Path, out: Path, step: int, full: Any, params: Any, opt_state: Any,
                  write_record: Callable[[Path], None], **extra_state: Any) -> None:
    """A converted run's workdir: its checkpoint at `step` (data state and RNG of the source
    run `full`, plus `extra_state`), config.gin, the source's tokenizer files, then
    `write_record(directory)`; written in a temporary directory and renamed to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp_"))
    tmp.chmod(0o777 & ~_umask())
    try:
        writer = Checkpointer(tmp / "checkpoints", async_save=False, max_to_keep=None)
        try:
            writer.save(step, params=params, opt_state=opt_state, data_state=full.data_state,
                        rng_key_data=full.rng_key_data, force=True, **extra_state)
        finally:
            writer.close()
        gin_utils.write_config(tmp)
        copy_tokenizer_files(workdir, tmp)
        write_record(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_record(out: Path, workdir: Path, config: SurgeryConfig, task: TaskSpec,
                  result: SurgeryResult, stats: Mapping[str, RoutingStats]) -> None:
    record = {
        "source_workdir": str(workdir), "step": result.step, "operation": result.operation,
        "config": {k: (list(map(list, v)) if k == "groups" and v is not None else v)
                   for k, v in dataclasses.asdict(config).items()},
        "task": dataclasses.asdict(task), "stats_file": str(result.stats_file),
        "num_experts": result.num_experts, "new_num_experts": result.new_num_experts,
        "k": result.k, "new_k": result.new_k,
        "layers": {name: {**plan, "task_load": stats[name].load.tolist()}
                   for name, plan in result.layers.items()},
    }
    (out / SURGERY_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------
# Command-line flags shared by scripts/prune_experts.py and scripts/merge_experts.py.


def add_flags(parser: Any) -> None:
    """The flags both surgery scripts take."""
    parser.add_argument("--workdir", required=True, help="The trained MoE run's workdir.")
    parser.add_argument("--out_workdir", required=True, help="New workdir (must not exist).")
    parser.add_argument("--task_source", default=None,
                        help="DataConfig.source of the task data: embedded, jsonl:<path>, "
                             "text:<glob> (default: the run's own).")
    parser.add_argument("--task_domain", default=None,
                        help="Only this domain's tokens count (default: all).")
    parser.add_argument("--task_split", choices=TASK_SPLITS, default="train")
    parser.add_argument("--task_batches", type=int, default=8,
                        help="Batches of the task data in the statistics pass.")
    parser.add_argument("--keep", type=int, default=None, help="Experts kept per layer (E').")
    parser.add_argument("--keep_fraction", type=float, default=None,
                        help="E' = round(f * E), f in (0, 1).")
    parser.add_argument("--clip_k", action="store_true",
                        help="Allow E' < k: k becomes E' (with a warning).")
    parser.add_argument("--optimizer_state", choices=OPTIMIZER_STATE_MODES, default="carry",
                        help="carry: moments transformed like the weights; reset: fresh AdamW.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default latest).")
    parser.add_argument("--eval_batches", type=int, default=0,
                        help="Also evaluate source and result on this many validation batches "
                             "of the task source (0 = no evaluation); the losses go to "
                             "surgery.json and the output.")


def task_from_args(args: Any) -> TaskSpec:
    """The task of the flags (also checks --eval_batches before anything runs)."""
    if args.eval_batches < 0:
        raise ValueError(f"eval_batches must be >= 0, got {args.eval_batches}")
    return TaskSpec(source=args.task_source, domain=args.task_domain, split=args.task_split,
                    batches=args.task_batches, seed=args.seed)


def run_from_args(operation: Callable[..., SurgeryResult], args: Any, task: TaskSpec,
                  **method_config: Any) -> None:
    """The CLIs' shared tail: the `SurgeryConfig` of the common flags (`add_flags`)
    plus the method's own fields, `operation` (prune_experts or merge_experts), its
    summary line, and the before/after evaluation when --eval_batches > 0."""
    config = SurgeryConfig(keep=args.keep, keep_fraction=args.keep_fraction, clip_k=args.clip_k,
                           optimizer_state=args.optimizer_state, seed=args.seed, step=args.step,
                           **method_config)
    result = operation(args.workdir, args.out_workdir, config, task)
    print(summary_line(result))
    if args.eval_batches:
        print(evaluate_before_after(result, task, args.eval_batches))


def evaluate_before_after(result: SurgeryResult, task: TaskSpec, num_batches: int) -> str:
    """Evaluates the source and the new workdir, adds `eval` to surgery.json; one line."""
    record_path = result.out_workdir / SURGERY_FILE
    record = json.loads(record_path.read_text())
    before = evaluate_workdir(record["source_workdir"], task, num_batches)
    after = evaluate_workdir(result.out_workdir, task, num_batches)
    record["eval"] = {"before": before, "after": after}
    record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    what = f"domain {task.domain}" if task.domain else "all domains"
    return (f"validation loss on {what} ({before['num_batches']} batches): "
            f"{before['task_loss']:.4f} -> {after['task_loss']:.4f}")


def summary_line(result: SurgeryResult) -> str:
    verb = "pruned" if result.operation == "prune" else "merged"
    parts = [f"{verb} step {result.step}: E {result.num_experts} -> {result.new_num_experts}"]
    if result.new_k != result.k:
        parts.append(f"k {result.k} -> {result.new_k} (clipped)")
    for name, plan in result.layers.items():
        what = plan.get("keep", plan.get("groups"))
        parts.append(f"{name}: {'kept' if 'keep' in plan else 'groups'} {what}")
    return "; ".join(parts) + f"; wrote {result.out_workdir}"
