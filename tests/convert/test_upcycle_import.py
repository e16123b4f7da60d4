"""scripts/import_hf.py: a tiny random Llama-style safetensors decoder (GQA,
SwiGLU, RMSNorm, RoPE) imported into our dense format must give the logits of an
independent numpy implementation of the HF Llama forward; the import then
upcycles exactly."""

import json

import gin
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.convert import upcycle_checkpoint as ex
from experiments.convert.hf.importer import import_hf
from experiments.data.config import DataConfig
from experiments.runtime import gin_utils
from experiments.runtime.checkpoints import Checkpointer
from experiments.train.optim import make_optimizer
from layers.transformer import TransformerLM

safetensors_numpy = pytest.importorskip("safetensors.numpy")

VOCAB = 259  # the byte tokenizer's vocabulary
CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "hidden_act": "silu", "tie_word_embeddings": False}
DATA = ["DataConfig.seq_len = 32", "DataConfig.batch_size = 8", "DataConfig.eval_batch_size = 8",
        "DataConfig.max_bytes_per_domain = 300000", "DataConfig.eval_max_batches = 2"]


def _hf_weights(seed=0):
    rng = np.random.default_rng(seed)
    d, f, h, kv, hd = 32, 48, 4, 2, 8

    def w(*shape):
        return (0.2 * rng.normal(size=shape)).astype(np.float32)

    t = {"model.embed_tokens.weight": w(VOCAB, d), "model.norm.weight": 1 + w(d),
         "lm_head.weight": w(VOCAB, d)}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + w(d),
              p + "post_attention_layernorm.weight": 1 + w(d),
              p + "self_attn.q_proj.weight": w(h * hd, d),
              p + "self_attn.k_proj.weight": w(kv * hd, d),
              p + "self_attn.v_proj.weight": w(kv * hd, d),
              p + "self_attn.o_proj.weight": w(d, h * hd),
              p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
              p + "mlp.down_proj.weight": w(d, f)}
    return t


def _reference_logits(t, ids):
    """HF Llama forward in numpy: x @ W.T, rotate_half RoPE, repeat_kv, causal."""
    def rms(x, weight):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * weight

    def rope(x, pos):  # x [S, H, hd]
        half = x.shape[-1] // 2
        inv = 1.0 / (10000.0 ** (np.arange(0, x.shape[-1], 2) / x.shape[-1]))
        ang = np.concatenate([pos[:, None] * inv] * 2, axis=-1)[:, None, :]
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * np.cos(ang) + rot * np.sin(ang)

    seq = len(ids)
    pos = np.arange(seq, dtype=np.float64)
    x = t["model.embed_tokens.weight"][ids].astype(np.float64)
    for i in range(2):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"])
        q = rope((h @ t[p + "self_attn.q_proj.weight"].T).reshape(seq, 4, 8), pos)
        k = rope((h @ t[p + "self_attn.k_proj.weight"].T).reshape(seq, 2, 8), pos)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(seq, 2, 8)
        k, v = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)  # repeat_kv
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(8)
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", probs, v).reshape(seq, 32)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"])
        gate = h @ t[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ t[p + "mlp.up_proj.weight"].T)) \
            @ t[p + "mlp.down_proj.weight"].T
    return rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    model_dir = root / "hf"
    model_dir.mkdir()
    weights = _hf_weights()
    safetensors_numpy.save_file(weights, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    gin.clear_config()
    out = import_hf(model_dir, root / "dense",
                       gin_files=["gin_configs/data/embedded_byte.gin"], gin_params=DATA)
    gin.clear_config()
    return weights, model_dir, out


def test_imported_model_matches_reference_llama_forward(imported):
    weights, _, out = imported
    gin.clear_config()
    gin_utils.parse([str(out / "config.gin")], [])
    model = nnx.eval_shape(lambda: TransformerLM(vocab_size=DataConfig().vocab_size(),
                                                 rngs=nnx.Rngs(0)))
    gin.clear_config()
    graphdef, abstract = nnx.split(model, nnx.Param)
    abstract = abstract.to_pure_dict()
    checkpointer = Checkpointer(out / "checkpoints")
    restored = checkpointer.restore_step(0, abstract, jax.eval_shape(
        make_optimizer(optax.constant_schedule(0.0)).init, abstract))
    checkpointer.close()
    ids = np.array([5, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 3])
    logits, _ = nnx.merge(graphdef, restored.params)(ids[None], deterministic=True)
    np.testing.assert_allclose(np.asarray(logits[0]), _reference_logits(weights, ids),
                               atol=2e-4, rtol=1e-4)


def test_imported_checkpoint_upcycles_exactly(imported, tmp_path):
    _, _, out = imported
    gin.clear_config()
    try:
        result = ex.upcycle(out, tmp_path / "moe", gin_params=[
            "TransformerLM.moe_kwargs = {'capacity_factor': None, 'normalize': True}"],
            config=ex.UpcycleConfig(moe_layers=(1,), num_experts=4, k=2), verify=True,
            verify_batches=1)
    finally:
        gin.clear_config()
    assert result.moe_layers == ("layer_1",) and result.granularity == 1
    assert result.verify.expected_exact and result.verify.ok, result.verify.render()


def test_import_refusals(imported, tmp_path):
    weights, _, _ = imported

    def model_dir(name, tensors, config):
        path = tmp_path / name
        path.mkdir()
        safetensors_numpy.save_file(tensors, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(config))
        return path

    data = ["gin_configs/data/embedded_byte.gin"]
    cases = [
        (model_dir("bias", dict(weights, **{
            "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}), CONFIG),
         r"no place in a LlamaForCausalLM.*q_proj\.bias"),
        (model_dir("rope", weights, dict(CONFIG, rope_scaling={"type": "yarn", "factor": 8.0})),
         "rope_scaling.rope_type='yarn'"),
        (model_dir("shape", weights, dict(CONFIG, intermediate_size=40)),
         r"layer_0/ffn/wi_gate: the model wants shape \(32, 40\)"),
    ]
    for path, match in cases:
        gin.clear_config()
        try:
            with pytest.raises(ValueError, match=match):
                import_hf(path, tmp_path / f"out_{path.name}", gin_files=data,
                          gin_params=DATA)
        finally:
            gin.clear_config()
        assert not (tmp_path / f"out_{path.name}").exists()
        assert not list(tmp_path.glob(f".out_{path.name}.tmp-*"))


def test_own_vocabulary_imports_without_a_matching_data_config(imported, tmp_path):
    """vocab_size comes from config.json: a 300-token model imports under the byte
    data config (259 tokens); its checkpoint then holds no data position."""
    weights, _, _ = imported
    rng = np.random.default_rng(1)
    path = tmp_path / "own_vocab"
    path.mkdir()
    tensors = dict(weights, **{n: rng.normal(size=(300, 32)).astype(np.float32)
                               for n in ("model.embed_tokens.weight", "lm_head.weight")})
    safetensors_numpy.save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dict(CONFIG, vocab_size=300)))
    (path / "tokenizer.json").write_text('{"model": {}}')
    gin.clear_config()
    try:
        out = import_hf(path, tmp_path / "out", gin_files=["gin_configs/data/embedded_byte.gin"],
                        gin_params=DATA)
    finally:
        gin.clear_config()
    checkpointer = Checkpointer(out / "checkpoints", read_only=True)
    try:
        assert checkpointer.stored_metadata(0, "params")["embedding"].shape == (300, 32)
    finally:
        checkpointer.close()
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    assert "TransformerLM.num_kv_heads = 2" in (out / "config.gin").read_text()
