"""Import a HF safetensors decoder (see `config.SUPPORTED`) as a workdir of ours.

The workdir (`checkpoints/0`, `config.gin`, the model's `tokenizer.json` when
it has one, `hf_import.json`) is what `scripts/train.py` continues and
`scripts/upcycle.py` upcycles. The vocabulary size is the HF config's, written
to `config.gin` as `train.vocab_size` (every consumer builds the model with
`model_vocab_size()`): a model with its own vocabulary imports, scores,
upcycles and exports whatever the data config's tokenizer. Training refuses a
data tokenizer with more ids than the model has rows; train new data with the
model's own tokenizer (`DataConfig.tokenizer = 'hf:<workdir>/tokenizer.json'`).
The checkpoint holds the data iterator's start when the data tokenizer's ids
fit the model's vocabulary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
import optax
from flax import nnx, traverse_util

from experiments.convert.hf import config as config_lib
from experiments.convert.hf import deepseek_tensors, mapping
from experiments.convert.hf.safetensors_io import SafetensorsReader
from experiments.convert.hf.workdir import atomic_dir, read_hf_config
from experiments.data import pipeline as data_lib
from experiments.data.config import DataConfig
from experiments.inference.tokenizer import copy_tokenizer_files
from experiments.runtime import gin_utils
from experiments.runtime import mesh as mesh_lib
from experiments.runtime.checkpoints import LOSS_FREE_HOOK, Checkpointer
from experiments.train import trainer  # noqa: F401  (registers `train` for the config)
from experiments.train.config import model_vocab_size
from experiments.train.optim import make_optimizer
from layers import scan as scan_lib
from layers.params import logical_axes_of
from layers.transformer import TransformerLM

_log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16")


def tensor_getter(reader: SafetensorsReader, spec: config_lib.ModelSpec
                  ) -> tuple[Callable[[str], np.ndarray], set[str]]:
    """`get(hf_name)` over per-expert or fused experts, and the set of names it read."""
    names = reader.names()
    fused = mapping.fused_expert_names(names, spec)
    used: set[str] = set()
    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name in names:
            used.add(name)
            return reader.get(name)
        if name in fused and fused[name] in names:
            src = fused[name]
            if src not in cache:
                cache.clear()  # one fused tensor at a time
                cache[src] = reader.get(src)
            used.add(src)
            return mapping.unfuse(name, src, cache[src], spec)
        raise KeyError(name)

    return get, used


def load_params(model_dir: Path, spec: config_lib.ModelSpec, abstract: Mapping,
                place: Callable[[tuple, np.ndarray], Any] | None = None,
                biases: dict[str, np.ndarray] | None = None) -> dict:
    """Our nested params from the safetensors of `model_dir`, checked against
    `abstract` (names and shapes); `place(path, array)` puts each leaf (default:
    a host array of the abstract dtype). DeepSeek-V3's correction biases go into
    `biases` (`{layer: [E] float32}`, our loss-free selection biases); its MTP
    layers' tensors are skipped with a warning (`deepseek_tensors.mtp_prefixes`)."""
    reader = SafetensorsReader(model_dir)
    get, used = tensor_getter(reader, spec)
    flat_abstract = traverse_util.flatten_dict(abstract)
    flat: dict[tuple, Any] = {}
    try:
        for path, value in mapping.to_ours(get, spec):
            name = "/".join(path)
            if path not in flat_abstract:
                raise ValueError(f"{name}: our model has no such parameter (is a layer option "
                                 "missing from this build?)")
            want = tuple(flat_abstract[path].shape)
            if value.shape != want:
                raise ValueError(f"{name}: the model wants shape {want}, the safetensors give "
                                 f"{value.shape}")
            flat[path] = (place(path, value) if place else
                          np.asarray(value, flat_abstract[path].dtype))
        for layer, name in deepseek_tensors.selection_bias_names(spec).items():
            bias = np.asarray(get(name), np.float32)
            if bias.shape != (spec.num_experts,):
                raise ValueError(f"{name}: shape {bias.shape}, want ({spec.num_experts},)")
            if biases is not None:
                biases[layer] = bias
    except KeyError as e:
        raise ValueError(f"{model_dir}: tensor {e.args[0]!r} missing from the safetensors "
                         "files") from None
    finally:
        reader.close()
    missing = sorted("/".join(p) for p in set(flat_abstract) - set(flat))
    if missing:
        raise ValueError(f"our model has parameters the import does not fill: {missing[:8]}")
    skipped = ignored_mtp_tensors(reader.names(), spec)
    if skipped:
        _log.warning("%s: %d tensors of DeepSeek-V3's %d MTP layer(s) (%s) not imported: "
                     "transformers' %s has no module for them", model_dir, len(skipped),
                     spec.deepseek.mtp_layers,
                     ", ".join(p + "*" for p in deepseek_tensors.mtp_prefixes(spec)),
                     spec.architecture)
    unused = sorted(n for n in reader.names() - used - set(skipped)
                    if not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise ValueError(f"{model_dir}: tensors with no place in a {spec.architecture} of this "
                         f"config: {unused[:8]}")
    return traverse_util.unflatten_dict(flat)


def ignored_mtp_tensors(names: set[str], spec: config_lib.ModelSpec) -> list[str]:
    """The tensors of DeepSeek-V3's MTP layers among `names` (not imported)."""
    prefixes = deepseek_tensors.mtp_prefixes(spec)
    return sorted(n for n in names if prefixes and n.startswith(prefixes))


def _data_state(vocab: int, seed: int) -> dict[str, Any]:
    """The data iterator's start, when the data tokenizer's ids fit the model's vocabulary."""
    try:
        data_config = DataConfig()
        data_vocab = data_config.vocab_size()
        if data_vocab <= vocab:
            return data_lib.iterator_state(data_config.train_iterator(seed))
        _log.warning("the data config's tokenizer has %d tokens, more than the model's %d: the "
                     "checkpoint holds no data position; train with the model's tokenizer",
                     data_vocab, vocab)
    except (ValueError, OSError, KeyError) as e:
        _log.warning("no data iterator position saved (%s)", e)
    return {}


def import_hf(model_dir: str | Path, out_workdir: str | Path, *,
              gin_files: Sequence[str] = (), gin_params: Sequence[str] = (),
              dtype: str = "float32", seed: int = 0) -> Path:
    """Writes `out_workdir` atomically (temp dir + rename); returns it."""
    model_dir, out_workdir = Path(model_dir), Path(out_workdir).absolute()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    hf_cfg = read_hf_config(model_dir)
    spec = config_lib.parse_config(hf_cfg)
    with atomic_dir(out_workdir) as tmp:
        gin.clear_config()
        gin_utils.parse(list(gin_files), [*config_lib.model_bindings(spec),
                                          "TransformerLM.dtype = 'float32'",
                                          f"TransformerLM.param_dtype = '{dtype}'",
                                          f"train.seed = {seed}",
                                          f"train.vocab_size = {spec.vocab_size}", *gin_params])
        if model_vocab_size() != spec.vocab_size:
            raise ValueError(f"train.vocab_size = {model_vocab_size()} disagrees with "
                             f"{model_dir / 'config.json'} vocab_size = {spec.vocab_size}")
        model = nnx.eval_shape(lambda: TransformerLM(vocab_size=spec.vocab_size,
                                                     rngs=nnx.Rngs(0)))
        layout = nnx.state(model, nnx.Param).to_pure_dict()
        # HF names layers one by one: load unscanned, then stack a scanned model's layers.
        abstract, scanned = scan_lib.unscan_tree(layout), scan_lib.SCANNED in layout
        place = None
        sharder = None
        if mesh_lib.mesh_shape_from_gin() is not None and not scanned:
            sharder = mesh_lib.Sharding()
            shardings = traverse_util.flatten_dict(
                sharder.param_shardings(abstract, logical_axes_of(model)))
            flat_abs = traverse_util.flatten_dict(abstract)

            def place(path, value):  # pylint: disable=function-redefined
                return jax.device_put(np.asarray(value, flat_abs[path].dtype), shardings[path])
        biases: dict[str, np.ndarray] = {}
        params = load_params(model_dir, spec, abstract, place, biases)
        if scanned:
            params = scan_lib.match_layer_layout(params, layout)
            if mesh_lib.mesh_shape_from_gin() is not None:
                sharder = mesh_lib.Sharding()
                params = sharder.place_params(params, logical_axes_of(model))
        tx = make_optimizer(optax.constant_schedule(0.0))
        opt_state = sharder.init_opt_state(tx, params) if sharder else tx.init(params)
        checkpointer = Checkpointer(tmp / "checkpoints", async_save=False, max_to_keep=None)
        try:
            checkpointer.save(0, params=params, opt_state=opt_state,
                              data_state=_data_state(spec.vocab_size, seed),
                              rng_key_data=np.asarray(jax.random.PRNGKey(seed)), force=True,
                              hook_state={LOSS_FREE_HOOK: biases} if biases else None)
        finally:
            checkpointer.close()
        gin_utils.write_config(tmp)
        copy_tokenizer_files(model_dir, tmp)
        record = {"source": str(model_dir), "architecture": spec.architecture, "config": hf_cfg}
        reader = SafetensorsReader(model_dir)
        try:
            skipped = ignored_mtp_tensors(reader.names(), spec)
        finally:
            reader.close()
        if skipped:
            record["not_imported"] = {
                "tensors": [p + "*" for p in deepseek_tensors.mtp_prefixes(spec)],
                "count": len(skipped),
                "why": "DeepSeek-V3 MTP layers: transformers has no module for them"}
        (tmp / "hf_import.json").write_text(json.dumps(record, indent=2) + "\n",
                                            encoding="utf-8")
    _log.info("imported %s into %s", model_dir, out_workdir)
    return out_workdir
