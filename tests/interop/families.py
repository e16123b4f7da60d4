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


def import_model(hf_dir: Path, out_workdir: Path) -> Path:
    """Our importer CLI on a saved HF model directory; returns the workdir."""
    result = run_script("scripts/import_hf.py", f"--hf_dir={hf_dir}",
                        f"--out_workdir={out_workdir}", f"--gin_file={DATA_GIN}")
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
    import_fn: Callable[[Path, Path], Path] = import_model
    rewrite_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None


FAMILIES = [
    Family("llama", lambda: transformers.LlamaConfig(
        **TINY, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})),
    Family("llama_top_level_rope_theta", lambda: transformers.LlamaConfig(
        **TINY, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}),
        rewrite_config=top_level_rope_theta),
    Family("mistral", lambda: transformers.MistralConfig(
        **TINY, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})),
]


def save(family: Family, model: Any, hf_dir: Path) -> None:
    """`save_pretrained`, then the family's config.json rewrite, if any."""
    model.save_pretrained(hf_dir)
    if family.rewrite_config is not None:
        path = hf_dir / "config.json"
        path.write_text(json.dumps(family.rewrite_config(json.loads(path.read_text())), indent=2))
