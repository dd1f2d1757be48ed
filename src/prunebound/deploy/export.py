"""Export a pruned model for inference: sparse layers where a measured kernel is faster.

`export(model, "csr")` returns a copy of the model (masks baked in, eval mode) in which every
pruned Linear, and every Conv2d when `input_shape` is given, becomes a `SparseLinear` /
`SparseConv2d` if one of the sparse kernels (`prunebound.deploy.kernels.KERNELS`) beats the dense
layer by >= 5% in a micro-benchmark at the given batch size and torch's current thread count
(medians of interleaved repeats, in at least 3 rounds, more while the rounds disagree) *and*
is faster in every round; otherwise it stays dense, so a tie within the noise stays dense and
the choice is stable. A speed-up above the FLOP limit 1 / (1 - sparsity) cannot be real: it is
re-measured, and if it persists it is flagged in the reason (and logged). With `input_shape`,
a layer less than 2x faster there is re-timed inside the model (with vs without it) and kept
only if it wins there too, and if the whole model is then not faster than with those layers
dense, they all go back to dense. What each layer became, and why, is in
`export_report(exported)`. Layers below `min_sparsity` are not even measured: with more than
half the weights left, a sparse kernel does more memory traffic than the dense one.

`export` converts in memory; `save_export` / `load_export` (`deploy.export_file`) write and read.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from prunebound._check import check_choice, check_float, check_int, is_int
from prunebound._masks import effective_weight, prunable_layers, remove
from prunebound.deploy.kernels import KERNELS
from prunebound.deploy.reports import (
    ExportReport,
    LayerExport,
    attach_report,
    attached_report,
    export_report,
)
from prunebound.deploy.sparse import sparse_layer, sparse_path
from prunebound.timing import choose, measure_rounds, rounds_of

__all__ = ["ExportReport", "LayerExport", "attached_report", "export", "export_report"]

logger = logging.getLogger(__name__)

Format = Literal["csr", "dense"]
FORMATS = ("csr", "dense")
SPARSE = "sparse"  # override: the fastest sparse kernel, even if dense is faster
_CHOICES = ("dense", SPARSE, *KERNELS)
_MARGIN = 1.05  # a sparse kernel must be >= 5% faster than dense to replace it (timing noise)
# sparse layers measured less than this much faster in isolation are re-timed inside the model
# (isolated timings miss cache sharing with the other layers and the input layout they get)
_CHECK_BELOW = 2.0


def _check_args(
    format: str,
    batch_size: int,
    input_shape: Sequence[int] | None,
    min_sparsity: float,
    candidates: Sequence[str],
) -> None:
    check_choice("format", format, FORMATS)
    check_int("batch_size", batch_size, 1)
    if input_shape is not None and (
        isinstance(input_shape, str) or not all(is_int(s) and s >= 1 for s in input_shape)
    ):
        raise ValueError(f"input_shape must be a sequence of ints >= 1, got {input_shape!r}")
    check_float("min_sparsity", min_sparsity, 0, 1, ints=True)
    bad = [k for k in candidates if k not in KERNELS]
    if bad or not candidates:
        raise ValueError(f"candidates must be a non-empty subset of {sorted(KERNELS)}, got {bad}")


def _resolve_overrides(
    layers: Mapping[str, str], names: Sequence[str], model: nn.Module
) -> dict[str, str]:
    """layer name -> choice, from {name or glob pattern: choice}; later entries win."""
    out: dict[str, str] = {}
    for pattern, choice in layers.items():
        if choice not in _CHOICES:
            raise ValueError(f"layers[{pattern!r}] must be one of {_CHOICES}, got {choice!r}")
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"layers: {pattern!r} matches no Linear/Conv layer; layers: {names}")
        for n in hits:
            why = sparse_path(model.get_submodule(n))
            if choice != "dense" and why is not None:
                raise ValueError(f"layers: {n!r} cannot be exported sparse: {why}")
            out[n] = choice
    return out


def _input_shapes(
    model: nn.Module, layers: Mapping[str, nn.Module], example: torch.Tensor
) -> dict[str, tuple[int, ...]]:
    """Input shape of each layer in one forward of `example`."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str, mod: nn.Module, args: tuple[Any, ...]) -> None:
        shapes.setdefault(name, tuple(args[0].shape))

    handles = [m.register_forward_pre_hook(partial(hook, name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _measure(
    m: nn.Module, shape: tuple[int, ...], candidates: Sequence[str], with_dense: bool
) -> dict[str, float]:
    """Latency (ms, median of repeats) of the dense layer and each sparse kernel, random input.
    The median, not the minimum: a kernel that is fast only in its best runs (thread wake-ups
    on a loaded machine) should not win."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=effective_weight(m).dtype)
    variants: dict[str, nn.Module] = {"dense": m} if with_dense else {}
    variants.update({k: sparse_layer(m, k) for k in candidates})
    fns: dict[str, Callable[[], object]] = {k: partial(v, x) for k, v in variants.items()}
    with torch.no_grad():
        return measure_rounds(fns, baseline="dense" if with_dense else None, margin=_MARGIN)


def flop_limit(sparsity: float) -> float:
    """The most a sparse kernel can gain over dense: dense / nonzero multiply-adds."""
    return math.inf if sparsity >= 1 else 1.0 / (1.0 - sparsity)


def _above_limit(speedup: float | None, sparsity: float) -> str:
    """A warning for a speed-up above the FLOP limit (a timing artefact), else ""."""
    if speedup is None or speedup <= flop_limit(sparsity):
        return ""
    return (
        f"; FLAGGED: measured speed-up {speedup:.3g}x exceeds the FLOP limit "
        f"{flop_limit(sparsity):.3g}x (a timing artefact: machine load?)"
    )


def _decide(
    row: LayerExport,
    m: nn.Module,
    choice: str | None,
    shape: tuple[int, ...] | None,
    opts: tuple[float, Sequence[str]],
    cache: dict[tuple[Any, ...], LayerExport],
) -> LayerExport:
    """Fill in the kernel and reason of `row` for one layer (format "csr")."""
    min_sparsity, candidates = opts
    why = sparse_path(m)
    if choice == "dense" or (choice is None and why is not None):
        return replace(row, kernel="dense", reason=why or "forced by layers")
    if choice in KERNELS:
        return replace(row, kernel=choice, reason="forced by layers")
    if choice is None and row.sparsity < min_sparsity:
        reason = f"sparsity {row.sparsity:.1%} < min_sparsity {min_sparsity:.0%}: dense is faster"
        return replace(row, kernel="dense", reason=reason)
    if shape is None:
        if choice == SPARSE:
            return replace(row, kernel=candidates[0], reason="forced sparse, not measured")
        reason = "no input_shape given: a conv layer's cost depends on its input size"
        return replace(row, kernel="dense", reason=reason)
    # layers of one shape and sparsity are measured once ("keep the best per shape")
    key = (row.type, row.shape, shape, round(row.sparsity, 2), choice, tuple(candidates))
    if key not in cache:
        ms = _measure(m, shape, candidates, with_dense=choice is None)
        limit = flop_limit(row.sparsity)
        if "dense" in ms and ms["dense"] > limit * min(ms[k] for k in candidates):
            ms = _measure(m, shape, candidates, with_dense=True)  # above the limit: again
        best = min(candidates, key=lambda k: ms[k])
        dense_ms = ms.get("dense", math.inf)
        kernel = best if choice == SPARSE else choose(ms, "dense", _MARGIN, candidates=candidates)
        reason = f"measured at input {list(shape)}: " + (
            f"{best} {ms[best]:.3g} ms vs dense {dense_ms:.3g} ms (medians of "
            f"{len(rounds_of(ms)['dense'])} rounds; sparse must win by 5% and in every round)"
            if "dense" in ms
            else f"forced sparse, fastest kernel {best} {ms[best]:.3g} ms"
        )
        speedup = dense_ms / ms[kernel] if "dense" in ms else None
        reason += _above_limit(speedup, row.sparsity)
        if _above_limit(speedup, row.sparsity):
            logger.warning("export %s: %s", row.name, reason)
        cache[key] = replace(
            row, kernel=kernel, reason=reason, timings_ms=dict(ms), speedup=speedup
        )
    hit = cache[key]
    return replace(
        row, kernel=hit.kernel, reason=hit.reason, timings_ms=hit.timings_ms, speedup=hit.speedup
    )


def _swap_and_time(
    out: nn.Module,
    names: Sequence[str],
    sparse: Mapping[str, nn.Module],
    dense: Mapping[str, nn.Module],
    x: torch.Tensor,
) -> tuple[bool, dict[str, float]]:
    """Time the whole exported model with the layers `names` sparse against the same model with
    them dense (interleaved medians); install the sparse ones only if they win by `_MARGIN`."""
    holders = {n: (out.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names}

    def run_with(mods: Mapping[str, nn.Module]) -> object:
        for n, (holder, leaf) in holders.items():
            setattr(holder, leaf, mods[n])
        return out(x)

    with torch.no_grad():
        ms = measure_rounds(
            {"sparse": partial(run_with, sparse), "dense": partial(run_with, dense)},
            baseline="dense",
            margin=_MARGIN,
            min_repeats=7,
        )
    keep = choose(ms, "dense", _MARGIN) == "sparse"
    for n, (holder, leaf) in holders.items():
        setattr(holder, leaf, sparse[n] if keep else dense[n])
    return keep, ms


def _installed(out: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    return {n: out.get_submodule(n) for n in names}


def _check_in_model(
    out: nn.Module, rows: list[LayerExport], dense: Mapping[str, nn.Module], x: torch.Tensor
) -> list[LayerExport]:
    """Re-time each borderline automatic sparse choice inside the exported model (with it
    against with that layer dense); keep sparse only if it wins by `_MARGIN` there. In model
    order, each check sees the choices already made."""
    checked = []
    for row in rows:
        if row.name not in dense or row.speedup is None or row.speedup >= _CHECK_BELOW:
            checked.append(row)
            continue
        keep, ms = _swap_and_time(out, [row.name], _installed(out, [row.name]), dense, x)
        note = f"; in the model {ms['sparse']:.3g} ms with it vs {ms['dense']:.3g} ms dense: " + (
            "kept" if keep else "dense"
        )
        speedup = ms["dense"] / ms["sparse"] if keep else 1.0
        note += _above_limit(speedup, row.sparsity)
        checked.append(
            replace(
                row,
                kernel=row.kernel if keep else "dense",
                reason=row.reason + note,
                speedup=speedup,
            )
        )
    return checked


def _check_whole_model(
    out: nn.Module, rows: list[LayerExport], dense: Mapping[str, nn.Module], x: torch.Tensor
) -> list[LayerExport]:
    """Last guard against timing noise (a loaded machine): the exported model against the same
    model with every automatic sparse choice dense; if it does not win by `_MARGIN`, those
    layers all go back to dense."""
    names = [r.name for r in rows if r.name in dense and r.kernel != "dense"]
    if not names:
        return rows
    keep, ms = _swap_and_time(out, names, _installed(out, names), dense, x)
    if keep:
        return rows
    note = f"; whole model {ms['sparse']:.3g} ms vs {ms['dense']:.3g} ms all dense: dense"
    return [
        replace(r, kernel="dense", reason=r.reason + note, speedup=1.0) if r.name in names else r
        for r in rows
    ]


def export(
    model: nn.Module,
    format: Format = "csr",
    *,
    layers: Mapping[str, str] | None = None,
    batch_size: int = 1,
    input_shape: Sequence[int] | None = None,
    min_sparsity: float = 0.5,
    candidates: Sequence[str] = tuple(KERNELS),
) -> nn.Module:
    """A copy of `model` for inference, with sparse layers where they are measured faster.

    The input model is not changed. The copy has its masks baked in and is in eval mode; its
    outputs equal the input model's (eval mode) up to float rounding, and carry no gradient.

    Args:
        model: a pruned model (masks, or zeros baked in by `pb.remove`), on CPU.
        format: "csr" (each pruned Linear, and each Conv2d if `input_shape` is given, sparse
            where measured faster, see the module docstring) or "dense" (every layer dense:
            the model with masks baked in).
        layers: per-layer overrides, {name or glob pattern: "dense" | "sparse" | kernel name};
            "sparse" takes the fastest sparse kernel even when dense is faster.
        batch_size: batch to measure at; the exported model accepts any batch.
        input_shape: shape of one input sample, e.g. (1, 28, 28); needed to measure Conv2d
            layers (and Linear layers applied to more than 2-D input).
        min_sparsity: layers with fewer zeros are kept dense without being measured.
        candidates: kernels to try (keys of `prunebound.deploy.kernels.KERNELS`).

    Returns:
        The exported model; `export_report(exported)` says what each layer became and why.

    Raises:
        ValueError: bad arguments, a model with no Linear/Conv layer, a model with no zero
            weight and format "csr" (nothing to gain: prune first, or ask for format="dense"),
            or an override forcing a layer that has no sparse path (Conv1d, grouped conv, GPU).
    """
    _check_args(format, batch_size, input_shape, min_sparsity, candidates)
    names = list(prunable_layers(model))
    if not names:
        raise ValueError("export: the model has no Linear/Conv layer to export")
    overrides = _resolve_overrides(layers or {}, names, model)
    out = remove(copy.deepcopy(model)).eval()
    targets = prunable_layers(out)
    zeros = {
        n: float((effective_weight(m) == 0).double().mean().item()) for n, m in targets.items()
    }
    if format == "csr" and not any(zeros.values()):
        raise ValueError(
            "export: the model is not pruned (no Linear/Conv weight is zero); prune it first, "
            "or pass format='dense' for a plain dense copy"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    example = None
    if input_shape is not None:
        p = next(out.parameters())
        g = torch.Generator(p.device).manual_seed(0)
        shape = (batch_size, *input_shape)
        example = torch.randn(shape, generator=g, dtype=p.dtype, device=p.device)
        shapes = _input_shapes(out, targets, example)
    auto: dict[str, nn.Module] = {}  # dense layers replaced by an automatic (measured) choice
    cache: dict[tuple[Any, ...], LayerExport] = {}
    rows = []
    for name, m in targets.items():
        shape = tuple(effective_weight(m).shape)
        row = LayerExport(name, type(m).__name__, shape, zeros[name], "dense", "format='dense'")
        if format == "dense":
            rows.append(row)
            continue
        in_shape = shapes.get(name)
        if in_shape is None and isinstance(m, nn.Linear):
            in_shape = (batch_size, m.in_features)
        row = _decide(row, m, overrides.get(name), in_shape, (min_sparsity, candidates), cache)
        rows.append(row)
        if row.kernel == "dense":
            continue
        if not name:  # the model is this one layer: measured alone = measured as the model
            out = sparse_layer(m, row.kernel)
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent), leaf, sparse_layer(m, row.kernel))
        if overrides.get(name) is None:
            auto[name] = m
    if example is not None and auto:
        rows = _check_in_model(out, rows, auto, example)
        rows = _check_whole_model(out, rows, auto, example)
    for row in rows:
        logger.info("export %s: %s (%s)", row.name, row.kernel, row.reason)
    attach_report(out, ExportReport(format, batch_size, torch.get_num_threads(), tuple(rows)))
    return out
