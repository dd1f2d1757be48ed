"""Deterministic certificate: an upper bound on sup_{||x|| <= R} ||f(x) - F(x)||_2 for a pruned
model f and the same model with its masks removed, F (docs/theory_certify.md §4).

Valid for ANY weights, trained ones included: no distributional assumption. Derived for
prunebound in the setting of Qian & Klabjan (2021) (Lemma A of docs/theory.md §6.2 and
variants); the constants are ours, not the paper's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from prunebound.masks import effective_weight, mask_module, original_weight
from prunebound.theory.network import Step, extract
from prunebound.theory.norms import NormBound, NormMethod, _finite, conv_norm, norm_bound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerTerm:
    """One prunable layer's part of the certificate (norms are upper bounds)."""

    name: str
    norm_w: float  # ||W_l|| (target)
    norm_pruned: float  # ||W~_l|| (pruned)
    norm_delta: float  # ||Delta_l|| = ||W_l - W~_l||
    r_in: float  # bound r_{l-1} on ||h_{l-1}(x)|| of the target over the ball
    contribution: float  # ||Delta_l|| r_{l-1} times the gains of every later step, as in (A)
    norm_method: str
    pruned: int
    total: int


@dataclass(frozen=True)
class Certificate:
    """sup_{||x|| <= radius} ||f(x) - F(x)|| <= bound, for these weights.

    `output_scale` (r_L) bounds sup ||F(x)|| over the ball; `relative` = bound / r_L.
    `candidates` holds every valid bound computed and `method` the one that won (the min).
    `fail_prob` > 0 only when a Lanczos norm was used: then the bound holds with probability
    >= 1 - fail_prob over the algorithm's random start (still for any weights).
    """

    bound: float
    radius: float
    output_scale: float
    relative: float
    layers: tuple[LayerTerm, ...]
    method: str
    candidates: dict[str, float] = field(default_factory=dict)
    fail_prob: float = 0.0
    assumptions: str = "deterministic: valid for any weights (trained or not)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats, strings, lists)."""
        return asdict(self)


def _layer_norm(
    step: Step,
    weight: torch.Tensor,
    method: NormMethod,
    fail_prob: float,
    generator: torch.Generator,
    steps: int,
) -> NormBound:
    spec = step.spec
    assert spec is not None
    if spec.kind == "linear":
        return norm_bound(
            weight, method=method, fail_prob=fail_prob, generator=generator, steps=steps
        )
    v = conv_norm(
        weight, spec.in_shape[1:], stride=spec.stride, padding=spec.padding, dilation=spec.dilation
    )
    return NormBound(v, "conv: min(circular DFT, Lemma C)")


def bias_norm(step: Step) -> float:
    """||b|| as seen in the layer's output (a conv bias repeats at every output position)."""
    b = getattr(step.module, "bias", None)
    if b is None:
        return 0.0
    spec = step.spec
    assert spec is not None
    reps = 1
    if spec.kind != "linear":
        with torch.no_grad():
            out = step.module(torch.zeros((1, *spec.in_shape), dtype=b.dtype, device=b.device))
        reps = math.prod(out.shape[2:])
    return float(torch.linalg.vector_norm(b.detach().double())) * math.sqrt(reps) * (1 + 1e-12)


def _check(model: nn.Module, radius: float) -> None:
    ok = isinstance(radius, int | float) and not isinstance(radius, bool)
    if not ok or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
    for name, p in model.named_parameters():
        if not _finite(p.detach()):
            raise ValueError(f"parameter {name!r} must be finite, got NaN or Inf")
    if any(isinstance(m, nn.Dropout) for m in model.modules()) and model.training:
        raise ValueError(
            "model must be in eval mode (Dropout is the identity only in eval), got training=True"
        )


def certify(
    model: nn.Module,
    *,
    radius: float = 1.0,
    input_shape: Sequence[int] | None = None,
    norm_method: NormMethod = "auto",
    fail_prob: float = 1e-9,
    lanczos_steps: int = 100,
    generator: torch.Generator | None = None,
) -> Certificate:
    """Certify sup_{||x|| <= radius} ||f(x) - F(x)||_2 for a pruned model (docs §4).

    Candidates, all provably valid, the minimum is returned:
    - ``lemma_a``: recursion (A) e_l = ||W~_l|| e_{l-1} + ||Delta_l|| r_{l-1} (theory.md §6.2);
    - ``lemma_a_mixed``: per layer the min of that and ||W_l|| e_{l-1} + ||Delta_l|| r~_{l-1}
      (r~ bounds the pruned network's activations) (docs §4.2);
    - ``triangle``: r_L + r~_L (docs §4.3).

    Args:
        model: nn.Sequential (nested allowed), pruned with prunebound masks or not (bound 0).
        radius: R > 0, the input ball's l2 radius.
        input_shape: one sample's shape; required for conv models.
        norm_method: matrix norm method (`norms.norm_bound`); conv norms are deterministic.
        fail_prob: total failure probability allowed to Lanczos norms (split evenly).
        lanczos_steps: Lanczos steps per large matrix (100: <= 1% over the true norm at 4096).
        generator: random start of Lanczos; default: fresh OS entropy.

    Example:
        >>> import torch, prunebound as pb
        >>> from prunebound.theory.certify import certify
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> cert = certify(pb.prune(net, "magnitude", 0.3), radius=1.0)
        >>> 0 <= cert.bound <= cert.candidates["lemma_a"]
        True
    """
    _check(model, radius)
    if not 0 < fail_prob < 1:
        raise ValueError(f"fail_prob must be in (0, 1), got {fail_prob}")
    net = extract(model, input_shape)
    gen = generator if generator is not None else torch.Generator()
    if generator is None:
        gen.seed()
    n_lin = 3 * sum(1 for s in net.specs if s.kind == "linear")
    per = fail_prob / max(n_lin, 1)
    r, rt = float(radius), float(radius)  # target / pruned activation bounds
    e_a, e_mix = 0.0, 0.0
    contribs: list[float] = []
    terms: list[dict[str, Any]] = []
    used_fail = 0.0
    with torch.no_grad():
        for step in net.steps:
            if step.spec is None:
                r, rt = step.lipschitz * r + step.offset, step.lipschitz * rt + step.offset
                e_a, e_mix = step.lipschitz * e_a, step.lipschitz * e_mix
                contribs = [c * step.lipschitz for c in contribs]
                continue
            w = original_weight(step.module).detach()
            nw = _layer_norm(step, w, norm_method, per, gen, lanczos_steps)
            if mask_module(step.module) is None:
                nt, nd, pruned = nw, NormBound(0.0, "zero"), 0
            else:
                wt = effective_weight(step.module).detach()
                nt = _layer_norm(step, wt, norm_method, per, gen, lanczos_steps)
                nd = _layer_norm(step, w - wt, norm_method, per, gen, lanczos_steps)
                pruned = int((wt == 0).sum() - (w == 0).sum())
            used_fail += nw.fail_prob + nt.fail_prob + nd.fail_prob
            contribs = [c * nt.value for c in contribs] + [nd.value * r]
            methods = sorted({nw.method, nt.method, nd.method} - {"zero"})
            terms.append(
                {
                    "name": step.name,
                    "norm_w": nw.value,
                    "norm_pruned": nt.value,
                    "norm_delta": nd.value,
                    "r_in": r,
                    "norm_method": "/".join(methods),
                    "pruned": pruned,
                    "total": w.numel(),
                }
            )
            e_a = nt.value * e_a + nd.value * r
            e_mix = min(nt.value * e_mix + nd.value * r, nw.value * e_mix + nd.value * rt)
            b = bias_norm(step)
            r, rt = nw.value * r + b, nt.value * rt + b
    cands = {"lemma_a": e_a, "lemma_a_mixed": e_mix, "triangle": r + rt}
    method = min(cands, key=lambda k: cands[k])
    bound = cands[method]
    log.debug("certificate candidates %s; %s wins", cands, method)
    layers = tuple(LayerTerm(contribution=c, **t) for t, c in zip(terms, contribs, strict=True))
    assumptions = "deterministic: valid for any weights (trained or not)"
    if used_fail > 0:
        assumptions += (
            f"; Lanczos norm bounds: holds with probability >= 1 - {used_fail:.3g} "
            "over the algorithm's random start"
        )
    return Certificate(
        bound=bound,
        radius=float(radius),
        output_scale=r,
        relative=bound / r if r > 0 else math.inf,
        layers=layers,
        method=method,
        candidates=cands,
        fail_prob=used_fail,
        assumptions=assumptions,
    )
