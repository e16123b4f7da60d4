"""Expert pruning and merging of a tiny trained run (scripts/prune_experts.py,
scripts/merge_experts.py, experiments.convert.expert_surgery).

The run: test_tiny.gin (layer_1 is a top-2 MoE of 4 experts), renormalised
top-k weights, loss-free selection biases, 6 steps. The pruned workdir must
hold exactly the kept experts' weights, router columns and biases, in their
order, restore, resume training and generate; bad input must leave nothing behind.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.convert import expert_surgery as ex
from experiments.inference import routing_stats
from experiments.inference.restore import RestoredModel, restore_model
from experiments.runtime import gin_utils
from experiments.train.optim import make_optimizer
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM
from layers.widenet import widenet_lm
from moe.router_state import SELECTION_BIAS, RouterState
from tests.helpers import run_script, script_main, shared_training_run
from tests.train.test_conditional_compute import _check_generation as check_generation

TINY = "--gin_file=gin_configs/experiments/test_tiny.gin"
PARAMS = ("train.num_steps = 6", "Checkpointer.async_save = False",
          "LossFreeBalancing.enabled = True", "LossFreeBalancing.rate = 0.05",
          "TopKRouter.normalize = True")
TASK = ("--task_domain=code", "--task_split=validation", "--task_batches=2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "surgery_tiny", TINY, "--quiet",
                               *(f"--gin_param={p}" for p in PARAMS))[0]



def _source(run):
    restored = restore_model(run)
    ffn = jax.device_get(restored.params["layer_1"]["ffn"])
    return restored, ffn, np.asarray(restored.router_state.layers["layer_1"][SELECTION_BIAS])


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.tmp_")]


def test_cli_prune_uncurl_writes_a_consistent_workdir_that_trains(run, tmp_path, clean_gin):
    out = tmp_path / "pruned"
    result = run_script("scripts/prune_experts.py", f"--workdir={run}", f"--out_workdir={out}",
                        "--keep=2", "--method=uncurl", *TASK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"pruned step 6: E 4 -> 2; layer_1: kept \[\d, \d\]", result.stdout)
    record = json.loads((out / ex.SURGERY_FILE).read_text())
    keep = record["layers"]["layer_1"]["keep"]
    clusters = record["layers"]["layer_1"]["clusters"]
    assert len(keep) == 2 and sorted(i for c in clusters for i in c) == [0, 1, 2, 3]
    assert all(sum(i in c for i in keep) == 1 for c in clusters)  # one representative each
    config = (out / gin_utils.CONFIG_FILE).read_text()
    assert "MoeLayer.num_experts = 2" in config and "MoeLayer.k = 2" in config
    # The statistics were saved next to the source checkpoint and are reused.
    stats_file = Path(record["stats_file"])
    assert stats_file.parent == run / routing_stats.STATS_DIR and stats_file.is_file()

    source, ffn, bias = _source(run)
    pruned = restore_model(out)
    assert pruned.step == source.step == 6
    new = jax.device_get(pruned.params["layer_1"]["ffn"])
    np.testing.assert_array_equal(new["router"]["kernel"], ffn["router"]["kernel"][:, keep])
    for name in ("wi", "wo"):
        np.testing.assert_array_equal(new["experts"][name], ffn["experts"][name][keep])
    np.testing.assert_array_equal(
        np.asarray(pruned.router_state.layers["layer_1"][SELECTION_BIAS]), bias[keep])
    # Every other parameter is unchanged.
    np.testing.assert_array_equal(jax.device_get(pruned.params["layer_0"]["ffn"]["wi"]),
                                  jax.device_get(source.params["layer_0"]["ffn"]["wi"]))

    trained = run_script("scripts/train.py", f"--workdir={out}", "--quiet",
                         "--gin_param=train.num_steps = 8")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (out / "checkpoints" / "8").is_dir()
    # ... and generates: KV-cache greedy decoding = the full forward pass's argmax.
    check_generation(out)


def test_merge_with_explicit_groups_averages_by_task_frequency(run, tmp_path, clean_gin):
    """Groups {0, 1}, {2}, {3}: E 4 -> 3, the merged expert is the count-weighted mean of
    experts 0 and 1 (counts from the saved task statistics); moments reset."""
    config = ex.SurgeryConfig(groups=((0, 1), (2,), (3,)), method="frequency_weighted",
                              optimizer_state="reset")
    task = ex.TaskSpec(domain="code", split="validation", batches=2)
    result = ex.merge_experts(run, tmp_path / "merged", config, task)
    assert (result.num_experts, result.new_num_experts, result.new_k) == (4, 3, 2)
    stats, info = routing_stats.load_stats(run, task.stats_name(6))
    counts = stats["layer_1"].counts
    assert info["domain"] == "code" and counts.sum() > 0
    _, ffn, bias = _source(run)
    merged = restore_model(tmp_path / "merged")
    new = jax.device_get(merged.params["layer_1"]["ffn"])
    c = counts[:2] / counts[:2].sum()
    np.testing.assert_allclose(new["experts"]["wi"][0],
                               c[0] * ffn["experts"]["wi"][0] + c[1] * ffn["experts"]["wi"][1],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(new["experts"]["wo"][1:], ffn["experts"]["wo"][2:])
    np.testing.assert_allclose(np.asarray(merged.router_state.layers["layer_1"][SELECTION_BIAS]),
                               [c @ bias[:2], bias[2], bias[3]], rtol=1e-5, atol=1e-7)
    # optimizer_state='reset': fresh Adam moments (zero), though the source's are not.
    mu_new, mu_old = _adam_mu(tmp_path / "merged", merged), _adam_mu(run, _source(run)[0])
    assert max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(mu_new)) == 0
    assert np.abs(np.asarray(mu_old["layer_1"]["ffn"]["experts"]["wi"])).max() > 0


def test_saved_statistics_are_reused_not_recomputed(run, clean_gin, monkeypatch):
    """A second surgery of the same task and step reads the saved pass (items 2-3 of
    issue 19 share one pass): with the collector disabled it still gets the same sums."""
    restored = restore_model(run)
    task = ex.TaskSpec(domain="code", split="validation", batches=2)
    first, path = ex.task_stats(restored, task)
    assert path.is_file()

    def no_second_pass(*args, **kwargs):
        raise AssertionError("statistics recomputed")

    monkeypatch.setattr(routing_stats, "collect_stats", no_second_pass)
    second, again = ex.task_stats(restored, task)
    assert again == path
    np.testing.assert_array_equal(second["layer_1"].coselect, first["layer_1"].coselect)


def _adam_mu(workdir: Path, restored: RestoredModel):
    """The first moments of the Adam state saved in `workdir` at step 6."""
    tx = make_optimizer(optax.constant_schedule(0.0))
    full = ex._read_full(  # pylint: disable=protected-access
        workdir, 6, jax.eval_shape(lambda: restored.params), tx)
    return next(x for x in jax.tree.leaves(full.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(x, "mu")).mu


def test_keep_below_k_needs_clip_k_and_clips_with_a_warning(run, tmp_path, clean_gin, capsys,
                                                            caplog):
    main = script_main("prune_experts.py")
    out = tmp_path / "one"
    assert main([f"--workdir={run}", f"--out_workdir={out}", "--keep=1",
                 "--method=frequency", *TASK]) == 2
    assert "keep=1 < k=2" in capsys.readouterr().err and not _leftovers(tmp_path, "one")
    assert main([f"--workdir={run}", f"--out_workdir={out}", "--keep=1", "--clip_k",
                 "--method=frequency", *TASK]) == 0
    assert "k is clipped to 1" in caplog.text
    config = (out / gin_utils.CONFIG_FILE).read_text()
    assert "MoeLayer.num_experts = 1" in config and "MoeLayer.k = 1" in config


@pytest.mark.parametrize("args,expected", [
    (("--keep=4",), "keep=4: must be < the current number of experts E=4"),
    (("--keep_fraction=1.5",), "keep_fraction must be in (0, 1)"),
    (("--keep=2", "--keep_fraction=0.5"), "exactly one of keep and keep_fraction"),
    (("--keep=2", "--task_domain=poetry"), "task_domain must be one of"),
    (("--keep=2", "--method=magic"), "--method"),
])
def test_bad_input_exits_2_and_writes_nothing(run, tmp_path, clean_gin, capsys, args, expected):
    main = script_main("prune_experts.py")
    code = main([f"--workdir={run}", f"--out_workdir={tmp_path / 'out'}", *args])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not _leftovers(tmp_path, "out")


def test_an_existing_out_workdir_is_refused(run, tmp_path, clean_gin, capsys):
    (tmp_path / "out").mkdir()
    main = script_main("merge_experts.py")
    assert main([f"--workdir={run}", f"--out_workdir={tmp_path / 'out'}", "--keep=2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not any((tmp_path / "out").iterdir())


def test_cli_with_bad_input_in_a_subprocess(run, tmp_path):
    result = run_script("scripts/merge_experts.py", f"--workdir={run}",
                        f"--out_workdir={tmp_path / 'out'}", "--groups=0,1;2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: groups must partition")
    assert not _leftovers(tmp_path, "out")


def test_a_dense_checkpoint_is_refused():
    model = TransformerLM(vocab_size=11, d_model=8, num_layers=2, num_heads=2, d_ff=8,
                          moe_every=0, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    restored = RestoredModel(workdir=Path("dense"), step=0, vocab_size=11, graphdef=graphdef,
                             params=params.to_pure_dict(), rest=rest, router_state=RouterState())
    with pytest.raises(ex.NotMoeError, match="dense \\(no MoE layers\\)"):
        ex._sizes(restored, ex.SurgeryConfig(keep=2), "prune")  # pylint: disable=protected-access


@pytest.mark.parametrize("share_router", [True, False])
def test_a_widenet_checkpoint_with_shared_experts_is_refused(share_router):
    """WideNet stores the shared experts once (under layer_0): refused by name, before
    any statistics are collected, whether the router is shared too or not."""
    base = functools.partial(TransformerLM, d_model=8, num_layers=2, num_heads=2, d_ff=8,
                             moe_every=1, moe_block=functools.partial(MoeLayer, num_experts=4,
                                                                      k=2, d_ff=8))
    model = widenet_lm(11, rngs=nnx.Rngs(0), base=base, share_router=share_router)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    restored = RestoredModel(workdir=Path("widenet"), step=0, vocab_size=11, graphdef=graphdef,
                             params=params.to_pure_dict(), rest=rest, router_state=RouterState())
    with pytest.raises(ValueError, match=r"MoE layers \['layer_0', 'layer_1'\] share one set "
                                         r"of experts \(WideNet"):
        ex._sizes(restored, ex.SurgeryConfig(keep=2), "prune")  # pylint: disable=protected-access
