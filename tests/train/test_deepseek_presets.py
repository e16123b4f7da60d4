"""The CPU DeepSeek presets (gin_configs/models/deepseek_tiny.gin, deepseek_small.gin):
both build DeepSeek-V3's option set (MLA with query LoRA, a dense first layer, grouped
sigmoid routing with shared experts), and the tiny one trains: 2 steps on the embedded
corpus (data sizes shrunk, and 2 layers: the dense one and one MoE layer, for compile
time), finite losses, and its loss-free selection biases (DeepSeek-V3's
e_score_correction_bias) move away from zero."""

import json
import math
from pathlib import Path

import gin
import pytest
from flax import nnx

from experiments.runtime import gin_utils
from experiments.train import trainer  # noqa: F401  registers LossFreeBalancing and the data config
from layers.transformer import TransformerLM
from tests.helpers import run_script

REPO = Path(__file__).resolve().parents[2]
DATA = ["DataConfig.seq_len = 32", "DataConfig.batch_size = 4", "DataConfig.eval_batch_size = 4",
        "DataConfig.eval_max_batches = 1", "DataConfig.max_bytes_per_domain = 100000",
        "train.num_steps = 2", "train.eval_every = 2", "Checkpointer.save_every = 2"]


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("size,layers,experts", [("tiny", 4, 16), ("small", 6, 32)])
def test_deepseek_presets_build_the_v3_option_set(size, layers, experts):
    gin_utils.parse([str(REPO / f"gin_configs/models/deepseek_{size}.gin")], [])
    assert gin.query_parameter("LossFreeBalancing.enabled") is True
    model = nnx.eval_shape(lambda: TransformerLM(vocab_size=259, rngs=nnx.Rngs(0)))
    assert type(model.layer_0.attention).__name__ == "MLAttention"
    assert model.layer_0.attention.query_up is not None  # query LoRA, as V3
    assert model.moe_layer_names == tuple(f"layer_{i}" for i in range(1, layers))
    moe = model.moe_layer("layer_1")
    router = moe.router
    assert (moe.num_experts, router.score, router.normalize, router.group_score) == (
        experts, "sigmoid", True, "top2_sum")
    assert router.num_groups and moe.shared is not None and moe.shared_gate is None


def test_deepseek_tiny_trains_two_steps(tmp_path):
    result = run_script("scripts/train.py", "--gin_file=gin_configs/models/deepseek_tiny.gin",
                        "--gin_file=gin_configs/data/embedded_byte.gin", "--quiet",
                        *[f"--gin_param={b}" for b in DATA], "--gin_param=TransformerLM.num_layers = 2",
                        "--gin_param=TransformerLM.moe_layers = (1,)", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 2 and math.isfinite(summary["valid_loss"]["all"])
    assert set(summary["moe"]) == {"layer_1"}
    meta = json.loads((tmp_path / "checkpoints" / "2" / "meta" / "metadata").read_text())
    biases = meta["hook_state"]["loss_free_balancing"]
    assert set(biases) == {"layer_1"}
    # Two sign-rule updates of rate 1e-3 from zero: every bias is 0 or +-1e-3 or +-2e-3,
    # and some moved (a step never loads 16 experts exactly evenly).
    values = [v for layer in biases.values() for v in layer["values"]]
    assert any(abs(v) > 5e-4 for v in values)
    assert all(min(abs(abs(v) - m) for m in (0.0, 1e-3, 2e-3)) < 1e-6 for v in values)
