"""Layer-wise Optimal Brain Surgeon reconstruction, SparseGPT-style (Frantar & Alistarh 2023).

For a layer computing X W^T with calibration rows X, pruning a weight w_q and moving the
others by the OBS update minimises the output error ||X W^T - X W_new^T||^2 given the mask. With
H = X^T X + lambda I (lambda = `damp` * mean(diag X^T X): the dampening that keeps H invertible
and the update stable; `damp=0.01` as in SparseGPT), the algorithm walks the input columns in
blocks of 128: in each block it picks the weights of lowest saliency w^2 / [U]_qq^2 (U the upper
Cholesky factor of H^-1), then zeroes the block's columns one by one, spreading each column's
error over the columns to its right with the rows of U. Everything is in float64.

Layers are processed in the order the forward calls them; each one's X comes from the model
whose earlier layers are already pruned and updated (computed through forward hooks that
substitute the new weights, so the model itself is changed only by `prune`, after every layer
succeeded). Layer scope prunes `round(amount * survivors)` per layer; global scope ranks the
OBS saliencies w^2 / [H^-1]_qq of all layers (from the dense model's Hessians) once to split the
count between layers. An N:M `pattern` keeps N of every M consecutive input weights of each row,
chosen by the same saliency as the columns are reached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from prunebound._masks import effective_weight, mask_module
from prunebound.calibration import (
    Batch,
    as_matrix,
    batches,
    check_input,
    check_layer,
    collect,
    from_matrix,
    input_rows,
    layer_forward,
)

#: (model, layers, data, *, counts, total, pattern, method) -> {layer: (keep-mask, new weight)}
ReconstructFn = Callable[..., dict[str, tuple[torch.Tensor, torch.Tensor]]]
DAMP = 0.01
BLOCK = 128
REFIT = 30  # conjugate-gradient steps of the final least-squares refit


class StopForward(BaseException):
    """Ends a forward pass once the layer being calibrated has seen its input."""


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0  # inputs that are always zero: any weight there costs nothing
    h.diagonal().add_(damp * float(diag.mean()))
    return h


def _inverse_factor(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 (H^-1 = U^T U), raising the dampening
    tenfold (at most 4 times) if H is numerically singular."""
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(damped(h, damp))
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return torch.as_tensor(u)
        damp *= 10
    raise ValueError(f"method 'obs': layer {name!r}: the calibration Hessian is not invertible")


def _quotas(k: int, alive: list[int]) -> list[int]:
    """Split `k` over blocks in proportion to their survivors (largest remainder, first wins)."""
    total = sum(alive)
    if total == 0 or k == 0:
        return [0] * len(alive)
    exact = [k * a / total for a in alive]
    out = [int(e) for e in exact]
    order = sorted(range(len(alive)), key=lambda b: (-(exact[b] - out[b]), b))
    for b in order[: k - sum(out)]:
        out[b] += 1
    return out


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    keep: torch.Tensor,
    *,
    k: int = 0,
    pattern: tuple[int, int] | None = None,
    damp: float = DAMP,
    iters: int = REFIT,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `k` more weights of the (out, in) matrix `weight` (or to the N:M `pattern`) among
    those `keep` marks, with OBS updates of the survivors; returns (new weight, new keep)."""
    w = weight.detach().double().clone()
    cols = w.shape[1]
    u = _inverse_factor(hessian.double(), damp, name)
    pruned = ~keep.to(torch.bool).clone()
    block = BLOCK if pattern is None else pattern[1] * max(1, BLOCK // pattern[1])
    starts = list(range(0, cols, block))
    quotas = _quotas(k, [int((~pruned[:, i : i + block]).sum()) for i in starts])
    for b, i1 in enumerate(starts):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(memory_format=torch.contiguous_format), u[i1:i2, i1:i2]
        p1 = pruned[:, i1:i2].clone(memory_format=torch.contiguous_format)
        err = torch.zeros_like(w1)
        d = u1.diagonal()
        if pattern is None and quotas[b]:
            sal = (w1**2 / d**2).masked_fill(p1, torch.inf).flatten()
            p1.view(-1)[sal.argsort(stable=True)[: quotas[b]]] = True
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                group = p1[:, i : i + m]
                sal = (w1[:, i : i + m] ** 2 / d[i : i + m] ** 2).masked_fill(group, -torch.inf)
                group.scatter_(1, sal.argsort(dim=1, stable=True)[:, : m - n], True)
            col = w1[:, i]
            q = col.masked_fill(p1[:, i], 0.0)
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
        pruned[:, i1:i2] = p1
    keep = ~pruned
    h = damped(hessian.double(), damp / 100)
    # refit of the survivors: its sequential updates only moved weights right of each pruned one
    return masked_lstsq(weight.detach().double() @ h, w, keep, h, iters), keep


def masked_lstsq(
    target: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, iters: int
) -> torch.Tensor:
    """Least squares with a fixed mask: minimise v^T H v - 2 v^T t over each row v of the
    weight (t its row of `target`), the entries `keep` marks free and the others zero, by
    conjugate gradients on all rows at once from `w`. With target = w0 H this is
    ||X v - X w0||^2 (the OBS refit); with target = Y^T X it fits X v to outputs Y."""
    m = keep.to(w.dtype)
    v = w * m
    r = m * (target - v @ h)
    p = r.clone()
    rs = (r * r).sum(1)
    tiny = torch.finfo(w.dtype).tiny
    scale = float(target.square().sum(1).max().clamp_min(tiny))
    for _ in range(iters):
        hp = m * (p @ h)
        alpha = rs / (p * hp).sum(1).clamp_min(tiny)
        v += alpha[:, None] * p
        r -= alpha[:, None] * hp
        new = (r * r).sum(1)
        if float(new.max()) <= 1e-20 * scale:
            break
        p = r + (new / rs.clamp_min(tiny))[:, None] * p
        rs = new
    return v


def _keep(module: nn.Module) -> torch.Tensor:
    mm = mask_module(module)
    w = effective_weight(module)
    return mm.mask if mm is not None else torch.ones(w.shape, dtype=torch.bool, device=w.device)


def forward_order(
    model: nn.Module, layers: Mapping[str, nn.Module], first: Batch, method: str
) -> list[str]:
    """Layer names in the order the forward calls them (layers never called go last), after
    checking each layer's input. ValueError for a layer the forward runs more than once (one
    layer-wise fit cannot serve every call)."""
    calls: dict[str, int] = {}

    def hook(n: str) -> Callable[..., None]:
        def record(mod: nn.Module, args: tuple[Any, ...]) -> None:
            check_input(mod, args[0], n, method)
            calls[n] = calls.get(n, 0) + 1

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model(first[0])
    finally:
        for h in handles:
            h.remove()
    if shared := sorted(n for n, c in calls.items() if c > 1):
        raise ValueError(
            f"method {method!r}: layers {shared} run more than once per forward (shared "
            "weights); one layer-wise fit cannot serve every call: exclude them with layers="
        )
    return list(calls) + [n for n in layers if n not in calls]


def _global_counts(
    model: nn.Module, layers: Mapping[str, nn.Module], data: list[Batch], total: int, method: str
) -> dict[str, int]:
    """Split `total` between layers by one ranking of the dense model's OBS saliencies."""
    stats = collect(model, layers, data, needs=("hessian",), method=method)
    parts = []
    for n, m in layers.items():
        h = stats[n].hessian
        assert h is not None
        hinv = torch.linalg.inv(damped(h, DAMP))
        w = as_matrix(m, effective_weight(m).detach()).double()
        sal = (w**2 / hinv.diagonal()).float()
        parts.append(sal.masked_fill(~as_matrix(m, _keep(m)), torch.inf).flatten())
    sizes = [p.numel() for p in parts]
    chosen = torch.cat(parts).argsort(stable=True)[:total]
    layer_of = torch.bucketize(chosen, torch.tensor(sizes).cumsum(0), right=True)
    hits = torch.bincount(layer_of, minlength=len(sizes))
    return {n: int(c) for n, c in zip(layers, hits, strict=True)}


def obs_reconstruct(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    data: object,
    *,
    counts: Mapping[str, int] | None = None,
    total: int | None = None,
    pattern: tuple[int, int] | None = None,
    method: str = "obs",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (keep-mask, new weight)} for `layers` of `model`; nothing is changed here.

    Give `counts` (weights to prune per layer), `total` (across layers: global scope) or
    `pattern` (N, M)."""
    for n, m in layers.items():
        check_layer(m, n, method)
    cached = list(batches(data))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cached = [(x.to(device), y) for x, y in cached]
    modes = {m: m.training for m in model.modules()}
    done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        model.eval()
        if total is not None:
            counts = _global_counts(model, layers, cached, total, method)
        for name in forward_order(model, layers, cached[0], method):
            module = layers[name]
            h = _hessian(model, layers, done, name, cached, method)
            w = as_matrix(module, effective_weight(module).detach())
            new, keep = sparsegpt(
                w,
                h,
                as_matrix(module, _keep(module)),
                k=0 if counts is None else counts[name],
                pattern=pattern,
                name=name,
            )
            shape = effective_weight(module).shape
            dtype = effective_weight(module).dtype
            done[name] = (
                from_matrix(module, keep, shape),
                from_matrix(module, new, shape).to(dtype),
            )
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return done


def _hessian(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    done: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    name: str,
    data: list[Batch],
    method: str,
) -> torch.Tensor:
    """X^T X of layer `name`'s inputs, the layers in `done` computing with their new weights."""
    module = layers[name]
    sums: list[torch.Tensor] = []

    def capture(mod: nn.Module, args: tuple[Any, ...]) -> None:
        check_input(mod, args[0], name, method)
        rows = input_rows(mod, args[0]).reshape(-1, as_matrix(mod, effective_weight(mod)).shape[1])
        rows = rows.double()
        sums.append(rows.t() @ rows)
        raise StopForward

    def substitute(n: str) -> Callable[..., torch.Tensor]:
        keep, new = done[n]

        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            return layer_forward(mod, args[0], new * keep)

        return hook

    handles = [layers[n].register_forward_hook(substitute(n)) for n in done]
    handles.append(module.register_forward_pre_hook(capture))
    try:
        with torch.no_grad():
            for x, _ in data:
                with contextlib.suppress(StopForward):
                    model(x)
    finally:
        for h in handles:
            h.remove()
    if not sums:
        raise ValueError(f"method {method!r}: layer {name!r} saw no calibration input")
    return torch.stack(sums).sum(0)
