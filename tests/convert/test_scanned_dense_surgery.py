"""Dense-checkpoint surgery on a scanned run (issue 19: "works on scanned and unscanned
checkpoints"): scripts/scale_up.py and scripts/dense_to_moe.py --method=tomoe read the
stacked layers through the unscanned view and write the result in the run's scanned
layout.

The run: test_tiny.gin with every FFN dense and `TransformerLM.scan_layers = True`
(d_model 32, d_ff 64, 2 layers stacked as one scanned unit), 2 steps. Both conversions
use their function-preserving settings, so `--verify` must find the source's logits
(a layer mixed up while unstacking or restacking would not), and the written
checkpoint must restore scanned with `scan_layers = True` kept in its config.
"""

from __future__ import annotations

import pytest

from experiments.inference.restore import restore_model
from experiments.runtime import gin_utils
from layers import scan as scan_lib
from tests.helpers import script_main, shared_training_run

PARAMS = ("TransformerLM.moe_every = 0", "TransformerLM.scan_layers = True",
          "train.num_steps = 2", "Checkpointer.save_every = 2", "train.eval_every = 2",
          "Checkpointer.async_save = False")


@pytest.fixture(scope="module")
def scanned_dense(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "scanned_dense",
                               "--gin_file=gin_configs/experiments/test_tiny.gin", "--quiet",
                               *(f"--gin_param={p}" for p in PARAMS))[0]



def _assert_scanned(workdir):
    assert "TransformerLM.scan_layers = True" in (workdir / gin_utils.CONFIG_FILE).read_text()
    assert scan_lib.SCANNED in restore_model(workdir).params


@pytest.mark.parametrize("script,args,done", [
    ("scale_up.py", ("--d_ff=96", "--num_layers=3"), "OK"),
    ("dense_to_moe.py", ("--method=tomoe", "--num_experts=4", "--active_fraction=1",
                         "--steps=1", "--data_batches=1", "--tokens_per_step=32"), "OK"),
])
def test_scanned_dense_run_converts_exactly_and_stays_scanned(scanned_dense, tmp_path,
                                                              clean_gin, capsys, script, args,
                                                              done):
    _assert_scanned(scanned_dense)
    out = tmp_path / "out"
    assert script_main(script)([f"--workdir={scanned_dense}", f"--out_workdir={out}", *args,
                                "--verify", "--verify_batches=1"]) == 0
    assert done in capsys.readouterr().out
    _assert_scanned(out)
