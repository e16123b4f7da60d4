"""tree_digest: host and device paths agree for every sharding, and it notices changes."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.runtime import checksums
from experiments.runtime.checkpoints import Checkpointer, legacy_crc32
from experiments.runtime.checksums import tree_digest

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.int32, np.uint32, np.int8, np.bool_]


def _array(dtype, shape, seed=0):
    values = np.random.default_rng(seed).normal(size=shape) * 100
    if dtype == np.bool_:
        return values > 0
    return values.astype(dtype)


def _mesh():
    return jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("spec", [P(), P("a"), P(None, "b"), P("a", "b"), P("b", "a")],
                         ids=str)
def test_device_sums_equal_host_sums_for_any_sharding(dtype, spec):
    host = _array(dtype, (8, 12))
    sharded = jax.device_put(host, NamedSharding(_mesh(), spec))
    s1, s2 = checksums._sums_device(sharded)
    assert (int(s1), int(s2)) == checksums._sums_np(host)


def test_device_sums_of_scalars_odd_shapes_and_64_bit_words():
    for host in (np.float32(3.5), np.arange(7 * 3 * 5, dtype=np.int32).reshape(7, 3, 5),
                 np.zeros((0, 4), np.float32)):
        s1, s2 = checksums._sums_device(jnp.asarray(host))
        assert (int(s1), int(s2)) == checksums._sums_np(host)
    with jax.enable_x64(True):
        host = np.array([[1, -2], [2**40 + 3, 7]], np.int64)
        s1, s2 = checksums._sums_device(jnp.asarray(host))
        assert (int(s1), int(s2)) == checksums._sums_np(host)


def test_digest_is_the_same_for_host_numpy_and_sharded_leaves():
    tree = {"w": _array(np.float32, (8, 4)), "b": _array(ml_dtypes.bfloat16, (4,), seed=1)}
    sharded = {"w": jax.device_put(tree["w"], NamedSharding(_mesh(), P("a", "b"))),
               "b": jnp.asarray(tree["b"])}
    assert tree_digest(tree) == tree_digest(sharded)


def test_digest_notices_one_bit_a_swap_a_reshape_and_a_dtype():
    base = _array(np.float32, (6, 4))
    digest = tree_digest({"w": base})
    flipped = base.copy()
    flipped.view(np.uint32)[2, 3] ^= 1  # lowest mantissa bit of one element
    swapped = base.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    changed = [{"w": flipped}, {"w": swapped}, {"w": base.reshape(4, 6)},
               {"w": base.view(np.int32)}, {"v": base, "w": base}]
    digests = [tree_digest(tree) for tree in changed]
    assert digest not in digests and len(set(digests)) == len(digests)
    assert tree_digest({"w": base.copy()}) == digest


def test_format_1_checkpoints_still_verify(tmp_path):
    # A checkpoint written before digests (format 1, `<item>_crc32`) restores; a
    # damaged one is still caught by its CRC32.
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    opt_state = {"m": jnp.zeros(3)}
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
    for step in (1, 2):
        ck.save(step, params=params, opt_state=opt_state, data_state={},
                rng_key_data=np.zeros(2, np.uint32))
    ck.close()
    for step, damage in ((1, 0), (2, 1)):
        path = tmp_path / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(path.read_text())
        for item, tree in (("params", params), ("opt_state", opt_state)):
            meta[f"{item}_crc32"] = legacy_crc32(tree) ^ damage
            del meta[f"{item}_digest"]
        meta["format_version"] = 1
        path.write_text(json.dumps(meta))
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    abstract = jax.eval_shape(lambda: (params, opt_state))
    with pytest.warns(RuntimeWarning, match="step 2.*params checksum mismatch"):
        restored = ck.restore_latest(*abstract)
    assert restored.step == 1
    np.testing.assert_array_equal(restored.params["w"], params["w"])
    ck.close()


def test_unknown_format_version_is_refused_not_quarantined(tmp_path):
    params, opt_state = {"w": jnp.ones(3)}, {"m": jnp.zeros(3)}
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1, async_save=False)
    ck.save(1, params=params, opt_state=opt_state, data_state={},
            rng_key_data=np.zeros(2, np.uint32))
    ck.close()
    path = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), format_version=99)))
    ck = Checkpointer(tmp_path / "checkpoints", save_every=1)
    with pytest.raises(ValueError, match="format_version 99; this code reads"):
        ck.restore_latest(*jax.eval_shape(lambda: (params, opt_state)))
    ck.close()
    assert (tmp_path / "checkpoints" / "1").is_dir()
