"""Checkpointer round trip, corruption fallback, and the workdir lock."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.runtime.checkpoints import Checkpointer, CheckpointMismatchError, is_damage
from experiments.runtime.checksums import tree_digest
from experiments.runtime.workdir_lock import WorkdirLock, WorkdirLockedError


def _state(scale=1.0):
    params = {"dense": {"kernel": jnp.full((3, 4), scale)}, "norm": {"scale": jnp.ones(4)}}
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    return params, opt_state


def _save(ck, step, scale):
    params, opt_state = _state(scale)
    ck.save(step, params=params, opt_state=opt_state, data_state={"pos": step},
            rng_key_data=np.asarray(jax.random.PRNGKey(7)))


def _abstract():
    params, opt_state = _state()
    return jax.eval_shape(lambda: params), jax.eval_shape(lambda: opt_state)


def test_save_every_and_round_trip(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", save_every=2, max_to_keep=2)
    for step in range(1, 7):
        _save(ck, step, float(step))
    ck.wait()
    assert ck.all_steps() == [4, 6]  # every 2nd step, 2 kept
    restored = ck.restore_latest(*_abstract())
    ck.close()
    assert restored.step == 6 and restored.data_state == {"pos": 6}
    np.testing.assert_array_equal(restored.params["dense"]["kernel"], 6.0)
    np.testing.assert_array_equal(restored.rng_key_data, np.asarray(jax.random.PRNGKey(7)))
    expected = _state(6.0)[1]
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(expected)


def test_empty_directory_restores_nothing(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints")
    assert ck.restore_latest(*_abstract()) is None
    ck.close()


def _corrupt_params(step_dir: Path, mode: str) -> None:
    files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
    assert files
    for path in files:
        if mode == "garbage":
            path.write_bytes(b"\x00garbage\xff" * 3)
        elif mode == "delete":
            path.unlink()


@pytest.mark.parametrize("mode", ["garbage", "delete"])
def test_corrupt_latest_falls_back_with_warning_naming_step(tmp_path, mode):
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    _save(ck, 1, 1.0)
    _save(ck, 2, 2.0)
    ck.close()
    _corrupt_params(tmp_path / "checkpoints" / "2", mode)
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    with pytest.warns(RuntimeWarning, match=r"step 2 .*falling back to step 1"):
        restored = ck.restore_latest(*_abstract())
    assert restored.step == 1
    np.testing.assert_array_equal(restored.params["dense"]["kernel"], 1.0)
    assert ck.all_steps() == [1]
    assert (tmp_path / "corrupt_checkpoints" / "2").is_dir()
    _save(ck, 2, 5.0)  # the step can be saved again after the fallback
    ck.close()


def test_checksum_catches_silently_changed_values(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    _save(ck, 1, 1.0)
    _save(ck, 2, 2.0)
    ck.wait()
    real = tree_digest
    # Simulate bit rot that orbax reads without error: the stored digest no longer matches.
    monkeypatch.setattr("experiments.runtime.checkpoints.tree_digest",
                        lambda tree: real(tree) ^ (1 if float(
                            np.asarray(jax.tree.leaves(tree)[0]).ravel()[0]) == 2.0 else 0))
    with pytest.warns(RuntimeWarning, match="step 2.*checksum mismatch"):
        restored = ck.restore_latest(*_abstract())
    assert restored.step == 1
    ck.close()


def test_unfinalised_checkpoint_is_ignored(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    _save(ck, 1, 1.0)
    ck.close()
    # A save killed mid-way leaves only orbax's temporary directory.
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123").mkdir()
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.restore_latest(*_abstract()).step == 1
    ck.close()


def test_read_only_reader_leaves_a_live_run_alone(tmp_path):
    # An analysis or upcycling reader opened while the trainer saves step 3 must not
    # delete that save's temporary directory, move a damaged step aside, or write.
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    _save(ck, 1, 1.0)
    _save(ck, 2, 2.0)
    ck.close()
    _corrupt_params(tmp_path / "checkpoints" / "2", "garbage")
    in_flight = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-123"
    in_flight.mkdir()
    reader = Checkpointer(tmp_path / "checkpoints", read_only=True)
    with pytest.warns(RuntimeWarning, match=r"step 2 .*falling back to step 1"):
        assert reader.restore_latest(*_abstract()).step == 1
    with pytest.raises(ValueError, match="read_only"):
        _save(reader, 4, 4.0)
    reader.close()
    assert in_flight.is_dir() and (tmp_path / "checkpoints" / "2").is_dir()
    assert not (tmp_path / "corrupt_checkpoints").exists()
    # The trainer's own (writable) Checkpointer cleans up and quarantines.
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    with pytest.warns(RuntimeWarning, match=r"step 2 "):
        assert ck.restore_latest(*_abstract()).step == 1
    ck.close()
    assert not in_flight.exists() and (tmp_path / "corrupt_checkpoints" / "2").is_dir()
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "nowhere", read_only=True)


def test_checkpointer_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)


def test_lock_refuses_second_holder_and_names_pid(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         ("import sys, time; from experiments.runtime.workdir_lock import WorkdirLock; "
         f"l = WorkdirLock({str(tmp_path)!r}); l.acquire(); print('locked', flush=True); "
         "time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLockedError, match=f"PID {holder.pid}"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock file (with its PID) is taken over.
    assert (tmp_path / "train.lock").read_text().strip() == str(holder.pid)
    with WorkdirLock(tmp_path):
        assert (tmp_path / "train.lock").read_text().strip() == str(os.getpid())
    assert (tmp_path / "train.lock").read_text() == ""


def test_hook_state_round_trip_and_legacy_balance_state(tmp_path):
    # Format 3 keeps each step hook's {key: array} state in meta, bit for bit and with
    # its dtype; a format-2 checkpoint (biases in meta.balance_state) restores them as
    # the state of the loss-free hook.
    import json

    from experiments.runtime.checkpoints import LOSS_FREE_HOOK

    params, opt_state = _state()
    hook_state = {"toy": {"count": np.int32(7).reshape(()), "hit": np.array([True, False])},
                  LOSS_FREE_HOOK: {"layer_1": np.float32([1 / 3, -2e-7, 0.1, 7.0])}}
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
    ck.save(1, params=params, opt_state=opt_state, data_state={}, rng_key_data=np.zeros(2),
            hook_state=hook_state)
    ck.save(2, params=params, opt_state=opt_state, data_state={}, rng_key_data=np.zeros(2),
            hook_state=hook_state)
    ck.close()
    meta_path = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    biases = hook_state[LOSS_FREE_HOOK]
    del meta["hook_state"], meta["hook_state_digest"]
    meta.update(format_version=2, balance_state={k: v.astype(np.float64).tolist()
                                                 for k, v in biases.items()},
                balance_state_digest=tree_digest(biases))
    meta_path.write_text(json.dumps(meta))

    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    new = ck.restore_step(1, *_abstract()).hook_state
    assert set(new) == {"toy", LOSS_FREE_HOOK}
    for hook, state in hook_state.items():
        for key, value in state.items():
            assert new[hook][key].dtype == value.dtype and new[hook][key].shape == value.shape
            np.testing.assert_array_equal(new[hook][key], value)
    old = ck.restore_step(2, *_abstract())
    assert set(old.hook_state) == {LOSS_FREE_HOOK}
    np.testing.assert_array_equal(old.balance_state["layer_1"].view(np.uint32),
                                  biases["layer_1"].view(np.uint32))
    ck.close()


def test_checkpointer_gin_settings_and_refusals(tmp_path):
    # The Checkpointer owns save_every / max_to_keep / async_save; the trainer sets
    # the directory, so binding it is refused; the old train.* names name the new ones.
    import gin

    from experiments.runtime import gin_utils
    from experiments.train.config import TrainConfig

    gin.clear_config()
    try:
        gin_utils.parse([], ["Checkpointer.save_every = 7"])
        ck = Checkpointer(tmp_path / "checkpoints")  # as the trainer builds it
        assert ck.save_every == 7
        ck.close()
        with pytest.raises(gin_utils.GinConfigError, match="directory"):
            gin_utils.parse([], ["Checkpointer.directory = '/tmp/elsewhere'"])
        for old, new in (("checkpoint_every", "Checkpointer.save_every"),
                         ("max_to_keep", "Checkpointer.max_to_keep"),
                         ("async_checkpoints", "Checkpointer.async_save")):
            gin.clear_config()
            with pytest.raises(gin_utils.GinConfigError,
                               match=f"train.{old} cannot be bound.*bind {new} instead"):
                gin_utils.parse([], [f"train.{old} = 5"])
            with pytest.raises(ValueError, match=f"train.{old} was removed: bind {new}"):
                TrainConfig(**{old: 5})
    finally:
        gin.clear_config()


def test_shape_change_is_refused_not_quarantined(tmp_path):
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    _save(ck, 1, 1.0)
    ck.close()
    params = dict(_state()[0], dense={"kernel": jnp.ones((3, 5))})  # another model size
    abstract = jax.eval_shape(lambda: (params, optax.adamw(1e-3).init(params)))
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    with pytest.raises(CheckpointMismatchError,
                       match=r"params/dense/kernel: checkpoint \(3, 4\) float32, config "
                             r"\(3, 5\) float32") as info:
        ck.restore_latest(*abstract)
    ck.close()
    assert info.value.step == 1
    assert (tmp_path / "checkpoints" / "1").is_dir()  # intact and in place
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_damage_classification():
    assert is_damage(FileNotFoundError("no such file"))
    assert is_damage(Exception("Encountered error while reading array index: (slice(0, 2))"))
    assert not is_damage(ValueError("Requested shape: (64, 64) is not compatible with the "
                                    "stored shape: (32, 64). Truncating/padding is disabled."))
    assert not is_damage(TypeError("unexpected keyword"))
    assert not is_damage(RuntimeError("something else"))


def test_quarantine_collision_keeps_both(tmp_path):
    """A/B/A: a step quarantined twice keeps both copies (`2`, then `2.1`)."""
    for scale in (2.0, 3.0):
        ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
        _save(ck, 1, 1.0)
        _save(ck, 2, scale)
        ck.close()
        _corrupt_params(tmp_path / "checkpoints" / "2", "garbage")
        (tmp_path / "checkpoints" / "2" / "marker").write_text(str(scale))
        ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
        with pytest.warns(RuntimeWarning, match="falling back to step 1"):
            assert ck.restore_latest(*_abstract()).step == 1
        ck.close()
    corrupt = tmp_path / "corrupt_checkpoints"
    assert sorted(p.name for p in corrupt.iterdir()) == ["2", "2.1"]
    assert (corrupt / "2" / "marker").read_text() == "2.0"
    assert (corrupt / "2.1" / "marker").read_text() == "3.0"
