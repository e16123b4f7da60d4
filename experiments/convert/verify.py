"""Dense vs upcycled MoE on sample batches: max |Δlogit| over real tokens, losses."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.train.train_step import token_cross_entropy

# Relative to the logits' scale (max |dense logit|, at least 1): fp32 rounding of the
# weighted expert sum grows with the logits, so a trained model's exact conversion
# differs by ~1e-5 in absolute terms (the default config after 800 steps: 1.1e-5).
EXACT_TOLERANCE = 1e-5


@dataclasses.dataclass
class VerifyReport:
    """Dense vs upcycled MoE on sample batches (real tokens only)."""

    max_abs_logit_diff: float
    dense_loss: float
    moe_loss: float
    expected_exact: bool
    violated: list[str]
    max_dropped_fraction: float
    num_tokens: int
    tolerance: float = EXACT_TOLERANCE
    logit_scale: float = 1.0  # max |dense logit| over real tokens

    @property
    def bound(self) -> float:
        """The largest max |Δlogit| an exact case may show: tolerance x max(1, logit scale)."""
        return self.tolerance * max(1.0, self.logit_scale)

    @property
    def loss_diff(self) -> float:
        return self.moe_loss - self.dense_loss

    @property
    def ok(self) -> bool:
        """False only when the case should be exact and is not."""
        return not self.expected_exact or self.max_abs_logit_diff <= self.bound

    def render(self) -> str:
        lines = [f"verify: {self.num_tokens} tokens; max |dlogit| = {self.max_abs_logit_diff:.3e}; "
                 f"loss dense {self.dense_loss:.6f}, MoE {self.moe_loss:.6f} "
                 f"(diff {self.loss_diff:+.3e}); max dropped fraction "
                 f"{self.max_dropped_fraction:.3f}"]
        if self.expected_exact:
            verdict = "OK" if self.ok else "FAILED"
            lines.append(f"expected exact (<= {self.tolerance:g} x max |logit| "
                         f"{max(1.0, self.logit_scale):.3g} = {self.bound:.2e} in fp32): {verdict}")
        else:
            lines.append("not expected to be exact; violated conditions:")
            lines.extend(f"  - {reason}" for reason in self.violated)
        return "\n".join(lines)


def _forward(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    logits, aux = model(batch["inputs"], segment_ids=batch["segment_ids"],
                        positions=batch["positions"], deterministic=True)
    dropped = [a.dropped_fraction for a in aux.values()]
    return logits, jnp.max(jnp.stack(dropped)) if dropped else jnp.zeros(())


def verify_models(dense_graphdef, dense_params, moe_graphdef, moe_params,
                  batches: Sequence[Mapping[str, np.ndarray]], *, violated: Sequence[str],
                  tolerance: float = EXACT_TOLERANCE) -> VerifyReport:
    """Runs both models on `batches`; max |Δlogit| over real tokens, losses."""
    if not batches:
        raise ValueError("verify needs at least one batch")
    dense_fn = jax.jit(lambda p, b: _forward(dense_graphdef, p, b)[0])
    moe_fn = jax.jit(lambda p, b: _forward(moe_graphdef, p, b))
    max_diff, dropped, tokens, scale = 0.0, 0.0, 0, 0.0
    ce = {"dense": 0.0, "moe": 0.0}
    for batch in batches:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        real = batch["weights"] > 0
        dense_logits = dense_fn(dense_params, batch)
        moe_logits, drop = moe_fn(moe_params, batch)
        diff = jnp.where(real[..., None], jnp.abs(moe_logits - dense_logits), 0.0)
        max_diff = max(max_diff, float(jnp.max(diff)))
        scale = max(scale, float(jnp.max(jnp.where(real[..., None], jnp.abs(dense_logits), 0.0))))
        dropped = max(dropped, float(drop))
        tokens += int(jnp.sum(real))
        for name, logits in (("dense", dense_logits), ("moe", moe_logits)):
            ce[name] += float(jnp.sum(token_cross_entropy(logits, batch["targets"])
                                      * batch["weights"]))
    return VerifyReport(max_abs_logit_diff=max_diff, dense_loss=ce["dense"] / max(tokens, 1),
                        moe_loss=ce["moe"] / max(tokens, 1), expected_exact=not violated,
                        violated=list(violated), max_dropped_fraction=dropped,
                        num_tokens=tokens, tolerance=tolerance, logit_scale=scale)
