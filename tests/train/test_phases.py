"""EvoMoE phase plan: phase boundaries, diversify, optimizer-state transfer, and a tiny
run that switches dense -> soft -> hard in one process and resumes across the boundaries."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.reporting.metrics import read_jsonl
from experiments.train import hooks, optim, phases
from experiments.train.phases import PhasePlan
from experiments.train.trainer import split_model
from layers.transformer import TransformerLM
from tests.helpers import run_script, shared_training_run

# --- the plan ----------------------------------------------------------------------------

PLAN = PhasePlan(dense_steps=4, soft_until=8, max_temperature=2.0, min_temperature=0.5,
                 temperature_decay_steps=2, temperature_schedule="linear")


def test_phase_boundaries():
    assert [PLAN.phase(s) for s in range(1, 11)] == ["dense"] * 4 + ["soft"] * 4 + ["hard"] * 2
    # The state after step s is dense iff s < dense_steps (diversify runs after step 4).
    assert [PLAN.structure_after(s) for s in (0, 3, 4, 9)] == \
        ["dense", "dense", "moe", "moe"]
    assert hooks.structure_after([], 7) == "model"


def test_temperature_starts_at_first_soft_step_and_hard_flag():
    # Linear from 2.0 at step 5 to 0.5 at step 7 (D = 2), held after.
    assert [PLAN.temperature(s) for s in (5, 6, 7, 9)] == pytest.approx([2.0, 1.25, 0.5, 0.5])
    assert PLAN.router_state(4, {}, None).empty
    soft, hard = PLAN.dts_state(8), PLAN.dts_state(9)
    assert not bool(soft.hard) and bool(hard.hard)
    assert PLAN.scalars(9, {}, {}) == {"phase": 2.0, "gate_temperature": 0.5}


@pytest.mark.parametrize("kwargs, match", [
    (dict(dense_steps=-1), "dense_steps must be >= 0"),
    (dict(dense_steps=5, soft_until=4), "soft_until must be >= dense_steps=5"),
    (dict(diversify="clone"), "diversify must be one of"),
    (dict(temperature_schedule="step"), "temperature_schedule must be one of"),
    (dict(min_temperature=3.0), "min_temperature <= max_temperature"),
])
def test_plan_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PhasePlan(**kwargs)


# --- diversify and the optimizer state ---------------------------------------------------

def _lm(structure):
    cls = PLAN.model_for(structure, TransformerLM)
    model = nnx.jit(lambda: cls(vocab_size=24, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                                moe_every=2, num_experts=4, k=1, expert_d_ff=48,
                                moe_kwargs={"gating": "dense_to_sparse"}, dtype="float32",
                                rngs=nnx.Rngs(params=0)))()
    return model, split_model(model)[1]


@pytest.fixture(scope="module")
def dense_and_moe():
    (dense_model, dense), (moe_model, moe) = _lm("dense"), _lm("moe")
    assert dense_model.moe_layer_names == () and moe_model.moe_layer_names == ("layer_1",)
    return dense, moe


def _diversify(dense_and_moe, **plan_kwargs):
    dense, moe = dense_and_moe
    plan = PhasePlan(dense_steps=1, soft_until=2, **plan_kwargs)
    return phases.diversify_params(dense, moe, ["layer_1"], plan, jax.random.PRNGKey(7))


def test_diversify_copies_shared_weights_and_keeps_fresh_router(dense_and_moe):
    dense, moe = dense_and_moe
    out = _diversify(dense_and_moe, diversify="copy")
    assert jax.tree.structure(out) == jax.tree.structure(moe)
    for path in (("embedding",), ("layer_0", "ffn", "wi"), ("layer_1", "attention", "query")):
        np.testing.assert_array_equal(_get(out, path), _get(dense, path))
    np.testing.assert_array_equal(out["layer_1"]["ffn"]["router"]["kernel"],
                                  moe["layer_1"]["ffn"]["router"]["kernel"])
    for name in ("wi", "wo"):  # copies: every expert is the dense FFN
        experts = out["layer_1"]["ffn"]["experts"][name]
        np.testing.assert_array_equal(experts, np.broadcast_to(dense["layer_1"]["ffn"][name],
                                                               experts.shape))


def test_diversify_mask_keeps_the_stated_fraction_and_experts_differ(dense_and_moe):
    # Keep ratio 0.7: each expert is base * Bernoulli(0.7) mask, ~30% zeros, masks differ.
    dense, _ = dense_and_moe
    out = _diversify(dense_and_moe, diversify="mask", diversify_ratio=0.7)
    base = np.asarray(dense["layer_1"]["ffn"]["wi"])  # [16, 48], no exact zeros
    experts = np.asarray(out["layer_1"]["ffn"]["experts"]["wi"])
    kept = experts != 0
    np.testing.assert_array_equal(experts, np.where(kept, base, 0))
    assert kept.mean() == pytest.approx(0.7, abs=0.03)
    for e in range(1, 4):
        assert 0.3 < np.mean(kept[0] != kept[e]) < 0.5  # independent masks: 2 * 0.7 * 0.3


def test_diversify_noise_and_drop_upcycling_make_distinct_experts(dense_and_moe):
    dense, _ = dense_and_moe
    base = np.asarray(dense["layer_1"]["ffn"]["wi"])
    noisy = np.asarray(_diversify(dense_and_moe, diversify="noise",
                                  diversify_noise_std=0.01)["layer_1"]["ffn"]["experts"]["wi"])
    assert np.std(noisy - base) == pytest.approx(0.01 * np.std(base), rel=0.1)  # relative std
    assert not np.allclose(noisy[0], noisy[1])
    dropped = _diversify(dense_and_moe, diversify="drop_upcycling", diversify_ratio=0.25)
    wi = np.asarray(dropped["layer_1"]["ffn"]["experts"]["wi"])
    changed_units = np.any(wi != base, axis=1)  # [E, f]: re-initialised hidden units
    assert np.all(changed_units.sum(1) == 12)  # round(0.25 * 48)
    assert not np.array_equal(changed_units[0], changed_units[1])


def test_transfer_opt_state_fresh_or_copied_moments(dense_and_moe):
    dense, _ = dense_and_moe
    tx = optim.make_optimizer(optim.learning_rate_schedule(10, warmup_steps=2))
    state = tx.init(dense)
    grads = jax.tree.map(jnp.ones_like, dense)
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update(grads, state, dense)
    new = _diversify(dense_and_moe, diversify="copy")
    for copy in (False, True):
        out = phases.transfer_opt_state(state, new, tx, ["layer_1"], copy_moments=copy)
        assert jax.tree.structure(out) == jax.tree.structure(tx.init(new))
        adam = _adam_state(out)
        assert int(adam.count) == 3  # step count (and the LR schedule position) carried over
        np.testing.assert_array_equal(adam.mu["layer_1"]["attention"]["query"],
                                      _adam_state(state).mu["layer_1"]["attention"]["query"])
        assert np.all(np.asarray(adam.nu["layer_1"]["ffn"]["router"]["kernel"]) == 0)
        experts_mu = np.asarray(adam.mu["layer_1"]["ffn"]["experts"]["wi"])
        dense_mu = np.asarray(_adam_state(state).mu["layer_1"]["ffn"]["wi"])
        if copy:
            np.testing.assert_array_equal(experts_mu, np.broadcast_to(dense_mu, experts_mu.shape))
        else:
            assert np.all(experts_mu == 0)
        # The carried state drives a normal update on the new tree.
        updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, new), out, new)
        assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_soft_phase_needs_a_dense_to_sparse_model():
    model = nnx.eval_shape(lambda: TransformerLM(vocab_size=8, d_model=8, num_layers=2,
                                                 num_heads=2, d_ff=8, num_experts=2, k=1,
                                                 rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="MoeLayer.router = @DenseToSparseRouter"):
        phases.check_moe_model(PLAN, model)
    phases.check_moe_model(PhasePlan(dense_steps=3, soft_until=3), model)  # no soft phase


def test_switch_with_scanned_layers_equals_unscanned():
    """EvoMoE's switch on 4 layers: the dense structure scans as one unit of 1 (R = 4),
    the MoE one ([dense, MoE] x 2) as one unit of 2 (R = 2). Diversified parameters and
    transferred optimizer state equal the unscanned switch's, in the MoE layout."""
    from layers import scan as scan_lib

    def lm(structure, scan):
        cls = PLAN.model_for(structure, TransformerLM)
        return split_model(nnx.jit(lambda: cls(
            vocab_size=24, d_model=16, num_layers=4, num_heads=2, d_ff=32, moe_every=2,
            num_experts=4, k=1, expert_d_ff=48, moe_kwargs={"gating": "dense_to_sparse"},
            dtype="float32", scan_layers=scan, rngs=nnx.Rngs(params=0)))())[1]

    plan = PhasePlan(dense_steps=1, soft_until=2, diversify="noise")
    tx = optim.make_optimizer(optim.learning_rate_schedule(10, warmup_steps=2))
    outs = {}
    for scan in (False, True):
        dense, moe = lm("dense", scan), lm("moe", scan)
        assert ("scanned" in dense) is scan and ("scanned" in moe) is scan
        state = tx.init(dense)
        _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, dense), state, dense)
        new = phases.diversify_params(dense, moe, ["layer_1", "layer_3"], plan,
                                      jax.random.PRNGKey(7))
        assert jax.tree.structure(new) == jax.tree.structure(moe)
        opt = phases.transfer_opt_state(state, new, tx, ["layer_1", "layer_3"], copy_moments=True)
        assert jax.tree.structure(opt) == jax.tree.structure(tx.init(new))
        outs[scan] = (scan_lib.unscan_tree(new), scan_lib.to_layer_plan(
            opt, scan_lib.LayerPlan(4)))
    jax.tree.map(np.testing.assert_array_equal, outs[True], outs[False])


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _adam_state(opt_state):
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
                if isinstance(s, optax.ScaleByAdamState))


# --- one run through every phase, and resumes across the boundaries ----------------------

TINY = "--gin_file=gin_configs/experiments/test_tiny.gin"
EVOMOE_PARAMS = [
    "--gin_param=TransformerLM.k = 1",
    "--gin_param=TransformerLM.moe_kwargs = {'capacity_factor': None, "
    "'eval_capacity_factor': 2.0, 'gating': 'dense_to_sparse'}",
    "--gin_param=train.phase_plan = @PhasePlan()",
    "--gin_param=PhasePlan.dense_steps = 4",
    "--gin_param=PhasePlan.soft_until = 8",
    "--gin_param=PhasePlan.diversify_ratio = 0.7",
    "--gin_param=PhasePlan.max_temperature = 2.0",
    "--gin_param=PhasePlan.min_temperature = 0.3",
    "--gin_param=PhasePlan.temperature_decay_steps = 3",
    "--gin_param=train.num_steps = 11",
    "--gin_param=Checkpointer.save_every = 3",
    "--gin_param=train.eval_every = 11",
    "--gin_param=Checkpointer.async_save = False",
]


@pytest.fixture(scope="module")
def evomoe_run(tmp_path_factory):
    workdir, _ = shared_training_run(tmp_path_factory, "evomoe_tiny", TINY, *EVOMOE_PARAMS,
                                     "--quiet")
    return workdir


def test_run_switches_phases_without_restart(evomoe_run):
    train = read_jsonl(evomoe_run / "metrics.jsonl", "train")
    assert [r["phase"] for r in train] == [0.0] * 4 + [1.0] * 4 + [2.0] * 3
    assert "gate_temperature" not in train[3] and train[4]["gate_temperature"] == 2.0
    assert "active_experts" not in train[0]  # the dense model has no MoE layer
    assert train[4]["active_experts"] > 2.0  # tau = 2: most of the 4 experts
    assert all(r["active_experts"] == 1.0 for r in train[8:])  # hard: top-1
    # Soft steps with many experts per token cost more than the dense and hard steps.
    assert train[4]["flops"] > train[8]["flops"] > train[0]["flops"]
    summary = json.loads((evomoe_run / "summary.json").read_text())
    assert set(summary["moe"]) == {"layer_1"}  # evaluated as the MoE model
    assert (evomoe_run / "checkpoints" / "9").is_dir()


@pytest.mark.parametrize("resume_from", [3, 6])  # dense phase, soft phase
def test_resume_across_phase_boundaries_reproduces_losses(evomoe_run, tmp_path, resume_from):
    workdir = tmp_path / "run"
    shutil.copytree(evomoe_run, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        if int(step_dir.name) > resume_from:
            shutil.rmtree(step_dir)
    result = run_script("scripts/train.py", TINY, *EVOMOE_PARAMS, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    # The console announces the phases the resumed run enters, before their first step.
    announced = [line for line in result.stderr.splitlines() if "EvoMoE" in line]
    assert [line.split(":")[0] for line in announced] == \
        [f"step {s}" for s in (5, 9) if s > resume_from]
    if resume_from < 4:
        assert "diversified the dense model" in announced[0]
    assert f"resuming from checkpoint at step {resume_from}" in result.stderr
    # TensorBoard holds each step once, though steps after `resume_from` ran twice.
    from tbparse import SummaryReader
    scalars = SummaryReader(str(workdir / "tensorboard")).scalars
    assert sorted(scalars[scalars["tag"] == "train/loss"]["step"]) == list(range(1, 12))
    full = read_jsonl(evomoe_run / "metrics.jsonl", "train")
    resumed = read_jsonl(workdir / "metrics.jsonl", "train")
    assert [r["step"] for r in resumed] == list(range(1, 12))
    for a, b in zip(full, resumed):
        for key in ("loss", "phase", "active_experts", "flops"):
            assert (key in a) == (key in b), (a["step"], key)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
