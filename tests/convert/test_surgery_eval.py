"""In-memory surgery (experiments.convert.surgery_eval) against the workdir path.

The tiny trained run of tests/convert/test_expert_surgery.py (shared: layer_1 a top-2 MoE of
4 experts, loss-free selection biases, renormalised top-k). Pruning (UNCURL, keep 3) and
merging (spectral groups, keep 3; one compiled step for both) in memory must choose the
same experts / groups as `prune_experts` / `merge_experts` and the pruned model's
validation loss must be the one `evaluate_workdir` reads from the written workdir: the
pruning experiment's numbers come from this path.
"""

from __future__ import annotations

import json

import gin
import numpy as np
import pytest

from experiments.convert import expert_surgery as ex
from experiments.convert.surgery_eval import SurgeryEvaluator
from tests.convert.test_expert_surgery import PARAMS, TINY
from tests.helpers import shared_training_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "surgery_tiny", TINY, "--quiet",
                               *(f"--gin_param={p}" for p in PARAMS))[0]


def test_in_memory_surgery_matches_the_written_workdir(run, tmp_path):
    gin.clear_config()
    task = ex.TaskSpec(domain="code", split="validation", batches=2)
    evaluator = SurgeryEvaluator(run, eval_batches=2)
    cases = [("prune", ex.prune_experts, ex.SurgeryConfig(keep=3, method="uncurl")),
             ("merge", ex.merge_experts, ex.SurgeryConfig(keep=3, method="frequency_weighted"))]
    fast = {}
    for operation, write, config in cases:
        fast[operation] = evaluator.run(operation, config, task)
        write(run, tmp_path / operation, config, task)
        record = json.loads((tmp_path / operation / ex.SURGERY_FILE).read_text())
        key = "keep" if operation == "prune" else "groups"
        plan = json.loads(json.dumps(fast[operation]["layers"]["layer_1"][key], default=int))
        assert plan == record["layers"]["layer_1"][key]
        assert fast[operation]["new_num_experts"] == 3
    # The loss (both domains) is the one the written pruned workdir evaluates to.
    slow = ex.evaluate_workdir(tmp_path / "prune", task, 2)
    np.testing.assert_allclose(fast["prune"]["loss"], slow["task_loss"], rtol=1e-6)
    np.testing.assert_allclose([fast["prune"]["domain_loss"][d] for d in ("code", "prose")],
                               [slow["domain_loss"][d] for d in ("code", "prose")], rtol=1e-6)
    with pytest.raises(ValueError, match="keep=1 < k=2"):
        evaluator.run("prune", ex.SurgeryConfig(keep=1, method="frequency"), task)
    gin.clear_config()
