"""`compress`: the sparsest pruning found on a search split, certified on a certify split.

Guarantee (statistical, over the certify sample; no assumption on the weights): with
probability >= `confidence`, the returned model's argmax differs from the original's on at most
a fraction `certificate.flip_upper` <= `max_flip_rate` of inputs from the population the certify
split was drawn i.i.d. from (or P_x(||f(x) - F(x)|| > eps) <= `max_gap_rate`). The search,
calibration, retraining and sparsity choice see the search split only; the certify split is
read by the final certification alone, at level (1 - confidence) / attempts for each of at most
`attempts` candidates (Bonferroni), so the statement holds whichever candidate is returned.
docs/theory.md §7.7 (data certificates) and §7.9 (this search).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from prunebound._check import as_generator, check_float, check_int, finite
from prunebound._masks import count_units, prunable_layers
from prunebound.data import Dataset
from prunebound.pruning import prune
from prunebound.stats import clopper_pearson_upper
from prunebound.theory.datacert import (
    DataCertificate,
    check_disjoint,
    data_certificate,
    inputs_and_labels,
    model_outputs,
)
from prunebound.training.loop import TrainConfig, train

log = logging.getLogger(__name__)
# candidate shares of the prunable weights: coarse where flips are rare, fine where they rise
# (each step of an iterative chain then changes the model less; measured on Fashion-MNIST
# LeNet-300-100 with obs + distillation, 0.86 -> 0.88 -> 0.9 flips fewer than 0.85 -> 0.9)
DEFAULT_SPARSITIES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.83, 0.86)
DEFAULT_SPARSITIES += (0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)


@dataclass(frozen=True)
class Trial:
    """One candidate sparsity, measured on the validation part of the search split."""

    sparsity: float  # target share pruned of the weights the model had left (all, if dense)
    achieved: float  # share of the prunable weights that are zero
    val_n: int
    val_flips: int | None  # argmax changes against the original (classifiers)
    val_exceed: int  # ||f - F|| > eps (regression target), else 0
    # the Clopper-Pearson limit (at the attempt level) the certify split would give if it saw the
    # validation rate: what the sparsity is chosen by, so that the chosen one tends to certify
    predicted_upper: float
    val_accuracy: float | None
    passed: bool
    seconds: float
    retrained: bool = False  # the candidate kept at this sparsity is the retrained one


@dataclass(frozen=True)
class CompressResult:
    """What `compress` found and certified.

    `model` is a pruned copy (the input model is untouched); `certificate` the held-out-data
    certificate of `model` on the certify split (each limit at level `attempt_level`;
    jointly with the other attempts, the guarantee holds at `confidence`). `accepted` is False
    when no candidate passed: `model` is then an unpruned copy and `notes` says so.
    """

    model: nn.Module
    certificate: DataCertificate | None
    accepted: bool
    sparsity: float
    counts: dict[str, int]
    target: str
    confidence: float
    attempt_level: float
    history: tuple[Trial, ...]
    certified: tuple[float, ...]  # the sparsities certified, in order
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    def __str__(self) -> str:
        head = (
            f"compress: {self.sparsity:.1%} of prunable weights pruned, {self.target}, "
            f"confidence {self.confidence:g}"
            if self.accepted
            else f"compress: NOTHING certified ({self.target}); the model is returned unpruned"
        )
        rows = [head, f"  {'sparsity':>9} {'predicted':>10} {'val acc':>8}  passed"]
        rows += [
            f"  {t.sparsity:>9.1%} {t.predicted_upper:>10.4f} "
            f"{'' if t.val_accuracy is None else f'{t.val_accuracy:.4f}':>8}  {t.passed}"
            for t in self.history
        ]
        cert = [] if self.certificate is None else str(self.certificate).splitlines()
        return "\n".join(rows + cert + [f"  note: {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the model)."""
        d = asdict(replace(self, model=nn.Identity()))
        del d["model"]
        return d


@dataclass(frozen=True)
class _Target:
    flip_rate: float | None
    gap_rate: float | None
    eps: float

    def describe(self, upper: float | None = None) -> str:
        what = (
            f"P(argmax changes) <= {self.flip_rate:g}"
            if self.flip_rate is not None
            else f"P(||f(x) - F(x)|| > {self.eps:g}) <= {self.gap_rate:g}"
        )
        return what if upper is None else f"{what} (certified {upper:.4g})"


def _check_split(name: str, data: object, model: nn.Module | None) -> tuple[torch.Tensor, Any]:
    """Inputs and labels of a split, checked; `model` (None for the certify split, which only
    the final certification may run the model on) is run on two samples to check they fit."""
    try:
        x, y = inputs_and_labels(data)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None
    if not x.is_floating_point():
        raise ValueError(f"{name} inputs must be a float tensor, got dtype {x.dtype}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 samples, got {x.shape[0]}")
    if not finite(x):
        raise ValueError(f"{name} inputs must be finite, got NaN or Inf")
    if y is not None and y.dtype != torch.int64:
        raise ValueError(f"{name} labels must be int64 class indices, got dtype {y.dtype}")
    if model is None:
        return x, y
    try:
        with torch.no_grad():
            out = model_outputs(model, x[:2], 2)
    except RuntimeError as e:
        msg = f"{name} inputs of shape {tuple(x.shape[1:])} do not fit the model: {e}"
        raise ValueError(msg) from None
    if not finite(out):
        raise ValueError(f"{name}: the model's outputs are NaN or Inf on these inputs")
    return x, y


def needed_samples(max_rate: float, level: float) -> int:
    """The fewest certify samples with which 0 events can certify `max_rate` at `level`."""
    return math.ceil(math.log(level) / math.log1p(-max_rate))


def compress(
    model: nn.Module,
    search: object,
    certify: object,
    *,
    max_flip_rate: float | None = 0.01,
    max_gap_rate: float | None = None,
    eps: float = 0.0,
    confidence: float = 0.95,
    method: str = "obs",
    retrain: TrainConfig | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    attempts: int = 2,
    validation: float = 0.2,
    calibration: int = 8192,
    seed: int = 0,
) -> CompressResult:
    """The sparsest pruning of `model` whose behaviour provably stays within a budget of it.

    Args:
        model: the trained original F (not modified). A model already pruned is F as it is.
        search: (inputs, labels) or inputs: calibration, retraining and the sparsity choice.
        certify: (inputs, labels) or inputs, disjoint from `search` by content: touched only by
            the final certification.
        max_flip_rate: the budget on P(argmax f(x) != argmax F(x)), a classifier's behaviour;
            None to use `max_gap_rate` instead.
        max_gap_rate, eps: the budget on P(||f(x) - F(x)|| > eps) (regression outputs).
        confidence: the statement holds with this probability over the certify sample.
        method: a `prunebound.prune` method, global scope; data-aware ones ("obs", "wanda",
            "obd", "taylor", "snip") calibrate on the first `calibration` samples of the
            search split's fitting part (statistics are accumulated batch by batch).
        retrain: a `TrainConfig` to retrain each candidate on the search split (its
            `objective="distill"` trains towards F); None: one-shot pruning. Candidates are
            pruned in increasing sparsity, each from the previous one (iterative pruning).
        sparsities: the candidate shares of the prunable weights to prune, increasing; of
            the surviving ones when `model` comes already pruned (`sparsity` in the result is
            the total share of zero weights).
        attempts: most candidates certified (the largest that passed validation first).
        validation: share of the search split held out for choosing the sparsity.
        seed: random methods, retraining order and the validation split.

    Returns:
        A `CompressResult`; `accepted` False (and an unpruned copy) when nothing certified.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if (max_flip_rate is None) == (max_gap_rate is None):
        raise ValueError("give exactly one of max_flip_rate and max_gap_rate (with eps)")
    rate = check_float(
        "max_flip_rate" if max_gap_rate is None else "max_gap_rate",
        max_gap_rate if max_flip_rate is None else max_flip_rate,
        0.0,
        1.0,
        closed="neither",
    )
    target = _Target(max_flip_rate, max_gap_rate, check_float("eps", eps, 0.0, ints=True))
    check_float("confidence", confidence, 0.0, 1.0, closed="neither")
    check_int("attempts", attempts, 1)
    check_float("validation", validation, 0.0, 1.0, closed="neither")
    check_int("calibration", calibration, 1)
    grid = [check_float("sparsities[i]", s, 0.0, 1.0, closed="right") for s in sparsities]
    if not grid or any(b <= a for a, b in itertools.pairwise(grid)):
        raise ValueError(f"sparsities must be increasing numbers in (0, 1), got {list(grid)}")
    original = copy.deepcopy(model).eval()
    xs, ys = _check_split("search", search, original)
    xc, yc = _check_split("certify", certify, None)
    if xs.shape[1:] != xc.shape[1:]:
        raise ValueError(f"search and certify samples differ in shape: {xs.shape} vs {xc.shape}")
    check_disjoint(xs, xc)
    out = model_outputs(original, xs[:2], 2)
    if max_flip_rate is not None and (out.dim() != 2 or out.shape[1] < 2):
        raise ValueError(
            "max_flip_rate needs a classifier (outputs of shape (batch, classes >= 2)), got "
            f"outputs of shape {tuple(out.shape)}: use max_gap_rate with eps"
        )
    if retrain is not None and (ys is None or out.dim() != 2):
        raise ValueError("retrain needs labelled search data and a classifier's outputs")
    level = (1 - confidence) / attempts
    need = needed_samples(rate, level)
    if xc.shape[0] < need:
        raise ValueError(
            f"certify holds {xc.shape[0]} samples, but certifying a rate <= {rate:g} at "
            f"confidence {confidence:g} over {attempts} attempts needs at least {need} (with "
            "no event at all); give a larger certify split or a looser target"
        )
    gen = as_generator(seed)
    perm = torch.randperm(xs.shape[0], generator=gen)
    n_val = max(1, round(validation * xs.shape[0]))
    val, fit = perm[:n_val], perm[n_val:]
    x_val, x_fit = xs[val], xs[fit]
    y_val = None if ys is None else ys[val]
    calib: Any = x_fit[:calibration] if ys is None else (x_fit[:calibration], ys[fit][:calibration])
    ref_val = model_outputs(original, x_val, 1024).double()
    fit_data = None
    if retrain is not None and ys is not None:
        shape = tuple(xs.shape[1:])
        fit_data = Dataset("search", x_fit, ys[fit], x_val, ys[val], out.shape[1], shape)

    n_cert = xc.shape[0]  # its size only: the sparsity is chosen to pass a test of this size
    history: list[Trial] = []
    kept: list[tuple[float, nn.Module, float]] = []  # (sparsity, model, predicted limit)
    current, done, fails = copy.deepcopy(original), 0.0, 0
    for s in grid:
        t1 = time.perf_counter()
        amount = 1.0 - (1.0 - s) / (1.0 - done)  # of the surviving weights
        prune(current, method, min(max(amount, 0.0), 1.0), scope="global", data=calib, seed=gen)
        trial = _measure(current.eval(), s, x_val, y_val, ref_val, target, level, rate, n_cert)
        best = current
        if fit_data is not None and retrain is not None:
            # retraining recovers accuracy but also moves the model: the candidate at s is the
            # one-shot pruning or the retrained one, whichever validates closer to F; the chain
            # goes on from the retrained one
            one_shot = copy.deepcopy(current)
            teacher = original if retrain.objective == "distill" else None
            train(current, fit_data, retrain, seed=gen, teacher=teacher)
            again = replace(
                _measure(current.eval(), s, x_val, y_val, ref_val, target, level, rate, n_cert),
                retrained=True,
            )
            trial, best = (
                (again, current)
                if again.predicted_upper <= trial.predicted_upper
                else (trial, one_shot)
            )
        history.append(replace(trial, seconds=time.perf_counter() - t1))
        log.info(
            "compress: %.3f -> predicted limit %.4g (%s)", s, trial.predicted_upper, trial.passed
        )
        done = s
        if trial.passed:
            kept.append((s, copy.deepcopy(best), trial.predicted_upper))
            fails = 0
        else:
            fails += 1
            if fails >= 2 or retrain is None:  # one-shot rates only grow with sparsity
                break
    chosen = _attempts(kept, attempts, rate)
    return _certify(original, chosen, xc, yc, target, confidence, level, history, t0)


def _attempts(
    kept: list[tuple[float, nn.Module, float]], attempts: int, rate: float
) -> list[tuple[float, nn.Module]]:
    """The candidates to certify, in order: attempt i takes the sparsest validated candidate
    whose predicted limit is <= rate * (1 - i / (attempts + 1)), so that a later attempt is a
    safer one, not the next sparsity with the same odds (the first is the sparsest passing)."""
    out: list[tuple[float, nn.Module]] = []
    for i in range(attempts):
        margin = rate * (1 - i / (attempts + 1))
        for s, model, predicted in sorted(kept, key=lambda k: -k[0]):
            if predicted <= margin and all(s != t for t, _ in out):
                out.append((s, model))
                break
    return out


def _measure(
    model: nn.Module,
    s: float,
    x: torch.Tensor,
    y: torch.Tensor | None,
    ref: torch.Tensor,
    target: _Target,
    level: float,
    rate: float,
    n_cert: int,
) -> Trial:
    outs = model_outputs(model, x, 1024).double()
    n = x.shape[0]
    gaps = torch.linalg.vector_norm((outs - ref).reshape(n, -1), dim=1)
    exceed = int((gaps > target.eps).sum())
    flips = None
    if outs.dim() == 2 and outs.shape[1] > 1:
        flips = int((outs.argmax(1) != ref.argmax(1)).sum())
    k = flips if target.flip_rate is not None else exceed
    assert k is not None
    upper = clopper_pearson_upper(min(n_cert, math.ceil(k / n * n_cert)), n_cert, level)
    acc = None if y is None or outs.dim() != 2 else float((outs.argmax(1) == y).double().mean())
    counts = _counts(model)
    total = sum(count_units(m, "weight")[0] for m in prunable_layers(model).values())
    achieved = sum(counts.values()) / max(total, 1)
    return Trial(s, achieved, n, flips, exceed, upper, acc, upper <= rate, 0.0)


def _certify(
    original: nn.Module,
    candidates: list[tuple[float, nn.Module]],
    xc: torch.Tensor,
    yc: torch.Tensor | None,
    target: _Target,
    confidence: float,
    level: float,
    history: list[Trial],
    t0: float,
) -> CompressResult:
    data: Any = xc if yc is None else (xc, yc)
    certified: list[float] = []
    notes: list[str] = []
    for s, cand in candidates:
        cert = data_certificate(cand, data, target.eps, confidence=1 - level, reference=original)
        certified.append(s)
        upper = cert.flip_upper if target.flip_rate is not None else cert.exceed_upper
        assert upper is not None
        bound = target.flip_rate if target.flip_rate is not None else target.gap_rate
        assert bound is not None
        if upper <= bound:
            return CompressResult(
                cand, cert, True, history[[t.sparsity for t in history].index(s)].achieved,
                _counts(cand), target.describe(upper), confidence, level, tuple(history),
                tuple(certified), tuple(notes), time.perf_counter() - t0,
            )  # fmt: skip
        notes.append(f"{s:.1%} failed on the certify split: limit {upper:.4g} > {bound:g}")
    if not candidates:
        notes.append("no sparsity passed validation on the search split")
    notes.append("nothing certified: the returned model is the original, unpruned")
    return CompressResult(
        copy.deepcopy(original), None, False, 0.0, {}, target.describe(), confidence, level,
        tuple(history), tuple(certified), tuple(notes), time.perf_counter() - t0,
    )  # fmt: skip


def _counts(model: nn.Module) -> dict[str, int]:
    """Pruned weights per layer."""
    out = {}
    for name, m in prunable_layers(model).items():
        total, alive = count_units(m, "weight")
        out[name] = total - alive
    return out
