"""Data certificates: Clopper-Pearson upper limits on how often pruning changes a model's output
on the input population, from a held-out i.i.d. sample (docs/theory.md §7.7).

No assumption on the weights; the only assumption is that the certify sample is drawn i.i.d.
from the population and is independent of every choice made about the pruning (which is why
`search_data_plan` searches on one split and certifies once on another). Derived for
prunebound in the setting of Qian & Klabjan (2021).

This module is the one place in `theory` that imports the prunebound core (prune/reset).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from scipy import stats
from torch import nn

from prunebound._masks import original_weight, prunable_layers, reset, trained_since_masked
from prunebound.pruning import prune

log = logging.getLogger(__name__)
Data = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class DataCertificate:
    """Empirical change rates of a pruned model and their exact Clopper-Pearson upper limits.

    Each `*_upper` holds with confidence >= 1 - delta for the population the sample was drawn
    i.i.d. from (jointly for the two or three rates: >= 1 - k delta, by the union bound).
    `flips` counts inputs where the argmax prediction changes (None for 1-output models);
    `new_errors` counts inputs the reference got right and the pruned model gets wrong
    (None without labels).
    """

    n: int
    eps: float
    delta: float
    exceed: int
    exceed_rate: float
    exceed_upper: float
    flips: int | None
    flip_rate: float | None
    flip_upper: float | None
    new_errors: int | None
    new_error_upper: float | None
    max_gap: float
    mean_gap: float
    assumptions: str = (
        "sample i.i.d. from the population and independent of the pruning choice; "
        "no assumption on the weights"
    )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """Exact one-sided upper confidence limit for a binomial rate: P(p <= U) >= 1 - delta.

    U = Beta^{-1}(1 - delta; k + 1, n - k), and U = 1 when k = n.
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n, got k={k}, n={n}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return 1.0 if k == n else float(stats.beta.ppf(1 - delta, k + 1, n - k))


def _split(data: Data) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(data, tuple):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise TypeError("data must be a tensor of inputs or a pair (inputs, labels)")
        x, y = data
        if y.shape[0] != x.shape[0]:
            msg = f"labels must match inputs in length, got {y.shape[0]} vs {x.shape[0]}"
            raise ValueError(msg)
        return x, y
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a tensor or (inputs, labels), got {type(data).__name__}")
    return data, None


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
    finally:
        model.train(was)


def _reference(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    return reset(ref)


def data_certificate(
    model: nn.Module,
    data: Data,
    eps: float,
    delta: float,
    *,
    reference: nn.Module | None = None,
    batch_size: int = 1024,
) -> DataCertificate:
    """Certify on a held-out sample how often ||f(x) - F(x)|| > eps and how often labels flip.

    Args:
        model: the pruned model f (not modified).
        data: inputs (n, ...) or (inputs, labels), an i.i.d. sample NOT used to choose the
            pruning.
        eps: output-gap threshold, >= 0.
        delta: 1 - confidence of each upper limit, in (0, 1).
        reference: F, the model the pruning started from. Default: `model` with its masks
            removed (a deep copy, `prunebound.reset`), which is F only if the weights did not
            change after pruning; a model retrained after pruning needs `reference` (refused
            without it).
        batch_size: forward batch size.
    """
    x, y = _split(data)
    if x.shape[0] < 1:
        raise ValueError("data must hold at least 1 input, got 0")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if reference is None:
        drifted = trained_since_masked(model)
        if drifted:
            raise ValueError(
                f"model was trained after pruning (layers {drifted[:5]} changed since their "
                "masks were set), so its masks removed are not the model it was pruned from; "
                "pass reference= the dense model you started from"
            )
    ref = _reference(model) if reference is None else reference
    out_f = _outputs(model, x, batch_size).double()
    out_r = _outputs(ref, x, batch_size).double()
    n = x.shape[0]
    gaps = torch.linalg.vector_norm((out_f - out_r).reshape(n, -1), dim=1)
    exceed = int((gaps > eps).sum())
    flips = rate = upper = None
    new_err = new_err_upper = None
    if out_f.dim() == 2 and out_f.shape[1] > 1:
        pred_f, pred_r = out_f.argmax(1), out_r.argmax(1)
        flips = int((pred_f != pred_r).sum())
        rate, upper = flips / n, clopper_pearson_upper(flips, n, delta)
        if y is not None:
            new_err = int(((pred_r == y) & (pred_f != y)).sum())
            new_err_upper = clopper_pearson_upper(new_err, n, delta)
    return DataCertificate(
        n=n,
        eps=float(eps),
        delta=float(delta),
        exceed=exceed,
        exceed_rate=exceed / n,
        exceed_upper=clopper_pearson_upper(exceed, n, delta),
        flips=flips,
        flip_rate=rate,
        flip_upper=upper,
        new_errors=new_err,
        new_error_upper=new_err_upper,
        max_gap=float(gaps.max()),
        mean_gap=float(gaps.mean()),
    )


def _pruned_copy(base: nn.Module, counts: dict[str, int], method: str, seed: int) -> nn.Module:
    """`base` pruned with every layer's count (zeros included), the exact call
    `prune(model, plan=p)` makes: same layers, same order, so a random method consumes the
    generator seeded with `seed` identically and draws the same masks."""
    work = copy.deepcopy(base)
    prune(work, method, counts=dict(counts), seed=seed)
    return work


def shared_samples(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many samples (rows along dim 0) of `b` are byte-for-byte equal to a sample of `a`.

    Compares content, not storage: a clone, an index copy (`x[perm[:120]]` and `x[perm[80:]]`)
    or the same data loaded twice are caught as well as views of one tensor.
    """
    if a.numel() == 0 or b.numel() == 0:
        return 0

    def rows(t: torch.Tensor) -> list[bytes]:
        flat = t.detach().cpu().contiguous().reshape(t.shape[0], -1)
        raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
        data = raw.numpy()
        return [data[i].tobytes() for i in range(data.shape[0])]

    seen = set(rows(a))
    return sum(r in seen for r in rows(b))


def check_disjoint(search: torch.Tensor, certify: torch.Tensor) -> None:
    """ValueError unless no certify sample also appears in the search split (by content)."""
    shared = shared_samples(search, certify)
    if shared:
        raise ValueError(
            f"search and certify data must be disjoint samples, got {shared} of the "
            f"{certify.shape[0]} certify samples also in the search split (compared by content): "
            "a certificate on samples the search has seen is not valid"
        )


def search_data_plan(
    model: nn.Module,
    search_data: Data,
    certify_data: Data,
    eps: float,
    delta: float,
    alpha: float,
    *,
    method: str = "magnitude",
    grid: Sequence[float] = DEFAULT_GRID,
    seed: int = 0,
    batch_size: int = 1024,
) -> tuple[dict[str, int], DataCertificate]:
    """Greedy per-layer sparsity search on one split, one certificate on a disjoint split.

    Coordinate ascent over per-layer fractions on `grid`: each round raises, among the layers
    whose next grid step keeps the Clopper-Pearson upper limit of P(||f - F|| > eps) <= alpha
    on the SEARCH split, the one adding the most pruned weights; stop when no step is feasible.
    Then `data_certificate` on the CERTIFY split: the only certificate that is valid, since the
    search split's counts are biased by the selection (docs/theory.md §7.7).

    Args:
        model: the model to prune (not modified: the search works on deep copies with masks
            removed; the reference F is that unpruned copy).
        search_data, certify_data: disjoint i.i.d. samples (tensors or (inputs, labels)).
        eps, delta, alpha: gap threshold, 1 - confidence, target violation rate in (0, 1).
        method: a `prunebound.prune` method; `seed` fixes its randomness.
        grid: increasing fractions in [0, 1] (0 first or added).

    Returns:
        (counts per layer name, DataCertificate on the certify split for those counts).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    levels = sorted({0.0, *(float(g) for g in grid)})
    if levels[0] < 0 or levels[-1] > 1:
        raise ValueError(f"grid must hold fractions in [0, 1], got {list(grid)}")
    xs, _ = _split(search_data)
    xc, _ = _split(certify_data)
    if xs.shape[1:] != xc.shape[1:] or xs.dtype != xc.dtype:
        raise ValueError(
            "search_data and certify_data must be inputs of one shape and dtype (each a tensor "
            f"or (inputs, labels)), got {tuple(xs.shape)} {xs.dtype} and "
            f"{tuple(xc.shape)} {xc.dtype}"
        )
    check_disjoint(xs, xc)
    base = _reference(model)
    ref_out = _outputs(base, xs, batch_size).double()
    sizes = {name: int(original_weight(m).numel()) for name, m in prunable_layers(base).items()}
    level = dict.fromkeys(sizes, 0)

    def counts_of(lv: dict[str, int]) -> dict[str, int]:
        return {k: round(levels[i] * sizes[k]) for k, i in lv.items()}

    def feasible(lv: dict[str, int]) -> bool:
        out = _outputs(_pruned_copy(base, counts_of(lv), method, seed), xs, batch_size).double()
        gaps = torch.linalg.vector_norm((out - ref_out).reshape(xs.shape[0], -1), dim=1)
        return clopper_pearson_upper(int((gaps > eps).sum()), xs.shape[0], delta) <= alpha

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
    return counts, data_certificate(
        pruned, certify_data, eps, delta, reference=base, batch_size=batch_size
    )
