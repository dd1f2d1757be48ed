"""Slope-decomposition bound on the whole difference network f - F (docs/theory.md §7.5).

Lemma A bounds every layer by a product of operator norms, as if the worst directions of all
layers aligned. Here each activation is written EXACTLY as a known linear part plus a bounded
remainder (an "atom"), and the linear parts are multiplied through as matrices:

    sigma(z) = mid * z + hw * (t * z),          t in [-1, 1]^n, so ||hw * t * z|| <= max hw ||z_U||
    sigma(z~) - sigma(z) = mid' * p + hw' * (t' * p)      (p = z~ - z)

where [mid - hw, mid + hw] contains every secant slope of sigma (per neuron: exact 0 or 1 for a
ReLU whose pre-activation interval over the ball has one sign, [0, 1] otherwise) and U is the
set of neurons with hw > 0. Every quantity v(x) is kept as sum_k A_k^T u_k(x) + c + e(x), with
atoms u_k (the input x, with ||x|| <= R, and the remainders above) of known radius rho_k and
||e(x)|| <= err (floating-point allowance), so sup_x ||v(x)|| <= sum_k ||A_k|| rho_k + ||c|| + err.
Products such as ||W~_3 W~_2 Delta_1|| replace ||W~_3|| ||W~_2|| ||Delta_1|| in the linear
parts. Valid for any weights. Derived for prunebound; not a result of Qian & Klabjan (2021).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import nn

from prunebound._masks import reset
from prunebound.theory.lipschitz import pool_multiplicity
from prunebound.theory.network import Network, Step
from prunebound.theory.norms import spectral_norm

_U64 = 2.0**-53
# activations with sigma(0) = 0 and every secant slope in [0, 1] (monotone, 1-Lipschitz)
_UNIT_SLOPE = (nn.Tanh, nn.ReLU6, nn.Softsign)
_AFFINE = (
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
)


def _gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of an n-term float64 dot product."""
    return n * _U64 / (1 - n * _U64)


@dataclass
class _Rep:
    """v(x) = sum_k atoms[k]^T u_k(x) + const + e(x), ||e(x)|| <= err (internal, mutable)."""

    atoms: dict[str, torch.Tensor]  # name -> (atom dim, value dim)
    const: torch.Tensor
    err: float

    def fro_mass(self, rho: dict[str, float]) -> float:
        """sum_k ||A_k||_F rho_k + ||c||: bounds ||v|| and the entries' magnitudes (rounding)."""
        s = sum(float(torch.linalg.vector_norm(a)) * rho[k] for k, a in self.atoms.items())
        return s + float(torch.linalg.vector_norm(self.const))

    def norm(self, rho: dict[str, float], cols: torch.Tensor | None = None) -> float:
        """Upper bound on sup_x ||v(x)|| (restricted to coordinates `cols`), docs §7.5.

        min of the triangle sum  sum_k ||A_k|| rho_k + ||c||  and the stacked (Cauchy-Schwarz)
        bound  ||[A_k / t_k; c / t_c]|| sqrt(sum_k t_k^2 rho_k^2 + t_c^2)  with
        t_k = sqrt(||A_k|| / rho_k), which is never above the sum and is smaller when the atoms'
        images point in different directions; plus the rounding allowance err.
        """
        c = self.const if cols is None else self.const[cols]
        c_norm = float(torch.linalg.vector_norm(c)) * (1 + 4 * _U64 * c.numel())
        blocks: list[tuple[torch.Tensor, float, float]] = []  # (matrix, ||matrix||, radius)
        for k, a in self.atoms.items():
            sub = a if cols is None else a[:, cols]
            if sub.numel() and rho[k] > 0:
                nrm = spectral_norm(sub)
                if nrm > 0:
                    blocks.append((sub, nrm, rho[k]))
        if c_norm > 0:
            blocks.append((c[None], c_norm, 1.0))
        tot = sum(n * r for _, n, r in blocks)
        if len(blocks) > 1:
            ts = [math.sqrt(n / r) for _, n, r in blocks]
            stack = torch.cat([m / t for (m, _, _), t in zip(blocks, ts, strict=True)])
            scale = math.sqrt(sum((t * r) ** 2 for (_, _, r), t in zip(blocks, ts, strict=True)))
            # the division by t and the stacking round: relative 2u on each entry
            tot = min(tot, spectral_norm(stack) * scale * (1 + 4 * _U64))
        return (tot + self.err) * (1 + 1e-12)

    def radius(self, rho: dict[str, float]) -> torch.Tensor:
        """Per coordinate i: sup_x |v_i(x) - c_i| <= sum_k ||A_k[:, i]|| rho_k + err."""
        r = torch.full_like(self.const, self.err)
        for k, a in self.atoms.items():
            r += torch.linalg.vector_norm(a, dim=0) * rho[k]
        return r * (1 + 1e-12) + 1e-300

    def plus(self, other: _Rep, rho: dict[str, float], sign: float = 1.0) -> _Rep:
        """self + sign * other (shared atoms add exactly: they are the same functions of x)."""
        atoms = dict(self.atoms)
        for k, a in other.atoms.items():
            atoms[k] = atoms[k] + sign * a if k in atoms else sign * a
        out = _Rep(atoms, self.const + sign * other.const, self.err + other.err)
        out.err += _U64 * out.fro_mass(rho)  # one rounding per entry of the sums
        return out


def _scale(rep: _Rep, mid: torch.Tensor, rho: dict[str, float]) -> _Rep:
    """mid * v (elementwise), with a rounding allowance."""
    m = float(mid.abs().max()) if mid.numel() else 0.0
    err = m * rep.err + 2 * _U64 * m * rep.fro_mass(rho)
    return _Rep({k: a * mid for k, a in rep.atoms.items()}, rep.const * mid, err)


def _map(rep: _Rep, fn: Any, opabs: float, n_terms: int, rho: dict[str, float]) -> _Rep:
    """Apply a linear map `fn` (rows -> rows) to every part, the constant included;
    ||op|| <= opabs bounds the abs-matrix norm (for the rounding allowance)."""
    atoms = {k: fn(a) for k, a in rep.atoms.items()}
    c = fn(rep.const[None])[0]
    err = opabs * rep.err + _gamma(n_terms + 2) * opabs * rep.fro_mass(rho)
    return _Rep(atoms, c, err)


@dataclass(frozen=True)
class SlopeBound:
    """Result of `slope_bound`: sup ||f - F|| <= bound, sup ||F|| <= output_scale.

    `gap_after[i]` / `out_after[i]` bound sup ||h~_i - h_i|| / sup ||h_i|| after step i (for
    the hybrid with Lemma A); `unstable` counts the neurons whose slope was not fixed."""

    bound: float
    output_scale: float
    gap_after: tuple[float, ...]
    out_after: tuple[float, ...]
    unstable: int


def _slopes(step: Step, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mid, hw): every secant slope of the activation on [lo, hi] is in [mid - hw, mid + hw]."""
    m = step.module
    if isinstance(m, nn.ReLU | nn.LeakyReLU):
        a = float(m.negative_slope) if isinstance(m, nn.LeakyReLU) else 0.0

        # the slopes as float64 tensors: torch.where on Python scalars makes float32, and a
        # LeakyReLU slope of 0.1 in float32 is 1.5e-8 off (tight certificates fell below gaps)
        def full(v: float) -> torch.Tensor:
            return torch.full_like(lo, v)

        smin = torch.where(hi <= 0, full(a), torch.where(lo >= 0, full(1.0), full(min(a, 1.0))))
        smax = torch.where(hi <= 0, full(a), torch.where(lo >= 0, full(1.0), full(max(a, 1.0))))
    else:
        smin, smax = torch.zeros_like(lo), torch.ones_like(lo)
    return (smin + smax) / 2, (smax - smin) / 2


def supported(net: Network) -> str | None:
    """None if `slope_bound` handles every step of `net`, else the reason it does not."""
    for s in net.steps:
        m = s.module
        if s.spec is not None:
            continue
        if isinstance(m, nn.LeakyReLU) and not 0 <= m.negative_slope <= 1:
            return f"{s.name}: LeakyReLU slope outside [0, 1]"
        if isinstance(m, nn.Hardtanh) and not m.min_val <= 0 <= m.max_val:
            return f"{s.name}: Hardtanh range excludes 0"
        if not isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, *_UNIT_SLOPE, *_AFFINE)):
            return f"{s.name}: {type(m).__name__} has no slope decomposition"
    return None


def _layer_fn(step: Step, weight: torch.Tensor) -> Any:
    spec = step.spec
    assert spec is not None
    w = weight.detach().to(torch.float64)
    shape = spec.in_shape

    def fn(a: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # rows of `a` are flattened samples (N, prod in_shape) -> (N, prod out_shape)
        x = a.reshape(a.shape[0], *shape)
        if spec.kind == "linear":  # token-wise on (..., in): the same W at every position
            return nnf.linear(x, w, bias).flatten(1)
        conv = nnf.conv1d if spec.kind == "conv1d" else nnf.conv2d
        return conv(x, w, bias, spec.stride, spec.padding, spec.dilation).flatten(1)

    return fn


def _opabs(step: Step, weight: torch.Tensor) -> tuple[float, int]:
    """(bound on the norm of the layer with |W|, terms per output): rounding allowances."""
    spec = step.spec
    assert spec is not None
    fro = float(torch.linalg.vector_norm(weight.detach().double())) * (1 + 1e-12)
    if spec.kind == "linear":
        return fro, spec.shape[1]
    k = spec.shape[2:]
    return fro * math.sqrt(pool_multiplicity(k, spec.stride, spec.dilation)), spec.fan_in


def _affine_fn(step: Step, module: nn.Module, *, original: bool) -> Any:
    """(linear part, value at 0) of the affine step as `module` computes it (with `original`:
    its masks removed)."""
    mod = copy.deepcopy(module)
    if original:
        reset(mod)
    mod = mod.double().eval()
    shape = step.in_shape
    with torch.no_grad():
        zero = mod(torch.zeros(1, *shape, dtype=torch.float64)).flatten(1)

    def fn(a: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = mod(a.reshape(a.shape[0], *shape)).flatten(1) - zero
            return out

    return fn, zero[0]


def slope_bound(
    net: Network, radius: float, *, max_elements: int = 30_000_000, per_step: bool = True
) -> SlopeBound:
    """Upper bound on sup_{||x|| <= radius} ||f(x) - F(x)|| by slope decomposition (module doc).

    `per_step=False` skips the per-step bounds (`gap_after`/`out_after` then hold only the
    last step), which the hybrid with Lemma A needs but a search over prunings does not.

    Raises ValueError when a step is not supported (see `supported`) or when the atom matrices
    would exceed `max_elements` float64 entries (the method multiplies dense matrices).
    """
    why = supported(net)
    if why is not None:
        raise ValueError(f"slope_bound does not support {why}")
    n0 = math.prod(net.input_shape)
    rho: dict[str, float] = {"x": float(radius)}
    h = _Rep({"x": torch.eye(n0, dtype=torch.float64)}, torch.zeros(n0, dtype=torch.float64), 0.0)
    d = _Rep({}, torch.zeros(n0, dtype=torch.float64), 0.0)
    gaps: list[float] = []
    outs: list[float] = []
    unstable = 0
    for i, step in enumerate(net.steps):
        if step.spec is not None:
            w, wt = step.weights()
            fw, ft, fd = _layer_fn(step, w), _layer_fn(step, wt), _layer_fn(step, w - wt)
            (ow, n), (ot, _), (od, _) = _opabs(step, w), _opabs(step, wt), _opabs(step, w - wt)
            b, bt = step.biases()
            z = _map(h, fw, ow, n, rho)
            p = _map(d, ft, ot, n, rho).plus(_map(h, fd, od, n, rho), rho, -1.0)
            # the biases in the output's own layout (per pixel / per token): z gets b, the
            # difference b~ - b (masked bias entries)
            zero = torch.zeros(1, math.prod(step.in_shape), dtype=torch.float64)
            if b is not None:
                z.const = z.const + fw(zero, b.double())[0]
            none = torch.zeros(wt.shape[0], dtype=torch.float64)
            gap = (none if bt is None else bt.double()) - (none if b is None else b.double())
            if bool(gap.any()):
                p.const = p.const + fw(zero, gap)[0]
                p.err += _U64 * float(torch.linalg.vector_norm(p.const))
            h, d = z, p
        elif isinstance(step.module, _AFFINE):
            fn, zero = _affine_fn(step, step.target, original=True)
            lip = step.lipschitz
            n = math.prod(step.in_shape)
            # the difference of two images of one affine map is the linear part applied to the
            # difference, its constant part included (-Delta h.const from the 2nd layer on);
            # a BatchNorm that f computes otherwise (masked entries) adds (A~ - A) h + (c~ - c)
            if step.pruned_map is None:
                d_new = _map(d, fn, lip, n, rho)
            else:
                fn_t, zero_t = _affine_fn(step, step.module, original=False)
                lip_t, _, d_s, _ = step.pruned_map
                d_new = _map(d, fn_t, lip_t, n, rho)

                def diff(a: torch.Tensor, f1: Any = fn_t, f0: Any = fn) -> torch.Tensor:
                    out: torch.Tensor = f1(a) - f0(a)
                    return out

                d_new = d_new.plus(_map(h, diff, d_s + lip + lip_t, n, rho), rho)
                d_new.const = d_new.const + (zero_t - zero)
                d_new.err += _U64 * float(torch.linalg.vector_norm(d_new.const))
            h = _map(h, fn, lip, n, rho)
            h.const = h.const + zero
            d = d_new
        else:  # activation: sigma(z) and sigma(z~) - sigma(z)
            rad_h = h.radius(rho)
            mid, hw = _slopes(step, h.const - rad_h, h.const + rad_h)
            zt = h.plus(d, rho)
            rad_t = zt.radius(rho)
            mid_t, hw_t = _slopes(step, zt.const - rad_t, zt.const + rad_t)
            # the difference quotient lies between the slopes seen by z and by z~
            lo_d = torch.minimum(mid - hw, mid_t - hw_t)
            hi_d = torch.maximum(mid + hw, mid_t + hw_t)
            mid_d, hw_d = (lo_d + hi_d) / 2, (hi_d - lo_d) / 2
            new_h = _scale(h, mid, rho)
            new_d = _scale(d, mid_d, rho)
            for tag, rep, src, half in (("u", new_h, h, hw), ("v", new_d, d, hw_d)):
                idx = torch.nonzero(half > 0).flatten()
                if idx.numel() == 0:
                    continue
                unstable += int(idx.numel())
                name = f"{tag}{i}"
                rho[name] = src.norm(rho, idx)
                atom = torch.zeros(idx.numel(), half.numel(), dtype=torch.float64)
                atom[torch.arange(idx.numel()), idx] = half[idx]
                rep.atoms[name] = atom
            h, d = new_h, new_d
        size = sum(a.numel() for a in h.atoms.values()) + sum(a.numel() for a in d.atoms.values())
        if size > max_elements:
            raise ValueError(
                f"slope_bound: atom matrices need {size} entries after step {step.name!r}, "
                f"over max_elements={max_elements}"
            )
        if per_step or i == len(net.steps) - 1:
            gaps.append(d.norm(rho))
            outs.append(h.norm(rho))
    return SlopeBound(gaps[-1], outs[-1], tuple(gaps), tuple(outs), unstable)


def slope_cost(net: Network) -> int:
    """Rough count of float64 entries the atom matrices reach (to skip huge models)."""
    widths: Sequence[int] = [math.prod(s.in_shape) for s in net.steps]
    n0 = math.prod(net.input_shape)
    n_act = sum(1 for s in net.steps if s.spec is None and not isinstance(s.module, _AFFINE))
    width = max(widths, default=n0)
    return int(2 * width * (n0 + 2 * n_act * width))  # h and d, x plus two atoms per activation
