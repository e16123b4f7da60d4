"""Balance scopes (moe/balance_scope.py): parsing, group ids, scoped LBL values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import balance
from moe import balance_scope as bs


@pytest.mark.parametrize("spec, kind, size", [
    ("sequence", "sequence", None), ("sequences:4", "sequences", 4),
    ("micro_batch", "micro_batch", None), ("global_batch", "global_batch", None),
    ("shuffled:128", "shuffled", 128)])
def test_parse_scopes(spec, kind, size):
    scope = bs.parse_lbl_scope(spec)
    assert (scope.kind, scope.size) == (kind, size)
    assert str(scope) == spec


@pytest.mark.parametrize("spec, match", [
    ("global", "one of"), ("sequences", "positive integer size"), ("sequences:0", "positive"),
    ("shuffled:x", "positive"), ("micro_batch:2", "takes no size"), (3, "must be a string")])
def test_parse_rejects_bad_scopes_naming_allowed_values(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        bs.parse_lbl_scope(spec)
    assert "lbl_scope" in str(info.value)


def test_layout_and_scope_validation():
    with pytest.raises(ValueError, match="divisible by num_microbatches"):
        bs.BatchLayout(batch_size=6, seq_len=4, num_microbatches=4)
    layout = bs.BatchLayout(batch_size=8, seq_len=4, num_microbatches=2)
    with pytest.raises(ValueError, match="do not divide the batch size"):
        bs.group_ids(bs.parse_lbl_scope("sequences:3"), layout)
    with pytest.raises(ValueError, match="do not divide the 32 tokens"):
        bs.group_ids(bs.parse_lbl_scope("shuffled:5"), layout)
    with pytest.raises(ValueError, match="rng"):
        bs.group_ids(bs.parse_lbl_scope("shuffled:8"), layout)


def test_group_ids_of_row_scopes():
    # 8 rows, 2 micro-batches of 4 rows, 2 data-parallel shards: a device sees 2 rows.
    layout = bs.BatchLayout(batch_size=8, seq_len=3, num_microbatches=2, data_parallel_size=2)
    expected = {"sequence": ([0, 1, 2, 3, 4, 5, 6, 7], 8),
                "sequences:4": ([0, 0, 0, 0, 1, 1, 1, 1], 2),
                "micro_batch": ([0, 0, 1, 1, 2, 2, 3, 3], 4),
                "global_batch": ([0] * 8, 1)}
    for spec, (rows, num_groups) in expected.items():
        group, g = bs.group_ids(bs.parse_lbl_scope(spec), layout)
        assert g == num_groups, spec
        np.testing.assert_array_equal(group, np.repeat(np.array(rows)[:, None], 3, 1))


def test_shuffled_groups_are_a_random_partition_into_equal_groups():
    layout = bs.BatchLayout(batch_size=4, seq_len=8, num_microbatches=2)
    group, num_groups = bs.group_ids(bs.parse_lbl_scope("shuffled:8"), layout,
                                     jax.random.PRNGKey(0))
    assert num_groups == 4
    np.testing.assert_array_equal(np.bincount(np.asarray(group).ravel()), [8, 8, 8, 8])
    # Not the row layout, and a different step key draws other groups.
    assert not np.array_equal(np.asarray(group[:, 0]), np.arange(4))
    other, _ = bs.group_ids(bs.parse_lbl_scope("shuffled:8"), layout, jax.random.PRNGKey(1))
    assert not np.array_equal(np.asarray(group), np.asarray(other))


def test_needs_step_counts_only_when_a_group_spans_microbatches():
    one = bs.BatchLayout(batch_size=8, seq_len=2, num_microbatches=1)
    two = bs.BatchLayout(batch_size=8, seq_len=2, num_microbatches=2, data_parallel_size=2)
    for spec in ("sequence", "sequences:4", "micro_batch", "global_batch", "shuffled:4"):
        assert not bs.needs_step_counts(bs.parse_lbl_scope(spec), one), spec
    expected = {"sequence": False, "sequences:2": False, "sequences:4": False,
                "sequences:8": True, "micro_batch": False, "global_batch": True,
                "shuffled:4": True}
    for spec, needed in expected.items():
        assert bs.needs_step_counts(bs.parse_lbl_scope(spec), two) == needed, spec


def _random_routing(seed, shape, num_experts=4, k=2):
    """Random probs [..., E] and the top-k of them as the selected experts."""
    logits = jax.random.normal(jax.random.PRNGKey(seed), (*shape, num_experts))
    probs = jax.nn.softmax(logits)
    return logits, probs, jax.lax.top_k(probs, k)[1]


def test_single_group_equals_the_switch_loss_with_padding():
    _, probs, index = _random_routing(0, (3, 5))
    mask = jnp.ones((3, 5)).at[:, -1].set(0)
    scoped = bs.scoped_lbl(probs, index, mask, jnp.zeros((3, 5), jnp.int32), 1)
    flat_mask = mask.reshape(-1)
    counts = balance.expert_counts(index.reshape(-1, 2), 4, mask=flat_mask)
    expected = balance.load_balancing_loss(probs.reshape(-1, 4), counts, mask=flat_mask)
    assert float(scoped) == pytest.approx(float(expected), rel=1e-6)


def test_mean_of_group_losses():
    # Two groups of unequal size; the scoped loss is the plain mean of the two Switch losses.
    _, probs, index = _random_routing(1, (10,))
    group = jnp.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    mask = jnp.ones(10)
    per_group = [balance.load_balancing_loss(
        probs[group == g], balance.expert_counts(index[group == g], 4)) for g in (0, 1)]
    scoped = bs.scoped_lbl(probs, index, mask, group, 2)
    assert float(scoped) == pytest.approx(float(sum(per_group)) / 2, rel=1e-6)
    # An empty (all-padding) third group is not counted in the mean.
    scoped3 = bs.scoped_lbl(probs, index, mask, group, 3)
    assert float(scoped3) == pytest.approx(float(scoped), rel=1e-6)


def test_two_microbatches_routed_to_different_experts():
    # E=2, k=1. Micro-batch 1 sends all 4 tokens to expert 0 with p ~ 1, micro-batch 2
    # all to expert 1. Each micro-batch alone is collapsed (LBL ~ E = 2); over the
    # global batch the counts are uniform, so the global LBL is exactly 1.
    probs = jnp.array([[[0.999, 0.001]] * 4, [[0.001, 0.999]] * 4])  # [2 mb, 4, 2]
    index = jnp.argmax(probs, -1)[..., None]
    mask = jnp.ones((2, 4))
    micro = bs.scoped_lbl(probs, index, mask, jnp.array([[0] * 4, [1] * 4]), 2)
    global_ = bs.scoped_lbl(probs, index, mask, jnp.zeros((2, 4), jnp.int32), 1)
    assert float(micro) == pytest.approx(2 * 0.999, rel=1e-6)
    assert float(global_) == pytest.approx(1.0, abs=1e-6)


def test_shares_over_microbatches_equal_the_concatenated_batch_in_value_and_gradient():
    # M=4 micro-batches of 2 rows x 6 tokens, with padding in one row. The global
    # loss assembled from per-micro-batch shares (global counts as constants)
    # equals the loss of the concatenated batch; so do the gradients w.r.t. logits.
    logits, _, _ = _random_routing(2, (8, 6))
    mask = jnp.ones((8, 6)).at[3, 4:].set(0)
    group = jnp.zeros((8, 6), jnp.int32)

    def concatenated(lg):
        probs = jax.nn.softmax(lg)
        return bs.scoped_lbl(probs, jax.lax.top_k(probs, 2)[1], mask, group, 1)

    def accumulated(lg):
        probs = jax.nn.softmax(lg)
        index = jax.lax.top_k(probs, 2)[1]
        counts = bs.group_counts(index, mask, group, 1, 4)
        tokens = bs.group_tokens(mask, group, 1)
        return sum(bs.scoped_lbl_share(probs[r:r + 2], mask[r:r + 2], group[r:r + 2],
                                       counts, tokens) for r in range(0, 8, 2))

    v1, g1 = jax.value_and_grad(concatenated)(logits)
    v2, g2 = jax.value_and_grad(accumulated)(logits)
    assert float(v1) == pytest.approx(float(v2), rel=1e-6)
    np.testing.assert_allclose(g1, g2, atol=1e-7)
    assert float(jnp.abs(g1).max()) > 0


def test_loss_is_one_at_balance_for_every_scope_and_layout():
    # Every row sends its 8 tokens round-robin to E=4 experts (k=1): every group of
    # every scope is balanced, so the loss is 1.0 for any probabilities.
    probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (8, 8, 4)))
    index = (jnp.arange(8)[None, :, None] % 4 + jnp.zeros((8, 1, 1), jnp.int32))
    mask = jnp.ones((8, 8))
    for layout in (bs.BatchLayout(8, 8), bs.BatchLayout(8, 8, 4), bs.BatchLayout(8, 8, 2, 4)):
        for spec in ("sequence", "sequences:2", "micro_batch", "global_batch"):
            group, g = bs.group_ids(bs.parse_lbl_scope(spec), layout)
            assert float(bs.scoped_lbl(probs, index, mask, group, g)) == pytest.approx(
                1.0, abs=1e-6), (spec, layout)


def _sequence_loss(probs, expert_index, batch_size):
    """The DeepSeek-V3 sequence-wise balance loss as the training step computes it
    (`experiments.train.balance_loss`): the scoped LBL with one group per row."""
    seq_len = probs.shape[0] // batch_size
    group, num_groups = bs.group_ids(bs.parse_lbl_scope("sequence"),
                                     bs.BatchLayout(batch_size, seq_len))
    return bs.scoped_lbl(probs, expert_index, jnp.ones(probs.shape[0]), group.reshape(-1),
                         num_groups)


def test_sequence_scope_is_the_deepseek_sequence_wise_loss():
    # Two sequences of 4 tokens; within each, k=1 choices cover all 4 experts.
    expert_index = jnp.array([[0], [1], [2], [3], [3], [2], [1], [0]])
    probs = jnp.full((8, 4), 0.25)
    np.testing.assert_allclose(_sequence_loss(probs, expert_index, 2), 1.0, rtol=1e-6)
    # Sequence 0 collapses onto expert 0 with scores concentrated there: E = 4.
    collapsed_idx = jnp.zeros((4, 1), jnp.int32)
    collapsed_probs = jnp.zeros((4, 4)).at[:, 0].set(1.0)
    np.testing.assert_allclose(_sequence_loss(collapsed_probs, collapsed_idx, 1), 4.0,
                               rtol=1e-6)


def test_counts_carry_no_gradient_and_exclude_padding():
    index = jnp.array([[0, 1], [1, 2], [3, 0]])
    counts = bs.group_counts(index, jnp.array([1, 1, 0]), jnp.array([0, 1, 1]), 2, 4)
    np.testing.assert_array_equal(counts, [[1, 1, 0, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(bs.group_tokens(jnp.array([1, 1, 0]), jnp.array([0, 1, 1]), 2),
                                  [1, 1])


def test_group_max_violation():
    counts = jnp.array([[4.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # MaxVio 1, 0; empty skipped
    assert float(bs.group_max_violation(counts)) == pytest.approx(0.5)
