"""Soft MoE's routing statistics (`moe.soft_stats`) on hand-made dispatch/combine weights.

Scenario: 2 experts x 1 slot, one sequence of 4 positions, the last one padding,
and a second sequence of padding only. The logits (+-50) send tokens 0 and 1 to
slot 0 (expert 0) and token 2 to slot 1 (expert 1) in both directions: the combine
weights are one-hot per token, and slot 0's dispatch weights are 1/2 on tokens 0
and 1 (2 effective tokens), slot 1's are 1 on token 2 (1 effective token). The
padding sequence's slots are empty and count nowhere. The domain matrix of a
perfectly specialised layer gives I(domain; expert) = H(domain).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.reporting.soft_routing import soft_layer_report
from layers.soft_moe import soft_weights
from moe.soft_stats import soft_layer_stats

BIG = 50.0
LOGITS = jnp.asarray([[[BIG, -BIG], [BIG, -BIG], [-BIG, BIG], [BIG, -BIG]],
                      [[0.0, 0.0]] * 4], jnp.float32)  # [B=2, m=4, S=2]
MASK = jnp.asarray([[1, 1, 1, 0], [0, 0, 0, 0]], jnp.float32)


def _stats(mask=MASK):
    dispatch, combine = soft_weights(LOGITS, mask)
    return soft_layer_stats(dispatch, combine, mask, slots_per_expert=1).to_numpy()


def test_deterministic_logits_give_hand_computed_soft_statistics():
    s = _stats()
    assert s.num_tokens == 3
    np.testing.assert_allclose(s.combine_mass, [2.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(s.soft_load, [2 / 3, 1 / 3], atol=1e-6)
    np.testing.assert_allclose(s.num_slots, [1.0, 1.0])  # the padding sequence's slots: none
    np.testing.assert_allclose(s.effective_tokens_per_slot, [2.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(s.effective_token_fraction, [2 / 3, 1 / 3], atol=1e-5)
    np.testing.assert_allclose(s.top_dispatch_weight, [0.5, 1.0], atol=1e-6)
    assert s.combine_effective_slots == pytest.approx(1.0, abs=1e-5)


def test_two_slots_per_expert_sum_into_their_expert():
    """The same 2 slots read as 1 expert x 2 slots: all mass on the one expert."""
    dispatch, combine = soft_weights(LOGITS, MASK)
    s = soft_layer_stats(dispatch, combine, MASK, slots_per_expert=2).to_numpy()
    np.testing.assert_allclose(s.combine_mass, [3.0], atol=1e-6)
    np.testing.assert_allclose(s.num_slots, [2.0])
    np.testing.assert_allclose(s.effective_tokens_per_slot, [1.5], atol=1e-5)


def test_soft_report_of_specialised_domains_has_mutual_information_h_domain():
    """Domain 'a' = tokens 0, 1 (expert 0), domain 'b' = token 2 (expert 1)."""
    a = _stats(jnp.asarray([[1, 1, 0, 0], [0] * 4], jnp.float32))
    b = _stats(jnp.asarray([[0, 0, 1, 0], [0] * 4], jnp.float32))
    report = soft_layer_report([a, b], _stats(), ["a", "b"])
    assert report["soft"] and "no per-token expert choices" in report["note"]
    np.testing.assert_allclose(report["soft_routing_fractions"], [[1, 0], [0, 1]], atol=1e-6)
    assert report["soft_mutual_information_nats"] == pytest.approx(
        -(2 / 3) * np.log(2 / 3) - (1 / 3) * np.log(1 / 3), abs=1e-5)
    assert report["soft_load_imbalance"] == pytest.approx(1 / 3, abs=1e-5)
    with pytest.raises(ValueError, match="1 domain names for 2 domain passes"):
        soft_layer_report([a, b], _stats(), ["a"])
