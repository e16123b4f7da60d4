"""scripts/bench_generate.py --small: a seconds-long run that writes every figure
docs/benchmarks.md ("Generation") reports, for the MoE and its dense twin."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_script

FIGURES = {"batch", "context", "prompt_tokens", "new_tokens", "decode_steps", "prefill_ms",
           "prefill_tokens_per_s", "decode_ms_per_step", "decode_tokens_per_s"}


def test_small_run_writes_every_figure(tmp_path):
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    result = run_script("scripts/bench_generate.py", "--small", f"--json={out}",
                        f"--markdown={table}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["load_average_before"]) == 3 and len(data["load_average_after"]) == 3
    assert data["cpu_count"] >= 1 and data["device"] and data["command"]
    assert data["rounds"] == 2 and data["new_tokens"] == 4
    [(preset, figures)] = data["presets"].items()
    assert preset == "tiny"
    models = figures["models"]
    assert set(models) == {"moe", "dense"}
    # Equal active parameters (the routers aside), fewer in total for the dense twin.
    assert models["dense"]["total_params"] < models["moe"]["total_params"]
    assert abs(models["dense"]["active_params"] - models["moe"]["active_params"]) \
        < 0.05 * models["moe"]["active_params"]
    for model in models.values():
        assert set(model["cells"]) == {"b1_ctx16", "b1_ctx64", "b4_ctx16"}
        for name, cell in model["cells"].items():
            assert FIGURES <= set(cell), name
            assert cell["prompt_tokens"] == cell["context"] // 2
            assert cell["engine_buckets"][2] == cell["context"]
            assert cell["decode_steps"] >= 3  # the first new token comes from the prefill
            assert cell["prefill_tokens_per_s"] > 0 and cell["decode_ms_per_step"] > 0
            # Rates are the median times' (batch / step time, prompt tokens / prefill time).
            assert cell["decode_tokens_per_s"] * cell["decode_ms_per_step"] / 1e3 \
                == pytest.approx(cell["batch"])
            assert cell["prefill_tokens_per_s"] * cell["prefill_ms"] / 1e3 \
                == pytest.approx(cell["batch"] * cell["prompt_tokens"])
    for variant in ("moe", "dense"):
        ratio = figures["context_ratio"][variant]
        assert (ratio["short"], ratio["long"]) == (16, 64)
        assert ratio["measured"] > 0 and "growth_ms" in ratio
        assert ratio["kv_cache_mb"]["long"] == 4 * ratio["kv_cache_mb"]["short"]
        flops = ratio["flops"]
        assert 1 < flops["with_cache"] < 2 < 4 < flops["without_cache"]
    assert set(figures["moe_over_dense"]) == {"b1_ctx16", "b1_ctx64", "b4_ctx16"}
    assert len(figures["rounds"]["moe/b1_ctx16"]) == 2
    text = table.read_text()
    assert "| tiny | moe |" in text and "| tiny | b4_ctx16 |" in text


def test_model_facts_of_an_mla_model_read_its_latent_cache():
    # The script used to read num_kv_heads / head_dim, which MLA layers lack.
    import functools
    import importlib.util
    import sys

    from flax import nnx

    from layers.mla import MLAttention
    from layers.transformer import TransformerLM
    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location("bench_generate",
                                                  REPO / "scripts" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    model = nnx.eval_shape(lambda: TransformerLM(  # shapes only: nothing computed
        vocab_size=16, d_model=16, num_layers=2, num_heads=4, d_ff=32, moe_every=0,
        dtype="float32", rngs=nnx.Rngs(0),
        attention=functools.partial(MLAttention, kv_lora_rank=6, qk_nope_head_dim=4,
                                    qk_rope_head_dim=2, v_head_dim=6)))
    facts = bench._model_facts(model)
    assert facts["kv_bytes_per_slot"] == 2 * (6 + 2) * 4  # layers x (latent + RoPE key) x f32
    assert facts["attention_width"] == 4 * (4 + 2 + 6) // 2
