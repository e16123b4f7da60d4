"""The experiment protocol (experiments/reporting/protocol.py) on hand-made run records.

Each record is what `sweep.collect_run` returns, cut to what the protocol reads:
variant, seed, workdir (relative to the sweep root), the final validation loss
and the validation curve.
"""

import math

import numpy as np
import pytest

from experiments.reporting import protocol


def _run(variant, seed, loss, *, curve=None, flops=None, **extra):
    record = {"variant": variant, "seed": seed, "workdir": f"demo/{variant}/seed{seed}",
              "valid_loss": {"all": loss}, "valid_curve": curve or [[10, None, loss]], **extra}
    if flops is not None:
        record["valid_flops"] = flops
    return record


def _two_variants(a_losses, b_losses):
    return ([_run("a", s, loss) for s, loss in a_losses.items()]
            + [_run("b", s, loss) for s, loss in b_losses.items()])


def test_paired_differences_and_standard_error():
    # a - b by seed: -0.1, -0.2, -0.3 -> mean -0.2; sample std 0.1 -> SE 0.1 / sqrt(3).
    records = _two_variants({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.1, 1: 2.2, 2: 3.3})
    p = protocol.paired(records, "a", "b")
    assert p.seeds == (0, 1, 2) and p.n == 3
    np.testing.assert_allclose(p.diffs, [-0.1, -0.2, -0.3])
    assert p.mean == pytest.approx(-0.2)
    assert p.se == pytest.approx(0.1 / math.sqrt(3))
    # The unpaired spread (losses 1..3) is far larger than the paired one: pairing matters.
    assert p.se < np.std([1.0, 2.0, 3.0], ddof=1) / math.sqrt(3) / 5


@pytest.mark.parametrize("diffs, threshold, outcome", [
    ([-0.10, -0.20, -0.30], 3.0, "supported"),   # mean -0.2, 3 SE = 0.173
    ([-0.10, -0.20, -0.30], 4.0, "inconclusive at this scale"),  # 4 SE = 0.231 > 0.2
    ([0.10, 0.20, 0.30], 3.0, "contradicted"),
    ([-0.10, 0.10, -0.05], 2.0, "inconclusive at this scale"),
])
def test_verdict_thresholds(diffs, threshold, outcome):
    records = _two_variants({s: 2.0 + d for s, d in enumerate(diffs)},
                            {s: 2.0 for s in range(len(diffs))})
    v = protocol.verdict(protocol.paired(records, "a", "b"), threshold)
    assert v.outcome == outcome
    text = v.text()
    assert text.startswith(outcome) and f"{threshold:g} SE" in text  # states its threshold
    assert f"{v.paired.mean:+.4f}" in text


def test_a_missing_seed_is_left_out_of_the_pairs_and_named():
    # b has no seed 2 and a has no seed 3: two pairs remain.
    records = _two_variants({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.2, 1: 1.3, 3: 9.0})
    p = protocol.paired(records, "a", "b")
    assert p.seeds == (0, 1) and p.missing == (2, 3)
    assert "seeds run by only one side, not paired: [2, 3]" in protocol.verdict(p).text()


def test_a_diverged_run_is_not_paired_and_is_named():
    records = _two_variants({0: 1.0, 1: float("nan"), 2: 1.0}, {0: 1.2, 1: 1.3, 2: 1.25})
    p = protocol.paired(records, "a", "b")
    assert p.seeds == (0, 2) and p.diverged == ("a seed 1",)
    assert "diverged (non-finite loss), not paired: a seed 1" in protocol.verdict(p).text()
    assert "| `a` | 1 | diverged |" in "\n".join(protocol.run_table(records))


def test_fewer_than_two_pairs_is_inconclusive():
    records = _two_variants({0: 1.0, 1: float("inf")}, {0: 5.0, 1: 5.0})
    v = protocol.verdict(protocol.paired(records, "a", "b"))
    assert v.outcome == "inconclusive at this scale"
    assert "1 paired seed(s), fewer than the two" in v.text()


def test_bad_inputs_are_refused_by_name():
    records = _two_variants({0: 1.0}, {0: 1.0})
    with pytest.raises(ValueError, match="variant 'c'"):
        protocol.paired(records, "c", "b")
    with pytest.raises(ValueError, match="two records for variant 'a' seed 0"):
        protocol.paired(records + [_run("a", 0, 1.0)], "a", "b")
    with pytest.raises(ValueError, match="threshold must be > 0"):
        protocol.verdict(protocol.paired(records, "a", "b"), 0.0)
    with pytest.raises(ValueError, match="absolute"):
        protocol.run_table([dict(records[0], workdir="/home/me/runs/a/seed0")])


def test_run_and_variant_tables():
    records = [_run("a", 0, 1.0, wall_seconds=61.2, steps=100, steps_per_second=2.5,
                    load_average=3.04),
               _run("a", 1, 1.1), _run("b", 0, 1.3), _run("b", 1, 1.5)]
    rows = protocol.run_table(records)
    assert rows[2] == "| `a` | 0 | 1.0000 | 100 | 2.50 | 61 | 3.0 | `demo/a/seed0` |"
    assert rows[3] == "| `a` | 1 | 1.1000 | - | - | - | - | `demo/a/seed1` |"
    table = "\n".join(protocol.variant_table(records, baseline="b", threshold=3.0))
    # a - b = -0.3, -0.4: mean -0.35, SE 0.05 -> 3 SE 0.15: supported.
    assert "| `a` | 2 | 1.0500 ± 0.0500 (n=2) | 61 | -0.3500 ± 0.0500 (n=2) | supported |" in table
    assert "| `b` | 2 | 1.4000 ± 0.1000 (n=2) | - | - | - |" in table


def test_curves_average_seeds_at_common_steps_and_flops():
    a0 = _run("a", 0, 2.0, curve=[[10, None, 3.0], [20, None, 2.0]], flops=[100.0, 200.0])
    a1 = _run("a", 1, 1.0, curve=[[10, None, 2.0], [20, None, 1.0], [30, None, 0.5]],
              flops=[110.0, 210.0, 310.0])
    by_step = protocol.curves([a0, a1], "step")["a"]
    np.testing.assert_allclose(by_step[0], [10, 20])  # step 30: seed 0 never got there
    np.testing.assert_allclose(by_step[1], [2.5, 1.5])
    np.testing.assert_allclose(protocol.curves([a0, a1], "flops")["a"][0], [105.0, 205.0])
    # A variant without FLOPs records has no FLOPs curve (not a wrong one).
    assert "b" not in protocol.curves([a0, _run("b", 0, 1.0)], "flops")


def test_plot_writes_both_panels(tmp_path):
    records = [_run(v, s, 1.0 + s, curve=[[10, None, 3.0], [20, None, 2.0]], flops=[1.0, 2.0])
               for v in ("a", "b") for s in (0, 1)]
    protocol.plot_loss_curves(records, tmp_path / "x" / "curves.png", title="t")
    assert (tmp_path / "x" / "curves.png").stat().st_size > 1000
