"""Clopper-Pearson limits (prunebound.stats): closed forms at the edges, and a known value."""

from __future__ import annotations

import pytest

from prunebound.stats import clopper_pearson_lower, clopper_pearson_upper


def test_limits_at_the_edges_have_closed_forms() -> None:
    # k = 0: U solves (1 - U)^n = delta; k = n: L solves L^n = delta
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert clopper_pearson_lower(100, 100, 0.05) == pytest.approx(0.05 ** (1 / 100), rel=1e-9)
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0


def test_limits_bracket_the_observed_rate() -> None:
    lo, hi = clopper_pearson_lower(7, 50, 0.1), clopper_pearson_upper(7, 50, 0.1)
    assert lo < 7 / 50 < hi
    assert (lo, hi) == pytest.approx((0.07963, 0.22419), abs=5e-5)


@pytest.mark.parametrize(("k", "n", "delta"), [(1, 10, 0.0), (11, 10, 0.1), (0, 0, 0.1)])
def test_bad_counts_are_refused(k: int, n: int, delta: float) -> None:
    with pytest.raises(ValueError, match=r"need n >= 1|delta must be in"):
        clopper_pearson_upper(k, n, delta)
    with pytest.raises(ValueError, match=r"need n >= 1|delta must be in"):
        clopper_pearson_lower(k, n, delta)
