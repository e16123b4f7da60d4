"""Expert surgery on a scanned run with shared experts and loss-free selection biases.

The run: test_tiny.gin with 4 layers scanned (`TransformerLM.scan_layers = True`: the
unit [dense, MoE] stacked twice, so layer_1 and layer_3 share one stacked MoE block),
one gated shared expert per MoE layer, loss-free biases, 3 steps. Pruning works on the
unscanned view and writes the scanned layout back: each MoE layer keeps exactly its own
chosen experts, router columns and biases; shared experts are copied unchanged; the full
state (optimizer moments included) restores in the run's scanned layout.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from experiments.convert import expert_surgery as ex
from experiments.inference.restore import restore_model
from experiments.runtime import gin_utils
from experiments.train.optim import make_optimizer
from layers import scan as scan_lib
from moe.router_state import SELECTION_BIAS
from tests.helpers import shared_training_run

PARAMS = ("train.num_steps = 3", "Checkpointer.save_every = 3", "train.eval_every = 3",
          "Checkpointer.async_save = False", "LossFreeBalancing.enabled = True",
          "LossFreeBalancing.rate = 0.05", "TopKRouter.normalize = True",
          "TransformerLM.num_layers = 4", "TransformerLM.scan_layers = True",
          "MoeLayer.num_shared_experts = 1", "MoeLayer.shared_gate = True")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "surgery_scanned",
                               "--gin_file=gin_configs/experiments/test_tiny.gin", "--quiet",
                               *(f"--gin_param={p}" for p in PARAMS))[0]



def test_prune_a_scanned_run_with_shared_experts(run, tmp_path, clean_gin):
    source = restore_model(run)
    assert scan_lib.SCANNED in source.params
    src = scan_lib.unscan_tree(jax.device_get(source.params))
    biases = {n: np.asarray(source.router_state.layers[n][SELECTION_BIAS])
              for n in ("layer_1", "layer_3")}
    task = ex.TaskSpec(domain="code", split="validation", batches=1)
    result = ex.prune_experts(run, tmp_path / "pruned", ex.SurgeryConfig(keep=3,
                              method="frequency"), task)
    assert (result.num_experts, result.new_num_experts) == (4, 3)
    config = (tmp_path / "pruned" / gin_utils.CONFIG_FILE).read_text()
    assert "TransformerLM.scan_layers = True" in config and "MoeLayer.num_experts = 3" in config

    pruned = restore_model(tmp_path / "pruned")
    assert scan_lib.SCANNED in pruned.params  # written in the run's own layout
    new = scan_lib.unscan_tree(jax.device_get(pruned.params))
    for name in ("layer_1", "layer_3"):
        keep = result.layers[name]["keep"]
        ffn, old = new[name]["ffn"], src[name]["ffn"]
        np.testing.assert_array_equal(ffn["experts"]["wi"], old["experts"]["wi"][keep])
        np.testing.assert_array_equal(ffn["router"]["kernel"], old["router"]["kernel"][:, keep])
        np.testing.assert_array_equal(ffn["shared"]["wi"], old["shared"]["wi"])
        np.testing.assert_array_equal(ffn["shared_gate"], old["shared_gate"])
        np.testing.assert_array_equal(
            np.asarray(pruned.router_state.layers[name][SELECTION_BIAS]), biases[name][keep])
    # The layers were pruned separately (each by its own statistics), not as one stack.
    assert set(result.layers) == {"layer_1", "layer_3"}
    # The whole state, moments included, restores in the scanned layout the trainer uses.
    tx = make_optimizer(optax.constant_schedule(0.0))
    full = ex._read_full(tmp_path / "pruned", 3,  # pylint: disable=protected-access
                         jax.eval_shape(lambda: pruned.params), tx)
    # optimizer_state='carry' (the default): the kept experts' Adam moments, in order.
    source_full = ex._read_full(run, 3,  # pylint: disable=protected-access
                                jax.eval_shape(lambda: source.params), tx)
    mu, old_mu = (scan_lib.unscan_tree(_adam(f.opt_state).mu) for f in (full, source_full))
    keep = result.layers["layer_3"]["keep"]
    assert np.shape(mu["layer_3"]["ffn"]["experts"]["wo"])[0] == 3
    np.testing.assert_array_equal(mu["layer_3"]["ffn"]["experts"]["wo"],
                                  np.asarray(old_mu["layer_3"]["ffn"]["experts"]["wo"])[keep])
    np.testing.assert_array_equal(mu["layer_3"]["ffn"]["router"]["kernel"],
                                  np.asarray(old_mu["layer_3"]["ffn"]["router"]["kernel"])[:, keep])
    assert np.abs(np.asarray(mu["layer_3"]["ffn"]["experts"]["wo"])).max() > 0


def _adam(opt_state):
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(x, "mu"))
