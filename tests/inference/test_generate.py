"""Generation with the KV cache (`experiments.inference.generate`).

Most tests use the tiny randomly perturbed MoE of tests/layers/test_kv_cache.py
(layer_1 top-2 of 4, selection biases that change the routing) wrapped as a
`RestoredModel` in memory; the reference is always the training forward
(`TransformerLM.__call__` on the whole sequence, no cache), with its argmax
fed back. The end-to-end tests restore the tiny trained run of
tests/inference/test_score.py (capacity factor 0.5, loss-free biases) and run
it under an 8-device mesh with expert parallelism.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.inference import generate as generate_lib
from experiments.inference import restore as restore_lib
from experiments.inference import score as score_lib
from experiments.inference.sampling import SamplingConfig, filter_logits, sample
from tests.helpers import shared_training_run
from tests.inference.test_score import PARAMS, TINY
from tests.layers.test_kv_cache import V, _biases, _model

PROMPTS = [[3], [5, 6, 7, 8], [9, 1, 2, 4, 11, 12, 13]]  # ragged: 1, 4 and 7 tokens


@pytest.fixture(scope="module")
def moe():
    model = _model()
    return model, _biases(model)


@pytest.fixture(scope="module")
def generator(moe):
    model, router_state = moe
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return generate_lib.Generator(restore_lib.RestoredModel(
        workdir=Path("."), step=0, vocab_size=V, graphdef=graphdef, params=params.to_pure_dict(),
        rest=rest, router_state=router_state))


def _greedy_by_full_forward(forward, prompt: list[int], n: int, width: int = 16) -> list[int]:
    """n tokens, each the argmax of the full forward's logits at the last token so far.

    The sequence is right-padded to `width` so that one compiled forward serves
    every length: causal attention and per-token (dropless top-k) routing make
    the logits at a position independent of the tokens after it.
    """
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(forward(jnp.asarray(padded)))[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_ragged_batch_is_the_full_forwards_argmax_fed_back(moe, generator):
    model, router_state = moe
    forward = nnx.jit(lambda m, ids: m(ids, router_state=router_state)[0])
    got = generator.generate(PROMPTS, max_new_tokens=6)
    stats = generator.last_stats
    assert (stats.batch_bucket, stats.prompt_bucket, stats.length_bucket) == (4, 8, 16)
    assert stats.decode_steps == 5 and stats.new_tokens == 18 and stats.prompt_tokens == 12
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == _greedy_by_full_forward(lambda ids: forward(model, ids), prompt, 6)
    # Each prompt alone (batch bucket 1, no pad rows) gives the same tokens.
    assert [generator.generate([p], max_new_tokens=6)[0] for p in PROMPTS] == got


def test_eos_stops_its_row_and_the_others_continue(generator):
    free = generator.generate(PROMPTS, max_new_tokens=6)
    eos = free[1][1]  # row 1's second token
    got = generator.generate(PROMPTS, max_new_tokens=6, eos_ids=[eos])
    for row, tokens in zip(free, got):
        want = row[: row.index(eos) + 1] if eos in row else row
        assert tokens == want
    assert got[1] == free[1][:2] and max(map(len, got)) == 6
    # When every row is done, the loop stops: first token an EOS -> no decode step.
    first = free[0][0]
    assert generator.generate([PROMPTS[0]], max_new_tokens=6, eos_ids=[first]) == [[first]]
    assert generator.last_stats.decode_steps == 0


def test_programs_are_compiled_once_per_bucket(generator):
    generator.generate([[1, 2]], max_new_tokens=3)
    programs = dict(generator._programs)  # pylint: disable=protected-access
    generator.generate([[4, 5, 6, 7, 8]], max_new_tokens=7)  # same buckets (1, 8, 16)
    assert generator._programs == programs  # pylint: disable=protected-access
    assert generator.last_stats.compile_seconds == 0
    assert ("decode", (1, 0, 16)) in generator.last_stats.compiled_buckets
    assert generate_lib.buckets(3, 9, 20) == (4, 16, 64)
    assert generate_lib.buckets(3, 2, 1, batch_shards=8) == (8, 8, 16)


def test_sampling_is_seeded_and_degenerates_to_greedy(generator):
    greedy = generator.generate(PROMPTS, max_new_tokens=6)
    hot = SamplingConfig(temperature=3.0)
    first = generator.generate(PROMPTS, max_new_tokens=6, sampling=hot, seed=1)
    assert generator.generate(PROMPTS, max_new_tokens=6, sampling=hot, seed=1) == first
    assert generator.generate(PROMPTS, max_new_tokens=6, sampling=hot, seed=2) != first
    assert first != greedy
    # A row's draws depend on the seed and its row, not on the batch bucket (4 vs 1).
    assert generator.generate(PROMPTS[:1], max_new_tokens=6, sampling=hot, seed=1) == first[:1]
    for config in (SamplingConfig(temperature=3.0, top_k=1),
                   SamplingConfig(temperature=3.0, top_p=1e-6)):
        assert generator.generate(PROMPTS, max_new_tokens=6, sampling=config, seed=1) == greedy


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.15, 0.25]]))
    inf = -np.inf
    top2 = np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0, top_k=2)))
    np.testing.assert_array_equal(np.isinf(top2), [[True, False, True, False]])
    # Nucleus 0.7: 0.5 (before: 0) and 0.25 (before: 0.5 < 0.7) kept, 0.15 (before 0.75) not.
    nucleus = np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0, top_p=0.7)))
    np.testing.assert_array_equal(nucleus == inf, [[True, False, True, False]])
    draws = {int(sample(logits, k, SamplingConfig(temperature=1.0, top_p=0.7))[0])
             for k in np.asarray(jnp.arange(40, dtype=jnp.uint32).reshape(20, 2))}
    assert draws == {1, 3}


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be None or in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be None or in \(0, 1\]"),
    (dict(top_k=0), "top_k must be None or an int >= 1"),
])
def test_sampling_config_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([[1]], dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    ([[1]], dict(max_new_tokens=-3), "max_new_tokens must be an int >= 1"),
    ([], dict(max_new_tokens=2), "at least one prompt"),
    ([[1], []], dict(max_new_tokens=2), "prompt 1 is empty"),
    ([[1, V]], dict(max_new_tokens=2), rf"prompt 0: token id {V} is outside the vocabulary"),
    ([[-1]], dict(max_new_tokens=2), "token id -1 is outside the vocabulary"),
    ([[1]], dict(max_new_tokens=2, eos_ids=[V]), f"eos id {V} is outside"),
])
def test_generate_refuses(generator, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generator.generate(prompts, **kwargs)


# --- a trained run, restored from its workdir ----------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tiny trained run of tests/inference/test_score.py (shared in the session)."""
    return shared_training_run(tmp_path_factory, "score_tiny", TINY, "--quiet",
                               *(f"--gin_param={p}" for p in PARAMS))[0]


def test_load_generator_is_the_scorers_greedy_continuation(workdir):
    """Dropless MoE with the checkpoint's selection biases, as scored."""
    scorer = score_lib.load_scorer(workdir)
    prompts = [[1, 84, 104, 101], [1, 87, 111, 114, 108, 100, 35]]
    got = generate_lib.load_generator(workdir).generate(prompts, max_new_tokens=8)
    for prompt, tokens in zip(prompts, got):
        assert tokens == _greedy_by_full_forward(scorer.forward, prompt, 8)


def test_generation_under_the_runs_mesh_with_expert_parallelism(workdir, tmp_path):
    """The same run with MESH_SHAPE bound (8 simulated devices, tests/conftest.py):
    parameters placed on the mesh, MoE dispatch switched to expert_parallel, batch
    bucket a multiple of the 8 batch shards; tokens equal the unsharded ones."""
    prompts = [[1, 84, 104, 101], [1, 87, 111, 114, 108, 100, 35], [1, 65]]
    want = generate_lib.load_generator(workdir).generate(prompts, max_new_tokens=8)
    sharded_dir = tmp_path / "sharded"
    sharded_dir.mkdir()
    (sharded_dir / "checkpoints").symlink_to(workdir / "checkpoints")
    config = (workdir / "config.gin").read_text()
    (sharded_dir / "config.gin").write_text(
        config + "\nMESH_SHAPE = {'data': 2, 'expert': 4}\n")
    generator = generate_lib.load_generator(sharded_dir)
    restored = generator.restored
    assert restored.sharding is not None and restored.batch_shards == 8
    assert "expert_parallel" in restored.dispatch
    layer = restored.model().moe_layer(restored.model().moe_layer_names[0])
    assert layer.dispatch == "expert_parallel"
    experts = [leaf for path, leaf in _leaves(restored.params) if "experts" in path]
    assert experts and all(len(leaf.sharding.device_set) == 8 for leaf in experts)
    assert generator.generate(prompts, max_new_tokens=8) == want
    assert generator.last_stats.batch_bucket == 8


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}/{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path)
        else:
            yield path, value
