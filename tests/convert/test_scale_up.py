"""Scale-up then scale-out, end to end on the upcycling tests' tiny dense run
(test_tiny.gin, every FFN dense: d_model 32, d_ff 64, 2 heads, 2 layers):
scripts/scale_up.py grows every dimension at once with the exact schemes (--verify
passes), scripts/upcycle.py upcycles the grown model unchanged (its --verify
passes too); bad input exits 2 and writes nothing."""

from __future__ import annotations

import json

import pytest

from experiments.convert.upcycle_checkpoint import UpcycleConfig, upcycle
from experiments.runtime import gin_utils
from tests.convert.test_upcycle_checkpoint import dense_run  # noqa: F401  (shared fixture)
from tests.helpers import script_main


def _main():
    return script_main("scale_up.py")


def test_scale_up_then_upcycle(dense_run, tmp_path, clean_gin, capsys):  # noqa: F811
    big, moe = tmp_path / "big", tmp_path / "moe"
    assert _main()([f"--workdir={dense_run}", f"--out_workdir={big}", "--d_model=48",
                    "--d_ff=96", "--num_heads=3", "--num_layers=3", "--verify",
                    "--verify_batches=1"]) == 0
    out = capsys.readouterr().out
    assert "d_model 32->48, d_ff 64->96, heads 2->3, layers 2->3" in out and "OK" in out
    record = json.loads((big / "scale_up.json").read_text())
    assert record["function_preserving"] and record["verify"]["ok"]
    config = (big / gin_utils.CONFIG_FILE).read_text()
    assert "TransformerLM.head_dim = 16" in config and "TransformerLM.norm_eps" in config
    result = upcycle(big, moe, config=UpcycleConfig(moe_layers="every_other", num_experts=4,
                                                     k=2, granularity=1),
                     gin_params=["TopKRouter.normalize = True"], verify=True, verify_batches=1)
    assert result.verify.ok and result.verify.expected_exact
    assert result.moe_layers == ("layer_1",)
    # The upcycled run is no longer dense: scale-up comes before scale-out.
    assert _main()([f"--workdir={moe}", f"--out_workdir={tmp_path / 'x'}", "--d_ff=128"]) == 2
    assert "scale-up grows a dense model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,expected", [
    (("--d_ff=32",), "d_ff: the target 32 is smaller than the source 64"),
    (("--num_layers=2",), "nothing to grow"),
    (("--d_model=48", "--depth_scheme=magic"), "--depth_scheme"),
])
def test_bad_input_exits_2_and_writes_nothing(dense_run, tmp_path, clean_gin, capsys,  # noqa: F811
                                              args, expected):
    assert _main()([f"--workdir={dense_run}", f"--out_workdir={tmp_path / 'out'}", *args]) == 2
    assert expected in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
