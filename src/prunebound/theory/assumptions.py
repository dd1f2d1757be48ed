"""Checks of the a-priori plans' weight assumptions: i.i.d. U[-a, a] or N(0, s^2) entries
(docs/theory.md §5, §7.8).

A check can only refute: passing does not prove the law. The deterministic certificate
(`certify`) and the data certificate (`datacert`) need none of these assumptions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from scipy import stats
from torch import nn

from prunebound._check import check_choice, check_float
from prunebound._masks import original_weight, prunable_layers

LawKind = Literal["uniform", "gaussian"]


@dataclass(frozen=True)
class LawCheck:
    """Kolmogorov-Smirnov test of a layer's weights against an i.i.d. law, plus a row/column
    energy-homogeneity smell test of independence.

    `passed` means KS p >= alpha. With `scale_fitted` the KS p-value is approximate and
    conservative (the statistic's null law is then smaller: Lilliefors), so a fitted-scale
    test rejects less often than alpha. `row_p`/`col_p` test whether row/column sums of
    squares vary more than i.i.d. entries allow (chi-square, CLT approximation).
    """

    name: str
    law: str
    scale: float
    scale_fitted: bool
    n: int
    ks_stat: float
    p_value: float
    alpha: float
    passed: bool
    row_p: float | None = None
    col_p: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _homogeneity_p(w2: torch.Tensor) -> float | None:
    """p-value that the sums over dim 1 of w2 (m groups of k i.i.d. values) are homogeneous.

    Under i.i.d. entries, S_i ~ approx N(k mu, k v) with mu = E w^2, v = Var w^2, so
    sum_i (S_i - mean S)^2 / (k v) ~ approx chi2(m - 1). One-sided: too much spread rejects.
    """
    m, k = w2.shape
    v = float(w2.var())
    if m < 2 or k < 2 or v <= 0:
        return None
    s = w2.sum(1)
    stat = float(((s - s.mean()) ** 2).sum()) / (k * v)
    return float(stats.chi2.sf(stat, m - 1))


def check_law(
    weight: torch.Tensor,
    law: LawKind,
    *,
    scale: float | None = None,
    alpha: float = 0.05,
    name: str = "",
) -> LawCheck:
    """KS test of the entries of `weight` against U[-scale, scale] or N(0, scale^2).

    Args:
        weight: any-shape tensor (conv kernels are treated as (c_out, rest) for the smell test).
        law: "uniform" or "gaussian".
        scale: the law's scale; None fits it (uniform: max |w|; gaussian: sqrt(mean w^2)).
        alpha: test level in (0, 1).
        name: layer name, carried into the result.
    """
    check_choice("law", law, ("uniform", "gaussian"))
    check_float("alpha", alpha, 0.0, 1.0, closed="neither")
    if scale is not None:
        check_float("scale", scale, 0.0, math.inf, closed="neither", ints=True)
    w = weight.detach().to(torch.float64).cpu()
    if w.numel() < 2 or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight must hold >= 2 finite entries, got shape {tuple(w.shape)}")
    flat = w.flatten()
    fitted = scale is None
    if scale is None:
        scale = float(flat.abs().max()) if law == "uniform" else float(flat.pow(2).mean().sqrt())
    dist = stats.uniform(loc=-scale, scale=2 * scale) if law == "uniform" else stats.norm(0, scale)
    res = stats.kstest(flat.numpy(), dist.cdf)
    mat = (w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)).pow(2)
    p = float(res.pvalue)
    return LawCheck(
        name=name,
        law=law,
        scale=float(scale),
        scale_fitted=fitted,
        n=flat.numel(),
        ks_stat=float(res.statistic),
        p_value=p,
        alpha=alpha,
        passed=p >= alpha,
        row_p=_homogeneity_p(mat),
        col_p=_homogeneity_p(mat.T.contiguous()),
    )


def check_model(
    model: nn.Module,
    law: LawKind,
    *,
    alpha: float = 0.05,
    init_scale: bool = False,
) -> tuple[LawCheck, ...]:
    """`check_law` for every prunable layer's (unmasked) weight.

    With `init_scale` and law "uniform", the scale is PyTorch's default-init bound
    1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5)); otherwise it is fitted per layer.
    """
    out = []
    for name, mod in prunable_layers(model).items():
        w = original_weight(mod)
        scale = None
        if init_scale:
            if law != "uniform":
                raise ValueError(f"init_scale needs law 'uniform' (PyTorch's init), got {law!r}")
            scale = 1.0 / math.sqrt(w[0].numel())
        out.append(check_law(w, law, scale=scale, alpha=alpha, name=name))
    return tuple(out)
