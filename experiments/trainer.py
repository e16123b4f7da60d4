"""The training loop: build, restore, step, log, evaluate, checkpoint, summarise.

Workdir layout (see docs/training.md): `checkpoints/<step>/`, `tensorboard/`,
`metrics.jsonl`, `config.gin`, `operative_config.gin`, `summary.json`,
`train.lock`; `corrupt_checkpoints/<step>/` when a damaged checkpoint was set
aside.
"""

from __future__ import annotations

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

from experiments import data as data_lib
from experiments import gin_utils
from experiments import summary as summary_lib
from experiments.checkpoints import Checkpointer
from experiments.evaluation import EvalResult, evaluate, make_eval_step
from experiments.metrics import MetricsWriter, ProgressLine, load_fractions, moe_scalars
from experiments.optim import learning_rate_schedule, make_optimizer
from experiments.pipeline import DataConfig
from experiments.train_step import LossWeights, make_train_step
from experiments.workdir_lock import WorkdirLock
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
          quiet: bool = False) -> dict[str, Any]:
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
    """
    workdir = Path(workdir).absolute()
    for name, value in (("num_steps", num_steps), ("eval_every", eval_every),
                        ("log_every", log_every), ("summary_window", summary_window)):
        if value < 1:
            raise ValueError(f"train.{name} must be >= 1, got {value}")
    with WorkdirLock(workdir):
        return _train_locked(
            workdir, model_cls=model_cls, num_steps=num_steps, seed=seed,
            num_microbatches=num_microbatches, eval_every=eval_every, log_every=log_every,
            summary_window=summary_window, checkpoint_every=checkpoint_every,
            max_to_keep=max_to_keep, async_checkpoints=async_checkpoints,
            nan_at_step=nan_at_step, debug_stall_at_step=debug_stall_at_step, quiet=quiet)


def _train_locked(workdir: Path, *, model_cls, num_steps, seed, num_microbatches, eval_every,
                  log_every, summary_window, checkpoint_every, max_to_keep, async_checkpoints,
                  nan_at_step, debug_stall_at_step, quiet) -> dict[str, Any]:
    data_config = DataConfig()
    domains = data_config.domains()
    vocab_size = data_config.vocab_size()
    model = build_model(model_cls, vocab_size, seed)
    graphdef, params, rest = split_model(model)
    moe_layers = list(getattr(model, "moe_layer_names", ()))
    del model

    schedule = learning_rate_schedule(num_steps)
    tx = make_optimizer(schedule)
    opt_state = tx.init(params)
    train_step = make_train_step(graphdef, rest, tx, loss_weights=LossWeights(),
                                 num_microbatches=num_microbatches, num_domains=len(domains))
    eval_step = make_eval_step(graphdef, rest, len(domains))
    eval_batches = data_config.eval_batches()
    train_iter = data_config.train_iterator(seed)
    base_key = jax.random.PRNGKey(seed)
    gin_utils.write_config(workdir)

    checkpointer = Checkpointer(workdir / "checkpoints", save_every=checkpoint_every,
                                max_to_keep=max_to_keep, async_save=async_checkpoints)
    restored = checkpointer.restore_latest(jax.eval_shape(lambda: params),
                                           jax.eval_shape(lambda: opt_state))
    start_step = 0
    if restored is not None:
        start_step = restored.step
        params, opt_state = restored.params, restored.opt_state
        base_key = jnp.asarray(restored.rng_key_data, jnp.uint32)
        data_lib.restore_iterator_state(train_iter, restored.data_state)
        _log.info("resumed from step %d of %s", start_step, checkpointer.directory)
        if not quiet:
            print(f"resuming from checkpoint at step {start_step}", file=sys.stderr)

    writer = MetricsWriter(workdir, resume_step=start_step if restored is not None else None)
    progress = None if quiet else ProgressLine(num_steps, start_step)
    window = summary_lib.DomainLossWindow(domains, summary_window)
    last_eval: EvalResult | None = None
    try:
        last_time = time.monotonic()
        for step in range(start_step + 1, num_steps + 1):
            batch = next(train_iter)
            if step == nan_at_step:
                batch = dict(batch, weights=batch["weights"] * np.float32("nan"))
            params_new, opt_state_new, metrics = train_step(
                params, opt_state, batch, jax.random.fold_in(base_key, step))
            metrics = jax.device_get(metrics)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                checkpointer.wait()
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step}; stopping without saving this state. "
                    f"Last good checkpoint: step {checkpointer.latest_step()} in "
                    f"{checkpointer.directory}")
            params, opt_state = params_new, opt_state_new
            now = time.monotonic()
            tokens_per_sec = float(metrics["num_tokens"]) / max(now - last_time, 1e-9)
            last_time = now
            window.add(metrics["domain_ce_sum"], metrics["domain_tokens"])
            log_now = step % log_every == 0 or step == num_steps
            writer.write(step, "train",
                         _step_scalars(metrics, float(schedule(step - 1)), tokens_per_sec),
                         tb_scalars=moe_scalars(metrics["moe"]) if log_now else None)
            if log_now:
                for layer, stats in metrics["moe"].items():
                    writer.histogram(f"moe/{layer}/load_histogram",
                                     load_fractions(stats["counts"]), step)
                if progress:
                    progress.update(step, loss, tokens_per_sec)
            if step == start_step + 1:
                gin_utils.write_operative_config(workdir)
            if step % eval_every == 0 or step == num_steps:
                last_eval = evaluate(eval_step, params, eval_batches, domains)
                writer.write(step, "valid", last_eval.scalars())
            checkpointer.save(step, params=params, opt_state=opt_state,
                              data_state=data_lib.iterator_state(train_iter),
                              rng_key_data=np.asarray(base_key), force=step == num_steps)
            if step == debug_stall_at_step:
                checkpointer.wait()
                writer.flush()
                _stall_forever(step)
        if progress:
            progress.finish()
        if last_eval is None:  # resumed at the final step
            last_eval = evaluate(eval_step, params, eval_batches, domains)
        result = _summary(workdir, num_steps, domains, data_config, window, last_eval,
                          moe_layers, checkpointer, writer)
    finally:
        checkpointer.close()
        writer.close()
    (workdir / SUMMARY_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    if not quiet:
        print(summary_lib.render(result))
    return result


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
