"""ToMoE end to end (scripts/dense_to_moe.py, experiments.convert.tomoe) on the tiny dense
run of the upcycling tests (test_tiny.gin with every FFN dense: 2 layers, d_ff 64)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from experiments.convert import tomoe as tomoe_lib
from experiments.inference.restore import restore_model
from experiments.runtime import gin_utils
from tests.convert.test_upcycle_checkpoint import dense_run  # noqa: F401  (shared fixture)
from tests.helpers import run_script, script_main

FAST = ("--steps=3", "--data_batches=1", "--tokens_per_step=64", "--verify_batches=1")



def _main():
    return script_main("dense_to_moe.py")


def test_active_fraction_one_reproduces_the_dense_logits(dense_run, tmp_path, clean_gin,  # noqa: F811
                                                          capsys):
    """E=4, every group active with weight 1: the MoE is the dense model (--verify exact);
    the groups of each layer are a permutation of the 64 hidden units; the output is an
    ordinary MoE workdir (MaskRouter, dropless) that restores, and is no longer dense."""
    out = tmp_path / "tomoe"
    main = _main()
    assert main(["--method=tomoe", f"--workdir={dense_run}", f"--out_workdir={out}",
                 "--num_experts=4", "--active_fraction=1", "--verify", *FAST]) == 0
    text = capsys.readouterr().out
    assert "E=4 experts of 16, k=4" in text and "OK" in text
    record = json.loads((out / "tomoe.json").read_text())
    assert record["verify"]["ok"] and record["verify"]["max_abs_logit_diff"] < 1e-4
    for layer in ("layer_0", "layer_1"):
        groups = record["layers"][layer]["groups"]
        assert len(groups) == 4 and sorted(i for g in groups for i in g) == list(range(64))
    config = (out / gin_utils.CONFIG_FILE).read_text()
    assert "MoeLayer.router = @MaskRouter" in config and "TransformerLM.moe_every = 1" in config
    restored = restore_model(out)
    assert restored.model().moe_layer_names == ("layer_0", "layer_1")
    again = main(["--method=tomoe", f"--workdir={out}", f"--out_workdir={tmp_path / 'x'}",
                  "--num_experts=4", "--k=2", *FAST])
    assert again == 2 and "is not dense" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_half_active_converts_and_trains(dense_run, tmp_path, clean_gin, capsys):  # noqa: F811
    """k=2 of 4: not exact (verify says so, exit 0, and reports the static magnitude-pruning
    baseline), and the workdir resumes training with scripts/train.py."""
    out = tmp_path / "half"
    assert _main()(["--method=tomoe", f"--workdir={dense_run}", f"--out_workdir={out}",
                    "--num_experts=4", "--active_fraction=0.5", "--verify", *FAST]) == 0
    text = capsys.readouterr().out
    assert "k=2" in text and "not expected to be exact" in text
    assert "static structural pruning (the same active units by magnitude)" in text
    trained = run_script("scripts/train.py", f"--workdir={out}", "--quiet",
                         "--gin_param=train.num_steps = 7")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (out / "checkpoints" / "7").is_dir()


@pytest.mark.parametrize("args,expected", [
    (("--num_experts=4", "--active_fraction=0.3"), "must be a whole number"),
    (("--num_experts=3", "--k=1"), "num_experts=3 must divide the dense d_ff=64"),
    (("--num_experts=4", "--k=1", "--active_fraction=0.5"), "k=1 disagrees"),
    (("--num_experts=4",), "give k or active_fraction"),
    (("--num_experts=4", "--k=5"), "k must be in [1, num_experts=4]"),
])
def test_bad_input_exits_2_and_writes_nothing(dense_run, tmp_path, clean_gin, capsys,  # noqa: F811
                                              args, expected):
    code = _main()(["--method=tomoe", f"--workdir={dense_run}",
                    f"--out_workdir={tmp_path / 'out'}", *args, *FAST])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_unknown_method_is_refused(dense_run, tmp_path, capsys):  # noqa: F811
    assert _main()(["--method=magic", f"--workdir={dense_run}",
                    f"--out_workdir={tmp_path / 'out'}", "--num_experts=4", "--k=2"]) == 2
    assert "--method" in capsys.readouterr().err


@pytest.mark.parametrize("weight_lr", [0.0, 1e-2])
def test_expert_weights_are_frozen_unless_a_weight_learning_rate_is_given(weight_lr):
    """learn_router on 32 hand-made tokens (d 4, E 2 experts of 3 units, k 1), 3 steps:
    the router always trains; the experts come back bit-identical with
    weight_learning_rate=0 (the default) and changed with a positive rate."""
    rng = np.random.default_rng(0)
    experts = {"wi": rng.normal(size=(2, 4, 3)).astype(np.float32),
               "wo": rng.normal(size=(2, 3, 4)).astype(np.float32)}
    data = {"x": rng.normal(size=(32, 4)).astype(np.float32),
            "y": rng.normal(size=(32, 4)).astype(np.float32)}
    config = tomoe_lib.ToMoEConfig(num_experts=2, k=1, steps=3, tokens_per_step=16,
                                   weight_learning_rate=weight_lr)
    kernel, tuned, _ = tomoe_lib.learn_router(experts, "relu", data, config, jax.random.key(0))
    init = 0.02 * jax.random.normal(jax.random.split(jax.random.key(0))[0], (4, 2))
    assert kernel.shape == (4, 2) and not np.allclose(kernel, np.asarray(init))
    same = [np.array_equal(tuned[w], experts[w]) for w in experts]
    assert same == ([True, True] if weight_lr == 0 else [False, False])
