"""High-probability operator-norm bounds for random matrices with independent symmetric entries.

Pure math (docs/theory.md §3). Two families of bounds, both INFERRED (our derivations in the
setting of Qian & Klabjan 2021, not the paper's constants):

* matrix Bernstein (Tropp 2012, Thm 1.6; docs/theory.md §3.1): entries bounded by R, variance
  sums v = max(max row sum, max column sum) of E x_ij^2;
* Gaussian comparison (docs/theory.md §3.2): if every entry is dominated in the convex order by
  c * N(0, 1), then E exp(lam ||X||) <= E exp(lam c ||G||) (the map X -> exp(lam ||X||) is convex,
  and the convex order passes to functions convex in each coordinate), and Gordon's inequality
  E||G|| <= sqrt(d1) + sqrt(d2) with Gaussian concentration of the 1-Lipschitz ||G|| give
  ||X|| <= c (sqrt(d1) + sqrt(d2) + sqrt(2 log(1/delta))) with probability >= 1 - delta.

For laws of the form "atom at 0 plus symmetric uniform magnitude pieces" (what pruning leaves of
uniform weights, and what dominates pruned truncated Gaussians) the constant c is computed by a
rigorous grid argument on stop-loss transforms (`domination_constant`).

The minimum of two bounds that each hold with probability >= 1 - delta also holds with
probability >= 1 - delta: the choice depends on the parameters only, never on the sample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import stats

from prunebound._check import check_float

_SQRT_2PI = math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class EntryLaw:
    """A symmetric law of one matrix entry: atom at 0, plus uniform-magnitude or Gaussian parts.

    `pieces` are (weight, lo, hi): with probability `weight` the entry is s * V, s a fair sign
    and V ~ U[lo, hi] (0 <= lo <= hi). `gauss` is (weight, scale): with probability `weight` the
    entry is N(0, scale^2). The remaining mass sits at 0. Use one of the two kinds per law.
    """

    pieces: tuple[tuple[float, float, float], ...] = ()
    gauss: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        total = sum(w for w, _, _ in self.pieces) + (self.gauss[0] if self.gauss else 0.0)
        if total > 1.0 + 1e-12:
            raise ValueError(f"EntryLaw weights must sum to <= 1, got {total}")
        for w, lo, hi in self.pieces:
            if not (w >= 0 and 0 <= lo <= hi):
                raise ValueError(
                    f"EntryLaw piece needs weight >= 0, 0 <= lo <= hi, got {(w, lo, hi)}"
                )
        if self.pieces and self.gauss:
            raise ValueError("EntryLaw: give uniform pieces or a Gaussian part, not both")

    @property
    def variance(self) -> float:
        """E x^2."""
        v = sum(w * (lo * lo + lo * hi + hi * hi) / 3.0 for w, lo, hi in self.pieces)
        if self.gauss:
            v += self.gauss[0] * self.gauss[1] ** 2
        return v

    @property
    def bound(self) -> float:
        """sup |x| (inf for a Gaussian part)."""
        if self.gauss and self.gauss[0] > 0:
            return math.inf
        return max((hi for w, _, hi in self.pieces if w > 0), default=0.0)

    def stop_loss(self, k: np.ndarray) -> np.ndarray:
        """E (x - k)_+ for k >= 0 (vectorised); bounded pieces only."""
        out = np.zeros_like(k, dtype=float)
        for w, lo, hi in self.pieces:
            if w == 0 or hi == 0:
                continue
            if hi - lo < 1e-15 * hi:  # point mass at +-hi
                part = np.maximum(hi - k, 0.0)
            else:
                part = np.where(
                    k <= lo, (lo + hi) / 2.0 - k, np.maximum(hi - k, 0.0) ** 2 / (2.0 * (hi - lo))
                )
            out += 0.5 * w * part  # the sign is + with probability 1/2
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def uniform_mixture(q: float, t: float = 1.0) -> EntryLaw:
    """(1 - q) delta_0 + q U[-t, t]: an entry of the pruned part (threshold/Bernoulli forms)."""
    return EntryLaw(pieces=((q, 0.0, t),))


def gaussian_stop_loss(c: np.ndarray, k: np.ndarray) -> np.ndarray:
    """E (c g - k)_+ for g ~ N(0, 1), c > 0, k >= 0: c phi(k/c) - k (1 - Phi(k/c))."""
    z = k / c
    return np.asarray(c * np.exp(-0.5 * z * z) / _SQRT_2PI - k * stats.norm.sf(z))


@lru_cache(maxsize=4096)
def domination_constant(law: EntryLaw, grid: int = 2048) -> float:
    """Smallest (up to grid slack) c with law <=_cx N(0, c^2) (docs/theory.md §3.2, Lemma D).

    For symmetric laws, X <=_cx Y iff E(X - k)_+ <= E(Y - k)_+ for all k >= 0. Both sides
    decrease in k, so on a grid 0 = k_0 < ... < k_n = sup|x| it suffices that
    E(cg - k_{i+1})_+ >= E(X - k_i)_+ for every i; c is the largest root over the cells (each
    root by bisection, rounded up). For a Gaussian part N(0, s^2) with weight <= 1 (plus the
    atom at 0), c = s exactly (mixtures preserve the convex order, delta_0 <=_cx N(0, s^2)).
    """
    if law.gauss is not None:
        return law.gauss[1] if law.gauss[0] > 0 else 0.0
    b = law.bound
    if b == 0.0:
        return 0.0
    ks = np.linspace(0.0, b, grid + 1)
    target = law.stop_loss(ks[:-1])  # E(X - k_i)_+
    right = ks[1:]
    lo = np.zeros_like(target)
    hi = np.full_like(target, 2.0 * b + 1e-300)
    # E(cg - k)_+ >= c phi(0)... at c = 2b: >= E(X)_+ >= target, so 2b is a valid upper root.
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ok = gaussian_stop_loss(np.maximum(mid, 1e-300), right) >= target
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return float(hi.max()) * (1.0 + 1e-9)


def bernstein_bound(
    d1: int, d2: int, *, entry_bound: float, variance_sum: float, delta: float
) -> float:
    """Matrix Bernstein (Tropp 2012, Thm 1.6): P(||X|| >= t) <= (d1+d2) exp(-t^2/2 / (v + R t/3)).

    `variance_sum` is v = max(max_i sum_j E x_ij^2, max_j sum_i E x_ij^2), `entry_bound` is R.
    Returns the exact root t of (d1+d2) exp(...) = delta (docs/theory.md §3.1, bound (B)).
    """
    _check_delta(delta)
    if variance_sum <= 0 or entry_bound <= 0:
        return 0.0
    if not math.isfinite(entry_bound):
        return math.inf
    lg = math.log((d1 + d2) / delta)
    b = entry_bound * lg / 3.0
    return b + math.sqrt(b * b + 2.0 * variance_sum * lg)


def gaussian_comparison_bound(
    d1: int, d2: int, *, c: float, delta: float, orthant: bool = False
) -> float:
    """c (sqrt d1 + sqrt d2 + sqrt(2 log(1/delta))) (docs/theory.md §3.2, bound (G)).

    Valid with probability >= 1 - delta for independent entries each <=_cx N(0, c^2);
    exact-constant Gordon + Gaussian concentration when the entries are N(0, c^2).
    With `orthant`, bounds the restricted norm sup{||X v|| : v >= 0, ||v|| <= 1} instead, with
    sqrt(d2) replaced by sqrt(d2 / 2) (Chevet's inequality with the width E||g_+|| of the
    orthant; docs §3.5).
    """
    _check_delta(delta)
    width = math.sqrt(d2 / 2.0) if orthant else math.sqrt(d2)
    return c * (math.sqrt(d1) + width + math.sqrt(2.0 * math.log(1.0 / delta)))


@dataclass(frozen=True)
class IidNormBound:
    """An operator-norm bound and the inequality that gave it."""

    value: float
    method: str
    bernstein: float
    gaussian: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def iid_norm_bound(
    d1: int, d2: int, law: EntryLaw, delta: float, *, dense: float = 1.0, orthant: bool = False
) -> IidNormBound:
    """Bound on ||X|| for a d1 x d2 matrix with i.i.d. entries from `law`, w.p. >= 1 - delta.

    Minimum of matrix Bernstein and the Gaussian comparison (both at delta; docs/theory.md §3.3).
    `dense` multiplies delta's complement budget: bounds are solved at delta * dense (the
    Bernoulli comparison of count-form subsets costs 1 / P(Bin >= m), docs/theory.md §4.1).
    `orthant`: bound the norm restricted to nonnegative inputs (docs §3.5; Bernstein's full-norm
    bound is also valid for it).
    """
    d_eff = delta * dense
    v = max(d1, d2) * law.variance
    b = bernstein_bound(d1, d2, entry_bound=law.bound, variance_sum=v, delta=d_eff)
    g = gaussian_comparison_bound(d1, d2, c=domination_constant(law), delta=d_eff, orthant=orthant)
    return IidNormBound(
        value=min(b, g), method="bernstein" if b < g else "gaussian", bernstein=b, gaussian=g
    )


def bernoulli_cover(population: int, m: int, eta: float) -> float:
    """Smallest q with P(Binomial(population, q) >= m) >= 1 - eta (q = 0 when m = 0).

    A uniformly random m-subset with i.i.d. symmetric entries is dominated, for every convex
    functional, by the Bernoulli(q) subset divided by P(Bin >= m) (docs/theory.md §4.1).
    """
    if m <= 0:
        return 0.0
    if m >= population:
        return 1.0
    # P(Bin(n, q) >= m) = I_q(m, n - m + 1) (regularised incomplete beta).
    return float(stats.beta.ppf(1.0 - eta, m, population - m + 1))


def order_stat_upper(population: int, m: int, delta: float) -> float:
    """p_hi with P(F(|w|_(m+1)) > p_hi) <= delta: the (m+1)-th smallest of `population` uniforms.

    P(U_(m+1) > p) = P(Bin(n, p) <= m) = 1 - I_p(m + 1, n - m) (docs/theory.md §4.2).
    """
    if m >= population:
        return 1.0
    return float(stats.beta.ppf(1.0 - delta, m + 1, population - m))


def magnitude_quantile(p: float, law_name: str, scale: float) -> float:
    """t with P(|w| < t) = p for w ~ U[-scale, scale] or N(0, scale^2)."""
    if law_name == "uniform":
        return scale * p
    return float(scale * stats.norm.ppf(0.5 + 0.5 * min(p, 1.0 - 1e-16)))


def bias_norm_bound(n: int, law_name: str, scale: float, delta: float) -> float:
    """||b|| for b with n i.i.d. entries U[-scale, scale] or N(0, scale^2), w.p. >= 1 - delta.

    Uniform: min(sqrt(n) scale (deterministic), Hoeffding on sum b_i^2 in [0, scale^2]:
    n scale^2/3 + scale^2 sqrt(n log(1/delta)/2)). Gaussian: Laurent-Massart chi-square bound
    scale^2 (n + 2 sqrt(n x) + 2 x), x = log(1/delta). docs/theory.md §3.4.
    """
    _check_delta(delta)
    x = math.log(1.0 / delta)
    if law_name == "uniform":
        hoeff = n * scale**2 / 3.0 + scale**2 * math.sqrt(n * x / 2.0)
        return min(math.sqrt(n) * scale, math.sqrt(hoeff))
    return scale * math.sqrt(n + 2.0 * math.sqrt(n * x) + 2.0 * x)


def _check_delta(delta: float) -> None:
    check_float("delta", delta, 0.0, 1.0, closed="neither", ints=False)
