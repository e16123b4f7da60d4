"""Expert pruning / merging evaluated in memory: many surgeries of one source, no workdirs.

`SurgeryEvaluator(workdir, eval_batches)` restores a trained MoE once; `.run(operation,
config, task)` applies the same per-layer plans and transforms as
`experiments.convert.expert_surgery.run_surgery` (statistics from the same saved pass,
the same layer seeds) to the parameters and selection biases in memory and returns the
validation loss per domain on `eval_batches` validation batches (evenly spaced, dropless,
as `expert_surgery.evaluate_workdir` reads them), without writing a checkpoint. One
compiled evaluation step per new expert count E' is reused across surgeries (and across
sources of one config, with `steps=`), so a grid of surgeries costs one restore and a few
compilations (the pruning experiment,
scripts/pruning_sweep.py, evaluates its 72 surgeries per source this way; a surgery that
is fine-tuned afterwards is written by `prune_experts` / `merge_experts` as usual).

Unscanned runs without a mesh only (refused otherwise: use the workdir path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp

from experiments.convert import expert_surgery as ex
from experiments.data.config import DataConfig
from experiments.inference import restore
from experiments.train import evaluation
from experiments.train.run_state import build_model, split_model
from layers import scan as scan_lib
from moe.router_state import SELECTION_BIAS, RouterState


class SurgeryEvaluator:
    """One restored source; surgeries of it evaluated in memory (see the module docstring)."""

    def __init__(self, workdir: str | Path, eval_batches: int,
                 steps: dict[int, Callable] | None = None):
        """steps: compiled eval steps by E', shared between evaluators of sources with the
        same model config (e.g. seeds of one run; the caller vouches for that)."""
        self.source = restore.restore_model(workdir)
        if scan_lib.SCANNED in self.source.params or self.source.sharding is not None:
            raise ValueError(f"{workdir}: in-memory surgery needs an unscanned run without a "
                             "mesh; use scripts/prune_experts.py --eval_batches")
        model = self.source.model()
        self.names = tuple(model.moe_layer_names)
        self.num_experts = model.moe_layer(self.names[0]).num_experts
        self.k = model.moe_layer(self.names[0]).k
        data = dataclasses.replace(DataConfig(), eval_max_batches=eval_batches)
        self.domains = data.domains()
        self.batches = data.eval_batches()
        self._steps = {} if steps is None else steps

    def _eval_step(self, new_e: int) -> Callable:
        """The jitted eval step of the source's model with E' experts per MoE layer."""
        if new_e not in self._steps:
            restore.parse_run_config(self.source.workdir)  # the source's config, E' on top
            gin.bind_parameter("MoeLayer.num_experts", new_e)
            try:
                model = build_model(restore.model_cls(), self.source.vocab_size, seed=0)
            finally:
                gin.bind_parameter("MoeLayer.num_experts", self.num_experts)
            restore.make_dropless(model)
            graphdef, _, rest = split_model(model)
            self._steps[new_e] = jax.jit(evaluation.make_eval_step(graphdef, rest,
                                                                   len(self.domains)))
        return self._steps[new_e]

    def plans(self, operation: str, config: ex.SurgeryConfig, task: ex.TaskSpec,
              ) -> tuple[dict[str, Any], dict[str, Callable]]:
        """Per MoE layer: the plan (kept experts or groups) and the transform, exactly as
        `run_surgery` chooses them."""
        stats, _ = ex.task_stats(self.source, task)
        n = config.kept(self.num_experts)
        plans, transforms = {}, {}
        for i, name in enumerate(self.names):
            plans[name] = (ex.prune_plan(stats[name], n, config, config.seed + i)
                           if operation == "prune" else ex.merge_plan(stats[name], n, config))
            transforms[name] = ex._layer_transform(  # pylint: disable=protected-access
                operation, plans[name], stats[name], config)
        return plans, transforms

    def run(self, operation: str, config: ex.SurgeryConfig, task: ex.TaskSpec,
            ) -> dict[str, Any]:
        """`{"loss": the task domain's loss (all domains' without one), "domain_loss",
        "layers": per-layer plans, "new_num_experts"}` of the surgery."""
        if config.router_merge == "alias" and operation == "merge":
            raise ValueError("in-memory surgery: router_merge='alias' is not supported")
        new_e = config.kept(self.num_experts)
        if new_e < self.k:
            raise ValueError(f"keep={new_e} < k={self.k}: in-memory surgery does not clip k")
        plans, transforms = self.plans(operation, config, task)
        params = jax.device_get(self.source.params)
        new_params = ex._apply(params, transforms)  # pylint: disable=protected-access
        layers = {}
        for name, state in self.source.router_state.layers.items():
            bias = transforms[name](params[name]["ffn"], state[SELECTION_BIAS])[1]
            layers[name] = {SELECTION_BIAS: jnp.asarray(bias)}
        result = evaluation.evaluate(self._eval_step(new_e), new_params, self.batches,
                                     self.domains, RouterState(layers=layers))
        loss = result.loss if task.domain is None else result.domain_loss[task.domain]
        return {"loss": loss, "domain_loss": result.domain_loss, "new_num_experts": new_e,
                "layers": plans}
