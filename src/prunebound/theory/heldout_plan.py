"""Plans certified on held-out data (docs/theory.md §7.7): search on one split, certify once on
a disjoint one.

Guarantee of `data_plan` (statistical, over the data, no assumption on the weights): with
probability >= `confidence` over the certify sample, P_x(||f(x) - F(x)|| > eps) <= `max_gap_rate`
for inputs x from the population the certify sample was drawn i.i.d. from. Not a sup over a
ball. Derived for prunebound in the setting of Qian & Klabjan (2021).

This is the part of `theory` that prunes models (`prunebound.prune` on deep copies).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any, get_args

import torch
from torch import nn

from prunebound._check import check_choice, check_float, check_int
from prunebound._masks import original_weight, prunable_layers
from prunebound.pruning import prune
from prunebound.stats import clopper_pearson_upper
from prunebound.theory.datacert import (
    Data,
    DataCertificate,
    check_disjoint,
    data_certificate,
    dense_reference,
    inputs_and_labels,
    model_outputs,
)
from prunebound.theory.resolve import resolve_target
from prunebound.theory.values import LayerPlan, Plan, PlanMethod

log = logging.getLogger(__name__)
DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _pruned_copy(base: nn.Module, counts: dict[str, int], method: str, seed: int) -> nn.Module:
    """`base` pruned with every layer's count (zeros included), the exact call
    `prune(model, plan=p)` makes: same layers, same order, so a random method consumes the
    generator seeded with `seed` identically and draws the same masks."""
    work = copy.deepcopy(base)
    prune(work, method, counts=dict(counts), seed=seed)
    return work


def search_data_plan(
    model: nn.Module,
    search_data: Data,
    certify_data: Data,
    eps: float,
    *,
    max_gap_rate: float,
    confidence: float = 0.95,
    method: str = "magnitude",
    grid: Sequence[float] = DEFAULT_GRID,
    seed: int = 0,
    batch_size: int = 1024,
) -> tuple[dict[str, int], DataCertificate]:
    """Greedy per-layer sparsity search on one split, one certificate on a disjoint split.

    Coordinate ascent over per-layer fractions on `grid`: each round raises, among the layers
    whose next grid step keeps the Clopper-Pearson upper limit (at `confidence`) of
    P(||f - F|| > eps) <= max_gap_rate on the SEARCH split, the one adding the most pruned
    weights; stop when no step is feasible. Then `data_certificate` on the CERTIFY split: the
    only certificate that is valid, since the search split's counts are biased by the selection
    (docs/theory.md §7.7). The certificate may fail the target: `data_plan` then prunes nothing.

    Args:
        model: the model to prune (not modified: the search works on deep copies with masks
            removed; the reference F is that unpruned copy).
        search_data, certify_data: disjoint i.i.d. samples (tensors or (inputs, labels)).
        eps: gap threshold, >= 0.
        max_gap_rate: the target for P_x(gap > eps), in (0, 1).
        confidence: the confidence level of each Clopper-Pearson limit, in (0, 1).
        method: a `prunebound.prune` method; `seed` fixes its randomness.
        grid: increasing fractions in [0, 1] (0 first or added).

    Returns:
        (counts per layer name, DataCertificate on the certify split for those counts).
    """
    check_float("max_gap_rate", max_gap_rate, 0.0, 1.0, closed="neither")
    check_float("confidence", confidence, 0.0, 1.0, closed="neither")
    check_int("seed", seed)
    levels = sorted({0.0, *(float(g) for g in grid)})
    if levels[0] < 0 or levels[-1] > 1:
        raise ValueError(f"grid must hold fractions in [0, 1], got {list(grid)}")
    xs, _ = inputs_and_labels(search_data)
    xc, _ = inputs_and_labels(certify_data)
    if xs.shape[1:] != xc.shape[1:] or xs.dtype != xc.dtype:
        raise ValueError(
            "search_data and certify_data must be inputs of one shape and dtype (each a tensor "
            f"or (inputs, labels)), got {tuple(xs.shape)} {xs.dtype} and "
            f"{tuple(xc.shape)} {xc.dtype}"
        )
    check_disjoint(xs, xc)
    base = dense_reference(model)
    ref_out = model_outputs(base, xs, batch_size).double()
    sizes = {name: int(original_weight(m).numel()) for name, m in prunable_layers(base).items()}
    level = dict.fromkeys(sizes, 0)

    def counts_of(lv: dict[str, int]) -> dict[str, int]:
        return {k: round(levels[i] * sizes[k]) for k, i in lv.items()}

    def feasible(lv: dict[str, int]) -> bool:
        work = _pruned_copy(base, counts_of(lv), method, seed)
        out = model_outputs(work, xs, batch_size).double()
        gaps = torch.linalg.vector_norm((out - ref_out).reshape(xs.shape[0], -1), dim=1)
        k = int((gaps > eps).sum())
        return clopper_pearson_upper(k, xs.shape[0], 1 - confidence) <= max_gap_rate

    for _ in itertools.count():
        best, best_gain = None, 0
        for name in sizes:
            if level[name] + 1 >= len(levels):
                continue
            trial = {**level, name: level[name] + 1}
            gain = counts_of(trial)[name] - counts_of(level)[name]
            if gain > best_gain and feasible(trial):
                best, best_gain = trial, gain
        if best is None:
            break
        level = best
        log.debug("search_data_plan: levels %s", level)
    counts = counts_of(level)
    pruned = _pruned_copy(base, counts, method, seed)
    cert = data_certificate(
        pruned, certify_data, eps, confidence=confidence, reference=base, batch_size=batch_size
    )
    return counts, cert


def data_plan(
    model: nn.Module,
    data: tuple[Data, Data],
    eps: float,
    *,
    max_gap_rate: float,
    confidence: float = 0.95,
    method: PlanMethod = "magnitude",
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> Plan:
    """A `Plan` (guarantee "data") from `search_data_plan` on data=(search, certify) (§7.7).

    Guarantee: with probability >= `confidence` over the certify sample,
    P_x(||f(x) - F(x)|| > eps) <= max_gap_rate for the population the certify sample was drawn
    i.i.d. from; no assumption on the weights; not a sup over a ball. If the certify split
    rejects the searched pruning, the plan prunes nothing (trying smaller prunings on the same
    split would select on it) and its note says so.

    Args:
        model: the trained model (not modified).
        data: (search_data, certify_data), two disjoint i.i.d. samples, each a float tensor of
            inputs or (inputs, labels). A single (inputs, labels) pair is refused (split it
            yourself); samples shared between the splits (by content) are refused.
        eps: gap threshold, >= 0. max_gap_rate, confidence: as in `search_data_plan`.
        method: "magnitude" or "random"; with "random", `seed` fixes the mask searched and
            certified, recorded as `Plan.seed`, which `prune(model, plan=p)` uses by default.
        input_shape: one sample's shape (conv models), for the plan's layer specs.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"data_plan needs an nn.Module, got {type(model).__name__}")
    check_float("eps", eps, 0.0, math.inf, closed="left", ints=True)
    check_choice("method", method, get_args(PlanMethod))
    search, certify_split = _data_splits(data)
    counts, cert = search_data_plan(
        model, search, certify_split, eps, max_gap_rate=max_gap_rate, confidence=confidence,
        method=method, seed=seed,
    )  # fmt: skip
    tgt = resolve_target(model, input_shape)
    note = (
        f"data plan: P_x(||f(x) - F(x)|| > {eps:.4g}) <= {cert.exceed_upper:.4g} "
        f"(Clopper-Pearson, confidence {confidence:.4g}) on {cert.n} held-out inputs; "
        "not a sup over the ball"
    )
    if cert.exceed_upper > max_gap_rate:
        note = (
            f"data plan: certification FAILED: the Clopper-Pearson upper limit "
            f"{cert.exceed_upper:.4g} of P_x(||f(x) - F(x)|| > {eps:.4g}) on {cert.n} held-out "
            f"inputs exceeds max_gap_rate = {max_gap_rate:.4g} for the searched counts "
            f"{ {k: v for k, v in counts.items() if v} }; this plan prunes nothing"
        )
        log.warning(note)
        counts = dict.fromkeys(counts, 0)
    layers = tuple(
        LayerPlan(
            name=s.name,
            count=counts.get(s.name, 0),
            fraction=counts.get(s.name, 0) / s.numel,
            threshold=None,
            eps_share=0.0,
            delta_share=0.0,
        )
        for s in tgt.specs
    )
    return Plan(
        method=method,
        law=None,
        eps=float(eps),
        delta=0.0,  # nothing is random in the weights or the mask choice's guarantee
        radius=0.0,  # no ball: a statement about the data population
        layers=layers,
        specs=tgt.specs,
        output_scale=0.0,
        split=None,
        notes=(note,),
        seed=seed if method == "random" else None,  # prune(plan=p) redraws this exact mask
        activation="relu" if tgt.relu_chain else "other",
        guarantee="data",
        confidence=confidence,
        max_gap_rate=max_gap_rate,
    )


def _data_splits(data: object) -> tuple[Any, Any]:
    """data=(search_data, certify_data), each inputs or (inputs, labels); refuse (x, y)."""
    form = (
        "data_plan needs data=(search_data, certify_data): two disjoint i.i.d. samples, each "
        "a float tensor of inputs or a pair (inputs, labels), e.g. "
        "data=((x[:n], y[:n]), (x[n:], y[n:]))"
    )
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError(f"{form}; got {data!r:.60}")
    parts = []
    for which, part in zip(("search_data", "certify_data"), data, strict=True):
        x = part[0] if isinstance(part, tuple | list) and len(part) == 2 else part
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{form}; {which} is a {type(part).__name__}")
        if not (x.is_floating_point() or x.is_complex()):
            hint = (
                " (this looks like data=(inputs, labels): split it into two samples)"
                if which == "certify_data"
                else ""
            )
            raise ValueError(f"{form}; {which} inputs have dtype {x.dtype}{hint}")
        parts.append(x)
    if parts[0].shape[1:] != parts[1].shape[1:]:
        raise ValueError(
            f"{form}; search and certify inputs differ in sample shape: "
            f"{tuple(parts[0].shape[1:])} vs {tuple(parts[1].shape[1:])} "
            "(data=(inputs, targets)? split it into two samples)"
        )
    return (tuple(data[0]) if isinstance(data[0], list) else data[0]), (
        tuple(data[1]) if isinstance(data[1], list) else data[1]
    )
