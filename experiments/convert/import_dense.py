"""Import a Llama/Mistral-style safetensors decoder as a dense checkpoint of ours.

The source is a Hugging Face model directory: `config.json` and one or more
`*.safetensors` files. Supported: decoder-only, RMSNorm, RoPE (rotate-half
layout, no `rope_scaling`), SwiGLU MLP, no biases, grouped-query attention.
The result is a workdir (`checkpoints/0`, `config.gin`) that `scripts/train.py`
resumes and `scripts/upcycle.py` upcycles.

Name mapping (HF `[out, in]` matrices are transposed to our `[in, out]`):

  model.embed_tokens.weight [V, d]                -> embedding [V, d]
  model.layers.{i}.input_layernorm.weight         -> layer_{i}/attention_norm/scale
  model.layers.{i}.self_attn.q_proj.weight [H*h, d] -> layer_{i}/attention/query [d, H, h]
  model.layers.{i}.self_attn.k_proj.weight [K*h, d] -> layer_{i}/attention/key [d, K, h]
  model.layers.{i}.self_attn.v_proj.weight [K*h, d] -> layer_{i}/attention/value [d, K, h]
  model.layers.{i}.self_attn.o_proj.weight [d, H*h] -> layer_{i}/attention/out [H, h, d]
  model.layers.{i}.post_attention_layernorm.weight -> layer_{i}/ffn_norm/scale
  model.layers.{i}.mlp.gate_proj.weight [f, d]    -> layer_{i}/ffn/wi_gate [d, f]
  model.layers.{i}.mlp.up_proj.weight [f, d]      -> layer_{i}/ffn/wi [d, f]
  model.layers.{i}.mlp.down_proj.weight [d, f]    -> layer_{i}/ffn/wo [f, d]
  model.norm.weight                               -> final_norm/scale
  lm_head.weight [V, d]                           -> lm_head [d, V]

Config mapping: hidden_size -> d_model, intermediate_size -> d_ff,
num_hidden_layers, num_attention_heads -> num_heads, num_key_value_heads ->
num_kv_heads, head_dim, rms_norm_eps -> norm_eps, rope_parameters.rope_theta
(transformers 5) or the top-level rope_theta (older) -> rope_max_wavelength,
hidden_act silu -> activation 'swiglu' (gelu -> 'geglu').
Tied embeddings (`tie_word_embeddings`) become an untied `lm_head` copy: our
tied head scales logits by d_model^-0.5, HF's does not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
import optax
from flax import nnx, traverse_util

from experiments.data import pipeline as data_lib
from experiments.data.config import DataConfig
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from experiments.runtime.workdir_lock import check_workdir
from experiments.train import trainer  # noqa: F401  (registers `train` for the config)
from experiments.train.optim import make_optimizer
from layers.transformer import TransformerLM

_log = logging.getLogger(__name__)

_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu", "relu": "reglu"}


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of every `*.safetensors` file in `model_dir`, as float32."""
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {model_dir}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for name, value in load_file(str(f)).items():
            tensors[name] = np.asarray(value, np.float32)
    return tensors


def _rope_theta(hf_config: Mapping[str, Any]) -> float:
    """The RoPE base: transformers 5 writes `rope_parameters: {rope_type, rope_theta}`,
    older versions a top-level `rope_theta` (and `rope_scaling`). Plain RoPE only."""
    if hf_config.get("rope_scaling"):
        raise ValueError(f"rope_scaling {hf_config['rope_scaling']!r} is not supported (plain "
                         "RoPE only)")
    params = hf_config.get("rope_parameters")
    if params is None:
        return float(hf_config.get("rope_theta", 10000.0))
    if not isinstance(params, Mapping) or "rope_theta" not in params:
        raise ValueError(f"rope_parameters {params!r} is not supported: expected one "
                         "{'rope_type': 'default', 'rope_theta': ...}")
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type {params['rope_type']!r} is not supported "
                         "(plain RoPE only: 'default')")
    return float(params["rope_theta"])


def model_bindings(hf_config: Mapping[str, Any]) -> list[str]:
    """Gin bindings of a dense TransformerLM matching a HF Llama-style config."""
    act = hf_config.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} not supported; supported: {sorted(_ACTIVATIONS)}")
    rope_theta = _rope_theta(hf_config)
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(f"{flag}=True is not supported: our layers have no biases")
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    return [
        "TransformerLM.moe_every = 0",
        "TransformerLM.moe_layers = None",
        f"TransformerLM.d_model = {hf_config['hidden_size']}",
        f"TransformerLM.d_ff = {hf_config['intermediate_size']}",
        f"TransformerLM.num_layers = {hf_config['num_hidden_layers']}",
        f"TransformerLM.num_heads = {heads}",
        f"TransformerLM.num_kv_heads = {hf_config.get('num_key_value_heads', heads)}",
        f"TransformerLM.head_dim = {head_dim}",
        f"TransformerLM.activation = '{_ACTIVATIONS[act]}'",
        f"TransformerLM.norm_eps = {float(hf_config.get('rms_norm_eps', 1e-6))!r}",
        f"TransformerLM.rope_max_wavelength = {rope_theta!r}",
        "TransformerLM.tie_embeddings = False",
        "TransformerLM.causal = True",
    ]


def convert(tensors: Mapping[str, np.ndarray], hf_config: Mapping[str, Any]) -> dict:
    """Our nested parameter dict from HF tensors (see the module docstring)."""
    d = hf_config["hidden_size"]
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads", heads)
    head_dim = hf_config.get("head_dim") or d // heads
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"tensor {name!r} missing from the safetensors files")
        used.add(name)
        return tensors[name]

    flat = {("embedding",): take("model.embed_tokens.weight"),
            ("final_norm", "scale"): take("model.norm.weight")}
    if "lm_head.weight" in tensors:
        flat[("lm_head",)] = take("lm_head.weight").T
    elif hf_config.get("tie_word_embeddings", False):
        flat[("lm_head",)] = flat[("embedding",)].T.copy()
    else:
        raise ValueError("lm_head.weight missing and tie_word_embeddings is false")
    for i in range(hf_config["num_hidden_layers"]):
        p, layer = f"model.layers.{i}.", f"layer_{i}"
        flat[(layer, "attention_norm", "scale")] = take(p + "input_layernorm.weight")
        flat[(layer, "ffn_norm", "scale")] = take(p + "post_attention_layernorm.weight")
        flat[(layer, "attention", "query")] = take(p + "self_attn.q_proj.weight").T.reshape(
            d, heads, head_dim)
        flat[(layer, "attention", "key")] = take(p + "self_attn.k_proj.weight").T.reshape(
            d, kv_heads, head_dim)
        flat[(layer, "attention", "value")] = take(p + "self_attn.v_proj.weight").T.reshape(
            d, kv_heads, head_dim)
        flat[(layer, "attention", "out")] = take(p + "self_attn.o_proj.weight").T.reshape(
            heads, head_dim, d)
        flat[(layer, "ffn", "wi_gate")] = take(p + "mlp.gate_proj.weight").T
        flat[(layer, "ffn", "wi")] = take(p + "mlp.up_proj.weight").T
        flat[(layer, "ffn", "wo")] = take(p + "mlp.down_proj.weight").T
    unused = sorted(n for n in tensors if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        raise ValueError(f"tensors with no place in our model (biases or another architecture?): "
                         f"{unused[:8]}")
    return traverse_util.unflatten_dict({k: np.ascontiguousarray(v) for k, v in flat.items()})


def import_dense(model_dir: str | Path, out_workdir: str | Path, *,
                 gin_files: Sequence[str] = (), gin_params: Sequence[str] = (),
                 seed: int = 0) -> Path:
    """Writes `out_workdir/checkpoints/0` and `config.gin`; returns out_workdir.

    `gin_files`/`gin_params` give the data and training config (e.g.
    `gin_configs/data/embedded_byte.gin`); the model bindings come from
    config.json. The tokenizer's vocabulary size must equal the model's.
    """
    model_dir, out_workdir = Path(model_dir), Path(out_workdir).absolute()
    check_workdir(out_workdir)
    hf_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if (out_workdir / "checkpoints").exists() and any((out_workdir / "checkpoints").iterdir()):
        raise FileExistsError(f"{out_workdir}/checkpoints already holds checkpoints")
    bindings = model_bindings(hf_config)
    params = convert(read_safetensors(model_dir), hf_config)
    gin.clear_config()
    gin_utils.parse(list(gin_files), [*bindings, "TransformerLM.dtype = 'float32'",
                                      "TransformerLM.param_dtype = 'float32'",
                                      f"train.seed = {seed}", *gin_params])
    data_config = DataConfig()
    vocab = data_config.vocab_size()
    if vocab != hf_config["vocab_size"]:
        raise ValueError(f"the data config's tokenizer has {vocab} tokens, the model "
                         f"{hf_config['vocab_size']}: use the model's tokenizer")
    model = nnx.eval_shape(lambda: TransformerLM(vocab_size=vocab, rngs=nnx.Rngs(0)))
    abstract = nnx.state(model, nnx.Param).to_pure_dict()
    flat_abstract = traverse_util.flatten_dict(abstract)
    flat_params = traverse_util.flatten_dict(params)
    if set(flat_abstract) != set(flat_params):
        raise ValueError(f"parameter names differ: {sorted(set(flat_abstract) ^ set(flat_params))}")
    for key, spec in flat_abstract.items():
        if tuple(spec.shape) != flat_params[key].shape:
            raise ValueError(f"{'/'.join(key)}: model wants {tuple(spec.shape)}, the import gives "
                             f"{flat_params[key].shape}")
    params = jax.tree.map(lambda a, s: jax.numpy.asarray(a, s.dtype), params, abstract)
    opt_state = make_optimizer(optax.constant_schedule(0.0)).init(params)
    iterator = data_config.train_iterator(seed)
    out_workdir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(out_workdir / "checkpoints", async_save=False, max_to_keep=None)
    try:
        checkpointer.save(0, params=params, opt_state=opt_state,
                          data_state=data_lib.iterator_state(iterator),
                          rng_key_data=np.asarray(jax.random.PRNGKey(seed)), force=True)
    finally:
        checkpointer.close()
    gin_utils.write_config(out_workdir)
    _log.info("imported %s into %s", model_dir, out_workdir)
    return out_workdir
