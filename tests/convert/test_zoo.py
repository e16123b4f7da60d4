"""gin_configs/zoo/: each preset's total and active parameter counts, from an
abstract model (`nnx.eval_shape`, nothing allocated), match the published
figures.

Published figures and sources (billions of parameters, total / active):
  Llama-3-8B       8.03 / 8.03  Hugging Face model card meta-llama/Meta-Llama-3-8B
                                (safetensors size: 8.03B params)
  Mixtral-8x7B     46.7 / 12.9  Mistral AI, "Mixtral of experts" (Dec 2023): "46.7B
                                total parameters but only uses 12.9B parameters per token"
  OLMoE-1B-7B      6.9 / 1.3    Muennighoff et al., "OLMoE: Open Mixture-of-Experts
                                Language Models" (arXiv 2409.02060), Table 1
  Qwen3-30B-A3B    30.5 / 3.3   Hugging Face model card Qwen/Qwen3-30B-A3B: "30.5B in
                                total and 3.3B activated"
  Qwen2-57B-A14B   57 / 14      Qwen2 Technical Report (arXiv 2407.10671), Table 1
  DeepSeek-V3      671 / 37     DeepSeek-V3 Technical Report (arXiv 2412.19437): "671B total
                                parameters with 37B activated for each token" (the 14B MTP
                                module excluded; the preset has none)
  DeepSeek-V2-Lite 15.7 / 2.4   DeepSeek-V2 paper (arXiv 2405.04434), Appendix B: "15.7B total
                                parameters, of which 2.4B are activated for each token"

DeepSeek's activated counts leave out the input embedding table (a token reads one
row of it): V2-Lite's 2.4B is 2.45B without it and 2.66B with it (our
`active_param_count` counts embeddings in full), so for those presets the table's
`vocab x d_model` is subtracted from ours before comparing.

A count matches when within 0.5% of the figure, or within the figure's own
rounding (half a unit of its last digit: 1.3B covers 1.25-1.35B) where that is
wider: a two-digit published figure cannot be checked to 0.5%.
"""

import inspect
from decimal import Decimal

import gin
import pytest
from flax import nnx

from experiments.runtime import gin_utils
from layers.moe_layer import MoeLayer
from layers.transformer import TransformerLM

# preset: (vocab size, published total, published active, options it needs beyond main)
ZOO = {
    "llama3_8b": (128256, "8.03", "8.03", ()),
    "mixtral_8x7b": (32000, "46.7", "12.9", ()),
    "olmoe_1b_7b": (50304, "6.9", "1.3", ("TransformerLM.qk_norm",)),
    "qwen3_30b_a3b": (151936, "30.5", "3.3", ("TransformerLM.qk_norm",)),
    "qwen2_57b_a14b": (151936, "57", "14", ("TransformerLM.attention_bias",
                                            "MoeLayer.shared_gate")),
    "deepseek_v3": (129280, "671", "37", ("TransformerLM.attention",)),
    "deepseek_v2_lite": (102400, "15.7", "2.4", ("TransformerLM.attention",)),
}
# Presets whose published active count excludes the input embedding (see the module doc).
ACTIVE_WITHOUT_EMBEDDING = ("deepseek_v3", "deepseek_v2_lite")


def _known(option: str) -> bool:
    cls, arg = option.split(".")
    target = {"TransformerLM": TransformerLM, "MoeLayer": MoeLayer}[cls]
    return arg in inspect.signature(target.__init__).parameters


def _matches(count: int, published: str) -> bool:
    """Within 0.5% of the published figure, or equal to it at its own precision
    (rounded or cut off: model cards write 3.35B activated as "3.3B")."""
    figure = Decimal(published) * 10 ** 9
    unit = Decimal(1).scaleb(Decimal(published).as_tuple().exponent) * 10 ** 9
    return (abs(count - figure) <= max(Decimal("0.005") * figure, unit / 2)
            or figure <= count < figure + unit)


def test_rounding_rule():
    assert _matches(1_282_000_000, "1.3") and not _matches(1_240_000_000, "1.3")
    assert _matches(8_030_000_000, "8.03") and not _matches(8_080_000_000, "8.03")
    assert not _matches(46_400_000_000, "46.7")
    assert _matches(3_353_000_000, "3.3") and not _matches(3_420_000_000, "3.3")


@pytest.mark.parametrize("preset", sorted(ZOO))
def test_zoo_parameter_counts_match_published(preset):
    vocab, total, active, needs = ZOO[preset]
    missing = [o for o in needs if not _known(o)]
    if missing:
        pytest.skip(f"{preset} needs {', '.join(missing)}, not yet in this build")
    gin.clear_config()
    try:
        # Scanned: the same counts, traced once per repeating unit rather than per layer.
        gin_utils.parse([f"gin_configs/zoo/{preset}.gin"], ["TransformerLM.scan_layers = True"])
        model = nnx.eval_shape(lambda: TransformerLM(vocab_size=vocab, rngs=nnx.Rngs(0)))
        counts = model.param_count(), model.active_param_count()
        if preset in ACTIVE_WITHOUT_EMBEDDING:
            counts = counts[0], counts[1] - vocab * model.d_model
    finally:
        gin.clear_config()
    assert _matches(counts[0], total), (preset, "total", counts[0], total)
    assert _matches(counts[1], active), (preset, "active", counts[1], active)
