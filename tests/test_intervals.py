"""The 95% intervals every delta carries (evaluate/intervals.py), checked against hand computations."""

from __future__ import annotations

import math

import pytest

from tuneforge.evaluate.intervals import (format_delta, is_real_drop, is_real_gain, mcnemar_exact, mean_interval,
                                          paired_delta, paired_ratio_delta, wilson)


def test_mcnemar_exact_by_hand():
    # 3 examples improved, none worsened: P(all 3 discordant pairs go one way) = 1/8, two-sided 1/4
    assert mcnemar_exact(3, 0) == pytest.approx(0.25)
    # 1 vs 9: 2 * (C(10,0) + C(10,1)) / 2**10 = 22 / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_wilson_by_hand():
    z = 1.959963984540054
    low, high = wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx((z * z / 20 + z * math.sqrt(z * z / 400)) / (1 + z * z / 10))  # 0.2775
    assert high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson(5, 10)
    assert (low + high) / 2 == pytest.approx(0.5) and low == pytest.approx(0.2366, abs=1e-4)
    assert wilson(0, 0) is None


def test_paired_bootstrap_two_examples_by_hand():
    """Differences [0, 100]: a resample's mean is 0, 50 or 100 with chances 1/4, 1/2, 1/4, so the 2.5th and 97.5th
    percentiles are 0 and 100."""
    result = paired_delta([0, 0], [0, 100])
    assert result["delta"] == 50.0 and result["ci95"] == [0.0, 100.0] and result["n"] == 2
    assert result["p_value"] == 1.0  # one improved, none worsened: exact McNemar 2 * 1/2


def test_constant_differences_have_a_point_interval_and_binary_scores_get_mcnemar():
    before, after = [0, 0, 0, 0, 0, 0, 100, 100], [100, 100, 100, 100, 100, 100, 100, 100]
    result = paired_delta(before, after)
    assert result["delta"] == 75.0
    assert 0 < result["ci95"][0] <= 75.0 <= result["ci95"][1] <= 100
    assert result["p_value"] == pytest.approx(2 / 64)  # 6 improved, 0 worsened
    assert paired_delta([10.0, 20.0], [15.0, 25.0]) == {"delta": 5.0, "ci95": [5.0, 5.0], "n": 2, "method": "paired bootstrap"}


def test_paired_bootstrap_is_seeded_and_shrinks_with_more_examples():
    import random

    rng = random.Random(0)
    small_b = [rng.choice([0, 100]) for _ in range(40)]
    small_a = [b if rng.random() < 0.8 else 100 - b for b in small_b]
    assert paired_delta(small_b, small_a) == paired_delta(small_b, small_a)
    big_b, big_a = small_b * 10, small_a * 10
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(paired_delta(big_b, big_a)) < width(paired_delta(small_b, small_a)) / 2


def test_weighted_loss_delta_by_hand():
    # per example [loss sum, tokens]: before 2/1 and 4/2 (mean 2.0), after 1/1 and 2/2 (mean 1.0): every resample -1
    result = paired_ratio_delta([[2, 1], [4, 2]], [[1, 1], [2, 2]])
    assert result["delta"] == pytest.approx(-1.0) and result["ci95"] == pytest.approx([-1.0, -1.0])


def test_flags_need_the_interval_to_exclude_zero_and_the_threshold():
    noisy = {"delta": -25.0, "ci95": [-60.0, 10.0]}  # 4 items: a big drop the data cannot tell from noise
    clear = {"delta": -8.0, "ci95": [-12.0, -4.0]}
    assert not is_real_drop(noisy, 5.0)
    assert is_real_drop(clear, 5.0) and not is_real_drop(clear, 10.0)
    assert is_real_gain({"delta": 3.0, "ci95": [0.5, 6.0]}) and not is_real_gain({"delta": 3.0, "ci95": [-0.5, 6.0]})
    assert format_delta(clear) == "-8.0 [-12.0, -4.0]" and format_delta({}) == "n/a"


def test_mean_interval():
    result = mean_interval([0, 100])
    assert result["mean"] == 50.0 and result["ci95"] == [0.0, 100.0]
    assert mean_interval([]) == {"mean": None, "ci95": None, "n": 0}
