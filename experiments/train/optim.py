"""Optimizer: AdamW with linear warm-up, cosine decay and global-norm clipping."""

from __future__ import annotations

import logging
from typing import Any

import gin
import jax
import optax

from layers.scan import SCANNED

_log = logging.getLogger(__name__)

# Parameters whose path contains one of these names are never weight-decayed,
# whatever their rank (e.g. a stacked [E, d] expert bias).
_NO_DECAY_NAMES = ("bias", "norm", "scale")


@gin.configurable(denylist=["num_steps"])
def learning_rate_schedule(num_steps: int, *, peak_learning_rate: float = 3e-3,
                           warmup_steps: int = 100, end_ratio: float = 0.1) -> optax.Schedule:
    """Linear warm-up from 0 to `peak_learning_rate`, then cosine decay to
    `peak_learning_rate * end_ratio` at `num_steps` (warm-up longer than the
    run is cut to `num_steps`, with a warning)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not peak_learning_rate > 0:
        raise ValueError(f"peak_learning_rate must be > 0, got {peak_learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > num_steps:
        _log.warning("warmup_steps=%d > num_steps=%d: warming up over all %d steps",
                        warmup_steps, num_steps, num_steps)
        warmup_steps = num_steps
    if not 0.0 <= end_ratio <= 1.0:
        raise ValueError(f"end_ratio must be in [0, 1], got {end_ratio}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(num_steps, warmup_steps + 1), end_value=peak_learning_rate * end_ratio)


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return names


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: rank >= 2 and not a norm scale or bias.
    The rank of a scanned layer's parameter excludes its leading `layers` axis."""

    def is_decayed(path, leaf) -> bool:
        names = [n.lower() for n in _path_names(path)]
        if any(word in n for n in names for word in _NO_DECAY_NAMES):
            return False
        return getattr(leaf, "ndim", 0) - (names[:1] == [SCANNED]) >= 2

    return jax.tree_util.tree_map_with_path(is_decayed, params)


@gin.configurable(denylist=["schedule"])
def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay masked by `decay_mask`) after global-norm clipping."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask)
    if clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


# The trainer passes these itself; gin_utils.parse names the binding to write instead.
learning_rate_schedule.gin_set_by = {"num_steps": "train.num_steps"}
make_optimizer.gin_set_by = {"schedule": "learning_rate_schedule.*"}
