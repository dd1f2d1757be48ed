"""Least-squares refit of a pruned model towards its original, layer by layer.

After a prune, each layer's surviving weights still hold their dense values, but its inputs
have changed: removed channels no longer feed it and every layer upstream computes something
slightly different. `refit(model, reference, data)` walks the layers in forward order and, with
every mask fixed, sets each layer's surviving weights and bias to the least-squares solution of

    min over the surviving (W, b)   sum over calibration rows || x W^T + b - y_ref ||^2

where x is the layer's input in the pruned model (its earlier layers already refitted) and
y_ref the same layer's output in the reference (the original) model. For a consumer of removed
channels, the remaining input channels are re-weighted to stand in for them (channel-pruning
feature reconstruction, He et al. 2017 / ThiNet; SparseGPT's layer-wise least squares aimed at
the original's outputs rather than at the pruned layer's own). The normal equations use
H = X^T X + lambda I (lambda = `damp` * mean(diag X^T X), damp 0.01 as in SparseGPT) in
float64: rows that keep the same input columns (structured masks) are solved together by one
Cholesky solve (up to 8 distinct row masks), other masks by conjugate gradients
(`obs.masked_lstsq`).

Masked entries stay masked (and keep their stored value, so `reset` revives them). A refit
changes the surviving weights, so like retraining it leaves `reset(model)` no longer the
original: a certificate then needs `reference=` the original (`trained_since_masked`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch
from torch import nn

from prunebound._masks import mask_module, original_tensor, prunable_layers
from prunebound.calibration import (
    Batch,
    as_matrix,
    batches,
    check_layer,
    from_matrix,
    input_rows,
    output_rows,
)
from prunebound.layer_types import PRUNABLE
from prunebound.obs import DAMP, StopForward, damped, forward_order, masked_lstsq

CG_STEPS = 200  # conjugate-gradient steps for rows with their own masks
EXACT_PATTERNS = 8  # up to this many distinct row masks, each is solved exactly


def refit(
    model: nn.Module,
    reference: nn.Module,
    data: object,
    *,
    layers: list[str] | None = None,
    damp: float = DAMP,
) -> nn.Module:
    """Refit the surviving weights and biases of `model`'s layers, in forward order, so each
    layer's output on the calibration `data` matches `reference`'s (the model before pruning:
    same layer names and shapes). Returns `model`, changed in place; `reference` is not touched.

    `layers`: names to refit (default: every Linear, GPT-2 Conv1D and Conv1d/2d with
    groups=1; other layers, such as depthwise convs, are left as they are, with a warning).
    `data`: calibration inputs (a tensor, an (inputs, labels) pair or batches), the same that
    run through both models. Everything is computed on a copy first: on any error `model` is
    unchanged.
    """
    if not isinstance(reference, nn.Module) or reference is model:
        raise TypeError("reference must be a separate nn.Module: the model before pruning")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    cached = list(batches(data))
    if not cached:
        raise ValueError("refit needs calibration data: at least one batch of inputs")
    chosen = _layers(model, layers)
    refs = dict(reference.named_modules())
    for name, m in chosen.items():
        r = refs.get(name)
        if r is None or original_tensor(r, "weight").shape != original_tensor(m, "weight").shape:
            got = "no such layer" if r is None else tuple(original_tensor(r, "weight").shape)
            raise ValueError(
                f"reference must be the model before pruning: layer {name!r} has weight shape "
                f"{tuple(original_tensor(m, 'weight').shape)}, the reference {got}"
            )
    work = copy.deepcopy(model)
    wmods = dict(work.named_modules())
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    cached = [(x.to(device), y) for x, y in cached]
    modes = {m: m.training for m in (*work.modules(), *reference.modules())}
    try:
        work.eval()
        reference.eval()
        layers_w = {n: wmods[n] for n in chosen}
        for name in forward_order(work, layers_w, cached[0], "refit"):  # inputs checked
            _fit_layer(work, reference, name, cached, damp)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    with torch.no_grad():
        for name, m in chosen.items():
            for tensor in ("weight", "bias"):
                if getattr(m, tensor, None) is not None:
                    original_tensor(m, tensor).copy_(original_tensor(wmods[name], tensor))
    return model


def _layers(model: nn.Module, names: list[str] | None) -> dict[str, nn.Module]:
    """The layers to refit: `names` (each must be fittable), or every fittable Linear/Conv."""
    out, skipped = {}, []
    for n, m in prunable_layers(model, names, types=PRUNABLE).items():
        try:
            check_layer(m, n, "refit")
        except ValueError:
            if names is not None:
                raise
            skipped.append(n)
            continue
        out[n] = m
    if skipped:
        warnings.warn(
            f"refit leaves {skipped} as they are (not a matrix product it fits: grouped or "
            "depthwise convs, Conv3d, transposed convs, string padding)",
            stacklevel=3,
        )
    if not out:
        raise ValueError("model has no layer refit can fit (Linear, Conv1d/2d with groups=1)")
    return out


def _moments(
    model: nn.Module, reference: nn.Module, name: str, data: list[Batch], bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(X^T X, X^T Y): X the layer's input rows in `model` (a column of ones appended for a
    bias), Y its output rows in `reference`, summed over `data`, in float64."""
    layer, ref = dict(model.named_modules())[name], dict(reference.named_modules())[name]
    got: dict[str, torch.Tensor] = {}

    def take_input(mod: nn.Module, args: tuple[Any, ...]) -> None:
        got["x"] = args[0]
        raise StopForward

    def take_output(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        got["y"] = out
        raise StopForward

    hh = (layer.register_forward_pre_hook(take_input), ref.register_forward_hook(take_output))
    xtx = xty = torch.zeros(0)
    try:
        with torch.no_grad():
            for x, _ in data:
                for net in (model, reference):
                    with contextlib.suppress(StopForward):
                        net(x)
                rows = input_rows(layer, got["x"])
                rows = rows.reshape(-1, rows.shape[-1]).double()
                if bias:
                    rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
                ys = output_rows(ref, got["y"]).reshape(rows.shape[0], -1).double()
                if not bool(torch.isfinite(ys).all()):
                    raise ValueError(f"refit: reference layer {name!r} outputs NaN or Inf")
                xtx = rows.t() @ rows + (xtx if xtx.numel() else 0)
                xty = rows.t() @ ys + (xty if xty.numel() else 0)
    finally:
        for h in hh:
            h.remove()
    return xtx, xty


def _fit_layer(
    model: nn.Module, reference: nn.Module, name: str, data: list[Batch], damp: float
) -> None:
    """Refit layer `name` of `model` in place (its original tensors, surviving entries)."""
    layer = dict(model.named_modules())[name]
    has_bias = getattr(layer, "bias", None) is not None
    xtx, xty = _moments(model, reference, name, data, has_bias)
    w = as_matrix(layer, original_tensor(layer, "weight").detach()).double()
    mm = mask_module(layer)
    keep = as_matrix(layer, mm.mask) if mm is not None else torch.ones_like(w, dtype=torch.bool)
    if has_bias:
        bm = mask_module(layer, "bias")
        b = original_tensor(layer, "bias").detach().double()
        bkeep = bm.mask if bm is not None else torch.ones_like(b, dtype=torch.bool)
        w, keep = torch.cat([w, b[:, None]], 1), torch.cat([keep, bkeep[:, None]], 1)
    h = damped(xtx, damp)
    new = w.clone()
    alive = keep.any(1)
    rows = alive.nonzero().flatten()
    patterns, which = torch.unique(keep[alive], dim=0, return_inverse=True)
    if len(patterns) <= EXACT_PATTERNS:  # few sets of surviving columns (structured): exactly
        for i, cols in enumerate(patterns):
            chol, info = torch.linalg.cholesky_ex(h[cols][:, cols])
            if int(info) != 0:
                raise ValueError(
                    f"refit: layer {name!r}: the calibration inputs leave its least-squares "
                    "fit singular; pass damp > 0 or more data"
                )
            these = rows[which == i]
            sol = torch.cholesky_solve(xty[cols][:, these], chol).t()
            new[these[:, None], cols.nonzero().flatten()[None, :]] = sol
    else:
        new[alive] = masked_lstsq(xty.t()[alive], (w * keep)[alive], keep[alive], h, CG_STEPS)
    new = torch.where(keep, new, w)  # masked entries keep their stored value
    with torch.no_grad():
        if has_bias:
            original_tensor(layer, "bias").copy_(new[:, -1])
            new = new[:, :-1]
        weight = original_tensor(layer, "weight")
        weight.copy_(from_matrix(layer, new, weight.shape))
