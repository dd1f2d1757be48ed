"""The one independent worst-gap search of the test suite (issue 9), and random architectures.

`worst_gap` lower-bounds sup_{||x|| <= R} ||f(x) - F(x)|| for a pruned model f and its dense
reference F by random points on the sphere plus projected gradient ascent with restarts, all in
float64, written from scratch (it shares no code with `prunebound.theory` or `prunebound.check`).
A certificate must never be below what it finds (relative `TOL`).

`architectures()` is a hypothesis strategy over everything `prunebound.theory.certificate` accepts:
Linear (flat or token-wise inputs), Conv1d/Conv2d with stride/padding/dilation, ReLU, LeakyReLU,
Tanh, Sigmoid, GELU, MaxPool/AvgPool, eval BatchNorm with random running statistics, Flatten,
Identity, Dropout, biases up to 30x the weights, radii 1e-3 to 10, and magnitude, random, neuron
and filter masks from 1% to 99% (structured ones also as whole units: rows, biases and BatchNorm
entries), with random masks on bias and BatchNorm entries on top.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

import prunebound as pb
from prunebound.coupling import mask_entries
from prunebound.layer_types import NORMS

TOL = 1e-6  # relative slack of "certificate >= found gap" (the search itself rounds in float64)


def _unit(x: torch.Tensor) -> torch.Tensor:
    n = x.flatten(1).norm(dim=1).clamp_min(1e-300)
    return x / n.view(-1, *[1] * (x.dim() - 1))


def worst_gap(
    pruned: nn.Module,
    reference: nn.Module | None = None,
    *,
    radius: float = 1.0,
    input_shape: tuple[int, ...],
    starts: int = 48,
    steps: int = 120,
    samples: int = 512,
    seed: int = 0,
) -> float:
    """max ||f(x) - F(x)|| found over ||x|| <= radius (a lower bound on the sup).

    `reference` defaults to `pruned` with its masks removed. Random sphere points first, then
    projected gradient ascent from the best `starts` of them (and from fresh random points), with
    a step that shrinks from 0.5 R to 0.005 R; points may move inside the ball (the sup of a
    non-homogeneous gap need not sit on the sphere).
    """
    f = copy.deepcopy(pruned).double().eval()
    ref = pb.reset(copy.deepcopy(pruned)) if reference is None else copy.deepcopy(reference)
    ref = ref.double().eval()
    g = torch.Generator().manual_seed(seed)

    def gap(x: torch.Tensor) -> torch.Tensor:
        return (f(x) - ref(x)).flatten(1).norm(dim=1)

    with torch.no_grad():
        cloud = radius * _unit(torch.randn(samples, *input_shape, generator=g, dtype=torch.float64))
        vals = gap(cloud)
        best = float(vals.max())
        top = cloud[vals.argsort(descending=True)[: starts // 2]]
    fresh = radius * _unit(torch.randn(starts - top.shape[0], *input_shape, generator=g).double())
    # a quarter of the fresh starts begin inside the ball
    fresh[: fresh.shape[0] // 4] *= (
        torch.rand(fresh.shape[0] // 4, generator=g).double().view(-1, *[1] * len(input_shape))
    )
    x = torch.cat([top, fresh]).requires_grad_()
    for it in range(steps):
        val = gap(x)
        best = max(best, float(val.detach().max()))
        (grad,) = torch.autograd.grad(val.sum(), x)
        lr = radius * (0.5 * (1 - it / steps) + 0.005)
        with torch.no_grad():
            x += lr * _unit(grad)
            nx = x.flatten(1).norm(dim=1).view(-1, *[1] * len(input_shape))
            x *= torch.clamp(radius / nx.clamp_min(1e-300), max=1.0)
    with torch.no_grad():
        return max(best, float(gap(x).max()))


def assert_sound(bound: float, found: float, what: str = "certificate") -> None:
    """bound >= found up to the relative TOL, with a message that gives both numbers."""
    assert bound >= found * (1 - TOL) - 1e-300, (
        f"{what} {bound!r} is below a gap attained in the ball: {found!r} "
        f"(ratio {bound / found if found else math.inf:.9f})"
    )


# ------------------------------------------------------------------------ random architectures

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
MASKS = ("magnitude", "random", "neuron", "filter")


@dataclass
class Case:
    """One random architecture, pruned, with the ball it is certified on."""

    model: nn.Module
    input_shape: tuple[int, ...]
    radius: float
    description: str


def scale_biases(model: nn.Module, factor: float) -> None:
    with torch.no_grad():
        for m in model.modules():
            b = getattr(m, "bias", None)
            w = getattr(m, "weight", None)
            if isinstance(b, torch.Tensor) and isinstance(w, torch.Tensor) and b.numel():
                b.mul_(factor)


def _batchnorm(c: int, dim: int, gen: torch.Generator) -> nn.Module:
    bn = nn.BatchNorm1d(c) if dim == 1 else nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))  # type: ignore[union-attr]
        bn.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.05)  # type: ignore[union-attr]
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))
    return bn


def mask_random_entries(model: nn.Module, share: float, gen: torch.Generator) -> None:
    """Mask a random `share` of every bias and BatchNorm weight/bias entry (prunebound masks)."""
    for m in model.modules():
        for tensor in (
            ("weight", "bias")
            if isinstance(m, NORMS)
            else (("bias",) if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d) else ())
        ):
            t = getattr(m, tensor, None)
            if isinstance(t, torch.Tensor):
                mask_entries(m, tensor, torch.rand(t.shape, generator=gen) >= share)


@st.composite
def architectures(draw: st.DrawFn) -> Case:
    """A random model certify accepts, pruned at random, with a random radius."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["mlp", "tokens", "conv1d", "conv2d"]))
    act_name = draw(st.sampled_from(sorted(ACTIVATIONS)))
    act = ACTIVATIONS[act_name]
    depth = draw(st.integers(1, 3))
    extras = draw(st.lists(st.sampled_from(["identity", "dropout", "bn", "pool"]), max_size=2))
    layers: list[nn.Module] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # default init of the layers below
        if kind in ("mlp", "tokens"):
            tokens = draw(st.integers(2, 4)) if kind == "tokens" else 0
            widths = [draw(st.integers(1, 8)) for _ in range(depth + 1)]
            input_shape: tuple[int, ...] = (tokens, widths[0]) if tokens else (widths[0],)
            for i in range(depth):
                layers.append(nn.Linear(widths[i], widths[i + 1], bias=draw(st.booleans())))
                if i < depth - 1:
                    if "bn" in extras and not tokens:
                        layers.append(_batchnorm(widths[i + 1], 1, gen))
                    layers.append(act())
                    if "identity" in extras:
                        layers.append(nn.Identity())
                    if "dropout" in extras:
                        layers.append(nn.Dropout(0.3))
            if tokens and draw(st.booleans()):
                layers.append(nn.Flatten())
        else:
            dim = 1 if kind == "conv1d" else 2
            conv = nn.Conv1d if dim == 1 else nn.Conv2d
            size = draw(st.integers(4, 7))
            chans = [draw(st.integers(1, 3)) for _ in range(depth + 1)]
            input_shape = (chans[0], *([size] * dim))
            for i in range(depth):
                k, pad = draw(st.integers(1, 3)), draw(st.integers(0, 1))
                dil, stride = (draw(st.integers(1, 2)) if k > 1 else 1), draw(st.integers(1, 2))
                if dil * (k - 1) + 1 > size + 2 * pad:  # the kernel must fit the input
                    k, dil = 1, 1
                size = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
                layers.append(
                    conv(chans[i], chans[i + 1], k, stride, pad, dil, bias=draw(st.booleans()))
                )
                if "bn" in extras:
                    layers.append(_batchnorm(chans[i + 1], dim, gen))
                layers.append(act())
                if "pool" in extras and i == 0 and size >= 2:
                    pool = draw(st.sampled_from(["max", "avg"]))
                    cls = {("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d}.get(
                        (pool, dim), nn.AvgPool1d if dim == 1 else nn.AvgPool2d
                    )
                    layers.append(cls(2, stride=1))
                    size -= 1
                if "identity" in extras:
                    layers.append(nn.Identity())
            layers.append(nn.Flatten())
            if draw(st.booleans()):
                model = nn.Sequential(*layers).eval()
                with torch.no_grad():
                    n_flat = model(torch.zeros(1, *input_shape)).shape[1]
                layers.append(nn.Linear(n_flat, draw(st.integers(1, 4))))
        model = nn.Sequential(*layers).eval()
    scale_biases(model, draw(st.sampled_from([1.0, 3.0, 30.0])))
    method = draw(st.sampled_from(MASKS))
    amount = draw(st.sampled_from([0.01, 0.1, 0.5, 0.9, 0.99]))
    structured = method in ("neuron", "filter")
    layer_type = nn.Linear if method == "neuron" else (nn.Conv1d, nn.Conv2d)
    has = any(isinstance(m, layer_type) for m in model.modules())
    if structured and not has:
        method = "magnitude"
    whole = structured and draw(st.booleans())  # whole units: rows, biases, BatchNorm entries
    if method in ("neuron", "filter"):  # the output layer too: named, so it is opted in
        names = [n for n, m in model.named_modules() if isinstance(m, layer_type)]
        example = torch.randn(2, *input_shape, generator=gen) if whole else None
        pb.prune(model, method, amount, layers=names, coupled=whole, example_inputs=example)
    else:
        pb.prune(model, method, amount, seed=seed)
    entries = draw(st.sampled_from([0.0, 0.0, 0.3, 0.7]))
    if entries:  # masks on bias and BatchNorm entries, independent of the weight masks
        mask_random_entries(model, entries, gen)
    radius = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    method += "/whole" if whole else ""
    method += f"/entries@{entries}" if entries else ""
    desc = f"{kind}/{act_name}/{extras}/{method}@{amount}/R={radius}/seed={seed}"
    return Case(model, input_shape, radius, desc)
