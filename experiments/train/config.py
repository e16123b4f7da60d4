"""The trainer's settings (`TrainConfig`, gin name `train`) and its collaborators
(`TrainSetup`: data, loss weights, sharding, checkpointer, step hooks)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin

from experiments.data.config import DataConfig
from experiments.runtime import distributed
from experiments.runtime import mesh as mesh_lib
from experiments.runtime.checkpoints import Checkpointer
from experiments.train import objective as objective_lib
from experiments.train import profiling
from experiments.train.hooks import StepHook, check_names
from experiments.train.loss_free import LossFreeBalancing
from experiments.train.loss_schedule import LossWeightSchedule  # noqa: F401  (gin: train.hooks)
from experiments.train.mola import mola_lm  # noqa: F401  (gin: train.model_cls = @mola_lm)
from experiments.train.phases import PhasePlan
from experiments.train.train_step import LossWeights
from layers.transformer import TransformerLM
from moe.validation import check_one_of


class _Moved:
    """Default of a removed `train` argument: any bound value is refused, naming the new one."""

    def __init__(self, new: str):
        self.new = new

    def __repr__(self) -> str:
        return f"<moved to {self.new}>"


_MOVED = {"checkpoint_every": "Checkpointer.save_every",
          "max_to_keep": "Checkpointer.max_to_keep",
          "async_checkpoints": "Checkpointer.async_save"}
_MOVED_CHECKPOINT_EVERY, _MOVED_MAX_TO_KEEP, _MOVED_ASYNC = (_Moved(v) for v in _MOVED.values())


# The gin name stays `train`: configs bind `train.num_steps = 800` as before. The
# moved names are denylisted: gin refuses them while parsing, naming the new binding.
@gin.configurable("train", denylist=list(_MOVED))
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The trainer's own settings.

    Attributes:
      model_cls: the model class, constructed as `model_cls(vocab_size=,
        rngs=)` with its other arguments from gin.
      vocab_size: the model's vocabulary (embedding rows); None: the data
        tokenizer's `DataConfig.vocab_size()`. An imported model binds its own
        (often padded beyond its tokenizer's size); see `model_vocab_size`.
      num_steps: total optimizer steps.
      seed: seeds parameter init, the data order and the per-step RNG keys
        (`fold_in(PRNGKey(seed), step)`).
      num_microbatches: gradient-accumulation micro-batches per step
        (`DataConfig.batch_size` must be divisible by it).
      eval_every: validation every this many steps (and at the end).
      log_every: progress line and MoE scalars/histograms every this many steps.
      summary_window: steps averaged into the summary's train loss per domain.
      quiet: no progress line or printed summary.
      max_skipped_steps: steps whose update is not finite (loss, gradient norm
        or update NaN/inf; never applied) that the run skips, counted, logged
        and listed in the summary, before it stops (0: stop at the first).
      phase_plan: the EvoMoE step hook (`experiments.train.phases.PhasePlan`):
        dense warm-up, diversify, dense-to-sparse soft and hard phases in one run.
      peak_tflops: peak TFLOP/s per device for the MFU scalar; None = the
        table in `experiments.train.throughput` by device kind (no MFU on CPU
        or an unlisted device).
      hooks: further step hooks (`experiments.train.hooks.StepHook`), run after
        the loss-free and EvoMoE ones.
      objective: 'next_token' (decoders) or 'masked_lm' (encoders:
        `experiments.train.objective`, options `MaskedLM.*`).
      profile_steps: 'N:M' writes a jax profiler trace of steps N..M (inclusive)
        into the run's TensorBoard directory (`experiments.train.profiling`);
        None: no trace.
      checkpoint_every, max_to_keep, async_checkpoints: moved to
        `Checkpointer.save_every`, `max_to_keep`, `async_save`; binding them
        (or passing them) is an error naming the new binding.
    """

    model_cls: Callable[..., Any] = TransformerLM
    vocab_size: int | None = None
    num_steps: int = 1000
    seed: int = 0
    num_microbatches: int = 1
    eval_every: int = 250
    log_every: int = 50
    summary_window: int = 50
    quiet: bool = False
    max_skipped_steps: int = 0
    phase_plan: PhasePlan | None = None
    peak_tflops: float | None = None
    hooks: Sequence[StepHook] = ()
    profile_steps: str | None = None
    objective: str = "next_token"
    checkpoint_every: Any = _MOVED_CHECKPOINT_EVERY
    max_to_keep: Any = _MOVED_MAX_TO_KEEP
    async_checkpoints: Any = _MOVED_ASYNC

    def __post_init__(self):
        for old, new in _MOVED.items():
            if not isinstance(getattr(self, old), _Moved):
                raise ValueError(f"train.{old} was removed: bind {new} instead (the "
                                 f"checkpointer owns its settings)")
        for name in ("num_steps", "eval_every", "log_every", "summary_window",
                     "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or
                                            not isinstance(self.vocab_size, int) or
                                            self.vocab_size < 1):
            raise ValueError(f"train.vocab_size must be None or an int >= 1, got "
                             f"{self.vocab_size!r}")
        if self.peak_tflops is not None and (isinstance(self.peak_tflops, bool) or not isinstance(
                self.peak_tflops, (int, float)) or not self.peak_tflops > 0):
            raise ValueError(f"train.peak_tflops must be None or a number > 0, got "
                             f"{self.peak_tflops!r}")
        if self.max_skipped_steps < 0:
            raise ValueError(f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        profiling.parse_profile_steps(self.profile_steps, num_steps=self.num_steps)
        check_one_of("train.objective", self.objective, objective_lib.OBJECTIVES)
        object.__setattr__(self, "hooks", tuple(self.hooks))


TrainConfig.gin_set_by = dict(_MOVED)  # read by gin_utils.parse to name the new binding


def model_vocab_size(config: TrainConfig | None = None, data: DataConfig | None = None) -> int:
    """The model's vocabulary size: `train.vocab_size` when bound, else the data
    tokenizer's (`DataConfig.vocab_size()`).

    Every consumer that builds a model (trainer, scorer, upcycler, reports) calls
    this. Without `config`, `train.vocab_size` is read from the parsed gin config
    (constructing `TrainConfig` there would build its hooks).
    """
    if config is not None:
        vocab = config.vocab_size
    else:
        try:
            vocab = gin.query_parameter("train.vocab_size")
        except ValueError:  # not bound
            vocab = None
        if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int)
                                  or vocab < 1):
            raise ValueError(f"train.vocab_size must be None or an int >= 1, got {vocab!r}")
    if vocab is not None:
        return int(vocab)
    return (data or DataConfig()).vocab_size()


def check_data_vocab(model_vocab: int, data: DataConfig) -> None:
    """Refuses a data tokenizer whose ids can reach past the model's vocabulary."""
    data_vocab = data.vocab_size()
    if data_vocab > model_vocab:
        raise ValueError(
            f"the data tokenizer (DataConfig.tokenizer = {data.tokenizer!r}) has {data_vocab} "
            f"ids, more than the model's vocabulary (train.vocab_size = {model_vocab}): train "
            f"with the model's tokenizer or a model of at least {data_vocab} rows")


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What `train()` works with, besides the workdir.

    Attributes:
      config: the trainer's settings.
      data: the data pipeline's configuration.
      loss_weights: auxiliary-loss weights of the train step.
      sharding: the device mesh and logical axis rules.
      checkpointer: `directory -> Checkpointer` (its settings from gin).
      hooks: the step hooks, in call order.
    """

    config: TrainConfig
    data: DataConfig
    loss_weights: LossWeights
    sharding: mesh_lib.Sharding
    checkpointer: Callable[[Path], Checkpointer]
    hooks: tuple[StepHook, ...]

    def __post_init__(self):
        check_names(self.hooks)
        objective_lib.check_setup(self.config.objective, self.hooks)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (`model_vocab_size`)."""
        return model_vocab_size(self.config, self.data)

    @classmethod
    def from_gin(cls, **config_changes: Any) -> TrainSetup:
        """Every collaborator built from the parsed gin config; `config_changes`
        override `TrainConfig` fields (e.g. `quiet=True`). Starts jax.distributed
        first when the environment asks for it (the mesh needs every device)."""
        distributed.initialize_distributed()
        config, data = TrainConfig(**config_changes), DataConfig()
        objective = objective_lib.objective_hooks(
            config.objective, seed=config.seed, data=data,
            vocab_size=lambda: model_vocab_size(config, data))
        return cls(config=config, data=data, loss_weights=LossWeights(),
                   sharding=mesh_lib.Sharding(), checkpointer=Checkpointer,
                   hooks=default_hooks(config) + objective)


def default_hooks(config: TrainConfig) -> tuple[StepHook, ...]:
    """`LossFreeBalancing()` when enabled, `config.phase_plan`, then `config.hooks`."""
    loss_free = LossFreeBalancing()
    hooks = [loss_free] if loss_free.enabled else []
    if config.phase_plan is not None:
        hooks.append(config.phase_plan)
    return tuple(hooks) + tuple(config.hooks)
