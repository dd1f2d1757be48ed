"""Random-matrix norm bounds (prunebound.theory.randmat / pruned): arithmetic and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from prunebound.theory import randmat
from prunebound.theory.prior_bounds import (
    magnitude_delta_bound,
    random_delta_bound,
    random_kept_bound,
    weight_norm_bound,
)
from prunebound.theory.randmat import (
    EntryLaw,
    bernoulli_cover,
    bernstein_bound,
    bias_norm_bound,
    domination_constant,
    gaussian_comparison_bound,
    gaussian_stop_loss,
    iid_norm_bound,
    order_stat_upper,
    uniform_mixture,
)
from prunebound.theory.values import Law

DELTA = 0.05
N_MC = 200


def _sample(law: Law, n: int, d1: int, d2: int, gen: torch.Generator) -> torch.Tensor:
    if law.name == "uniform":
        return (torch.rand(n, d1, d2, generator=gen, dtype=torch.float64) * 2 - 1) * law.scale
    return torch.randn(n, d1, d2, generator=gen, dtype=torch.float64) * law.scale


def _q(norms: torch.Tensor, delta: float = DELTA) -> float:
    return float(torch.quantile(norms, 1 - delta))


def test_domination_constant_of_uniform_matches_closed_form() -> None:
    # docs §3.2: U[-1, 1] <=_cx N(0, c^2) iff c >= sqrt(2 pi)/4 (binding at k = 0).
    c = domination_constant(uniform_mixture(1.0))
    exact = math.sqrt(2 * math.pi) / 4
    assert exact <= c <= exact * 1.003, (c, exact)


@pytest.mark.parametrize("q", [1.0, 0.5, 0.2, 0.05])
def test_domination_constant_dominates_stop_loss_everywhere(q: float) -> None:
    law = uniform_mixture(q, 2.0)
    c = domination_constant(law)
    ks = np.linspace(0, 2.5, 5001) + 1e-4  # off the solver's grid
    assert np.all(law.stop_loss(ks) <= gaussian_stop_loss(np.full_like(ks, c), ks) + 1e-15)
    assert c >= math.sqrt(law.variance) - 1e-12  # convex order forces E x^2 <= c^2
    # and c is nearly the smallest: 2% less fails somewhere
    assert np.any(law.stop_loss(ks) > gaussian_stop_loss(np.full_like(ks, 0.98 * c), ks))


def test_bernstein_hand_computed() -> None:
    lg = math.log(5 / 0.1)
    want = lg / 3 + math.sqrt(lg**2 / 9 + 2 * 2.0 * lg)
    t = bernstein_bound(2, 3, entry_bound=1.0, variance_sum=2.0, delta=0.1)
    assert t == pytest.approx(want)
    assert 5 * math.exp(-t * t / 2 / (2.0 + t / 3)) == pytest.approx(0.1)


def test_gaussian_comparison_hand_computed() -> None:
    got = gaussian_comparison_bound(4, 9, c=0.5, delta=math.exp(-2.0))
    assert got == pytest.approx(0.5 * (2 + 3 + 2))


def test_invalid_delta_names_parameter() -> None:
    with pytest.raises(ValueError, match=r"delta must be a float in \(0, 1\), got 0"):
        gaussian_comparison_bound(2, 2, c=1.0, delta=0)
    with pytest.raises(ValueError, match="delta must be a float in"):
        bernstein_bound(2, 2, entry_bound=1.0, variance_sum=1.0, delta=1.5)
    with pytest.raises(ValueError, match="weights must sum"):
        EntryLaw(pieces=((0.7, 0, 1), (0.7, 0, 1)))


def test_bernoulli_cover_and_order_stat_quantiles() -> None:
    n, m, eta = 1000, 300, 0.25
    q = bernoulli_cover(n, m, eta)
    assert stats.binom.sf(m - 1, n, q) >= 1 - eta - 1e-9
    assert stats.binom.sf(m - 1, n, q * 0.99) < 1 - eta
    p = order_stat_upper(n, m, 0.01)
    assert stats.binom.cdf(m, n, p) == pytest.approx(0.01, rel=1e-6)
    assert bernoulli_cover(n, 0, eta) == 0.0


@pytest.mark.parametrize(
    ("law_name", "shape"), [("uniform", (30, 50)), ("gaussian", (60, 20)), ("uniform", (70, 90))]
)
def test_weight_bound_covers_empirical_quantile(law_name: str, shape: tuple[int, int]) -> None:
    d1, d2 = shape
    law = Law(law_name, 1 / math.sqrt(d2))
    w = _sample(law, N_MC, d1, d2, torch.Generator().manual_seed(1))
    emp = _q(torch.linalg.matrix_norm(w, 2))
    b = weight_norm_bound(d1, d2, law, DELTA)
    assert b >= emp, f"{law_name} {shape}: bound {b:.4f} < empirical {emp:.4f}"
    assert b <= 1.5 * emp, f"bound {b:.4f} is loose vs {emp:.4f}"


@pytest.mark.parametrize("law_name", ["uniform", "gaussian"])
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_magnitude_pruned_bound_covers_empirical_quantile(law_name: str, frac: float) -> None:
    d1, d2 = 40, 60
    law = Law(law_name, 1 / math.sqrt(d2))
    w = _sample(law, N_MC, d1, d2, torch.Generator().manual_seed(2))
    m = int(frac * d1 * d2)
    thr = w.abs().flatten(1).kthvalue(m + 1, dim=1).values  # (m+1)-th smallest
    delta_part = torch.where(w.abs() < thr[:, None, None], w, torch.zeros_like(w))
    assert int((delta_part != 0).sum()) == N_MC * m
    emp = _q(torch.linalg.matrix_norm(delta_part, 2))
    b, t_max = magnitude_delta_bound(d1, d2, m, law, DELTA)
    assert b >= emp, f"{law_name} q={frac}: bound {b:.4f} < empirical {emp:.4f}"
    assert float(torch.quantile(thr, 1 - DELTA)) <= t_max


@pytest.mark.parametrize("law_name", ["uniform", "gaussian"])
@pytest.mark.parametrize("frac", [0.05, 0.5])
def test_random_pruned_and_kept_bounds_cover_empirical_quantile(law_name: str, frac: float) -> None:
    d1, d2 = 50, 40
    law = Law(law_name, 1 / math.sqrt(d2))
    gen = torch.Generator().manual_seed(3)
    w = _sample(law, N_MC, d1, d2, gen)
    m = int(frac * d1 * d2)
    idx = torch.rand(N_MC, d1 * d2, generator=gen).argsort(dim=1)[:, :m]
    pruned = torch.zeros(N_MC, d1 * d2, dtype=torch.bool).scatter_(1, idx, True).reshape(w.shape)
    dp, kept = w * pruned, w * ~pruned
    emp_d = _q(torch.linalg.matrix_norm(dp, 2))
    emp_k = _q(torch.linalg.matrix_norm(kept, 2))
    assert random_delta_bound(d1, d2, m, law, DELTA) >= emp_d
    assert random_kept_bound(d1, d2, m, law, DELTA) >= emp_k


def test_bias_bound_covers_empirical_quantile() -> None:
    gen = torch.Generator().manual_seed(4)
    for name in ("uniform", "gaussian"):
        law = Law(name, 0.1)
        b = _sample(law, 2000, 1, 300, gen).flatten(1).norm(dim=1)
        assert bias_norm_bound(300, name, 0.1, DELTA) >= _q(b)


def test_gaussian_comparison_much_sharper_than_bernstein_300x784() -> None:
    a = 1 / math.sqrt(784)
    full = iid_norm_bound(300, 784, uniform_mixture(1.0, a), 0.01)
    assert full.method == "gaussian"
    assert full.gaussian <= 0.40 * full.bernstein, full  # measured: 1.083 vs 2.922 (63% smaller)
    pruned = iid_norm_bound(300, 784, uniform_mixture(0.3, 0.3 * a), 0.01)
    assert pruned.gaussian <= 0.75 * pruned.bernstein, pruned


def test_module_namespace() -> None:
    assert randmat.iid_norm_bound is iid_norm_bound


@pytest.mark.parametrize("law_name", ["uniform", "gaussian"])
def test_orthant_restricted_bound_covers_projected_power_estimate(law_name: str) -> None:
    # sup{||X v|| : v >= 0, ||v|| = 1} estimated from below by projected power iteration
    d1, d2 = 30, 120
    law = Law(law_name, 1 / math.sqrt(d2))
    x = _sample(law, N_MC, d1, d2, torch.Generator().manual_seed(5))
    v = torch.ones(N_MC, d2, 1, dtype=torch.float64)
    for _ in range(100):
        v = (x.transpose(1, 2) @ (x @ v)).clamp_min(0)
        v = v / v.norm(dim=1, keepdim=True)
    emp = _q((x @ v).norm(dim=(1, 2)))
    b = weight_norm_bound(d1, d2, law, DELTA, orthant=True)
    assert b >= emp, f"{law_name}: restricted bound {b:.4f} < estimate {emp:.4f}"
    assert b < weight_norm_bound(d1, d2, law, DELTA)
    full = _q(torch.linalg.matrix_norm(x, 2))
    assert emp < full  # the restriction is real for these matrices
