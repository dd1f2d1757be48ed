"""Lipschitz constants and offsets of the non-prunable steps of a chain (docs/theory.md §3,
§7.3): each map phi has ||phi(x) - phi(y)|| <= L ||x - y|| and ||phi(0)|| = c. An eval-mode
BatchNorm is the affine map x -> s * x + t per channel (`batchnorm_affine`), so a BatchNorm with
masked entries is another such map. Derived for prunebound in the setting of Qian & Klabjan
(2021).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from prunebound._masks import original_tensor
from prunebound.layer_types import NORMS

POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)
ELEMENTWISE_1 = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softsign)
# GELU: sup |d/dx x Phi(x)| = Phi(sqrt 2) + sqrt 2 phi(sqrt 2) (at x = sqrt 2; docs §3.1)
GELU_LIPSCHITZ = 0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi)
SILU_LIPSCHITZ = 1.1  # sup |d/dx x sigmoid(x)| = 1.0998.. (grid + curvature bound, docs §3.1)
SUPPORTED = (
    "Linear, Conv1d/Conv2d (groups=1, zero padding), ReLU, ReLU6, LeakyReLU, Tanh, Hardtanh, "
    "Softsign, Sigmoid, ELU, GELU, SiLU, MaxPool1d/2d, AvgPool1d/2d, global AdaptiveAvgPool, "
    "Flatten, Dropout, Identity, eval BatchNorm1d/2d, nested nn.Sequential"
)


def as_tuple(v: int | Sequence[int], d: int) -> list[int]:
    return [int(v)] * d if isinstance(v, int) else [int(x) for x in v]


def pool_multiplicity(kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> int:
    """Max number of pooling windows containing one input entry: prod min(k, ceil(ext / s))."""
    return math.prod(
        min(k, math.ceil((dl * (k - 1) + 1) / s))
        for k, s, dl in zip(kernel, stride, dilation, strict=True)
    )


def unsupported(name: str, m: nn.Module, why: str = "") -> ValueError:
    return ValueError(
        f"layer {name!r} ({type(m).__name__}) is not supported by the theory{why}; supported: "
        f"{SUPPORTED}"
    )


def pool_lipschitz(name: str, m: nn.Module) -> float:
    d = 1 if isinstance(m, nn.MaxPool1d | nn.AvgPool1d) else 2
    k = as_tuple(m.kernel_size, d)  # type: ignore[arg-type]
    s = as_tuple(m.stride if m.stride is not None else k, d)  # type: ignore[arg-type]
    if isinstance(m, nn.MaxPool1d | nn.MaxPool2d):
        # |max a - max b| <= ||a - b||_2 per window; each entry is in <= mult windows (§3.2)
        return math.sqrt(pool_multiplicity(k, s, as_tuple(m.dilation, d)))
    mult = pool_multiplicity(k, s, [1] * d)
    if getattr(m, "divisor_override", None) is not None:
        raise unsupported(name, m, " with divisor_override")
    if m.count_include_pad and not m.ceil_mode:  # y_o = sum(win)/K: ||y||^2 <= mult/K ||x||^2
        return math.sqrt(mult / math.prod(k))
    return math.sqrt(mult)  # y_o = sum(win)/c_o with c_o >= |win|: |y_o| <= ||x_win|| (§3.2)


def step_lipschitz(name: str, m: nn.Module, in_shape: tuple[int, ...]) -> tuple[float, float]:
    """(Lipschitz constant, ||phi(0)||) of a non-prunable step (docs/theory.md §7.3)."""
    if isinstance(m, nn.Dropout) and m.training and m.p > 0:
        raise unsupported(name, m, " in training mode (call model.eval())")
    if isinstance(m, nn.Flatten | nn.Dropout | nn.Identity):
        return 1.0, 0.0  # Dropout: the identity in eval mode
    if isinstance(m, POOLS):
        return pool_lipschitz(name, m), 0.0
    if isinstance(m, nn.AdaptiveAvgPool1d | nn.AdaptiveAvgPool2d):
        if as_tuple(m.output_size, len(in_shape) - 1) != [1] * (len(in_shape) - 1):  # type: ignore[arg-type]
            raise unsupported(name, m, " unless global (output_size 1)")
        return 1.0 / math.sqrt(math.prod(in_shape[1:])), 0.0  # Cauchy-Schwarz per channel
    if isinstance(m, NORMS):
        scale, shift = batchnorm_affine(name, m, original=True)
        reps = _positions(in_shape)
        return float(scale.abs().max()), float(torch.linalg.vector_norm(shift)) * math.sqrt(reps)
    if isinstance(m, nn.LeakyReLU):
        lip = max(1.0, abs(m.negative_slope))
    elif isinstance(m, nn.ELU):
        lip = max(1.0, abs(m.alpha))
    elif isinstance(m, nn.Sigmoid):
        lip = 0.25
    elif isinstance(m, nn.GELU):
        if m.approximate != "none":
            raise unsupported(name, m, " with approximate='tanh'")
        lip = GELU_LIPSCHITZ * (1 + 1e-12)
    elif isinstance(m, nn.SiLU):
        lip = SILU_LIPSCHITZ
    elif isinstance(m, ELEMENTWISE_1):
        lip = 1.0
    else:
        raise unsupported(name, m)
    # elementwise: ||phi(0)|| = |phi(0)| sqrt(n), computed rather than assumed (Sigmoid: 1/2)
    with torch.no_grad():
        zero = float(m(torch.zeros(1, dtype=torch.float64)).abs().item())
    return lip, zero * math.sqrt(math.prod(in_shape))


def _positions(in_shape: tuple[int, ...]) -> int:
    """Positions per channel of a BatchNorm input (its shift repeats at each)."""
    return math.prod(in_shape[1:]) if len(in_shape) > 1 else 1


def batchnorm_affine(
    name: str, m: nn.Module, *, original: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with BN(x) = s * x + t per channel in eval mode; with `original`, from
    the unmasked gamma and beta (the reference F), else from the values the module computes
    with (masked entries are 0: the pruned network f)."""
    assert isinstance(m, NORMS)
    var, mean = m.running_var, m.running_mean
    if m.training or not isinstance(var, torch.Tensor) or not isinstance(mean, torch.Tensor):
        raise unsupported(name, m, " in training mode or without running stats (call eval())")
    scale = 1.0 / torch.sqrt(var.double() + cast(float, m.eps))
    shift = -mean.double() * scale
    if m.affine:
        gamma = original_tensor(m, "weight") if original else m.weight
        beta = original_tensor(m, "bias") if original else m.bias
        assert isinstance(gamma, torch.Tensor) and isinstance(beta, torch.Tensor)
        scale = scale * gamma.detach().double()
        shift = shift * gamma.detach().double() + beta.detach().double()
    return scale, shift


def batchnorm_gap(
    name: str, pruned: nn.Module, target: nn.Module, in_shape: tuple[int, ...]
) -> tuple[float, float, float, float] | None:
    """For a BatchNorm that the pruned network f computes as s~ * x + t~ and the reference F as
    s * x + t (masked entries, or another model's BatchNorm): (L~, c~, max |s - s~|,
    ||t - t~|| sqrt(positions)), so that ||BN~(x~) - BN(x)|| <= L~ ||x~ - x|| +
    max |s - s~| ||x|| + ||t - t~|| sqrt(positions) (docs/theory.md §7.3). None if f and F
    compute the same map."""
    s, t = batchnorm_affine(name, target, original=True)
    st, tt = batchnorm_affine(name, pruned, original=False)
    if s.shape != st.shape:
        raise ValueError(
            f"layer {name!r}: BatchNorm of {st.numel()} channels, reference {s.numel()}"
        )
    if torch.equal(s, st) and torch.equal(t, tt):
        return None
    reps = math.sqrt(_positions(in_shape))
    return (
        float(st.abs().max()),
        float(torch.linalg.vector_norm(tt)) * reps,
        float((s - st).abs().max()),
        float(torch.linalg.vector_norm(t - tt)) * reps,
    )
