"""The dense importer reads the RoPE base from both config.json layouts:
transformers 5's `rope_parameters` and the older top-level `rope_theta`."""

import pytest

from experiments.convert.import_dense import model_bindings

BASE = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)


def _wavelength(config):
    (line,) = [b for b in model_bindings(config) if b.startswith("TransformerLM.rope_max_wave")]
    return float(line.split("=")[1])


@pytest.mark.parametrize("rope", [{"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
                                  {"rope_theta": 500.0}])
def test_both_layouts(rope):
    assert _wavelength({**BASE, **rope}) == 500.0


def test_default_base():
    assert _wavelength(BASE) == 10000.0


@pytest.mark.parametrize("rope, match", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters.rope_type 'llama3'"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, "rope_parameters"),
    ({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
])
def test_scaled_rope_refused(rope, match):
    with pytest.raises(ValueError, match=match):
        model_bindings({**BASE, **rope})
