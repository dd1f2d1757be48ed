"""Exact (Clopper–Pearson) confidence limits for a binomial rate: k events in n trials.

Both one-sided limits in one place: the upper limit bounds a violation or failure rate from
above (what a guarantee needs), the lower limit from below (what a failed check needs to be
sure it failed). `delta` is 1 − confidence: each limit holds with probability ≥ 1 − delta.
"""

from __future__ import annotations

from scipy import stats


def _check_counts(k: int, n: int, delta: float) -> None:
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n, got k={k}, n={n}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """U with P(p <= U) >= 1 - delta: Beta^{-1}(1 - delta; k + 1, n - k), and 1 when k = n."""
    _check_counts(k, n, delta)
    return 1.0 if k == n else float(stats.beta.ppf(1 - delta, k + 1, n - k))


def clopper_pearson_lower(k: int, n: int, delta: float) -> float:
    """L with P(p >= L) >= 1 - delta: Beta^{-1}(delta; k, n - k + 1), and 0 when k = 0."""
    _check_counts(k, n, delta)
    return 0.0 if k == 0 else float(stats.beta.ppf(delta, k, n - k + 1))
