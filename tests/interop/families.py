"""The Hugging Face families the interop tests check, one entry each.

A family is a tiny random float32 model built from a config (no hub access),
saved with `save_pretrained`, optionally with its config.json rewritten (older
layouts), imported into a workdir of ours by `import_fn(hf_dir, out_workdir)`.
Adding a family is one `Family(...)` in `FAMILIES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import transformers

from tests.helpers import run_script

# Byte-tokenizer vocabulary (the data config the importer is given).
VOCAB_SIZE = 259
DATA_GIN = "gin_configs/data/embedded_byte.gin"
TINY = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            tie_word_embeddings=False, attn_implementation="eager")
# A non-default RoPE base: an importer that misses it gives different logits.
ROPE_THETA = 500.0
ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}}
# llama3 scaling whose wavelength bands (4 and 16 positions) split head_dim=8's
# frequencies: some scaled, some smoothed, some kept.
LLAMA3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": 4.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}}
# Smaller than the test sequence (tests/interop/test_reference.IDS, 24 tokens).
WINDOW = 5
# MoE: 4 experts, top-2, expert d_ff 24; 3 layers so one can be dense.
MOE = dict(TINY, num_hidden_layers=3)


def import_model(hf_dir: Path, out_workdir: Path, *flags: str) -> Path:
    """Our importer CLI on a saved HF model directory (plus `flags`, e.g.
    `--dtype=bfloat16`); returns the workdir."""
    result = run_script("scripts/import_hf.py", f"--hf_dir={hf_dir}",
                        f"--out_workdir={out_workdir}", f"--gin_file={DATA_GIN}", *flags)
    if result.returncode != 0:
        raise AssertionError(f"import failed: {result.stderr[-3000:]}")
    return out_workdir


def top_level_rope_theta(config: dict[str, Any]) -> dict[str, Any]:
    """The transformers-4 layout: `rope_theta` at the top level, no `rope_parameters`."""
    config = dict(config)
    params = config.pop("rope_parameters")
    assert params["rope_type"] == "default", params
    config["rope_theta"] = params["rope_theta"]
    return config


class Family(NamedTuple):
    name: str
    config: Callable[[], transformers.PretrainedConfig]
    import_fn: Callable[..., Path] = import_model
    rewrite_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def is_moe(self) -> bool:
        return "MoeFor" in self.architecture or self.architecture in (
            "MixtralForCausalLM", "OlmoeForCausalLM")

    @property
    def architecture(self) -> str:
        return self.config().architectures[0]


def _cfg(cls: type, **kw: Any) -> Callable[[], transformers.PretrainedConfig]:
    """A config factory that also names the architecture (`architectures` is what
    save_pretrained writes from the model class; set here for `Family.architecture`)."""
    def make() -> transformers.PretrainedConfig:
        config = cls(**kw)
        config.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
        return config
    return make


_QWEN2_MOE = dict(MOE, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                  num_experts=4, num_experts_per_tok=2, qkv_bias=True)

FAMILIES = [
    Family("llama", _cfg(transformers.LlamaConfig, **TINY, **ROPE)),
    Family("llama_top_level_rope_theta", _cfg(transformers.LlamaConfig, **TINY, **ROPE),
           rewrite_config=top_level_rope_theta),
    Family("llama_llama3_scaling_bias", _cfg(transformers.LlamaConfig, **TINY, **LLAMA3,
                                             attention_bias=True)),
    Family("llama_tied", _cfg(transformers.LlamaConfig, **dict(TINY, tie_word_embeddings=True),
                              **ROPE)),
    Family("mistral", _cfg(transformers.MistralConfig, **TINY, sliding_window=WINDOW, **ROPE)),
    Family("qwen2", _cfg(transformers.Qwen2Config, **TINY, **ROPE)),
    Family("qwen3", _cfg(transformers.Qwen3Config, **TINY, head_dim=12, **ROPE)),
    Family("mixtral", _cfg(transformers.MixtralConfig, **dict(MOE, intermediate_size=24),
                           num_local_experts=4, num_experts_per_tok=2, **ROPE)),
    Family("qwen2_moe_dense_layer_norm_topk", _cfg(
        transformers.Qwen2MoeConfig, **_QWEN2_MOE, mlp_only_layers=[1], norm_topk_prob=True,
        **ROPE)),
    Family("qwen2_moe_sparse_step_2", _cfg(
        transformers.Qwen2MoeConfig, **dict(_QWEN2_MOE, num_hidden_layers=2),
        decoder_sparse_step=2, norm_topk_prob=False, **ROPE)),
    Family("qwen3_moe", _cfg(transformers.Qwen3MoeConfig, **MOE, moe_intermediate_size=24,
                             num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, **ROPE)),
    Family("olmoe", _cfg(transformers.OlmoeConfig, **dict(MOE, intermediate_size=24),
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, **ROPE)),
]


def save(family: Family, model: Any, hf_dir: Path) -> None:
    """`save_pretrained`, then the family's config.json rewrite, if any."""
    model.save_pretrained(hf_dir)
    if family.rewrite_config is not None:
        path = hf_dir / "config.json"
        path.write_text(json.dumps(family.rewrite_config(json.loads(path.read_text())), indent=2))
