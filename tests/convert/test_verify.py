"""The --verify verdict: an exact case may differ by fp32 rounding, which grows with
the logits (tolerance relative to max |logit|, at least 1)."""

from experiments.convert.verify import EXACT_TOLERANCE, VerifyReport


def _report(diff: float, scale: float, violated=()) -> VerifyReport:
    return VerifyReport(max_abs_logit_diff=diff, dense_loss=1.45, moe_loss=1.45,
                        expected_exact=not violated, violated=list(violated),
                        max_dropped_fraction=0.0, num_tokens=8192, logit_scale=scale)


def test_exact_case_with_trained_logits_passes_at_fp32_rounding():
    # The default config after 800 dense steps, upcycled exactly: 1.144e-05 (was FAILED).
    report = _report(1.144e-5, scale=21.0)
    assert report.ok and report.bound == EXACT_TOLERANCE * 21.0
    assert "in fp32): OK" in report.render()


def test_small_logits_keep_the_absolute_tolerance_and_real_errors_fail():
    assert _report(9e-6, scale=0.3).bound == EXACT_TOLERANCE
    assert not _report(2e-5, scale=0.3).ok
    failed = _report(3e-2, scale=21.0)
    assert not failed.ok and "FAILED" in failed.render()
    assert _report(3.1, scale=21.0, violated=["softmax-then-top-k"]).ok  # not expected exact
