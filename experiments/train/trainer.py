"""The training loop: build, restore, step, log, evaluate, checkpoint, summarise.

Workdir layout (see docs/training.md): `checkpoints/<step>/`, `tensorboard/`,
`metrics.jsonl`, `config.gin`, `operative_config.gin`, `summary.json`,
`train.lock`; `corrupt_checkpoints/<step>/` when a damaged checkpoint was set
aside.

`train(workdir)` takes its collaborators (`experiments.train.config.
TrainSetup`: settings, data, loss weights, sharding, checkpointer, step hooks)
from gin unless it is given them. Features that act around each step
(loss-free balancing, the EvoMoE phases, test fault injection) are step hooks
(`experiments.train.hooks`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import gin
import jax
import numpy as np

from experiments.data import pipeline as data_lib
from experiments.data import sharded as sharded_data
from experiments.reporting import summary as summary_lib
from experiments.reporting.console import Console
from experiments.runtime import distributed, gin_utils, paths
from experiments.runtime.checkpoints import Checkpointer, CheckpointMismatchError
from experiments.runtime.workdir_lock import check_workdir, workdir_lock
from experiments.train import hooks as hooks_lib
from experiments.train import interrupt as interrupt_lib
from experiments.train import profiling, resume_check, run_state, throughput
from experiments.train.config import TrainConfig, TrainSetup
from experiments.train.evaluation import EvalResult, evaluate
from experiments.train.nonfinite import NonFiniteLossError, SkipGuard
from experiments.train.optim import learning_rate_schedule, make_optimizer
from experiments.train.run_state import RunState, Runtimes, build_model, split_model
from experiments.train.step_log import SUMMARY_FILE, StepLog, summary

__all__ = [
    "SUMMARY_FILE",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainSetup",
    "build_model",
    "split_model",
    "train",
]

_log = logging.getLogger(__name__)


def train(workdir: str | paths.PathLike, setup: TrainSetup | None = None, **config_changes: Any,
          ) -> dict[str, Any]:
    """Trains (or resumes) in `workdir`; returns the summary (also in `summary.json`).

    Args:
      workdir: run directory, local or in a bucket (`gs://...`,
        `experiments.runtime.paths`); if it holds checkpoints, training resumes
        from the latest intact one.
      setup: the run's collaborators; default `TrainSetup.from_gin(**config_changes)`.
      **config_changes: `TrainConfig` fields to override (e.g. `quiet=True`),
        only without `setup`.

    Raises:
      experiments.train.interrupt.Interrupted: on SIGINT/SIGTERM, after the
        current step and its checkpoint (a second signal: KeyboardInterrupt).
    """
    if setup is None:
        setup = TrainSetup.from_gin(**config_changes)
    elif config_changes:
        raise ValueError(f"train: pass {sorted(config_changes)} in setup.config, not beside it")
    workdir = paths.as_path(workdir)
    if setup.config.profile_steps:
        paths.require_local(workdir, "train.profile_steps (the jax profiler trace)",
                            "the profiler writes its trace with local file APIs")
    distributed.initialize_distributed()
    # What a configuration mistake can break is built before the workdir is touched.
    check_workdir(workdir)
    run_state.check_model(setup)
    inputs = _Inputs.build(setup)
    # One lock holder per job: in a multi-process run process 0 holds it for all.
    # A bucket's lock is a lease that can be lost (`lock.check()` before each save).
    lock = workdir_lock(workdir) if jax.process_index() == 0 else _NoLock()
    with lock, interrupt_lib.InterruptGuard() as guard:  # SIGINT/SIGTERM: save and stop
        return _train_locked(workdir, setup, inputs, guard, lock)


class _NoLock(contextlib.nullcontext):
    def check(self) -> None:
        pass


class _Inputs(NamedTuple):
    schedule: Any
    runtimes: Runtimes
    eval_batches: list[Any]
    train_iter: Any

    @classmethod
    def build(cls, setup: TrainSetup) -> _Inputs:
        schedule = learning_rate_schedule(setup.config.num_steps)
        return cls(schedule, Runtimes(setup, make_optimizer(schedule)),
                   hooks_lib.eval_batches(setup.hooks, sharded_data.eval_batches(setup.data)),
                   sharded_data.make_sharded_train_iterator(setup.data, setup.config.seed))


def _train_locked(workdir: paths.Path, setup: TrainSetup, inputs: _Inputs,
                  guard: interrupt_lib.InterruptGuard, lock: Any) -> dict[str, Any]:
    config, data, hooks = setup.config, setup.data, setup.hooks
    console = Console(quiet=config.quiet)  # also the run's wall clock
    schedule, runtimes, eval_batches, train_iter = inputs
    log_dir = distributed.process_log_dir(workdir)  # other processes log beside process 0
    checkpointer = setup.checkpointer(workdir / "checkpoints")
    log: StepLog | None = None
    profiler: profiling.StepProfiler | None = None
    try:
        try:
            run = run_state.start(setup, runtimes, checkpointer, train_iter,
                                  flush=lambda: _flush(checkpointer, log))
        except CheckpointMismatchError as e:  # another model's checkpoints: touch nothing
            raise resume_check.mismatch_error(e, workdir) from e
        gin_utils.write_config(log_dir)
        console.startup(runtimes, setup.sharding, workdir, run)
        log = StepLog(log_dir, domains=data.domains(), num_steps=config.num_steps,
                      start_step=run.step, resumed=run.resumed, log_every=config.log_every,
                      summary_window=config.summary_window, quiet=config.quiet,
                      console=console, tokenizer=data.tokenizer,
                      num_devices=jax.device_count(), peak_tflops=throughput.peak_tflops(
                          jax.devices()[0].device_kind, config.peak_tflops))
        profiler = profiling.StepProfiler(
            profiling.parse_profile_steps(config.profile_steps, num_steps=config.num_steps),
            log.writer.tensorboard_dir)
        start_step, last_eval = run.step, None
        skips = SkipGuard(config.max_skipped_steps, checkpointer)
        for step in range(start_step + 1, config.num_steps + 1):
            run.step = step
            console.messages(step, hooks_lib.messages(hooks, run.hook_states, step))
            waited = time.monotonic()
            batch = next(train_iter)
            data_seconds = time.monotonic() - waited
            for hook in hooks:
                batch = hook.before_step(step, batch)
            current = runtimes[run.train.structure]
            profiler.before_step(step)
            console.before_step(run.train.structure)
            params, opt_state, metrics = current.train_step(
                run.train.params, run.train.opt_state, batch,
                jax.random.fold_in(run.base_key, step),
                router_state=hooks_lib.router_state(hooks, run.hook_states, step, run.ctx))
            metrics = jax.device_get(metrics)
            profiler.after_step(step, params)
            console.after_step()
            skipped = skips.check(step, metrics)  # a rejected step's state is only a
            if not skipped:  # candidate: the state from before the step stays
                run.train = run.train._replace(params=params, opt_state=opt_state)
            del params, opt_state  # one reference: a structure switch frees the old state
            # `batch` holds this process's rows; the MoE counts are global already.
            positions = batch["inputs"].size * jax.process_count()
            step_flops = current.flops.step_flops(
                metrics["moe"], positions=positions, num_microbatches=config.num_microbatches)
            realised = current.flops.realised(  # {} unless layers can skip (layers.skip)
                metrics["moe"], positions=positions, num_microbatches=config.num_microbatches)
            run_state.after_step(hooks, run, metrics, runtimes)
            if not skipped:  # a skipped step's metrics are not finite: not logged
                log.train_step(step, metrics, learning_rate=float(schedule(step - 1)),
                               flops=step_flops,
                               hook_scalars={**_hook_scalars(hooks, run, metrics), **realised},
                               data_seconds=data_seconds)
            if step == start_step + 1:
                gin_utils.write_operative_config(log_dir, notes=runtimes.dispatch_lines.values())
            if step % config.eval_every == 0 or step == config.num_steps:
                last_eval = _evaluate(runtimes, run, hooks, eval_batches, data.domains())
                log.evaluation(step, last_eval)
            stop = guard.stop_requested()  # the same step in every process
            lock.check()  # a lost lease: stop before writing a checkpoint
            checkpointer.save(step, params=run.train.params, opt_state=run.train.opt_state,
                              data_state=data_lib.iterator_state(train_iter),
                              rng_key_data=np.asarray(run.base_key),
                              force=stop or step == config.num_steps, hook_state=run.hook_states)
            for hook in hooks:
                hook.end_of_step(step, run.ctx)
            if stop:
                raise guard.stopped(step, checkpointer)
        if last_eval is None:  # resumed at the final step
            last_eval = _evaluate(runtimes, run, hooks, eval_batches, data.domains())
        log.close()
        result = summary(workdir, log, step=config.num_steps, data=data, last_eval=last_eval,
                         moe_layers=list(run.ctx.experts_per_layer),
                         checkpoint_dir=checkpointer.directory, skipped_steps=skips.skipped)
    finally:
        if profiler is not None:
            profiler.close()
        checkpointer.close()
        if log is not None:
            log.close()
    if not config.quiet:
        print(summary_lib.render(result))
    return result


def _hook_scalars(hooks, run: RunState, metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for hook in hooks:
        out.update(hook.scalars(run.step, run.hook_states[hook.name], metrics))
    return out


def _evaluate(runtimes: Runtimes, run: RunState, hooks, eval_batches,
              domains: list[str]) -> EvalResult:
    """Validation of the current state, routed with the hooks' router inputs."""
    router_state = hooks_lib.router_state(hooks, run.hook_states, run.step + 1, run.ctx,
                                          for_eval=True)
    return evaluate(runtimes[run.train.structure].eval_step, run.train.params, eval_batches,
                    domains, router_state=None if router_state.empty else router_state)


def train_unless_finished(workdir: str | paths.PathLike, gin_files: Sequence[str],
                          gin_params: Sequence[str]) -> bool:
    """Trains (or resumes) the run in `workdir` under a fresh gin config of `gin_files` and
    `gin_params`, unless it has finished (its summary.json exists): the step of the
    experiment drivers that makes them resumable. Returns whether it trained."""
    if (paths.as_path(workdir) / SUMMARY_FILE).exists():
        return False
    gin.clear_config()
    gin_utils.parse(list(gin_files), list(gin_params))
    train(workdir, quiet=True)
    return True


def _flush(checkpointer: Checkpointer, log: StepLog | None) -> None:
    checkpointer.wait()
    if log is not None:
        log.flush()
