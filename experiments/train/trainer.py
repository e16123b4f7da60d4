"""The training loop: build, restore, step, log, evaluate, checkpoint, summarise.

Workdir layout (see docs/training.md): `checkpoints/<step>/`, `tensorboard/`,
`metrics.jsonl`, `config.gin`, `operative_config.gin`, `summary.json`,
`train.lock`; `corrupt_checkpoints/<step>/` when a damaged checkpoint was set
aside.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.data import pipeline as data_lib
from experiments.data import sharded as sharded_data
from experiments.data.config import DataConfig
from experiments.reporting import summary as summary_lib
from experiments.reporting.metrics import MetricsWriter, ProgressLine, load_fractions, moe_scalars
from experiments.runtime import distributed, gin_utils
from experiments.runtime import mesh as mesh_lib
from experiments.runtime.checkpoints import Checkpointer
from experiments.runtime.workdir_lock import WorkdirLock
from experiments.train import loss_free, phases
from experiments.train.evaluation import EvalResult, evaluate, make_eval_step
from experiments.train.flops import flop_counter
from experiments.train.optim import learning_rate_schedule, make_optimizer
from experiments.train.train_step import LossWeights, make_train_step
from layers.params import logical_axes_of
from layers.transformer import TransformerLM

_log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def build_model(model_cls: type, vocab_size: int, seed: int) -> nnx.Module:
    """`model_cls(vocab_size=..., rngs=...)`, other arguments from gin.

    Initialised inside one `nnx.jit`: eagerly, every initializer would be
    compiled on its own (seconds on CPU).
    """
    return nnx.jit(lambda: model_cls(vocab_size=vocab_size, rngs=nnx.Rngs(params=seed)))()


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any], Any]:
    """`(graphdef, params as a plain nested dict, other state)`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params.to_pure_dict(), rest


def _step_scalars(metrics: dict[str, Any], learning_rate: float,
                  tokens_per_sec: float) -> dict[str, float]:
    return {"loss": float(metrics["loss"]), "ce": float(metrics["ce"]), "lbl": float(metrics["lbl"]),
                "z_loss": float(metrics["z_loss"]), "grad_norm": float(metrics["grad_norm"]),
                "learning_rate": learning_rate, "tokens_per_sec": tokens_per_sec}


def _stall_forever(step: int) -> None:
    _log.warning("debug_stall_at_step=%d: stalling (for crash tests); kill this process", step)
    sys.stderr.flush()
    while True:
        time.sleep(3600)


@gin.configurable(denylist=["workdir"])
def train(workdir: str | Path, *, model_cls: type = TransformerLM, num_steps: int = 1000,
          seed: int = 0, num_microbatches: int = 1, eval_every: int = 250,
          log_every: int = 50, summary_window: int = 50, checkpoint_every: int = 250,
          max_to_keep: int | None = 3, async_checkpoints: bool = True,
          nan_at_step: int | None = None, debug_stall_at_step: int | None = None,
          quiet: bool = False, phase_plan: phases.PhasePlan | None = None) -> dict[str, Any]:
    """Trains (or resumes) in `workdir`; returns the summary (also in `summary.json`).

    Args:
      workdir: run directory; if it holds checkpoints, training resumes from
        the latest intact one.
      model_cls: the model class, constructed as `model_cls(vocab_size=,
        rngs=)` with its other arguments from gin.
      num_steps: total optimizer steps.
      seed: seeds parameter init, the data order and the per-step RNG keys
        (`fold_in(PRNGKey(seed), step)`).
      num_microbatches: gradient-accumulation micro-batches per step
        (`DataConfig.batch_size` must be divisible by it).
      eval_every: validation every this many steps (and at the end).
      log_every: progress line and MoE scalars/histograms every this many steps.
      summary_window: steps averaged into the summary's train loss per domain.
      checkpoint_every, max_to_keep, async_checkpoints: see `Checkpointer`.
      nan_at_step: fault injection for tests: the loss weights of this step's
        batch are multiplied by NaN, which makes the loss NaN through the real
        step; the run must stop naming the step and keep the last checkpoint.
      debug_stall_at_step: crash-test hook: after this step is logged (and its
        checkpoint, if any, finalised) the trainer sleeps until killed.
      quiet: no progress line or printed summary.
      phase_plan: EvoMoE schedule (`experiments.train.phases.PhasePlan`): dense
        warm-up, diversify, dense-to-sparse soft and hard phases in one run.
    """
    workdir = Path(workdir).absolute()
    for name, value in (("num_steps", num_steps), ("eval_every", eval_every),
                        ("log_every", log_every), ("summary_window", summary_window)):
        if value < 1:
            raise ValueError(f"train.{name} must be >= 1, got {value}")
    distributed.initialize_distributed()
    # One lock holder per job: in a multi-process run process 0 holds it for all.
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train_locked(
            workdir, model_cls=model_cls, num_steps=num_steps, seed=seed,
            num_microbatches=num_microbatches, eval_every=eval_every, log_every=log_every,
            summary_window=summary_window, checkpoint_every=checkpoint_every,
            max_to_keep=max_to_keep, async_checkpoints=async_checkpoints,
            nan_at_step=nan_at_step, debug_stall_at_step=debug_stall_at_step, quiet=quiet,
            phase_plan=phase_plan)


def _train_locked(workdir: Path, *, model_cls, num_steps, seed, num_microbatches, eval_every,
                  log_every, summary_window, checkpoint_every, max_to_keep, async_checkpoints,
                  nan_at_step, debug_stall_at_step, quiet, phase_plan) -> dict[str, Any]:
    data_config = DataConfig()
    domains = data_config.domains()
    vocab_size = data_config.vocab_size()
    schedule = learning_rate_schedule(num_steps)
    tx = make_optimizer(schedule)
    loss_weights = LossWeights()
    bias_config = loss_free.LossFreeBalancing()
    sharder = mesh_lib.Sharding()  # MESH_SHAPE and the logical axis rules (gin)
    runtimes: dict[str, phases.Runtime] = {}

    def runtime(structure: str) -> phases.Runtime:
        """Initial state, jitted steps and FLOP counter of a model structure, built once."""
        if structure not in runtimes:
            model = build_model(phases.model_factory(model_cls, structure), vocab_size, seed)
            if structure != phases.DENSE:
                phases.check_moe_model(phase_plan, model)
            graphdef, init_params, rest = split_model(model)
            init_params = sharder.place_params(init_params, logical_axes_of(model))
            runtimes[structure] = phases.Runtime(
                structure=structure, params=init_params,
                opt_state=sharder.init_opt_state(tx, init_params),
                moe_layers=list(getattr(model, "moe_layer_names", ())),
                train_step=sharder.wrap_train_step(make_train_step(
                    graphdef, rest, tx, loss_weights=loss_weights,
                    num_microbatches=num_microbatches, num_domains=len(domains),
                    data_parallel_size=sharder.batch_shards)),
                eval_step=sharder.wrap_eval_step(make_eval_step(graphdef, rest, len(domains))),
                flops=flop_counter(model, batch_size=data_config.batch_size,
                                   seq_len=data_config.seq_len,
                                   num_microbatches=num_microbatches))
        return runtimes[structure]

    def take_initial_state(structure: str) -> tuple[Any, Any]:
        """The structure's initial (params, opt_state). The runtime keeps only their
        shapes afterwards: no second model and optimizer state stays on the devices."""
        r = runtime(structure)
        runtimes[structure] = r._replace(params=mesh_lib.abstract_like(r.params),
                                         opt_state=mesh_lib.abstract_like(r.opt_state))
        return r.params, r.opt_state

    def abstract_state(step: int) -> tuple[Any, Any]:
        r = runtime(phases.structure_after(phase_plan, step))
        return mesh_lib.abstract_like((r.params, r.opt_state))  # restore onto this mesh

    biases: dict[str, np.ndarray] | None = {} if bias_config.enabled else None
    eval_batches = sharded_data.eval_batches(data_config)
    train_iter = sharded_data.make_sharded_train_iterator(data_config, seed)
    base_key = jax.random.PRNGKey(seed)
    log_dir = distributed.process_log_dir(workdir)  # other processes log beside process 0
    gin_utils.write_config(log_dir)

    checkpointer = Checkpointer(workdir / "checkpoints", save_every=checkpoint_every,
                                max_to_keep=max_to_keep, async_save=async_checkpoints)
    restored = checkpointer.restore_latest(None, None, abstract_for_step=abstract_state)
    start_step = 0 if restored is None else restored.step
    structure = phases.structure_after(phase_plan, start_step)
    params, opt_state = take_initial_state(structure)  # dropped below when resuming
    current = runtimes[structure]
    if restored is not None:
        params, opt_state = restored.params, restored.opt_state
        base_key = jnp.asarray(restored.rng_key_data, jnp.uint32)
        data_lib.restore_iterator_state(train_iter, restored.data_state)
        if bias_config.enabled:
            if restored.balance_state is None:
                raise ValueError(f"LossFreeBalancing.enabled but the checkpoint at step "
                                 f"{start_step} holds no selection biases; resume with the "
                                 f"configuration it was trained with")
            biases = restored.balance_state
        _log.info("resumed from step %d of %s", start_step, checkpointer.directory)
        if not quiet:
            print(f"resuming from checkpoint at step {start_step}", file=sys.stderr)

    writer = MetricsWriter(log_dir, resume_step=start_step if restored is not None else None)
    progress = None if quiet else ProgressLine(num_steps, start_step)
    window = summary_lib.DomainLossWindow(domains, summary_window)
    last_eval: EvalResult | None = None
    try:
        last_time = time.monotonic()
        for step in range(start_step + 1, num_steps + 1):
            batch = next(train_iter)
            if step == nan_at_step:
                batch = dict(batch, weights=batch["weights"] * np.float32("nan"))
            step_kwargs = phases.step_kwargs(phase_plan, step)
            if biases is not None and current.moe_layers:
                biases = {**bias_config.init(loss_free.experts_per_layer(
                    params, current.moe_layers)), **biases}
                step_kwargs["model_kwargs"] = dict(step_kwargs.get("model_kwargs", {}),
                                                   selection_biases=_layer_biases(biases, current))
            params_new, opt_state_new, metrics = current.train_step(
                params, opt_state, batch, jax.random.fold_in(base_key, step), **step_kwargs)
            metrics = jax.device_get(metrics)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                checkpointer.wait()
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step}; stopping without saving this state. "
                    f"Last good checkpoint: step {checkpointer.latest_step()} in "
                    f"{checkpointer.directory}")
            params, opt_state = params_new, opt_state_new
            if biases is not None and current.moe_layers:  # once per optimizer step
                biases.update(bias_config.update(_layer_biases(biases, current), metrics["moe"],
                                                 step, num_steps))
            # `batch` holds this process's rows; the MoE counts are global already.
            step_flops = current.flops.step_flops(
                metrics["moe"], positions=batch["inputs"].size * jax.process_count(),
                num_microbatches=num_microbatches)
            if phases.structure_after(phase_plan, step) != current.structure:  # diversify
                structure = phases.structure_after(phase_plan, step)
                fresh_params, _ = take_initial_state(structure)
                current = runtimes[structure]
                params = phases.diversify_params(params, fresh_params, current.moe_layers,
                                                 phase_plan, phases.diversify_key(base_key, step))
                del fresh_params
                opt_state = phases.transfer_opt_state(opt_state, params, tx, current.moe_layers,
                                                      copy_moments=phase_plan.copy_moments)
            now = time.monotonic()
            tokens_per_sec = float(metrics["num_tokens"]) / max(now - last_time, 1e-9)
            last_time = now
            window.add(metrics["domain_ce_sum"], metrics["domain_tokens"])
            log_now = step % log_every == 0 or step == num_steps
            writer.write(step, "train",
                         dict(_step_scalars(metrics, float(schedule(step - 1)), tokens_per_sec),
                              flops=step_flops, seq_balance=float(metrics["seq_balance"]),
                              **loss_free.balance_scalars(metrics["moe"]),
                              **phases.step_scalars(phase_plan, step, metrics["moe"])),
                         tb_scalars=moe_scalars(metrics["moe"]) if log_now else None)
            if log_now:
                for layer, stats in metrics["moe"].items():
                    writer.histogram(f"moe/{layer}/load_histogram",
                                     load_fractions(stats["counts"]), step)
                if progress:
                    progress.update(step, loss, tokens_per_sec)
            if step == start_step + 1:
                gin_utils.write_operative_config(log_dir)
            if step % eval_every == 0 or step == num_steps:
                last_eval = evaluate(current.eval_step, params, eval_batches, domains,
                                     _eval_kwargs(biases, current))
                writer.write(step, "valid", dict(
                    last_eval.scalars(), **loss_free.valid_balance_scalars(
                        last_eval.expert_counts)))
            checkpointer.save(step, params=params, opt_state=opt_state,
                              data_state=data_lib.iterator_state(train_iter),
                              rng_key_data=np.asarray(base_key), force=step == num_steps,
                              balance_state=biases)
            if step == debug_stall_at_step:
                checkpointer.wait()
                writer.flush()
                _stall_forever(step)
        if progress:
            progress.finish()
        if last_eval is None:  # resumed at the final step
            last_eval = evaluate(current.eval_step, params, eval_batches, domains,
                                 _eval_kwargs(biases, current))
        result = _summary(workdir, num_steps, domains, data_config, window, last_eval,
                          current.moe_layers, checkpointer, writer)
    finally:
        checkpointer.close()
        writer.close()
    (log_dir / SUMMARY_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    if not quiet:
        print(summary_lib.render(result))
    return result


def _layer_biases(biases: dict[str, np.ndarray], current: phases.Runtime) -> dict[str, Any]:
    """The loss-free biases of the current model's MoE layers."""
    return {layer: biases[layer] for layer in current.moe_layers}


def _eval_kwargs(biases: dict[str, np.ndarray] | None,
                 current: phases.Runtime) -> dict[str, Any] | None:
    """Evaluation routes with the loss-free biases too (they are part of the router)."""
    if biases is None or not current.moe_layers:
        return None
    return {"selection_biases": _layer_biases(biases, current)}


def _summary(workdir: Path, step: int, domains: list[str], data_config: DataConfig,
             window: summary_lib.DomainLossWindow, last_eval: EvalResult,
             moe_layers: list[str], checkpointer: Checkpointer,
             writer: MetricsWriter) -> dict[str, Any]:
    try:
        entropy = data_config.unigram_entropy("train")
        entropy_dict = {"nats_per_byte": entropy.nats_per_byte,
                            "bits_per_byte": entropy.bits_per_byte, "num_bytes": entropy.num_bytes}
    except ValueError as e:  # e.g. a corpus without text
        _log.warning("no unigram entropy: %s", e)
        entropy_dict = None
    valid = dict(last_eval.domain_loss, all=last_eval.loss)
    return {
        "step": step, "domains": domains, "tokenizer": data_config.tokenizer,
        "train_loss": window.losses(), "valid_loss": valid,
        "valid_tokens": last_eval.domain_tokens, "unigram_entropy": entropy_dict,
        "moe": summary_lib.moe_summary({k: last_eval.expert_counts[k] for k in moe_layers
                                     if k in last_eval.expert_counts},
                                    last_eval.dropped_fraction),
        "paths": {"workdir": str(workdir), "checkpoints": str(checkpointer.directory),
                   "tensorboard": str(writer.tensorboard_dir), "metrics": str(writer.jsonl_path),
                   "config": str(workdir / gin_utils.CONFIG_FILE),
                   "operative_config": str(workdir / gin_utils.OPERATIVE_CONFIG_FILE),
                   "summary": str(workdir / SUMMARY_FILE)}}
