"""Auxiliary-loss-free balancing in the trainer: the per-layer selection biases.

The biases `{moe layer: [E] float32}` live outside the trainable parameters:
the trainer holds them as a plain dict, passes them to the step as
`model_kwargs["selection_biases"]` (selection only, no gradient, no weight
decay, no optimizer state), updates them once per optimizer step from the
step's counts (`metrics["moe"][layer]["counts"]`: every micro-batch, and under
`jit` over a mesh every device) and saves them in the checkpoint's `meta`
(float32 values survive JSON exactly). See docs/balancing.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from experiments.reporting import analysis
from moe import bias_balancing

Biases = dict[str, np.ndarray]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossFreeBalancing:
    """Gin configuration of the bias update (`moe.bias_balancing.BiasUpdate`).

    Attributes:
      enabled: turn auxiliary-loss-free balancing on.
      rule: 'sign' (DeepSeek), 'proportional' or 'dual_subgradient'.
      rate: u per optimizer step (1e-3 in the papers; ~1e-2 for runs of a few
        hundred steps).
      schedule: 'constant', 'inverse' or 'inverse_sqrt'.
      decay_steps: tau of the decaying schedules.
      freeze_fraction: updates stop from this fraction of `train.num_steps` on.
      recenter: keep sum_i b_i = 0.
    """

    enabled: bool = False
    rule: str = "sign"
    rate: float = 1e-3
    schedule: str = "constant"
    decay_steps: float = 100.0
    freeze_fraction: float = 1.0
    recenter: bool = False

    def __post_init__(self):
        try:
            _ = self.update_config
        except ValueError as e:
            raise ValueError(f"LossFreeBalancing: {e}") from None

    @property
    def update_config(self) -> bias_balancing.BiasUpdate:
        return bias_balancing.BiasUpdate(
            rule=self.rule, rate=self.rate, schedule=self.schedule,
            decay_steps=self.decay_steps, freeze_fraction=self.freeze_fraction,
            recenter=self.recenter)

    def init(self, experts_per_layer: Mapping[str, int]) -> Biases:
        """Zero biases for every MoE layer."""
        return {layer: np.zeros((e,), np.float32) for layer, e in experts_per_layer.items()}

    def update(self, biases: Biases, moe_stats: Mapping[str, Mapping[str, Any]], step: int,
               num_steps: int) -> Biases:
        """Biases after optimizer step `step` (1-based), from that step's counts."""
        config = self.update_config
        return {layer: np.asarray(_update(
            jnp.asarray(bias), jnp.asarray(moe_stats[layer]["counts"], jnp.float32),
            config.rate_at(step - 1, num_steps), jnp.asarray(moe_stats[layer]["num_tokens"]),
            rule=config.rule, recenter=config.recenter))
            for layer, bias in biases.items()}


@functools.partial(jax.jit, static_argnames=("rule", "recenter"))
def _update(bias, counts, rate, num_tokens, *, rule, recenter):
    return bias_balancing.update_bias(bias, counts, rate, rule=rule, recenter=recenter,
                                      num_tokens=num_tokens)


def experts_per_layer(params: Mapping[str, Any], moe_layers: list[str]) -> dict[str, int]:
    """`{layer: E}` read from the routers' kernels `[d_model, E]` of `TransformerLM` params."""
    return {layer: int(params[layer]["ffn"]["router"]["kernel"].shape[-1])
            for layer in moe_layers}


def to_json(biases: Biases) -> dict[str, list[float]]:
    """float32 -> Python floats (float64): exact, and exact again on the way back."""
    return {layer: np.asarray(b, np.float32).astype(np.float64).tolist()
            for layer, b in biases.items()}


def from_json(data: Mapping[str, list[float]]) -> Biases:
    return {layer: np.asarray(values, np.float32) for layer, values in data.items()}


def balance_scalars(moe_stats: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Train scalars: MaxVio of the step's global counts and per sequence, mean over layers."""
    out = {}
    for name in ("batch_max_violation", "sequence_max_violation"):
        values = [float(s[name]) for s in moe_stats.values() if name in s]
        if values:
            out[name] = float(np.mean(values))
    return out


def valid_balance_scalars(expert_counts: Mapping[str, Any]) -> dict[str, float]:
    """Validation scalars: MaxVio over the whole validation pass, per layer and mean."""
    out = {}
    for layer, counts in expert_counts.items():
        out[f"{layer}/max_violation"] = analysis.max_violation(counts)
    if out:
        out["max_violation"] = float(np.mean(list(out.values())))
    return out
