"""Batched networks for Monte Carlo checks (`prunebound.check.verify`): N sampled networks of one
plan held as (N, *shape) weights, pruned together, run with torch.baddbmm or one grouped
convolution (groups=N), and a worst-gap search over the input ball, all without a Python loop
over networks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunebound._check import Seed, as_generator, check_int
from prunebound._masks import set_mask
from prunebound.theory.values import Law, LayerSpec, Plan


@dataclass(frozen=True)
class SearchConfig:
    """Effort of the worst-gap search, per network.

    `samples` random inputs on the sphere ||x|| = R; projected gradient ascent (normalised
    steps, projected on the ball, step size decaying linearly from `step_size` * R) runs
    `steps` steps from each of the best `restarts` samples.
    """

    samples: int = 128
    restarts: int = 8
    steps: int = 40
    step_size: float = 0.5

    def __post_init__(self) -> None:
        for name in ("samples", "restarts", "steps"):
            check_int(f"search.{name}", getattr(self, name), 0 if name == "steps" else 1)
        if self.restarts > self.samples:
            raise ValueError(
                f"search.restarts must be <= samples ({self.samples}), got {self.restarts}"
            )
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"search.step_size must be > 0 and finite, got {self.step_size!r}")


@dataclass(frozen=True)
class Batch:
    """N sampled target networks: per layer weights (N, *shape), biases (N, out) or None, and
    pruning keys (N, numel). A layer prunes its m smallest keys (count form: |w| for magnitude,
    uniform noise for random) or every key below a cutoff (Bernoulli / threshold form); a
    neuron plan's keys are the row norms (N, rows, 1) and whole rows go."""

    specs: tuple[LayerSpec, ...]
    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor | None, ...]
    keys: tuple[torch.Tensor, ...]


def _out_shape(spec: LayerSpec) -> tuple[int, ...]:
    if spec.kind == "linear":
        return (spec.shape[0],)
    size = tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(
            spec.in_shape[1:], spec.shape[2:], spec.stride, spec.padding, spec.dilation, strict=True
        )
    )
    return (spec.shape[0], *size)


def check_chain(specs: Sequence[LayerSpec]) -> None:
    """Raise ValueError unless the layers form a plain chain (ReLU between, conv output
    flattened into a following linear layer), the only networks `verify` can rebuild."""
    if not specs:
        raise ValueError("plan has no layers")
    for a, b in itertools.pairwise(specs):
        out = _out_shape(a)
        ok = out == b.in_shape or (b.kind == "linear" and math.prod(out) == b.in_shape[0])
        if not ok:
            raise ValueError(
                f"layer {b.name!r} reads shape {b.in_shape} but layer {a.name!r} outputs {out}: "
                "verify needs a plain Linear/Conv chain with ReLU between (no pooling)"
            )


def laws(plan: Plan) -> list[Law]:
    found = [lp.law for lp in plan.layers]
    if plan.law not in ("uniform", "gaussian") or any(law is None for law in found):
        raise ValueError(
            f"verify needs a plan with law 'uniform' or 'gaussian' (weights to sample), "
            f"got law={plan.law!r}"
        )
    return [law for law in found if law is not None]


def sample_batch(
    plan: Plan,
    n: int,
    seed: Seed,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Batch:
    """Draw n target networks from the plan's laws: weights AND biases i.i.d. from the layer's
    law (U[-a, a] or N(0, a^2)), as the theory assumes (docs/theory.md §1). Drawn in `dtype`
    on the CPU generator `seed` stands for (a Generator continues its stream), then moved to
    `device`."""
    generator = as_generator(seed)
    ws, bs, ks = [], [], []
    for spec, law in zip(plan.specs, laws(plan), strict=True):

        def draw(*shape: int, law: Law = law) -> torch.Tensor:
            if law.name == "uniform":
                u = torch.rand(shape, generator=generator, dtype=dtype)
                return ((2 * u - 1) * law.scale).to(device)
            return (torch.randn(shape, generator=generator, dtype=dtype) * law.scale).to(device)

        w = draw(n, *spec.shape)
        ws.append(w)
        bs.append(draw(n, spec.shape[0]) if spec.bias else None)
        if plan.method == "magnitude":
            ks.append(w.reshape(n, -1).abs())
        elif plan.method == "neuron":  # one key per row (N, rows, 1): its L2 norm
            ks.append(torch.linalg.vector_norm(w.reshape(n, spec.shape[0], -1), dim=2)[..., None])
        else:
            ks.append(torch.rand((n, spec.numel), generator=generator, dtype=dtype).to(device))
    return Batch(tuple(plan.specs), tuple(ws), tuple(bs), tuple(ks))


def smallest(keys: torch.Tensor, m: int, *, sample: int = 8192) -> torch.Tensor:
    """Bool mask of the m smallest entries of each row of keys (N, n), exactly m per row.

    Same result as topk(m, largest=False) (up to ties). For 1/8 < m/n < 7/8, where topk is
    slow, a row sample brackets the m-th value in a band [lo, hi] (6 standard errors of the
    sample quantile), only the band is sorted, and rows where the bracket misses fall back to
    topk. Ties at the m-th value are broken by position.
    """
    rows, n = keys.shape
    if m <= 0 or m >= n:
        return torch.full_like(keys, m >= n, dtype=torch.bool)
    if m <= n // 8 or n <= 4 * sample:  # topk is fast for small k
        out = torch.zeros_like(keys, dtype=torch.bool)
        return out.scatter_(1, keys.topk(m, dim=1, largest=False).indices, True)
    if m >= n - n // 8:  # the complement of the n - m largest
        out = torch.ones_like(keys, dtype=torch.bool)
        return out.scatter_(1, keys.topk(n - m, dim=1).indices, False)
    q = m / n
    err = 6 * math.sqrt(q * (1 - q) / sample) + 2 / sample
    probs = torch.tensor([max(q - err, 0.0), min(q + err, 1.0)], dtype=keys.dtype)
    lo, hi = torch.quantile(keys[:, :sample], probs.to(keys.device), dim=1)[:, :, None].unbind(0)
    below = keys < lo
    band = (keys >= lo) & (keys <= hi)
    size = torch.count_nonzero(band, dim=1)
    need = m - torch.count_nonzero(below, dim=1)  # per row, how many band entries to add
    idx = band.nonzero()  # (B, 2), row-major
    start = torch.cumsum(size, 0) - size
    pos = torch.arange(len(idx), device=keys.device) - start[idx[:, 0]]
    width = int(size.max()) if len(idx) else 0
    padded = torch.full((rows, width), math.inf, dtype=keys.dtype, device=keys.device)
    padded[idx[:, 0], pos] = keys[idx[:, 0], idx[:, 1]]
    ranked = padded.argsort(dim=1, stable=True)  # band entries of each row, by key
    take = torch.arange(width, device=keys.device)[None, :] < torch.minimum(need, size)[:, None]
    r, c = take.nonzero().unbind(1)
    below[r, idx[start[r] + ranked[r, c], 1]] = True
    bad = (need < 0) | (need > size)
    if bool(bad.any()):
        sub = keys[bad]
        fix = torch.zeros_like(sub, dtype=torch.bool)
        below[bad] = fix.scatter_(1, sub.topk(m, dim=1, largest=False).indices, True)
    return below


def prune_batch(
    batch: Batch, amounts: Sequence[float], *, cutoff: bool = False
) -> tuple[torch.Tensor, ...]:
    """Pruned weights: per layer zero the `amounts[l]` smallest keys (count form, ints), or with
    `cutoff=True` every key < amounts[l] (Bernoulli fraction or magnitude threshold). Row keys
    (N, rows, 1) prune whole rows."""
    out = []
    for w, key, a in zip(batch.weights, batch.keys, amounts, strict=True):
        if key.dim() == 3:  # whole rows
            drop = (key[..., 0] < a if cutoff else smallest(key[..., 0], int(a)))[..., None]
            rows = w.reshape(w.shape[0], w.shape[1], -1)
            out.append(rows.masked_fill(drop, 0.0).reshape(w.shape))
            continue
        flat = w.reshape(w.shape[0], -1)
        drop = key < a if cutoff else smallest(key, int(a))
        out.append(flat.masked_fill(drop, 0.0).reshape(w.shape))
    return tuple(out)


def forward(
    specs: Sequence[LayerSpec],
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    x: torch.Tensor,
) -> torch.Tensor:
    """Batched forward of N networks (ReLU between layers, none after the last).

    x: (N, K, *in_shape) -> (N, K, out_dim), network i applied to x[i].
    """
    n, k = x.shape[:2]
    h = x
    for i, (spec, w, b) in enumerate(zip(specs, weights, biases, strict=True)):
        if spec.kind == "linear":
            wt = w.transpose(1, 2)  # (N, in, out)
            h = h.reshape(n, k, -1)
            h = torch.bmm(h, wt) if b is None else torch.baddbmm(b[:, None, :], h, wt)
        else:
            c, conv = spec.shape[1], F.conv1d if spec.kind == "conv1d" else F.conv2d
            # networks side by side as channel groups: (K, N * C, *spatial)
            hk = h.reshape(n, k, *spec.in_shape).transpose(0, 1)
            hk = hk.reshape(k, n * c, *spec.in_shape[1:])
            y = conv(
                hk,
                w.reshape(n * spec.shape[0], *spec.shape[1:]),
                None if b is None else b.reshape(-1),
                stride=spec.stride,
                padding=spec.padding,
                dilation=spec.dilation,
                groups=n,
            )
            h = y.reshape(k, n, spec.shape[0], *y.shape[2:]).transpose(0, 1)
        if i < len(specs) - 1:
            h = torch.relu(h)
    return h.reshape(n, k, -1)


def sphere(n: int, k: int, shape: Sequence[int], radius: float, seed: Seed) -> torch.Tensor:
    """(n, k, *shape) points uniform on the sphere ||x|| = radius (float32, CPU)."""
    x = torch.randn((n, k, math.prod(shape)), generator=as_generator(seed))
    x = radius * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    out: torch.Tensor = x.reshape(n, k, *shape)
    return out


def worst_gap(
    batch: Batch,
    pruned: Sequence[torch.Tensor],
    radius: float,
    x0: torch.Tensor,
    search: SearchConfig,
    *,
    block: int = 64,
) -> torch.Tensor:
    """Per network, max of ||F(x) - f(x)|| over the starts x0 (N, S, *in_shape) and over
    projected gradient ascent from the best `search.restarts` of them. A LOWER bound on the
    sup over the ball. Returns (N,)."""
    specs, w, b = batch.specs, batch.weights, batch.biases

    def gap(x: torch.Tensor) -> torch.Tensor:
        diff = forward(specs, w, b, x) - forward(specs, pruned, b, x)
        out: torch.Tensor = torch.linalg.vector_norm(diff, dim=-1)
        return out

    n, s = x0.shape[:2]
    with torch.no_grad():
        vals = torch.cat([gap(x0[:, i : i + block]) for i in range(0, s, block)], dim=1)
    best = vals.max(dim=1).values
    top = vals.topk(min(search.restarts, s), dim=1).indices  # (N, R)
    flat = x0.reshape(n, s, -1)
    x = flat.gather(1, top[..., None].expand(-1, -1, flat.shape[-1]))
    for it in range(search.steps):
        x = x.detach().requires_grad_(True)
        g = gap(x.reshape(n, x.shape[1], *x0.shape[2:]))
        (grad,) = torch.autograd.grad(g.sum(), x)  # networks are independent: per-net grads
        best = torch.maximum(best, g.detach().max(dim=1).values)
        lr = radius * search.step_size * (1.0 - it / search.steps + 0.02)
        with torch.no_grad():
            x = x + lr * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            x = x * (radius / x.norm(dim=-1, keepdim=True).clamp_min(radius))
    if search.steps:
        with torch.no_grad():
            last = gap(x.reshape(n, x.shape[1], *x0.shape[2:])).max(dim=1).values
        best = torch.maximum(best, last)
    return best


def chunk_generator(seed: int, c: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, c]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def default_chunk(specs: Sequence[LayerSpec]) -> int:
    return max(1, min(256, (1 << 22) // sum(s.numel for s in specs)))  # ~16 MB of weights


def to_module(batch: Batch, pruned: Sequence[torch.Tensor], i: int) -> nn.Sequential:
    """Network i of `batch` as a float64 Linear/Conv chain with ReLU between and prunebound
    masks (the pruned weights' zeros): the form `theory.certify` reads."""
    mods: list[nn.Module] = []
    for j, (spec, w, wp, b) in enumerate(
        zip(batch.specs, batch.weights, pruned, batch.biases, strict=True)
    ):
        layer: nn.Linear | nn.Conv1d | nn.Conv2d
        if spec.kind == "linear":
            if j and batch.specs[j - 1].kind != "linear":
                mods.append(nn.Flatten())
            layer = nn.Linear(spec.shape[1], spec.shape[0], bias=b is not None)
        else:
            conv: Any = nn.Conv1d if spec.kind == "conv1d" else nn.Conv2d
            layer = conv(
                spec.shape[1], spec.shape[0], spec.shape[2:], spec.stride, spec.padding,
                spec.dilation, bias=b is not None,
            )  # fmt: skip
        layer = layer.double()
        with torch.no_grad():
            layer.weight.copy_(w[i])
            if b is not None and layer.bias is not None:
                layer.bias.copy_(b[i])
        set_mask(layer, wp[i] != 0)
        mods += [layer, nn.ReLU()]
    return nn.Sequential(*mods[:-1]).eval()
