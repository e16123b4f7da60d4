"""Export a checkpoint of ours as a HF safetensors model directory.

Reads `workdir/config.gin` and a checkpoint step (params only), picks the HF
family (`family.spec_of`), maps the tensors (`mapping.to_hf`) and writes
`config.json` + sharded safetensors (+ the workdir's tokenizer files)
atomically. Our tied head (logits scaled by d_model**-0.5) is written as an
untied `lm_head` = embedding.T * d_model**-0.5, exact; Qwen2-MoE's Q/K/V
biases are zeros when our model has none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
from flax import nnx, traverse_util

from experiments.convert.hf import config as config_lib
from experiments.convert.hf import deepseek_tensors, family, mapping
from experiments.convert.hf.importer import DTYPES
from experiments.convert.hf.safetensors_io import write_sharded
from experiments.convert.hf.workdir import atomic_dir
from experiments.inference.tokenizer import copy_tokenizer_files
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from experiments.train import trainer  # noqa: F401  (registers `train` for the config)
from layers import scan as scan_lib
from layers.transformer import TransformerLM

_log = logging.getLogger(__name__)


def hf_getter(flat: Mapping[tuple, Any], spec: config_lib.ModelSpec, tied: bool):
    """`get(our path)` over our flat params, adding the untied head and zero biases."""
    def get(path: tuple) -> np.ndarray:
        if path in flat:
            return np.asarray(flat[path], np.float32)
        if path == ("lm_head",) and tied:
            emb = np.asarray(flat[("embedding",)], np.float32)
            return emb.T * np.float32(spec.d_model ** -0.5)
        if path[-1] in ("query_bias", "key_bias", "value_bias"):
            heads = spec.num_heads if path[-1] == "query_bias" else spec.num_kv_heads
            return np.zeros((heads, spec.head_dim), np.float32)
        raise KeyError("/".join(path))
    return get


def _read(workdir: Path, step: int | None) -> tuple[Any, dict, int, dict[str, np.ndarray]]:
    """(abstract model, host params, step, the stored loss-free selection biases)."""
    config = workdir / gin_utils.CONFIG_FILE
    if not config.exists():
        raise FileNotFoundError(f"{config}: missing (not a workdir of ours?)")
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False, max_to_keep=None,
                                read_only=True)
    try:
        step = checkpointer.pick_step(step, option="--step")
        vocab = int(checkpointer.stored_metadata(step, "params")["embedding"].shape[0])
        gin.clear_config()
        gin_utils.parse([str(config)], [])
        model = nnx.eval_shape(lambda: TransformerLM(vocab_size=vocab, rngs=nnx.Rngs(0)))
        abstract = nnx.state(model, nnx.Param).to_pure_dict()
        restored = checkpointer.restore_step(step, abstract, None)
    finally:
        checkpointer.close()
    biases = {k: np.asarray(v, np.float32) for k, v in (restored.balance_state or {}).items()}
    # HF names layers one by one: a scanned model's stacked layers are unstacked.
    return model, scan_lib.unscan_tree(jax.device_get(restored.params)), step, biases


def _tensors(get, spec: config_lib.ModelSpec, biases: dict[str, np.ndarray],
             drop_selection_bias: bool) -> Iterator[tuple[str, np.ndarray]]:
    """The mapped tensors, then DeepSeek-V3's `e_score_correction_bias` per MoE layer
    (the run's selection biases; zeros without them or with --drop_selection_bias)."""
    yield from mapping.to_hf(get, spec)
    for layer, name in deepseek_tensors.selection_bias_names(spec).items():
        bias = None if drop_selection_bias else biases.get(layer)
        yield name, (np.zeros((spec.num_experts,), np.float32) if bias is None else bias)


def export_hf(workdir: str | Path, out_dir: str | Path, *, step: int | None = None,
              dtype: str = "float32", drop_selection_bias: bool = False,
              max_shard_bytes: int = 2 * 1024 ** 3) -> Path:
    """Writes `out_dir` (config.json, safetensors, tokenizer files); returns it."""
    workdir, out_dir = Path(workdir), Path(out_dir).absolute()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    if not workdir.is_dir():
        raise FileNotFoundError(f"{workdir}: not a directory")
    model, params, step, biases = _read(workdir, step)
    has_biases = any(np.any(v != 0) for v in biases.values())
    spec = family.spec_of(model, selection_biases=has_biases,
                          drop_selection_bias=drop_selection_bias)
    flat = traverse_util.flatten_dict(params)
    get = hf_getter(flat, spec, tied=model.tie_embeddings)
    with atomic_dir(out_dir) as tmp:
        write_sharded(tmp, _tensors(get, spec, biases, drop_selection_bias), dtype=dtype,
                      max_shard_bytes=max_shard_bytes)
        cfg = config_lib.hf_config(spec, dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        copy_tokenizer_files(workdir, tmp)
    _log.info("exported %s step %d as %s into %s", workdir, step, spec.architecture, out_dir)
    return out_dir
