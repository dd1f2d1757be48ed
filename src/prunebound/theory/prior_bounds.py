"""Per-layer norm bounds for a priori plans: the target W, its pruned part Delta, its kept part W~.

Pure math on shapes and laws (docs/theory.md §4). INFERRED: derived in the setting of
Qian & Klabjan (2021); the constants are ours. Each function returns a bound valid with
probability >= 1 - delta over the weights (and the random mask), as stated per function.
"""

from __future__ import annotations

import math

from scipy import stats

from prunebound.theory.randmat import (
    bernoulli_cover,
    bernstein_bound,
    gaussian_comparison_bound,
    iid_norm_bound,
    magnitude_quantile,
    order_stat_upper,
    uniform_mixture,
)
from prunebound.theory.values import Law

#: Bernoulli comparison slack: count-form subsets are compared with Bernoulli(q) masks where
#: P(Bin >= m) >= 1 - ETA; tail bounds are then solved at delta * (1 - ETA) (docs §4.1).
ETA = 0.25


def weight_norm_bound(d1: int, d2: int, law: Law, delta: float, *, orthant: bool = False) -> float:
    """||W|| for i.i.d. U[-a, a] or N(0, s^2) entries, w.p. >= 1 - delta (docs §3.3)."""
    if law.name == "gaussian":
        return gaussian_comparison_bound(d1, d2, c=law.scale, delta=delta, orthant=orthant)
    return iid_norm_bound(d1, d2, uniform_mixture(1.0, law.scale), delta, orthant=orthant).value


def magnitude_delta_bound(
    d1: int, d2: int, m: int, law: Law, delta: float, *, orthant: bool = False
) -> tuple[float, float]:
    """||Delta|| after pruning the m smallest |w| of d1 x d2 i.i.d. weights (count form).

    docs §4.2: with t' the (m+1)-th smallest |w|, P(t' > t_max) <= delta/2 (order statistic);
    given t', the pruned entries are m i.i.d. draws from the law truncated to |w| < t' on a
    uniformly random subset, each <=_cx U[-t', t'] (symmetric unimodal), so the Bernoulli
    comparison and `iid_norm_bound` apply with the law (1-q) delta_0 + q U[-t_max, t_max].
    Also ||Delta|| <= ||Delta||_F <= t_max sqrt(m). Returns (bound, t_max). `orthant`: the norm
    restricted to nonnegative inputs (docs §3.5).
    """
    n = d1 * d2
    if m <= 0:
        return 0.0, 0.0
    p_hi = order_stat_upper(n, m, delta / 2.0)
    t_max = magnitude_quantile(p_hi, law.name, law.scale)
    if not math.isfinite(t_max):  # unbounded law, p_hi = 1: no finite threshold bound
        return math.inf, math.inf
    q = bernoulli_cover(n - 1, m, ETA)
    mix = uniform_mixture(q, t_max)
    nb = iid_norm_bound(d1, d2, mix, delta / 2.0, dense=1.0 - ETA, orthant=orthant)
    return min(nb.value, t_max * math.sqrt(m)), t_max


def row_norm_quantile(p: float, d2: int, law: Law) -> float:
    """An upper bound on the p-quantile of a row's norm ||w|| (d2 i.i.d. entries): t with
    P(||w|| <= t) >= p. Gaussian: s sqrt(chi2_{d2} quantile), exact. Uniform U[-a, a]:
    ||w||^2 / a^2 = sum u_j^2 with u_j^2 in [0, 1], mean 1/3, variance 4/45, so by Bernstein
    P(sum u_j^2 >= d2/3 + x) <= exp(-x^2 / (2 (4 d2/45 + (2/3) x/3))) = 1 - p at the root x
    (capped at ||w||^2 <= d2 a^2). docs/theory.md §4.5."""
    if p >= 1.0:
        return math.inf if law.name == "gaussian" else law.scale * math.sqrt(d2)
    if law.name == "gaussian":
        return law.scale * math.sqrt(float(stats.chi2.ppf(p, d2)))
    lg = math.log(1.0 / (1.0 - p))
    b = (2.0 / 3.0) * lg / 3.0
    x = b + math.sqrt(b * b + 2.0 * (4.0 * d2 / 45.0) * lg)
    return law.scale * math.sqrt(min(float(d2), d2 / 3.0 + x))


def neuron_delta_bound(
    d1: int, d2: int, m: int, law: Law, delta: float, *, orthant: bool = False
) -> tuple[float, float]:
    """||Delta|| after pruning the m rows of smallest L2 norm of d1 x d2 i.i.d. weights.

    docs §4.5: with t' the (m+1)-th smallest row norm, P(t' > t_max) <= delta/2 (order
    statistic of the i.i.d. row norms, `row_norm_quantile`); given t', the m pruned rows are
    independent draws of a row conditioned on ||w|| < t'. Gaussian law: a row is rho U with U
    uniform on the sphere independent of rho, so (convex order) the conditioned row is
    <=_cx s g and <=_cx (t'/E chi_{d2}) g, and Lemma D bounds the m x d2 matrix with
    c = min(s, t_max / E chi_{d2}) at delta/2. Uniform law (no such symmetry): matrix
    Bernstein over the independent rows (||X_i|| <= t', v = t'^2 max(1, m/d2), E w w^T <=
    (t'^2/d2) I by exchangeability). Both: ||Delta|| <= ||Delta||_F <= t_max sqrt(m). Returns
    (bound, t_max); the caller also has ||Delta|| <= ||W|| (a row submatrix). `orthant`: the
    norm restricted to nonnegative inputs (Gaussian: docs §3.5; Bernstein bounds the full norm).
    """
    if m <= 0:
        return 0.0, 0.0
    p_hi = order_stat_upper(d1, m, delta / 2.0)
    t_max = row_norm_quantile(p_hi, d2, law)
    if law.name == "gaussian":
        mean_chi = math.sqrt(2.0) * math.exp(math.lgamma((d2 + 1) / 2.0) - math.lgamma(d2 / 2.0))
        c = min(law.scale, t_max / mean_chi)
        b = gaussian_comparison_bound(m, d2, c=c, delta=delta / 2.0, orthant=orthant)
        return min(b, t_max * math.sqrt(m)), t_max
    v = t_max * t_max * max(1.0, m / d2)
    bern = bernstein_bound(m, d2, entry_bound=t_max, variance_sum=v, delta=delta / 2.0)
    return min(bern, t_max * math.sqrt(m)), t_max


def random_delta_bound(
    d1: int,
    d2: int,
    m: int,
    law: Law,
    delta: float,
    *,
    bernoulli: bool = False,
    orthant: bool = False,
) -> float:
    """||Delta|| for random pruning independent of W, w.p. >= 1 - delta over W and the mask.

    Count form (exact m, uniform subset) via the Bernoulli comparison (docs §4.1); Bernoulli form
    (`bernoulli=True`, m/(d1 d2) is the probability) directly. Uniform law: entries
    (1-q) delta_0 + q U[-a, a]. Gaussian law: min of Gordon with scale s and, on the event
    max|w| <= T (probability >= 1 - delta/2), the bounded law (1-q) delta_0 + q U[-T, T]
    (dominates the truncated Gaussian) with Bernstein variance q s^2 (docs §4.3).
    """
    n = d1 * d2
    if m <= 0:
        return 0.0
    q = m / n if bernoulli else bernoulli_cover(n, m, ETA)
    dense = 1.0 if bernoulli else 1.0 - ETA
    if law.name == "uniform":
        mixture = uniform_mixture(q, law.scale)
        return iid_norm_bound(d1, d2, mixture, delta, dense=dense, orthant=orthant).value
    s = law.scale
    gordon = gaussian_comparison_bound(d1, d2, c=s, delta=delta, orthant=orthant)
    t_cap = s * float(stats.norm.isf(delta / (4.0 * n)))  # P(max|w| > T) <= delta/2
    mix = iid_norm_bound(
        d1, d2, uniform_mixture(q, t_cap), delta / 2.0, dense=dense, orthant=orthant
    )
    bern = bernstein_bound(
        d1, d2, entry_bound=t_cap, variance_sum=max(d1, d2) * q * s * s, delta=delta / 2.0 * dense
    )
    return min(gordon, mix.gaussian, bern)


def random_kept_bound(
    d1: int, d2: int, m: int, law: Law, delta: float, *, bernoulli: bool = False
) -> float:
    """||W~|| of the kept part after random pruning of m weights, directly (docs §4.3).

    The kept set is a uniform (n - m)-subset (count form) or Bernoulli(1 - m/n): entries
    (1 - q_k) delta_0 + q_k U[-a, a] for the uniform law; Gordon with scale s for the Gaussian
    law (sparsity is not used there).
    """
    n = d1 * d2
    if law.name == "gaussian":
        return gaussian_comparison_bound(d1, d2, c=law.scale, delta=delta)
    qk = (n - m) / n if bernoulli else bernoulli_cover(n, n - m, ETA)
    dense = 1.0 if bernoulli else 1.0 - ETA
    return iid_norm_bound(d1, d2, uniform_mixture(qk, law.scale), delta, dense=dense).value


def conv_factor(
    kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> float:
    """Lemma C (docs §4.4): ||Conv_W|| <= sqrt(prod ceil(k/s)) ||W_mat|| (prod k if dilated)."""
    f = 1
    for i, k in enumerate(kernel):
        s = stride[i] if i < len(stride) else stride[-1]
        dil = dilation[i] if i < len(dilation) else dilation[-1]
        f *= k if dil > 1 else -(-k // s)
    return math.sqrt(f)
