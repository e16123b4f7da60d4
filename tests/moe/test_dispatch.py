"""Capacity, slot assignment and dispatch implementations (the dispatch interface and the
capacity and drop-order conventions of docs/architecture.md).

The dispatch checks run over every registered dispatch (`available_dispatches()`); a
new dispatch is tested by registering it. The only filter is a declared
`DispatchTraits` property, never a list of names."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import dispatch, routing
from moe.dispatch import dispatchers
from moe.dispatch.registry import DispatchTraits, dispatch_traits, unavailable
from moe.experts import ExpertFFN
from moe.kernels import padded_fused, padded_gmm, xla_gmm
from moe.numeric import ceil_div_float

# --------------------------------------------------------------------------- capacity

def test_expert_capacity_formula_and_rounding():
    assert dispatch.expert_capacity(8192, 8, 2, 1.25) == 2560  # ceil(2*8192*1.25/8)
    assert dispatch.expert_capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert dispatch.expert_capacity(10, 4, 1, 0.01, min_capacity=2) == 2
    assert dispatch.expert_capacity(10, 4, 1, 1.0, multiple_of=4) == 4
    for num_tokens, num_experts, k, cf in [(7, 3, 2, 0.3), (100, 16, 4, 1.1), (1, 8, 1, 1.0)]:
        capacity = dispatch.expert_capacity(num_tokens, num_experts, k, cf)
        assert isinstance(capacity, int) and capacity >= 1
        assert capacity * num_experts >= k * num_tokens * cf - 1e-6


def test_ceil_div_float_ignores_float_noise():
    assert ceil_div_float(2 * 8192 * 1.25, 8) == 2560  # exact quotient
    assert ceil_div_float(2560.0000000001, 1) == 2560  # noise above it
    assert ceil_div_float(2560.001, 1) == 2561  # a real excess
    assert ceil_div_float(10, 4) == 3


@pytest.mark.parametrize("cf", [0, -1.0, None])
def test_capacity_factor_must_be_positive(cf):
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        dispatch.expert_capacity(10, 4, 1, cf)


# --------------------------------------------------------------------------- slots

def test_choice_major_first_choices_beat_second_choices():
    # Four tokens, E=2, C=2. Every token's first choice is expert 0 except
    # token 3; token 0 and 1 name expert 1 as second choice. Choice-major order:
    # expert 0 slots go to tokens 0, 1 (first choices, in token order) and
    # token 2's first choice is dropped; expert 1 takes token 3's first choice
    # before token 0's second choice, then is full.
    expert_index = jnp.array([[0, 1], [0, 1], [0, 1], [1, 0]])
    slot, keep = dispatch.assign_slots(expert_index, 2, 2)
    np.testing.assert_array_equal(slot, [[0, 1], [1, 2], [2, 3], [0, 3]])
    np.testing.assert_array_equal(keep, [[True, True], [True, False], [False, False],
                                         [True, False]])


def test_capacity_never_exceeded_and_nothing_dropped_when_c_ge_t():
    expert_index = routing.top_k_gating(jax.random.normal(jax.random.key(0), (64, 4)),
                                        2).expert_index
    for capacity in (1, 5, 17):
        _, keep = dispatch.assign_slots(expert_index, 4, capacity)
        kept_per_expert = np.bincount(np.asarray(expert_index)[np.asarray(keep)], minlength=4)
        assert kept_per_expert.max() <= capacity
    _, keep = dispatch.assign_slots(expert_index, 4, 64)
    assert bool(jnp.all(keep))


def test_saturated_expert_keeps_exactly_the_first_c_tokens():
    # Everybody wants expert 1 (top-1); C=3 keeps tokens 0, 1, 2.
    expert_index = jnp.ones((6, 1), jnp.int32)
    _, keep = dispatch.assign_slots(expert_index, 2, 3)
    np.testing.assert_array_equal(keep[:, 0], [True, True, True, False, False, False])


def test_priority_routing_serves_high_priority_first():
    # Same all-to-expert-1 scenario; priorities favour tokens 5, 4, 3.
    expert_index = jnp.ones((6, 1), jnp.int32)
    priority = jnp.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    _, keep = dispatch.assign_slots(expert_index, 2, 3, priority=priority)
    np.testing.assert_array_equal(keep[:, 0], [False, False, False, True, True, True])


def test_padding_takes_no_slot():
    # Tokens 0 and 1 are padding: the real tokens 2, 3 get expert 0's two slots.
    expert_index = jnp.zeros((4, 1), jnp.int32)
    slot, keep = dispatch.assign_slots(expert_index, 2, 2, mask=jnp.array([0, 0, 1, 1]))
    np.testing.assert_array_equal(keep[:, 0], [False, False, True, True])
    np.testing.assert_array_equal(slot[2:, 0], [0, 1])


# --------------------------------------------------------------------------- dispatch

NUM_TOKENS, D_MODEL, D_FF, NUM_EXPERTS, K = 24, 8, 12, 4, 2


def _ffn(activation="relu", key=0):
    keys = jax.random.split(jax.random.key(key), 3)
    shape_in, shape_out = (NUM_EXPERTS, D_MODEL, D_FF), (NUM_EXPERTS, D_FF, D_MODEL)
    gate = 0.3 * jax.random.normal(keys[2], shape_in) if activation == "swiglu" else None
    return ExpertFFN(0.3 * jax.random.normal(keys[0], shape_in),
                     0.3 * jax.random.normal(keys[1], shape_out), gate, activation)


def _reference(x, expert_index, weights, ffn, keep=None):
    """Per-expert loop: y_t = sum_j keep_tj * w_tj * Expert_{e_tj}(x_t)."""
    keep = jnp.ones(expert_index.shape, bool) if keep is None else keep
    y = jnp.zeros_like(x)
    for e in range(ffn.num_experts):
        w = jnp.sum(jnp.where((expert_index == e) & keep, weights, 0.0), axis=1)
        y = y + w[:, None] * ffn.single(e, x)
    return y


def _routing(key=1):
    x = jax.random.normal(jax.random.key(key), (NUM_TOKENS, D_MODEL))
    logits = jax.random.normal(jax.random.key(key + 1), (NUM_TOKENS, NUM_EXPERTS))
    gating = routing.top_k_gating(logits, K, normalize=True)
    return x, gating.expert_index, gating.weights


def _toy_dispatch(x, expert_index, weights, ffn, *, capacity, priority=None, mask=None):
    """A dispatch defined by this test module: every expert on every token, then each
    token gathers its k outputs (E times the work)."""
    if capacity is None:
        keep = jnp.ones(expert_index.shape, bool)
    else:
        _, keep = dispatch.assign_slots(expert_index, ffn.num_experts, capacity,
                                        priority=priority, mask=mask)
    outputs = ffn.all_experts(x)  # [E, T, d]
    chosen = outputs[expert_index, jnp.arange(x.shape[0])[:, None]]  # [T, k, d]
    y = jnp.einsum("tk,tkd->td", jnp.where(keep, weights, 0.0).astype(x.dtype), chosen)
    return dispatch.DispatchOutput(y, keep)


# Registered at import, before the parametrisations below read the registry.
TOY = "toy_gather_all"
if TOY not in dispatch.available_dispatches():
    dispatch.register_dispatch(TOY, _toy_dispatch)
DISPATCHES = dispatch.available_dispatches()


def _usable(name):
    """The dispatch, or a skip when its optional package is not installed (the declared
    `DispatchTraits.missing`; `test_a_missing_extra_is_named` covers that refusal)."""
    reason = unavailable(name)
    if reason:
        pytest.skip(reason)
    return dispatch.get_dispatch(name)

EXACT_DROPLESS = tuple(name for name in DISPATCHES if dispatch_traits(name).exact_dropless)


@pytest.mark.parametrize("name", DISPATCHES)
@pytest.mark.parametrize("capacity", [None, NUM_TOKENS])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_all_dispatches_match_per_expert_loop_when_nothing_dropped(name, capacity, activation):
    x, expert_index, weights = _routing()
    ffn = _ffn(activation)
    fn = _usable(name)

    def loss_dispatch(x, ffn, weights):
        return jnp.sum(jnp.sin(fn(x, expert_index, weights, ffn, capacity=capacity).y))

    def loss_reference(x, ffn, weights):
        return jnp.sum(jnp.sin(_reference(x, expert_index, weights, ffn)))

    out = fn(x, expert_index, weights, ffn, capacity=capacity)
    np.testing.assert_allclose(out.y, _reference(x, expert_index, weights, ffn), atol=1e-5)
    assert bool(jnp.all(out.keep))
    grads = jax.grad(loss_dispatch, argnums=(0, 1, 2))(x, ffn, weights)
    expected = jax.grad(loss_reference, argnums=(0, 1, 2))(x, ffn, weights)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", DISPATCHES)
def test_capacity_dispatch_drops_exactly_the_overflow(name):
    x, expert_index, weights = _routing(key=5)
    ffn = _ffn()
    capacity = 5  # 48 assignments into 4 x 5 slots: many drops
    _, keep = dispatch.assign_slots(expert_index, NUM_EXPERTS, capacity)
    assert not bool(jnp.all(keep))
    out = _usable(name)(x, expert_index, weights, ffn, capacity=capacity)
    np.testing.assert_array_equal(out.keep, keep)
    np.testing.assert_allclose(out.y, _reference(x, expert_index, weights, ffn, keep), atol=1e-5)

    def loss(x, ffn):
        return jnp.sum(_usable(name)(x, expert_index, weights, ffn,
                                                   capacity=capacity).y ** 2)

    def loss_ref(x, ffn):
        return jnp.sum(_reference(x, expert_index, weights, ffn, keep) ** 2)

    for got, want in zip(jax.tree.leaves(jax.grad(loss, (0, 1))(x, ffn)),
                         jax.tree.leaves(jax.grad(loss_ref, (0, 1))(x, ffn))):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("name", EXACT_DROPLESS)
def test_huge_capacity_equals_dropless(name):
    x, expert_index, weights = _routing(key=7)
    ffn = _ffn()
    fn = _usable(name)
    capacity = dispatch.expert_capacity(NUM_TOKENS, NUM_EXPERTS, K, NUM_EXPERTS / K)
    np.testing.assert_allclose(fn(x, expert_index, weights, ffn, capacity=capacity).y,
                               fn(x, expert_index, weights, ffn, capacity=None).y, atol=1e-5)


@pytest.mark.parametrize("name", DISPATCHES)
def test_dropless_with_empty_and_skewed_groups(name):
    # Everything on expert 2 except one token on expert 0: experts 1 and 3 empty.
    # An exact-dropless dispatch keeps all 24 assignments; any other may drop only
    # what it reports in keep.
    x = jax.random.normal(jax.random.key(3), (NUM_TOKENS, D_MODEL))
    expert_index = jnp.full((NUM_TOKENS, 1), 2, jnp.int32).at[0, 0].set(0)
    weights = jnp.ones((NUM_TOKENS, 1))
    ffn = _ffn()
    out = _usable(name)(x, expert_index, weights, ffn, capacity=None)
    if dispatch_traits(name).exact_dropless:
        assert bool(jnp.all(out.keep))
    np.testing.assert_allclose(out.y, _reference(x, expert_index, weights, ffn, out.keep),
                               atol=1e-5)


def test_expert_choice_dispatch_matches_loop():
    x = jax.random.normal(jax.random.key(4), (NUM_TOKENS, D_MODEL))
    gating = routing.expert_choice_gating(
        jax.random.normal(jax.random.key(5), (NUM_TOKENS, NUM_EXPERTS)), 6)
    ffn = _ffn()
    y = dispatch.expert_choice_dispatch(x, gating.token_index, gating.weights, ffn)
    expected = jnp.zeros_like(x)
    for e in range(NUM_EXPERTS):
        for c in range(6):
            t = int(gating.token_index[e, c])
            expected = expected.at[t].add(gating.weights[e, c] * ffn.single(e, x[t:t + 1])[0])
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_unknown_dispatch_and_duplicate_registration():
    with pytest.raises(ValueError, match="dispatch must be one of"):
        dispatch.get_dispatch("magic")
    with pytest.raises(ValueError, match="dispatch must be one of"):
        dispatch_traits("magic")
    with pytest.raises(ValueError, match="already registered"):
        dispatch.register_dispatch("einsum", dispatch.einsum_dispatch)


def test_a_dispatch_registered_in_a_test_module_is_checked_like_the_others():
    # The toy registered above, with the default traits, is among the names every
    # dispatch check of this module is parametrised with.
    assert dispatch_traits(TOY) == DispatchTraits(exact_dropless=True)
    checks = [test_all_dispatches_match_per_expert_loop_when_nothing_dropped,
              test_capacity_dispatch_drops_exactly_the_overflow,
              test_huge_capacity_equals_dropless, test_dropless_with_empty_and_skewed_groups]
    for check in checks:
        names = [mark.args[1] for mark in check.pytestmark if mark.args[0] == "name"]
        assert names and TOY in names[0], check.__name__


def test_grouped_capacity_keeps_the_buffers_drops_with_padding_and_priority():
    """On CPU, with large groups, the `sort` dispatch's capacity mode sends only the kept
    rows through the grouped matmul (no empty slots). With padding (tokens 0-3) and a
    priority order, it must keep exactly what the `[E, C, d]` buffers keep, through either
    grouped matmul (tile loop, padded layout), and give the same output and gradients
    (the registry's `sort` takes this path only for large groups, so the dispatch-wide
    tests at these sizes run the buffers)."""
    x, expert_index, weights = _routing(key=7)
    options = dict(capacity=4, priority=jax.random.uniform(jax.random.key(3), (NUM_TOKENS,)),
                   mask=jnp.ones((NUM_TOKENS,)).at[:4].set(0.0))
    grouped = functools.partial(dispatchers.grouped_capacity_dispatch, gmm=xla_gmm.gmm,
                                **options)
    # The same through the tile-aligned layout and its grouped matmul (CPU's default).
    padded = functools.partial(dispatchers.grouped_capacity_dispatch, gmm=None,
                               padded=(padded_gmm.DEFAULT_TILE_M, padded_gmm.DEFAULT_TILE_M),
                               **options)
    buffers = functools.partial(dispatch.capacity_sort_dispatch, **options)
    @jax.jit  # one program for all paths: one compile
    def all_paths(x, ffn):
        return [(f(x, expert_index, weights, ffn), jax.grad(
            lambda x, ffn, f=f: jnp.sum(jnp.sin(f(x, expert_index, weights, ffn).y)),
            argnums=(0, 1))(x, ffn)) for f in (grouped, padded, buffers)]

    *candidates, (want, want_grads) = all_paths(x, _ffn())
    assert 0 < int(jnp.sum(want.keep)) < 2 * (NUM_TOKENS - 4)  # drops happen
    assert not bool(jnp.any(want.keep[:4]))  # padding keeps nothing
    for got, got_grads in candidates:
        np.testing.assert_array_equal(got.keep, want.keep)
        np.testing.assert_allclose(got.y, want.y, atol=1e-5)
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_sort_takes_the_padded_layout_on_cpu_only_from_a_tile_of_rows_per_expert(
        monkeypatch, activation):
    # 64 tokens x top-2 over 4 experts = 128 rows, a tile (32) per expert on average: the
    # fused padded grouped matmuls, with the per-expert loop's values and gradients (of
    # the tokens, the experts and the routing weights). 24 tokens (48 rows, 12 per
    # expert) stay on the tile loop: padding would more than double them.
    calls = []
    real = padded_fused.gather_gmm
    monkeypatch.setattr(padded_fused, "gather_gmm",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ffn = _ffn(activation, key=3)
    fn = dispatch.get_dispatch("sort")
    x = jax.random.normal(jax.random.key(11), (64, D_MODEL))
    gating = routing.top_k_gating(jax.random.normal(jax.random.key(12), (64, NUM_EXPERTS)), K,
                                  normalize=True)
    expert_index, weights = gating.expert_index, gating.weights

    def loss(x, ffn, weights):
        return jnp.sum(jnp.sin(fn(x, expert_index, weights, ffn, capacity=None).y))

    def loss_ref(x, ffn, weights):
        return jnp.sum(jnp.sin(_reference(x, expert_index, weights, ffn)))

    np.testing.assert_allclose(fn(x, expert_index, weights, ffn, capacity=None).y,
                               _reference(x, expert_index, weights, ffn), atol=1e-5)
    got, want = (jax.tree.leaves(jax.grad(f, (0, 1, 2))(x, ffn, weights))
                 for f in (loss, loss_ref))
    assert len(got) == len(want) == 4 + (activation == "swiglu")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)
    assert calls and jax.default_backend() == "cpu"
    calls.clear()
    small_x, small_index, small_weights = _routing()
    fn(small_x, small_index, small_weights, ffn, capacity=None)
    assert not calls
