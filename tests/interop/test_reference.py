"""Our imported models score like transformers' on the same weights.

Needs torch and transformers: `make test-interop` (skipped in the core venv).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch: run `make test-interop`")
pytest.importorskip("transformers", reason="needs transformers: run `make test-interop`")

from tests.helpers import run_script  # noqa: E402
from tests.interop.families import FAMILIES, VOCAB_SIZE, Family, save  # noqa: E402

# Positions far enough apart that a wrong RoPE base shows in the log-probs.
IDS = [int(i) for i in np.random.default_rng(0).integers(3, VOCAB_SIZE, size=24)]


def random_model(family: Family):
    """A tiny float32 model with weights large enough for every part to matter
    (transformers' init, std 0.02, gives near-uniform log-probs)."""
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config(), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model.eval()


def reference_logprobs(model, ids: list[int]) -> np.ndarray:
    """transformers' log p(ids[i] | ids[:i]), i = 1..n-1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def score(workdir, ids: list[int]) -> dict:
    result = run_script("scripts/score.py", f"--workdir={workdir}", "--json",
                        "--ids=" + ",".join(map(str, ids)))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_scores_match_transformers(family, tmp_path):
    model = random_model(family)
    save(family, model, tmp_path / "hf")
    workdir = family.import_fn(tmp_path / "hf", tmp_path / "ours")
    want = reference_logprobs(model, IDS)
    got = score(workdir, IDS)
    assert got["ids"] == IDS
    np.testing.assert_allclose(got["logprobs"], want, atol=1e-4, rtol=0)
    # The weights are far from uniform: a wrong model would not pass by chance.
    assert np.ptp(want) > 1.0
