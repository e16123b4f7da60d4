"""Training objectives: next-token prediction (the default) or BERT-style masked-LM.

`train.objective = 'masked_lm'` trains an encoder (`TransformerLM.causal = False`,
e.g. a Soft MoE encoder, `gin_configs/models/soft_moe_encoder.gin`). The train step
is unchanged: it minimises the weighted cross-entropy of `batch["targets"]` at
`batch["weights"]`; the `MaskedLM` step hook rewrites every batch before the step
(`before_step`) and every validation batch once (`eval_batch`) with
`layers.transformer.mask_tokens`:

    selected ~ Bernoulli(mask_rate) on real tokens (segment id > 0)
    inputs'  = mask_id (80% of selected) | a uniform random id (10%) | unchanged (10%)
    targets' = inputs (the original token at the same position)
    weights' = 1 on selected tokens, else 0

so `ce` (and the validation loss) is the masked-LM cross-entropy over the selected
tokens, in nats per token. The masks are a function of (`train.seed`, step, process)
for training and of (`train.seed`, validation batch index, process) for validation:
a resumed run sees the same masks (exact resume), and every evaluation of a run sees
the same validation masks (comparable across steps). Nothing is saved in checkpoints.

`mask_id` defaults to the data tokenizer's padding id (never a real input: padding has
segment id 0), so the byte vocabulary needs no extra row; any id in [0, vocab) may be
bound.

Refused: a causal model (a decoder sees no future token, so masked-LM is a
different, weaker task than the one it is for; train it with 'next_token'), a model with
multi-token prediction (`TransformerLM.mtp`: its targets are the next tokens), and
`MaskedLM.*` bindings without `train.objective = 'masked_lm'`. Generation and scoring
already refuse an encoder (`experiments.inference.restore.restore_model`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from experiments.train.hooks import Batch, StepHook
from layers.transformer import mask_tokens
from moe.validation import check_one_of

OBJECTIVES = ("next_token", "masked_lm")
MASKED_LM_HOOK = "masked_lm"
_TRAIN_SALT, _EVAL_SALT = 0x4D4C4D, 0x4D4C4E  # keys apart from the model's step keys


@gin.configurable(denylist=["seed", "vocab_size", "pad_id"])
@dataclasses.dataclass(frozen=True)
class MaskedLM(StepHook):
    """The masked-LM batch rewrite (module docstring).

    Attributes (gin: `MaskedLM.<name>`):
      mask_rate: probability that a real token is selected, in (0, 1].
      mask_id: the [MASK] id; None = the tokenizer's padding id.
    Set by the trainer (`objective_hooks`): seed (`train.seed`), vocab_size (the
    model's), pad_id (the tokenizer's).
    """

    mask_rate: float = 0.15
    mask_id: int | None = None
    seed: int = 0
    vocab_size: int = 0
    pad_id: int = 0

    name = MASKED_LM_HOOK

    def __post_init__(self):
        if not 0.0 < self.mask_rate <= 1.0:
            raise ValueError(f"MaskedLM.mask_rate must be in (0, 1], got {self.mask_rate}")
        if not 0 <= self.resolved_mask_id < self.vocab_size:
            raise ValueError(f"MaskedLM.mask_id must be in [0, vocab_size={self.vocab_size}) "
                             f"(None = the tokenizer's padding id {self.pad_id}), got "
                             f"{self.mask_id}")

    @property
    def resolved_mask_id(self) -> int:
        return self.pad_id if self.mask_id is None else int(self.mask_id)

    def check_model(self, structure: str, model: Any) -> None:
        del structure
        if getattr(model, "causal", True):
            raise ValueError("train.objective = 'masked_lm' needs an encoder "
                             "(TransformerLM.causal = False): a causal decoder cannot see the "
                             "tokens after a masked one; train it with 'next_token'")
        if getattr(model, "mtp", None) is not None:
            raise ValueError("train.objective = 'masked_lm' cannot train multi-token "
                             "prediction (TransformerLM.mtp): its targets are the next tokens; "
                             "unbind TransformerLM.mtp")

    def before_step(self, step: int, batch: Batch) -> Batch:
        return self._mask(batch, _TRAIN_SALT, step)

    def eval_batch(self, index: int, batch: Batch) -> Batch:
        return self._mask(batch, _EVAL_SALT, index)

    def _mask(self, batch: Batch, salt: int, index: int) -> Batch:
        key = jax.random.fold_in(jax.random.fold_in(
            jax.random.key(self.seed), salt), index)
        key = jax.random.fold_in(key, jax.process_index())
        inputs, targets, weights = jax.device_get(_masked(
            key, jnp.asarray(batch["inputs"]), jnp.asarray(batch["segment_ids"]),
            self.mask_rate, self.resolved_mask_id, self.vocab_size))
        return {**batch, "inputs": np.asarray(inputs, np.asarray(batch["inputs"]).dtype),
                "targets": np.asarray(targets, np.asarray(batch["targets"]).dtype),
                "weights": np.asarray(weights, np.asarray(batch["weights"]).dtype)}


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _masked(key: jax.Array, inputs: jax.Array, segment_ids: jax.Array, mask_rate: float,
            mask_id: int, vocab_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`mask_tokens` of `inputs [B, S] int32` (one compile per setting)."""
    return mask_tokens(key, inputs, segment_ids, mask_rate=mask_rate, mask_id=mask_id,
                       vocab_size=vocab_size)


def objective_hooks(objective: str, *, seed: int, data: Any,
                    vocab_size: Callable[[], int]) -> tuple[StepHook, ...]:
    """The step hooks of `train.objective` (none for 'next_token'): `data` is the run's
    `DataConfig`, `vocab_size()` the model's vocabulary. Refuses `MaskedLM.*` bindings
    that would not take effect."""
    check_one_of("train.objective", objective, OBJECTIVES)
    if objective == "masked_lm":
        return (MaskedLM(seed=seed, vocab_size=vocab_size(), pad_id=pad_id(data)),)
    bound = _bound("MaskedLM")
    if bound:
        raise ValueError(f"MaskedLM.{sorted(bound)[0]} is bound but train.objective = "
                         f"{objective!r}: bind train.objective = 'masked_lm' or unbind it")
    return ()


def check_setup(objective: str, hooks: Any) -> None:
    """Refuses a hand-built `TrainSetup` whose hooks lack its objective's hook."""
    if objective == "masked_lm" and not any(h.name == MASKED_LM_HOOK for h in hooks):
        raise ValueError("train.objective = 'masked_lm' needs the MaskedLM step hook among "
                         "the setup's hooks (TrainSetup.from_gin adds it)")


def pad_id(data: Any) -> int:
    """The padding id of `data`'s (a `DataConfig`) tokenizer (0 for a SeqIO source)."""
    from experiments.data.tokenizers import make_tokenizer  # pylint: disable=g-import-not-at-top

    if data._is_seqio():  # pylint: disable=protected-access
        return 0
    return int(make_tokenizer(data.tokenizer).pad_id)


def _bound(name: str) -> dict[str, Any]:
    try:
        return dict(gin.get_bindings(name))
    except (ValueError, KeyError):
        return {}
