"""Tightening a trained magnitude plan: grow the Lemma A counts while the pruned model's
deterministic certificate, min(Lemma A, slope decomposition), stays <= eps (docs/theory.md §7.5).

Each candidate pruning is applied to a copy of the model with `prunebound.prune(counts=)` (exactly
what `prune(plan=...)` will do) and certified; only certified candidates are kept, so the result
is valid whatever the search does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from prunebound._masks import reset
from prunebound.pruning import prune
from prunebound.theory.lemma_a import Propagation
from prunebound.theory.network import extract
from prunebound.theory.resolve import Target
from prunebound.theory.slopes import slope_bound

SWEEPS = 2  # passes over the layers, largest first
BISECTIONS = 12  # bisection steps per layer and sweep


def tighten_counts(
    tgt: Target,
    lemma: Callable[[Sequence[int]], Propagation],
    counts: Sequence[int],
    eps: float,
    radius: float,
    input_shape: tuple[int, ...] | None,
) -> tuple[list[int], float, float | None]:
    """Grow `counts` (a Lemma A plan of `tgt.model`) while min(Lemma A, slopes) <= eps.

    Search: each layer, largest first, by bisection given the others, `SWEEPS` times.
    `lemma(counts)` is Lemma A with the plan's oracles. Returns (counts, certified gap, output
    scale bound, or None when the Lemma A counts could not be certified by the slopes either).
    """
    model = tgt.model
    if model is None:
        raise ValueError("tighten needs an nn.Module target, got widths/specs")
    names = [s.name for s in tgt.specs]
    numels = [s.numel for s in tgt.specs]
    base = reset(copy.deepcopy(model))
    cache: dict[tuple[int, ...], tuple[float, float]] = {}

    def cert(c: Sequence[int]) -> tuple[float, float]:
        key = tuple(c)
        if key not in cache:
            lem = lemma(c)
            trial = copy.deepcopy(base)
            prune(trial, "magnitude", counts=dict(zip(names, c, strict=True)))
            with torch.no_grad():
                sl = slope_bound(extract(trial, input_shape), radius, per_step=False)
            cache[key] = (min(lem.gap, sl.bound), min(lem.output_scale, sl.output_scale))
        return cache[key]

    def ok(c: Sequence[int]) -> bool:
        return cert(c)[0] <= eps

    cur = list(counts)
    if not ok(cur):  # Lemma A alone certified it; the slopes can only lower the min
        return cur, cert(cur)[0], None
    for _ in range(SWEEPS):
        for l in sorted(range(len(cur)), key=lambda i: -numels[i]):
            a, b = cur[l], numels[l]
            if ok([*cur[:l], b, *cur[l + 1 :]]):
                cur[l] = b
                continue
            for _ in range(BISECTIONS):
                if b - a <= 1:
                    break
                mid = (a + b) // 2
                a, b = (mid, b) if ok([*cur[:l], mid, *cur[l + 1 :]]) else (a, mid)
            cur[l] = a
    gap, scale = cert(cur)
    return cur, gap, scale
