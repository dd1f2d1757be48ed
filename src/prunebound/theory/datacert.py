"""Data certificates: Clopper-Pearson upper limits on how often pruning changes a model's output
on the input population, from a held-out i.i.d. sample (docs/theory.md §7.7).

No assumption on the weights; the only assumption is that the certify sample is drawn i.i.d.
from the population and is independent of every choice made about the pruning (which is why
`theory.heldout_plan` searches on one split and certifies once on another). Derived for
prunebound in the setting of Qian & Klabjan (2021).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunebound._check import check_float
from prunebound._masks import reset, trained_since_masked
from prunebound.stats import clopper_pearson_upper

Data = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DataCertificate:
    """Empirical change rates of a pruned model and their exact Clopper-Pearson upper limits.

    Each `*_upper` holds with probability >= `confidence` over the sample, for the population it
    was drawn i.i.d. from (jointly for the two or three rates: >= 1 - k (1 - confidence), by the
    union bound).
    `flips` counts inputs where the argmax prediction changes (None for 1-output models);
    `new_errors` counts inputs the reference got right and the pruned model gets wrong
    (None without labels).
    """

    n: int
    eps: float
    confidence: float
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

    def __str__(self) -> str:
        rows = [
            f"DataCertificate on {self.n} held-out inputs (confidence {self.confidence:g} each):",
            f"  P(||f(x) - F(x)|| > {self.eps:g}) <= {self.exceed_upper:.4g}"
            f"  (observed {self.exceed}/{self.n}; max gap {self.max_gap:.4g})",
        ]
        if self.flip_upper is not None:
            rows.append(
                f"  P(argmax changes)     <= {self.flip_upper:.4g}"
                f"  (observed {self.flips}/{self.n})"
            )
        if self.new_error_upper is not None:
            rows.append(
                f"  P(new error)          <= {self.new_error_upper:.4g}"
                f"  (observed {self.new_errors}/{self.n})"
            )
        return "\n".join([*rows, f"  assumes: {self.assumptions}"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def inputs_and_labels(data: Data) -> tuple[torch.Tensor, torch.Tensor | None]:
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
def model_outputs(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """`model(x)` in eval mode, `batch` inputs at a time (the model's mode restored after)."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
    finally:
        model.train(was)


def dense_reference(model: nn.Module) -> nn.Module:
    """F: a deep copy of `model` with its masks removed (`prunebound.reset`)."""
    return reset(copy.deepcopy(model))


def data_certificate(
    model: nn.Module,
    data: Data,
    eps: float,
    *,
    confidence: float = 0.95,
    reference: nn.Module | None = None,
    batch_size: int = 1024,
) -> DataCertificate:
    """Certify on a held-out sample how often ||f(x) - F(x)|| > eps and how often labels flip.

    Args:
        model: the pruned model f (not modified).
        data: inputs (n, ...) or (inputs, labels), an i.i.d. sample NOT used to choose the
            pruning.
        eps: output-gap threshold, >= 0.
        confidence: the confidence level of each upper limit, in (0, 1).
        reference: F, the model the pruning started from. Default: `model` with its masks
            removed (a deep copy, `prunebound.reset`), which is F only if the weights did not
            change after pruning; a model retrained after pruning needs `reference` (refused
            without it).
        batch_size: forward batch size.
    """
    x, y = inputs_and_labels(data)
    if x.shape[0] < 1:
        raise ValueError("data must hold at least 1 input, got 0")
    check_float("eps", eps, 0.0, math.inf, closed="left", ints=True)
    check_float("confidence", confidence, 0.0, 1.0, closed="neither")
    delta = 1.0 - confidence  # each limit's error probability
    if reference is None:
        drifted = trained_since_masked(model)
        if drifted:
            raise ValueError(
                f"model was trained after pruning (layers {drifted[:5]} changed since their "
                "masks were set), so its masks removed are not the model it was pruned from; "
                "pass reference= the dense model you started from"
            )
    ref = dense_reference(model) if reference is None else reference
    out_f = model_outputs(model, x, batch_size).double()
    out_r = model_outputs(ref, x, batch_size).double()
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
        confidence=float(confidence),
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
