"""Sharded training on 8 simulated CPU devices: rules, placement, expert parallelism.

The reference for every mesh is the same train step on one device. With SGD at
learning rate 1, `params - new_params` is exactly the gradient, so comparing
updated parameters compares gradients, expert weights included.
"""

import functools
import io
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from experiments.reporting import summary as summary_lib
from experiments.reporting.metrics import ProgressLine
from experiments.runtime import mesh as mesh_lib
from experiments.train.flops import flop_counter
from experiments.train.train_step import LossWeights, make_train_step
from experiments.train.trainer import split_model
from layers.moe_layer import MoeLayer
from layers.params import logical_axes_of
from layers.transformer import TransformerLM
from moe import sharding
from moe.dispatch import einsum_dispatch
from moe.dispatch import expert_parallel as ep_lib
from moe.experts import ExpertFFN
from moe.layer_aux import MoeAux
from tests.helpers import COMPILATION_CACHE, run_script

NUM_DOMAINS = 2
# Recompiling a step for its HLO (and reruns) hit the persistent cache.
jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
MESHES = [{"data": 8}, {"data": 2, "expert": 4}, {"data": 2, "fsdp": 2, "expert": 2},
          {"fsdp": 4, "tensor": 2}]


def _model(moe_kwargs=None):
    # E = 8 experts so that expert=4 holds 2 per device; 2 heads, mlp 32 for tensor=2.
    moe_block = functools.partial(MoeLayer, num_experts=8, k=2, d_ff=16, **(moe_kwargs or {}))
    return TransformerLM(vocab_size=48, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                         moe_every=2, moe_block=moe_block, dtype="float32",
                         rngs=nnx.Rngs(params=0))


def _batch(batch_size=8, seq=8, seed=0):
    # Two packed documents per row and two padding tokens at the end of each row.
    rng = np.random.default_rng(seed)
    segment_ids = np.repeat(np.array([[1, 1, 1, 2, 2, 2, 0, 0]], np.int32), batch_size, 0)
    positions = np.array([[0, 1, 2, 0, 1, 2, 0, 0]], np.int32).repeat(batch_size, 0)
    weights = (segment_ids > 0).astype(np.float32)
    return {"inputs": rng.integers(3, 48, (batch_size, seq)).astype(np.int32),
            "targets": rng.integers(3, 48, (batch_size, seq)).astype(np.int32),
            "weights": weights, "segment_ids": segment_ids, "positions": positions,
            "domain": np.where(weights > 0, np.arange(batch_size)[:, None] % NUM_DOMAINS,
                               -1).astype(np.int32)}


@functools.cache
def _built(moe_key=()):
    model = nnx.jit(lambda: _model(dict(moe_key)))()
    graphdef, params, rest = split_model(model)
    return graphdef, params, rest, logical_axes_of(model)


def _split(moe_key=(), sharder=None):
    """The model's parts, its dispatch chosen by `sharder` (as the trainer does)."""
    graphdef, params, rest, logical = _built(moe_key)
    if sharder is not None:
        model = nnx.merge(graphdef, params, rest)
        sharder.configure_dispatch(model)
        graphdef = split_model(model)[0]
    return graphdef, params, rest, logical


def _sharded_step(mesh_shape, moe_key=(), **sharding_kwargs):
    """One SGD(lr=1) step with 2 micro-batches on `mesh_shape` (None = 1 device);
    returns (loss, gradients as numpy, metrics, the Sharding, the wrapped step, args)."""
    sharder = mesh_lib.Sharding(mesh_shape, **sharding_kwargs)
    graphdef, params, rest, logical = _split(moe_key, sharder)
    tx = optax.sgd(1.0)
    placed = sharder.place_params(params, logical)
    opt_state = sharder.init_opt_state(tx, placed)
    step = sharder.wrap_train_step(make_train_step(
        graphdef, rest, tx, loss_weights=LossWeights(), num_microbatches=2,
        num_domains=NUM_DOMAINS))
    args = (placed, opt_state, _batch(), jax.random.PRNGKey(0))
    new_params, _, metrics = step(*args)
    grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, new_params)
    return float(metrics["loss"]), grads, jax.device_get(metrics), sharder, new_params


@pytest.fixture(scope="module")
def single_device():
    return _sharded_step(None)


@pytest.mark.parametrize("mesh_shape", MESHES,
                         ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
def test_step_matches_single_device(single_device, mesh_shape):
    # Buffer factor E/k: a device's slots per expert cover all its tokens, so the
    # padded dropless exchange cannot overflow and must equal the 1-device step.
    loss, grads, metrics, sharder, new_params = _sharded_step(mesh_shape, ep_buffer_factor=4.0)
    ref_loss, ref_grads, ref_metrics, _, _ = single_device
    assert sharder.mesh_shape == {**dict.fromkeys(sharding.MESH_AXES, 1), **mesh_shape}
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                              jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    # Expert gradients are not trivially zero (they are part of the comparison).
    assert np.abs(grads["layer_1"]["ffn"]["experts"]["wi"]).max() > 1e-4
    np.testing.assert_allclose(metrics["moe"]["layer_1"].counts,
                               ref_metrics["moe"]["layer_1"].counts)
    assert float(metrics["moe"]["layer_1"].dropped_fraction) == 0.0
    # Updated parameters keep the shardings the rules give them.
    expected = sharder.param_shardings(new_params, _split()[3])
    for leaf, sh in zip(jax.tree.leaves(new_params), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)


def test_capacity_dispatch_expert_parallel_matches_single_device():
    # capacity_factor = E / k gives every shard C >= its token count: nothing is dropped
    # on one device or per shard, so the [ep, E/ep, C, d] exchange must match exactly.
    moe_key = (("capacity_factor", 4.0),)
    ref_loss, ref_grads, _, _, _ = _sharded_step(None, moe_key)
    loss, grads, metrics, _, _ = _sharded_step({"data": 2, "expert": 4}, moe_key)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)
    assert float(metrics["moe"]["layer_1"].dropped_fraction) == 0.0


def _exchange_all_to_alls(hlo: str) -> list[str]:
    """all-to-all ops moving `[ep=1 block, E/ep=2, C, d=16]` expert buffers."""
    return [line for line in hlo.splitlines()
            if " all-to-all(" in line and re.search(r"f32\[1,2,\d+,16\]", line)]


def test_expert_parallel_step_compiles_to_all_to_all():
    # The same step with expert parallelism on and off on {data: 2, expert: 4}: only the
    # expert-parallel one exchanges [E/ep, C, d] token buffers with all-to-all.
    tx = optax.sgd(1.0)

    def hlo(enabled):
        sharder = mesh_lib.Sharding({"data": 2, "expert": 4}, expert_parallel=enabled)
        graphdef, params, rest, logical = _split((), sharder)
        placed = sharder.place_params(params, logical)
        step = sharder.wrap_train_step(make_train_step(
            graphdef, rest, tx, loss_weights=LossWeights(), num_microbatches=2,
            num_domains=NUM_DOMAINS))
        return step.lower(placed, sharder.init_opt_state(tx, placed), _batch(),
                          jax.random.PRNGKey(0)).compile().as_text()

    assert _exchange_all_to_alls(hlo(True))
    assert not _exchange_all_to_alls(hlo(False))


def test_expert_parallel_is_chosen_by_the_sharding_config_logged_and_counted(caplog):
    # {data: 2, expert: 4}: the batch is split 8 ways (batch rule: data, fsdp, expert).
    # 64 tokens per micro-batch -> 8 per shard; the default padded buffers hold the worst
    # case, 8 slots for each of the 8 experts on each of the 8 shards = 512 expert rows,
    # where the single-device sort dispatch computes T * k = 128. The opt-in buffer factor
    # 2.0 bounds them to ceil(2.0 * k * 8 / E) = 4 slots (256 rows), and the line says so.
    model = nnx.eval_shape(lambda: _model())
    plain = flop_counter(model, batch_size=8, seq_len=8)
    assert model.layer_1.ffn.dispatch == "sort" and plain.static_rows == {"layer_1": 128}
    sharder = mesh_lib.Sharding({"data": 2, "expert": 4})
    with caplog.at_level(logging.INFO, logger=mesh_lib.__name__):
        line = sharder.configure_dispatch(model, tokens_per_call=64)
    assert line.startswith("dispatch: expert_parallel over mesh axes ('expert',) (ep=4), "
                           "capacity per shard 8, dropless mode 'padded' (worst-case buffers: "
                           "exact, nothing dropped)")
    assert line in caplog.text
    assert model.layer_1.ffn.dispatch == "expert_parallel"
    assert flop_counter(model, batch_size=8, seq_len=8).static_rows == {"layer_1": 512}
    bounded = nnx.eval_shape(lambda: _model())
    line = mesh_lib.Sharding({"data": 2, "expert": 4}, ep_buffer_factor=2.0).configure_dispatch(
        bounded, tokens_per_call=64)
    assert "capacity per shard 4" in line and "BOUNDED" in line and "DROPPED" in line
    assert flop_counter(bounded, batch_size=8, seq_len=8).static_rows == {"layer_1": 256}
    # Turned off in the config, the layers keep their dispatch and the log says why.
    off = nnx.eval_shape(lambda: _model())
    line = mesh_lib.Sharding({"data": 2, "expert": 4},
                             expert_parallel=False).configure_dispatch(off)
    assert off.layer_1.ffn.dispatch == "sort" and "expert parallelism off" in line


def test_every_parameter_sharded_by_its_logical_axes():
    _, params, _, logical = _split()
    sharder = mesh_lib.Sharding({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
    placed = sharder.place_params(params, logical)
    rules = dict(sharder.rules)
    seen = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(placed):
        key = tuple(k.key for k in path)
        axes = logical[key]
        spec = leaf.sharding.spec
        used = set()
        for dim, name in enumerate(axes):
            expected = tuple(a for a in rules[name] if a not in used)
            used.update(expected)
            assert sharding.spec_axes(spec[dim] if dim < len(spec) else None) == expected, key
            ways = int(np.prod([sharder.mesh.shape[a] for a in expected]))
            assert leaf.addressable_shards[0].data.shape[dim] == leaf.shape[dim] // ways
        seen.add(axes)
    # The rules, spelled out for the weights that matter.
    experts = placed["layer_1"]["ffn"]["experts"]
    assert experts["wi"].sharding.spec == P("expert", "fsdp", "tensor")
    assert experts["wo"].sharding.spec == P("expert", "tensor", "fsdp")
    attention = placed["layer_0"]["attention"]
    assert attention["query"].sharding.spec == P("fsdp", "tensor", None)
    assert placed["layer_0"]["ffn"]["wi"].sharding.spec == P("fsdp", "tensor")
    assert placed["embedding"].sharding.spec == P(None, "fsdp")
    assert ("expert", "embed", "mlp") in seen and ("embed", "heads", "kv") in seen


def test_optimizer_state_follows_parameter_shardings():
    _, params, _, logical = _split()
    sharder = mesh_lib.Sharding({"data": 2, "expert": 4})
    placed = sharder.place_params(params, logical)
    opt_state = sharder.init_opt_state(optax.adam(1e-3), placed)
    mu = opt_state[0].mu
    assert mu["layer_1"]["ffn"]["experts"]["wi"].sharding.spec == P("expert", "fsdp", "tensor")
    assert opt_state[0].count.sharding.is_fully_replicated


@pytest.mark.parametrize("mode", ["padded", "ragged_emulated"])
def test_expert_parallel_dispatch_values_and_grads(mode):
    # 64 tokens, top-2 of 8 experts, against the einsum reference; 4-way expert
    # parallelism times 2-way tensor parallelism on the expert hidden dimension.
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    x = jax.random.normal(keys[0], (64, 8))
    first = jax.random.randint(keys[1], (64,), 0, 8)
    expert_index = jnp.stack([first, (first + 1 + jax.random.randint(keys[2], (64,), 0, 7)) % 8],
                             axis=1)
    weights = jax.random.uniform(keys[3], (64, 2))
    wi, wo = jax.random.normal(keys[4], (8, 8, 16)) * 0.3, jax.random.normal(keys[0], (8, 16, 8))

    def loss(dispatch, wi, wo, x):
        out = dispatch(x, expert_index, weights, ExpertFFN(wi, wo, None, "relu"), capacity=None)
        return jnp.sum(out.y ** 2)

    ref = jax.value_and_grad(functools.partial(loss, einsum_dispatch), argnums=(0, 1, 2))(wi, wo, x)
    sharder = mesh_lib.Sharding({"expert": 4, "tensor": 2}, ep_dropless=mode, ep_buffer_factor=4.0)
    with sharder.context():
        got = jax.jit(jax.value_and_grad(functools.partial(loss, ep_lib.expert_parallel_dispatch),
                                         argnums=(0, 1, 2)))(wi, wo, x)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(got[1], ref[1]):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-5)


def test_padded_overflow_is_counted_not_silent():
    # All 16 tokens pick expert 0 first and expert 1 second; buffer factor 1 gives each
    # of the 2 token shards ceil(1 * 2 * 8 / 4) = 4 slots per expert, so of its 8
    # first choices 4 overflow (and 4 of the 8 second choices): half the assignments.
    x = jnp.ones((16, 4))
    expert_index = jnp.stack([jnp.zeros(16, jnp.int32), jnp.ones(16, jnp.int32)], axis=1)
    ffn = ExpertFFN(jnp.ones((4, 4, 4)), jnp.ones((4, 4, 4)), None, "relu")
    sharder = mesh_lib.Sharding({"expert": 2}, devices=jax.devices()[:2], ep_buffer_factor=1.0)
    with sharder.context():
        out = jax.jit(lambda x: ep_lib.expert_parallel_dispatch(
            x, expert_index, jnp.full((16, 2), 0.5), ffn, capacity=None))(x)
    keep = np.asarray(out.keep)
    assert keep.sum() == 16 and keep[:4].all() and not keep[4:8].any()
    # Kept: 0.5 * 16 from each expert (relu(1·4 ones) = 4, times 4 ones = 16); tokens 4-7
    # overflowed both choices and get nothing.
    y = np.asarray(out.y)
    np.testing.assert_allclose(y[:4], np.full((4, 4), 16.0))
    np.testing.assert_allclose(y[4:8], 0.0)


def _skewed_layer():
    """A dropless top-2 layer whose router sends every (positive) token to experts 0 and 1."""
    layer = MoeLayer(8, 16, num_experts=8, k=2, rngs=nnx.Rngs(0))
    layer.router.kernel[...] = jnp.zeros((8, 8)).at[:, 0].set(1.0).at[:, 1].set(0.5)
    x = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8))) + 0.1
    return layer, x


def _expert_parallel_forward(layer, x, sharder):
    layer.use_expert_parallel(sharder.ep_options, sharder.batch_shards)
    graphdef, state = nnx.split(layer)
    with sharder.context():
        return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def test_dropless_stays_dropless_under_expert_parallelism_with_skewed_routing():
    # All 64 tokens pick experts 0 and 1, so each of the 8 token shards sends its 8 tokens
    # to one expert rank: the default buffers (the worst case) hold them all, and the
    # output equals the 1-device dropless layer.
    layer, x = _skewed_layer()
    y_ref, aux_ref = layer(x)
    assert float(aux_ref.dropped_fraction) == 0.0
    np.testing.assert_array_equal(aux_ref.counts, [64, 64, 0, 0, 0, 0, 0, 0])
    y, aux = _expert_parallel_forward(layer, x, mesh_lib.Sharding({"data": 2, "expert": 4}))
    assert float(aux.dropped_fraction) == 0.0
    np.testing.assert_array_equal(aux.kept_counts, aux_ref.kept_counts)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)


def test_bounded_buffer_is_an_opt_in_and_its_drops_are_reported():
    # Sharding.ep_buffer_factor = 2.0: ceil(2 * 2 * 8 / 8) = 4 slots per (shard, expert)
    # for 8 tokens each: half of every assignment overflows, and dropped_fraction says so.
    layer, x = _skewed_layer()
    sharder = mesh_lib.Sharding({"data": 2, "expert": 4}, ep_buffer_factor=2.0)
    _, aux = _expert_parallel_forward(layer, x, sharder)
    assert float(aux.dropped_fraction) == 0.5


def test_progress_line_and_summary_state_the_drop_rate():
    stream = io.StringIO()
    progress = ProgressLine(10, stream=stream)
    progress.update(5, 1.0, 1000.0, dropped=0.0)
    progress.update(10, 1.0, 1000.0, dropped=0.0617)
    first, second = stream.getvalue().splitlines()
    assert "dropped" not in first and second.endswith("dropped 0.0617")
    dropped = summary_lib.DroppedMean()
    for value in (0.1, 0.2):
        dropped.add({"layer_1": MoeAux(dropped_fraction=jnp.float32(value))})
    moe = summary_lib.moe_summary({"layer_1": np.ones(4)}, {"layer_1": 0.25},
                                  train_dropped=dropped.means())
    assert moe["layer_1"]["train_dropped_fraction"] == pytest.approx(0.15)
    text = summary_lib.render({"step": 10, "domains": [], "moe": moe, "paths": {}})
    assert "dropped train 0.1500 valid 0.2500" in text


def test_training_with_the_bounded_buffer_states_the_drop_rate(tmp_path):
    # The opt-in end to end: 8 devices {data: 2, expert: 4}, the tiny dropless config
    # with a bounded buffer (1.0 x the balanced load) that overflows. The start-up
    # dispatch line says drops happen, the progress line and the summary give the rate.
    result = run_script(
        "scripts/train.py", "--gin_file=gin_configs/experiments/test_tiny.gin",
        "--gin_param=MESH_SHAPE = {'data': 2, 'expert': 4}",
        "--gin_param=Sharding.ep_buffer_factor = 1.0", "--gin_param=train.num_microbatches = 1",
        "--gin_param=train.num_steps = 4", "--gin_param=train.log_every = 2",
        "--gin_param=train.eval_every = 4", "--gin_param=DataConfig.eval_max_batches = 1",
        f"--workdir={tmp_path}", num_devices=8, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert ("(BOUNDED buffer, Sharding.ep_buffer_factor=1.0: assignments that overflow it are "
            "DROPPED; the drop rate is on the progress line and in the summary)") in output
    assert re.search(r"step 4/4 loss \S+ .* dropped 0\.\d*[1-9]", output)
    layer = json.loads((tmp_path / "summary.json").read_text())["moe"]["layer_1"]
    assert layer["train_dropped_fraction"] > 0 and layer["dropped_fraction"] > 0
    assert re.search(r"layer_1: .* dropped train 0\.\d+ valid 0\.\d+", output)


def test_ragged_is_refused_on_cpu_and_options_validated():
    sharder = mesh_lib.Sharding({"expert": 8}, ep_dropless="ragged")
    ffn = ExpertFFN(jnp.ones((8, 4, 4)), jnp.ones((8, 4, 4)), None, "relu")
    with sharder.context(), pytest.raises(ValueError, match="not implemented on CPU"):
        jax.jit(lambda x: ep_lib.expert_parallel_dispatch(
            x, jnp.zeros((16, 1), jnp.int32), jnp.ones((16, 1)), ffn, capacity=None))(
                jnp.ones((16, 4)))
    with pytest.raises(ValueError, match="dropless must be one of"):
        ep_lib.ExpertParallelOptions(dropless="bogus")
    with pytest.raises(ValueError, match="buffer_factor"):
        ep_lib.ExpertParallelOptions(buffer_factor=0)
    # Through the gin-configured class the message names its own parameters.
    with pytest.raises(ValueError, match="Sharding.ep_buffer_factor must be > 0"):
        mesh_lib.Sharding({"data": 1}, devices=jax.devices()[:1], ep_buffer_factor=0.0)
    with pytest.raises(ValueError, match="Sharding.ep_dropless must be one of"):
        mesh_lib.Sharding({"data": 1}, devices=jax.devices()[:1], ep_dropless="bogus")


def test_ragged_exports_for_gpu_and_tpu():
    # ragged_all_to_all cannot run here, but the path must lower for the platforms
    # that have it: export the jitted dispatch for cuda and tpu on an abstract mesh.
    mesh = jax.sharding.AbstractMesh((1, 1, 4, 1), sharding.MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 4)
    ffn = ExpertFFN(jnp.ones((8, 4, 4)), jnp.ones((8, 4, 4)), None, "relu")

    def dispatch(x, expert_index, weights):
        with sharding.use_rules(sharding.DEFAULT_RULES), \
                ep_lib.use_options(ep_lib.ExpertParallelOptions(dropless="ragged")):
            return ep_lib.expert_parallel_dispatch(x, expert_index, weights, ffn,
                                                  capacity=None)

    args = (jax.ShapeDtypeStruct((16, 4), jnp.float32), jax.ShapeDtypeStruct((16, 2), jnp.int32),
            jax.ShapeDtypeStruct((16, 2), jnp.float32))
    with jax.sharding.use_abstract_mesh(mesh):
        exported = jax.export.export(
            jax.jit(dispatch), platforms=("cuda", "tpu"),
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")],
        )(*args)
    assert "ragged_all_to_all" in exported.mlir_module()


def test_mesh_shape_resolution_and_errors():
    assert mesh_lib.resolve_mesh_shape({"data": 2, "expert": -1}, 8) == (2, 1, 4, 1)
    assert mesh_lib.resolve_mesh_shape(None, 1) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="unknown axes"):
        mesh_lib.resolve_mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        mesh_lib.resolve_mesh_shape({"data": 4}, 8)
    with pytest.raises(ValueError, match="at most one"):
        mesh_lib.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="mesh axis 'model'"):
        sharding.normalize_rules([("batch", "model")])
    with pytest.raises(ValueError, match="not divisible"):
        sharding.logical_to_spec(("embed",), sharding.normalize_rules(sharding.DEFAULT_RULES),
                                 shape=(6,), mesh_shape={"fsdp": 4}, name="w")
    mesh = mesh_lib.make_mesh({"data": 2, "expert": -1})
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 4
