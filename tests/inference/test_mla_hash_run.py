"""A trained run with multi-head latent attention and hash routing, restored and generated from.

Scenario: the tiny training config with `TransformerLM.attention = @MLAttention`
and `MoeLayer.router = @HashRouter` (seed 7) trains a few steps; the run's
config.gin records the seed, so the restored model routes with the same table
(derived from the recorded seed, nothing else), and the unchanged engine generates
from it with the latent cache: greedy = the full forward's argmax fed back.
"""

from __future__ import annotations

import gin
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.inference import generate as generate_lib
from experiments.inference import restore as restore_lib
from layers import HashRouter, MLAttention
from layers.routers.hash import hash_experts
from tests.helpers import shared_training_run
from tests.inference.test_generate import _greedy_by_full_forward

TINY = "--gin_file=gin_configs/experiments/test_tiny.gin"
PARAMS = ("train.num_steps = 4", "TransformerLM.attention = @MLAttention",
          "MLAttention.kv_lora_rank = 8", "MLAttention.qk_nope_head_dim = 8",
          "MLAttention.qk_rope_head_dim = 4", "MLAttention.v_head_dim = 8",
          "MLAttention.q_lora_rank = 12", "MoeLayer.router = @HashRouter",
          "HashRouter.seed = 7")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return shared_training_run(tmp_path_factory, "mla_hash_tiny", TINY, "--quiet",
                               *(f"--gin_param={p}" for p in PARAMS), timeout=600)[0]


def test_restored_run_routes_by_the_recorded_seed_and_generates(workdir):
    assert "HashRouter.seed = 7" in (workdir / "config.gin").read_text()
    gin.clear_config()
    restored = restore_lib.restore_model(workdir)
    gin.clear_config()
    model = restored.model()
    assert isinstance(model.layer_0.attention, MLAttention)
    router = model.moe_layer(model.moe_layer_names[0]).router
    assert isinstance(router, HashRouter) and router.seed == 7
    np.testing.assert_array_equal(router.table(restored.vocab_size),
                                  hash_experts(jnp.arange(restored.vocab_size), router.num_experts,
                                               router.k, 7))
    generator = generate_lib.Generator(restored)
    prompts = [[1, 72, 101, 108], [1, 87]]
    got = generator.generate(prompts, max_new_tokens=4)
    forward = nnx.jit(lambda m, ids: m(ids, router_state=restored.router_state)[0])
    for prompt, tokens in zip(prompts, got):
        assert tokens == _greedy_by_full_forward(lambda ids: forward(model, ids), prompt, 4)
