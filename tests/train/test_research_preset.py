"""The calibrated research preset (gin_configs/experiments/research.gin, its dense
references and gin_configs/sweeps/calibration.gin): the sweep's variants are the model
files' bindings, the dense references have the parameter counts they claim, and the
preset trains (2 steps, sizes shrunk by bindings)."""

import ast
import json
import math
from pathlib import Path

import gin
import numpy as np
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
    # Each candidate c (`c_moe`, `c_dense_total`) sets only moe_every on top of the model
    # files; `dense_active` is shared (see the next test).
    sweep = sweep_lib.load_sweep(REPO / "gin_configs/sweeps/calibration.gin")
    gin.clear_config()
    assert list(sweep.gin_files) == [PRESET]
    files = {"moe": {}, **{v: _bindings(f) for v, f in DENSE.items()}}
    for variant, bindings in sweep.variants.items():
        kind = "dense_active" if variant == "dense_active" else variant.split("_", 1)[1]
        rest = {k: v for k, v in bindings.items() if k != "TransformerLM.moe_every"}
        assert rest == files[kind], variant
        assert variant == "dense_active" or "TransformerLM.moe_every" in bindings
    assert {"alt_moe", "dense_active", "alt_dense_total"} <= set(sweep.variants)


def test_dense_active_is_one_model_whatever_moe_every():
    # With dense_baseline every FFN is dense with d_ff k x expert d_ff = the dense FFNs'
    # d_ff, so the candidates share one dense_active model: same parameters, same init.
    def init(moe_every):
        gin.clear_config()
        gin_utils.parse([str(REPO / PRESET), str(REPO / DENSE["dense_active"])],
                        [*SHRINK, f"TransformerLM.moe_every = {moe_every}"])
        state = nnx.to_flat_state(nnx.state(
            TransformerLM(vocab_size=259, rngs=nnx.Rngs(params=3)), nnx.Param))
        return {k: np.asarray(v.get_value()) for k, v in state}

    alt, every = init(2), init(1)
    assert sorted(alt) == sorted(every)
    assert all(np.array_equal(alt[k], every[k]) for k in alt)


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
    assert set(summary["moe"]) == {f"layer_{i}" for i in range(4)}  # 4 layers, moe_every 1


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
