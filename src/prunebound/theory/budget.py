"""Sharing the budget eps across layers: fixed splits and the optimised (greedy) split.

docs/theory.md §6. Both solvers only need, per layer, monotone norm bounds as functions of the
pruned count (`oracles.Oracle`) and Lemma A (`propagate`) as a function of all counts. INFERRED: our
construction in the setting of Qian & Klabjan (2021).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prunebound.theory.lemma_a import Propagation
from prunebound.theory.oracles import Oracle

Lemma = Callable[[Sequence[int]], Propagation]


def max_count(ok: Callable[[int], bool], hi: int) -> int:
    """Largest m in [0, hi] with ok(m), assuming ok is monotone (true then false)."""
    lo = 0
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def solve_budgets(
    orcs: Sequence[Oracle],
    lemma: Lemma,
    eps: float,
    shares: Sequence[float],
    lipschitz: Sequence[float],
) -> list[int]:
    """Fixed split eta_l = eps * share_l (docs §6): back to front, the largest m_l whose Lemma A
    term (prod_{k>l} L_k ||W~_k(m_k)||) L_l ||Delta_l(m_l)|| r_{l-1} is <= eta_l.

    Term l depends only on later layers' counts, so the backward pass is exact, and the total
    is <= sum eta_l = eps when the shares sum to 1.
    """
    n = len(orcs)
    counts = [0] * n
    r = lemma(counts).r
    for l in reversed(range(n)):
        tail = lipschitz[l]
        for k in range(l + 1, n):
            tail *= lipschitz[k] * orcs[k].norm_kept(counts[k])

        def ok(m: int, orc: Oracle = orcs[l], factor: float = tail * r[l], l: int = l) -> bool:
            return factor * orc.norm_delta(m) <= eps * shares[l]

        counts[l] = max_count(ok, orcs[l].limit)
    return counts


def solve_optimized(orcs: Sequence[Oracle], lemma: Lemma, eps: float) -> list[int]:
    """Greedy marginal-gain allocation maximising sum_l m_l subject to Lemma A's gap <= eps.

    Steps of h (a fraction of a layer) go to the layer with the most weights pruned per unit of
    certified gap; h halves (1/16 -> 1/4096) when no step fits; finally each layer is pushed to
    its largest feasible count by bisection given the others, so no layer can take one more
    weight (docs §6). Heuristic: maximal, not necessarily maximum.
    """
    n = len(orcs)
    counts = [0] * n

    def gap(c: Sequence[int]) -> float:
        return lemma(c).gap

    cur = gap(counts)
    h = 1.0 / 16
    while h >= 1.0 / 4096:
        best, best_gain, best_gap = -1, 0.0, cur
        for l, o in enumerate(orcs):
            m = min(o.limit, counts[l] + max(1, round(h * o.limit)))
            if m == counts[l]:
                continue
            g = gap([*counts[:l], m, *counts[l + 1 :]])
            if g <= eps:
                gain = (m - counts[l]) / max(g - cur, 1e-300)
                if gain > best_gain:
                    best, best_gain, best_gap = l, gain, g
        if best < 0:
            h /= 2
            continue
        counts[best] = min(orcs[best].limit, counts[best] + max(1, round(h * orcs[best].limit)))
        cur = best_gap
    for l in range(n):

        def fits(m: int, l: int = l) -> bool:
            return gap([*counts[:l], m, *counts[l + 1 :]]) <= eps

        counts[l] = max_count(fits, orcs[l].limit)
    return counts
