"""Turning a planning target (widths, LayerSpecs or an nn.Module) into layer specs.

Thin adapter over `prunebound.theory.network.extract` (T1) when it exists; widths and LayerSpec
lists need no model. Naming: widths [n0, ..., nL] give layers named "1", "3", ..., "2L-1", the
names of the Linear modules in `prunebound.models.mlp(widths)`, so a widths plan applies to that
model with `prunebound.prune(model, plan=plan)`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from prunebound._check import is_int
from prunebound.theory.network import extract
from prunebound.theory.values import LayerKind, LayerSpec


@dataclass(frozen=True)
class Target:
    """Resolved target: prunable layer specs, Lipschitz factors after each, optional module."""

    specs: tuple[LayerSpec, ...]
    lipschitz: tuple[float, ...]
    model: nn.Module | None = None
    extra_bias: tuple[float, ...] | None = None
    nonneg_input: tuple[bool, ...] | None = None  # layer l reads a ReLU output (h >= 0)
    relu_chain: bool = True  # ReLU alone between layers (widths and LayerSpec targets are)
    # steps before the first prunable layer: ||phi(x)|| <= prefix_lipschitz ||x|| + prefix_offset
    prefix_lipschitz: float = 1.0
    prefix_offset: float = 0.0

    def radius_in(self, radius: float) -> float:
        """Radius of a ball holding the first prunable layer's input when ||x|| <= radius."""
        return self.prefix_lipschitz * float(radius) + self.prefix_offset


def resolve_target(target: object, input_shape: tuple[int, ...] | None) -> Target:
    """Widths, LayerSpecs or an nn.Module -> Target (ValueError/TypeError otherwise)."""
    if isinstance(target, nn.Module):
        return _from_module(target, input_shape)
    if isinstance(target, Sequence) and not isinstance(target, str) and len(target) > 0:
        if all(isinstance(s, LayerSpec) for s in target):
            specs = tuple(s for s in target if isinstance(s, LayerSpec))
            return Target(specs=specs, lipschitz=(1.0,) * len(specs))
        if all(isinstance(w, int) for w in target):
            specs = from_widths([int(w) for w in target])
            nonneg = tuple(i > 0 for i in range(len(specs)))  # ReLU between, as models.mlp
            return Target(specs=specs, lipschitz=(1.0,) * len(specs), nonneg_input=nonneg)
    raise TypeError(
        "target must be a list of widths, a list of LayerSpec or an nn.Module, "
        f"got {type(target).__name__}"
    )


def _from_module(model: nn.Module, input_shape: tuple[int, ...] | None) -> Target:
    net = extract(model, input_shape)
    specs = tuple(net.specs)
    lips = tuple(net.lipschitz)
    pre_lip, pre_off = _prefix(net)
    return Target(
        specs=specs,
        lipschitz=lips,
        model=model,
        extra_bias=_extra_bias(net),
        nonneg_input=_nonneg_inputs(net),
        relu_chain=_relu_chain(net),
        prefix_lipschitz=pre_lip,
        prefix_offset=pre_off,
    )


def _prefix(net: Any) -> tuple[float, float]:
    """(L, c) with ||phi(x)|| <= L ||x|| + c for the steps phi before the first prunable layer
    (BatchNorm, Sigmoid, pooling, ...): the first layer then reads a ball of radius L R + c."""
    lip, off = 1.0, 0.0
    for step in net.steps:
        if step.spec is not None:
            break
        lip, off = step.lipschitz * lip, step.lipschitz * off + step.offset
    return lip, off


_KEEPS_NONNEG = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)


def _relu_chain(net: Any) -> bool:
    """Are the layers separated by ReLU (flatten/dropout allowed), with nothing but
    identity-like steps after the last one? (The networks `prunebound.verify` rebuilds.)"""
    seen = 0
    since: list[nn.Module] = []
    for step in net.steps:
        if step.spec is not None:
            if seen and not any(isinstance(m, nn.ReLU) for m in since):
                return False
            seen += 1
            since = []
            continue
        m = step.module
        if not isinstance(m, nn.ReLU | nn.Flatten | nn.Dropout | nn.Identity):
            return False
        since.append(m)
    return not any(isinstance(m, nn.ReLU) for m in since)


def _nonneg_inputs(net: Any) -> tuple[bool, ...]:
    """Per prunable layer: is its input >= 0 for every x (a ReLU, then only ops that keep signs)?"""
    out: list[bool] = []
    state = False  # the network input x has any sign
    for step in net.steps:
        if step.spec is not None:
            out.append(state)
            state = False
        elif isinstance(step.module, nn.ReLU):
            state = True
        elif not isinstance(step.module, _KEEPS_NONNEG):
            state = False
    return tuple(out)


def _extra_bias(net: Any) -> tuple[float, ...]:
    """Per prunable layer l: c_l with ||h_l|| <= L_l (||W_l h|| + ||b_l|| + c_l).

    A non-prunable step phi_j with ||phi_j(y)|| <= L_j ||y|| + o_j (o_j = ||phi_j(0)||, nonzero
    for Sigmoid or eval BatchNorm shifts) after layer l adds sum_j o_j prod_{i>j} L_i to r_l;
    divided by the product L_l of all of them it folds into the bias norm (docs §2).
    """
    out: list[float] = []
    acc, lip = 0.0, 1.0
    for step in net.steps:
        if step.spec is not None:
            if out:
                out[-1] = acc / lip if lip > 0 else 0.0
            out.append(0.0)
            acc, lip = 0.0, 1.0
        elif out:
            acc = step.lipschitz * acc + step.offset
            lip *= step.lipschitz
    if out:
        out[-1] = acc / lip if lip > 0 else 0.0
    return tuple(out)


def from_widths(widths: Sequence[int], *, bias: bool = True) -> tuple[LayerSpec, ...]:
    """LayerSpecs of an MLP with widths (n_0, ..., n_L), named "1", "3", ... like the Linear
    modules of `prunebound.models.mlp(widths)` (Flatten first, activations between)."""
    if len(widths) < 2 or any(not is_int(w) or w < 1 for w in widths):
        raise ValueError(f"widths must be >= 2 positive ints, got {list(widths)!r}")
    return tuple(
        LayerSpec(str(2 * i + 1), "linear", (b, a), (a,), bias=bias)
        for i, (a, b) in enumerate(itertools.pairwise(widths))
    )


def conv_specs(
    channels: Sequence[int],
    kernel: int,
    in_size: Sequence[int],
    *,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
) -> tuple[LayerSpec, ...]:
    """LayerSpecs of a plain conv stack (Conv2d for 2-D `in_size`, Conv1d for 1-D), for
    widths-only planning targets; spatial sizes follow the usual output-size formula."""
    d = len(in_size)
    if d not in (1, 2) or len(channels) < 2 or kernel < 1 or stride < 1 or padding < 0:
        raise ValueError(
            f"conv_specs needs 1-2 spatial dims, >= 2 channels, kernel/stride >= 1, padding >= 0; "
            f"got in_size={tuple(in_size)}, channels={list(channels)}, kernel={kernel}, "
            f"stride={stride}, padding={padding}"
        )
    kind: LayerKind = "conv1d" if d == 1 else "conv2d"
    size = [int(s) for s in in_size]
    out: list[LayerSpec] = []
    for i, (a, b) in enumerate(itertools.pairwise(channels)):
        shape = (b, a, *([kernel] * d))
        out.append(
            LayerSpec(
                str(i), kind, shape, (a, *size), (stride,) * d, (padding,) * d, (1,) * d, bias
            )
        )
        size = [(s + 2 * padding - kernel) // stride + 1 for s in size]
        if min(size) < 1:
            raise ValueError(f"conv_specs: spatial size shrinks below 1 at layer {i}, got {size}")
    return tuple(out)
