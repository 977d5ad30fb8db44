"""The 95 % interval of the tables: the Wilson score interval, checked against its definition."""

from __future__ import annotations

import math

import pytest

from eval.report import Z95, wilson


def _score_test_bounds(k: int, n: int, steps: int = 200_000) -> tuple[float, float]:
    """Brute force: the Wilson interval is every p0 that the score test does not reject,
    |k/n - p0| <= z sqrt(p0 (1 - p0) / n). Scanned on a grid of 2e5 points."""
    accepted = [i / steps for i in range(steps + 1)
                if abs(k / n - i / steps) <= Z95 * math.sqrt((i / steps) * (1 - i / steps) / n)]
    return accepted[0], accepted[-1]


@pytest.mark.parametrize("k,n", [(0, 15), (1, 15), (7, 15), (15, 15), (50, 100), (3, 200)])
def test_wilson_interval_is_the_score_test_inversion(k, n):
    low, high = wilson(k / n, n)
    ref_low, ref_high = _score_test_bounds(k, n)
    # The grid step is 5e-6; the bounds agree to within two steps.
    assert abs(low - ref_low) < 1e-5 and abs(high - ref_high) < 1e-5
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_one_question_in_fifteen_is_a_wide_interval():
    low, high = wilson(10 / 15, 15)
    assert high - low > 0.4  # 66.7 % over 15 documents: about 42-85 %
