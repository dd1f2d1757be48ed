"""Lemma A of docs/theory.md: deterministic propagation of pruning errors through a network.

Pure arithmetic on per-layer norm bounds; shared by the certificate (exact norms of weights in
hand) and the planner (high-probability norm bounds for random weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Propagation:
    """Result of Lemma A.

    `r[l]` bounds sup ||h_l(x)|| of the target over the ball (r[0] = radius, r[-1] = output
    scale r_L). `e[l]` bounds sup ||h~_l(x) - h_l(x)||; `e[-1]` is the certified gap.
    `terms[l]` is layer l's contribution (prod_{k>l} ||W~_k||) * ||Delta_l|| * r[l-1] to the
    unrolled sum (A); sum(terms) == e[-1] up to rounding.
    """

    r: tuple[float, ...]
    e: tuple[float, ...]
    terms: tuple[float, ...]

    @property
    def gap(self) -> float:
        return self.e[-1]

    @property
    def output_scale(self) -> float:
        return self.r[-1]


def propagate(
    norm_w: Sequence[float],
    norm_kept: Sequence[float],
    norm_delta: Sequence[float],
    bias_norms: Sequence[float],
    radius: float,
    lipschitz: Sequence[float] | None = None,
) -> Propagation:
    """Lemma A: r_l = L(|W_l| r_{l-1} + |b_l|), e_l = L(|W~_l| e_{l-1} + |D_l| r_{l-1}).

    Args:
        norm_w: upper bounds on the operator norms ||W_l|| of the target's layers.
        norm_kept: upper bounds on ||W~_l|| = ||M_l * W_l|| (pruned layers).
        norm_delta: upper bounds on ||Delta_l|| = ||W_l - W~_l||.
        bias_norms: ||b_l|| (0 for no bias).
        radius: R, the input ball's radius.
        lipschitz: Lipschitz constant (with sigma(0) = 0) of whatever follows layer l before the
            next prunable layer (1 for ReLU/Tanh, max|gamma/sigma| for eval BatchNorm, ...);
            default 1 everywhere. Applied to both r and e.
    """
    n = len(norm_w)
    if not (len(norm_kept) == len(norm_delta) == len(bias_norms) == n):
        raise ValueError("propagate: all per-layer sequences must have the same length")
    lips = [1.0] * n if lipschitz is None else list(lipschitz)
    r = [float(radius)]
    e = [0.0]
    for l in range(n):
        r.append(lips[l] * (norm_w[l] * r[l] + bias_norms[l]))
        e.append(lips[l] * (norm_kept[l] * e[l] + norm_delta[l] * r[l]))
    terms = []
    for l in range(n):
        t = norm_delta[l] * r[l] * lips[l]
        for k in range(l + 1, n):
            t *= norm_kept[k] * lips[k]
        terms.append(t)
    return Propagation(r=tuple(r), e=tuple(e), terms=tuple(terms))
