"""Self-speculative greedy decoding with the MTP head = plain greedy decoding.

Scenario: a tiny random MoE decoder with one MTP module (vocabulary 8, so that the
untrained MTP head's drafts are accepted often enough for both branches, accept and
reject, to run); 20 prompts of 1-7 tokens, 6 new tokens each, decoded by the plain
engine (`Generator`, greedy) and by `SpeculativeGenerator`: the tokens must be equal,
and the acceptance counts must show both branches were taken.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

from experiments.inference import generate as generate_lib
from experiments.inference import restore as restore_lib
from experiments.inference.speculative import SpeculativeGenerator
from experiments.train.run_state import split_model
from layers.moe_layer import MoeLayer
from layers.mtp import MultiTokenPrediction
from layers.transformer import TransformerLM
from moe.router_state import RouterState

VOCAB = 8


def _restored(mtp: bool) -> restore_lib.RestoredModel:
    model = TransformerLM(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                          moe_every=2, moe_block=functools.partial(MoeLayer, num_experts=4, k=2,
                                                                   d_ff=16),
                          dtype="float32", rngs=nnx.Rngs(3),
                          mtp=functools.partial(MultiTokenPrediction, depth=1) if mtp else None)
    restore_lib.make_dropless(model)
    graphdef, params, rest = split_model(model)
    return restore_lib.RestoredModel(workdir=None, step=0, vocab_size=VOCAB, graphdef=graphdef,
                                     params=params, rest=rest, router_state=RouterState())


def test_speculative_decoding_equals_plain_greedy_on_20_prompts():
    restored = _restored(mtp=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, size=rng.integers(1, 8)).tolist() for _ in range(20)]
    plain = generate_lib.Generator(restored).generate(prompts, max_new_tokens=6)
    speculative = SpeculativeGenerator(restored)
    assert speculative.generate(prompts, max_new_tokens=6) == plain
    stats = speculative.last_speculative
    assert stats.new_tokens == 20 * 6
    assert 0 < stats.accepted < stats.drafts  # both branches ran
    assert stats.acceptance_rate == stats.accepted / stats.drafts
    # An EOS stops a row as in plain decoding (the EOS is kept, nothing after it).
    eos = [plain[0][2]]
    assert (speculative.generate(prompts[:4], max_new_tokens=6, eos_ids=eos)
            == generate_lib.Generator(restored).generate(prompts[:4], max_new_tokens=6,
                                                         eos_ids=eos))


def test_speculative_decoding_needs_an_mtp_model():
    with pytest.raises(ValueError, match="needs a model with multi-token prediction"):
        SpeculativeGenerator(_restored(mtp=False))
