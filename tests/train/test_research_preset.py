"""The calibrated research preset (gin_configs/experiments/research.gin, its dense
references and gin_configs/sweeps/calibration.gin): the sweep's variants are the model
files' bindings, the dense references have the parameter counts they claim, and the
preset trains (2 steps, sizes shrunk by bindings)."""

import ast
import json
import math
from pathlib import Path

import gin
import pytest
from flax import nnx

from experiments.reporting import sweep as sweep_lib
from experiments.runtime import gin_utils
from experiments.train import trainer  # noqa: F401  registers DataConfig and the trainer's configurables
from layers.transformer import TransformerLM
from tests.helpers import run_script

REPO = Path(__file__).resolve().parents[2]
PRESET = "gin_configs/experiments/research.gin"
DENSE = {"dense_active": "gin_configs/models/research_dense_active.gin",
         "dense_total": "gin_configs/models/research_dense_total.gin"}
# The preset at test size: every size the preset binds, shrunk.
SHRINK = ["TransformerLM.d_model = 32", "TransformerLM.num_heads = 2", "TransformerLM.d_ff = 64",
          "MoeLayer.d_ff = 32", "DataConfig.seq_len = 32", "DataConfig.batch_size = 4",
          "DataConfig.eval_batch_size = 4", "DataConfig.eval_max_batches = 1",
          "DataConfig.max_bytes_per_domain = 100000", "train.num_steps = 2",
          "train.eval_every = 2", "Checkpointer.save_every = 2"]


def _bindings(path: str) -> dict[str, object]:
    """`{key: value}` of a gin file made only of `key = literal` lines."""
    out = {}
    for line in (REPO / path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = (part.strip() for part in line.split("=", 1))
            out[key] = ast.literal_eval(value)
    return out


def test_sweep_variants_are_the_model_files():
    sweep = sweep_lib.load_sweep(REPO / "gin_configs/sweeps/calibration.gin")
    gin.clear_config()
    assert list(sweep.gin_files) == [PRESET]
    assert dict(sweep.variants) == {"moe": {}, **{v: _bindings(f) for v, f in DENSE.items()}}


def _model(*gin_files: str) -> TransformerLM:
    gin.clear_config()
    gin_utils.parse([str(REPO / f) for f in gin_files], [])
    model = nnx.eval_shape(lambda: TransformerLM(vocab_size=259, rngs=nnx.Rngs(0)))
    gin.clear_config()
    return model


def test_dense_references_match_the_moe_in_active_and_total_parameters():
    moe = _model(PRESET)
    active, total = (_model(PRESET, DENSE[v]) for v in ("dense_active", "dense_total"))
    assert moe.moe_layer_names and not active.moe_layer_names and not total.moe_layer_names
    # The routers (d_model x E per MoE layer) are the only parameters the dense ones lack.
    router = sum(v.size for name in moe.moe_layer_names
                 for _, v in nnx.to_flat_state(nnx.state(moe.moe_layer(name).router, nnx.Param)))
    assert router == len(moe.moe_layer_names) * 128 * 8
    assert moe.active_param_count() == active.param_count() + router
    assert moe.param_count() == total.param_count() + router
    assert total.param_count() > 1.5 * active.param_count()  # the two references differ


def test_research_preset_trains_two_steps(tmp_path):
    result = run_script("scripts/train.py", f"--gin_file={PRESET}", "--quiet",
                        *[f"--gin_param={b}" for b in SHRINK], f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 2 and math.isfinite(summary["valid_loss"]["all"])
    assert set(summary["moe"]) == {"layer_1", "layer_3"}  # the preset's depth, moe_every 2


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
