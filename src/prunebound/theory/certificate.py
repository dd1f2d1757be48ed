"""Deterministic certificate: an upper bound on sup_{||x|| <= R} ||f(x) - F(x)||_2 for a pruned
model f and the same model with its masks removed, F (docs/theory.md §7.4-§7.6).

Valid for ANY weights, trained ones included: no distributional assumption. Derived for
prunebound in the setting of Qian & Klabjan (2021) (Lemma A of docs/theory.md §2, its
variants, and the slope decomposition of §7.5); the constants are ours, not the paper's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from prunebound._check import Seed, as_generator, check_float, finite
from prunebound._masks import is_pruned, trained_since_masked
from prunebound.theory.layer_norms import EXACT_MAX, LargeLinear, step_norm
from prunebound.theory.network import Step, extract
from prunebound.theory.norms import NormBound, NormMethod
from prunebound.theory.slopes import SlopeBound, slope_bound, slope_cost, supported

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerTerm:
    """One prunable layer's part of the certificate (norms are upper bounds)."""

    name: str
    norm_w: float  # ||W_l|| (target)
    norm_kept: float  # ||W~_l|| (the kept weights)
    norm_delta: float  # ||Delta_l|| = ||W_l - W~_l||
    r_in: float  # bound r_{l-1} on ||h_{l-1}(x)|| of the target over the ball
    contribution: float  # ||Delta_l|| r_{l-1} times the gains of every later step, as in (A)
    norm_method: str
    pruned: int
    total: int


@dataclass(frozen=True)
class Certificate:
    """sup_{||x|| <= radius} ||f(x) - F(x)|| <= bound, for these weights.

    `output_scale` bounds sup ||F(x)|| over the ball (min of Lemma A's r_L and the slope
    decomposition's); `relative` = bound / output_scale. `candidates` holds every valid bound
    computed (in exact arithmetic) and `method` the one that won (the min); `bound` is that
    minimum with the floating-point margin of `float_margin`. `fail_prob` > 0 only when a
    Lanczos norm was used: then the bound holds with probability >= 1 - fail_prob over the
    algorithm's random start (still for any weights). `notes` says which candidates or
    refinements were skipped and why; `seconds` is the wall time of `certify`.
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
    notes: tuple[str, ...] = ()
    seconds: float = 0.0
    vacuous: bool = False  # bound >= output_scale: no better than the trivial bound

    def __str__(self) -> str:
        head = (
            f"Certificate: sup_(||x|| <= {self.radius:g}) ||f(x) - F(x)|| <= {self.bound:.6g} "
            f"({self.method}; {self.relative:.2%} of sup ||F|| <= {self.output_scale:.6g})"
        )
        if self.vacuous:
            head += "\n  VACUOUS: no better than the trivial bound on the unpruned output"
        rows = [f"  {'layer':<16} {'pruned':>12} {'||W||':>10} {'||Delta||':>10}"]
        rows += [
            f"  {t.name:<16} {f'{t.pruned}/{t.total}':>12} {t.norm_w:>10.4g} {t.norm_delta:>10.4g}"
            for t in self.layers[:20]
        ]
        if len(self.layers) > 20:
            rows.append(f"  ... {len(self.layers) - 20} more layers")
        notes = [f"  note: {n}" for n in self.notes]  # e.g. F drifted, candidates skipped
        return "\n".join([head, *rows, f"  {self.assumptions}", *notes])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats, strings, lists)."""
        return asdict(self)


def float_margin(bound: float, output_scale: float, radius: float) -> float:
    """`bound` raised to stay above a gap evaluated in float64 (docs/theory.md §7.3b): relative
    1e-9 for the rounding of norms and sums, absolute 1e-12 (output_scale + radius) for outputs
    of that size; 0 stays 0 (nothing pruned: f = F exactly)."""
    return bound * (1 + 1e-9) + 1e-12 * (output_scale + radius) if bound > 0 else 0.0


def _check(model: nn.Module, radius: float) -> None:
    check_float("radius", radius, 0.0, math.inf, closed="neither", ints=True)
    for name, p in model.named_parameters():
        if not finite(p.detach()):
            raise ValueError(f"parameter {name!r} must be finite, got NaN or Inf")
    for name, m in model.named_modules():
        if m.training and isinstance(m, _MODE_DEPENDENT):
            raise ValueError(
                f"model must be in eval mode (Dropout is the identity and BatchNorm uses running "
                f"stats only in eval), got layer {name or '<model>'!r} ({type(m).__name__}) with "
                "training=True; call model.eval()"
            )


# modules whose forward depends on `training` (Dropout variants, BatchNorm/InstanceNorm)
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


@dataclass
class _Norms:
    """Per prunable step: norm bounds (`delta_lower` <= ||Delta|| is only a Ritz estimate)."""

    nw: NormBound
    nt: NormBound
    nd: NormBound
    bias: tuple[float, float, float]  # Step.bias_norms: ||b||, ||b~||, ||b - b~||
    pruned: int
    total: int
    refine: Callable[..., NormBound] | None = None  # Lanczos for ||Delta|| (k steps)


def _chain(
    steps: Sequence[Step],
    norms: dict[int, _Norms],
    radius: float,
    rel: SlopeBound | None,
    delta_value: Callable[[_Norms], float],
) -> tuple[dict[str, float], list[float], list[float], float]:
    """Candidates (docs §7.4-7.5), per-layer contributions, r_in, and r_L."""
    r, rt = float(radius), float(radius)
    e_a, e_mix, e_hyb = 0.0, 0.0, 0.0
    r_h = float(radius)  # hybrid: min of Lemma A's r and the slope bound on ||h||
    contribs: list[float] = []
    r_in: list[float] = []
    for i, step in enumerate(steps):
        if step.spec is None:
            lip, off = step.lipschitz, step.offset
            # a BatchNorm with masked entries: f's map s~ x + t~ against F's s x + t (§7.3)
            lip_t, off_t, d_s, d_t = step.pruned_map or (lip, off, 0.0, 0.0)
            e_a = lip_t * e_a + d_s * r + d_t
            e_mix = min(lip_t * e_mix + d_s * r, lip * e_mix + d_s * rt) + d_t
            e_hyb = lip_t * e_hyb + d_s * r_h + d_t
            r, rt, r_h = lip * r + off, lip_t * rt + off_t, lip * r_h + off
            contribs = [c * lip_t for c in contribs]
        else:
            nm = norms[i]
            nw, nt, nd = nm.nw.value, nm.nt.value, delta_value(nm)
            nb, nbt, nbd = nm.bias
            contribs = [c * nt for c in contribs] + [nd * r + nbd]
            r_in.append(r)
            e_a = nt * e_a + nd * r + nbd
            e_mix = min(nt * e_mix + nd * r, nw * e_mix + nd * rt) + nbd
            e_hyb = nt * e_hyb + nd * r_h + nbd
            r, rt, r_h = nw * r + nb, nt * rt + nbt, nw * r_h + nb
        if rel is not None:
            e_hyb = min(e_hyb, rel.gap_after[i])
            r_h = min(r_h, rel.out_after[i])
    cands = {"lemma_a": e_a, "lemma_a_mixed": e_mix, "triangle": r + rt}
    if rel is not None:
        cands["slopes"] = rel.bound
        cands["hybrid"] = e_hyb
    return cands, contribs, r_in, min(r, r_h) if rel is not None else r


def certify(
    model: nn.Module,
    *,
    radius: float = 1.0,
    input_shape: Sequence[int] | None = None,
    norm_method: NormMethod = "auto",
    fail_prob: float = 1e-9,
    lanczos_steps: int = 100,
    seed: Seed = 0,
    slopes: bool | None = None,
    slopes_max_elements: int = 30_000_000,
    reference: nn.Module | None = None,
) -> Certificate:
    """Certify sup_{||x|| <= radius} ||f(x) - F(x)||_2 for a pruned model (docs/theory.md §7).

    Candidates, all provably valid; the minimum is returned and `method` names it:
    - ``lemma_a``: recursion (A) e_l = ||W~_l|| e_{l-1} + ||Delta_l|| r_{l-1} (theory.md §2);
    - ``lemma_a_mixed``: per layer the min of that and ||W_l|| e_{l-1} + ||Delta_l|| r~_{l-1}
      (r~ bounds the pruned network's activations) (§7.4);
    - ``triangle``: r_L + r~_L (§7.4);
    - ``slopes``: slope decomposition of the difference network (§7.5), when every step is
      supported (Linear/Conv, ReLU-like activations, affine maps; no max-pool) and affordable;
    - ``hybrid``: Lemma A whose e_l and r_l are capped, step by step, by the slope bounds.

    Args:
        model: nn.Sequential (nested allowed), pruned with prunebound masks or not (bound 0).
        radius: R > 0, the input ball's l2 radius.
        input_shape: one sample's shape; required for conv models.
        norm_method: matrix norm method (`norms.norm_bound`); conv norms are deterministic.
        fail_prob: total failure probability allowed to Lanczos norms (split evenly).
        lanczos_steps: Lanczos steps per large matrix (100: <= 1% over the true norm at 4096).
        seed: the random start of Lanczos (`_check.Seed`; default 0, reproducible).
        slopes: compute the slopes/hybrid candidates: True (error if unsupported), False, or
            None (default: when supported and the atom matrices stay under
            `slopes_max_elements`).
        reference: the model F to compare with, when it is not `model` with its masks removed:
            a chain with the same layers and shapes (e.g. `prunebound.expand(shrunk, original)`
            of a shrunk model); its own masks are removed (F is its unmasked weights).

    Example:
        >>> import torch, prunebound as pb
        >>> from prunebound.theory.certificate import certify
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> cert = certify(pb.prune(net, "magnitude", 0.3), radius=1.0)
        >>> 0 <= cert.bound <= cert.candidates["lemma_a"]
        True
    """
    t_start = time.perf_counter()
    _check(model, radius)
    if reference is not None:
        _check(reference, radius)
    check_float("fail_prob", fail_prob, 0.0, 1.0, closed="neither")
    net = extract(model, input_shape, reference=reference)
    gen = as_generator(seed)
    notes: list[str] = []
    rel: SlopeBound | None = None
    why = supported(net)
    if slopes is True and why is not None:
        raise ValueError(f"slopes=True but the model is not supported: {why}")
    if slopes is None and why is None and slope_cost(net) > slopes_max_elements:
        why = f"atom matrices would exceed slopes_max_elements={slopes_max_elements}"
    if slopes is not False and why is None:
        try:
            with torch.no_grad():
                rel = slope_bound(net, radius, max_elements=slopes_max_elements)
        except ValueError as err:  # only the size guard raises here (support was checked)
            if slopes:
                raise
            notes.append(f"slopes candidate skipped: {err}")
    elif slopes is None:
        notes.append(f"slopes candidate skipped: {why}")
    # four Lanczos runs at most per linear layer (W, W~, short and full Delta): union bound
    n_lin = 4 * sum(1 for s in net.specs if s.kind == "linear")
    per = fail_prob / max(n_lin, 1)
    norms: dict[int, _Norms] = {}
    with torch.no_grad():
        for i, step in enumerate(net.steps):
            if step.spec is None:
                continue
            w, wt = step.weights()
            wt = w if torch.equal(w, wt) else wt  # `is` below: nothing pruned in this layer
            pruned = int((wt == 0).sum() - (w == 0).sum())
            b = step.bias_norms()
            large = (
                step.spec.kind == "linear"
                and norm_method in ("auto", "lanczos")
                and min(w.shape) > EXACT_MAX
            )
            if large:
                ops = LargeLinear(w, wt)
                nw = ops.norm_w(lanczos_steps, per, gen)
                if wt is w:
                    norms[i] = _Norms(nw, nw, NormBound(0.0, "zero"), b, 0, w.numel())
                    continue
                nt = ops.norm_t(lanczos_steps, per, gen)
                # ||Delta|| <= ||W|| + ||W~||, and >= (Ritz lower of ||W||) - ||W~|| (lazy)
                nd = NormBound(nw.value + nt.value, "triangle", 0.0, max(nw.lower - nt.value, 0.0))

                def refine(ops: LargeLinear = ops, k: int = lanczos_steps) -> NormBound:
                    return ops.norm_d(k, per, gen)

                norms[i] = _Norms(nw, nt, nd, b, pruned, w.numel(), refine)
                continue
            nw = step_norm(step, w, norm_method, per, gen, lanczos_steps)
            if wt is w:
                nt, nd = nw, NormBound(0.0, "zero")
            else:
                nt = step_norm(step, wt, norm_method, per, gen, lanczos_steps)
                nd = step_norm(step, w - wt, norm_method, per, gen, lanczos_steps)
            norms[i] = _Norms(nw, nt, nd, b, pruned, w.numel())
        cands, contribs, r_in, scale = _chain(net.steps, norms, radius, rel, lambda n: n.nd.value)
        lazy = [n for n in norms.values() if n.refine is not None]
        extra_fail = 0.0
        if lazy:
            # ||Delta|| <= ||W|| + ||W~|| is valid but loose; run Lanczos on Delta only if Lemma A
            # with LOWER estimates of ||Delta|| could still beat the best other candidate
            others = min(v for k, v in cands.items() if not k.startswith("lemma_a"))

            def can_win() -> bool:
                low, *_ = _chain(
                    net.steps, norms, radius, rel, lambda n: n.nd.lower if n.refine else n.nd.value
                )
                return min(low["lemma_a"], low["lemma_a_mixed"]) < others

            # stage 1: ||Delta|| >= ||W|| - ||W~|| (free); stage 2: Ritz value of a 10-step
            # Lanczos (a lower estimate); stage 3: full Lanczos upper bounds
            for stage in (10, lanczos_steps):
                if not can_win():
                    break
                for n in lazy:
                    assert n.refine is not None
                    run = n.refine(k=stage)
                    extra_fail += run.fail_prob  # every run's bound may be the one kept
                    lower = max(n.nd.lower, run.lower)
                    n.nd = run if run.value < n.nd.value else n.nd
                    n.nd = NormBound(n.nd.value, n.nd.method, n.nd.fail_prob, lower)
            else:
                lazy = []
            cands, contribs, r_in, scale = _chain(
                net.steps, norms, radius, rel, lambda n: n.nd.value
            )
            if lazy:
                notes.append(
                    "||Delta|| of large layers not refined to full Lanczos: Lemma A cannot win "
                    "even with lower estimates of ||Delta||"
                )
    used_fail = extra_fail + sum(n.nw.fail_prob + n.nt.fail_prob for n in norms.values())
    used_fail += sum(n.nd.fail_prob for n in norms.values() if n.refine is None)
    # `candidates` keep their exact-arithmetic values; the bound is the winner plus the
    # floating-point margin (docs/theory.md §7.3b)
    method = min(cands, key=lambda k: cands[k])
    bound = float_margin(cands[method], scale, float(radius))
    vacuous = bound >= scale
    if vacuous:
        notes.append(
            f"vacuous: the bound {bound:.4g} is no better than the trivial bound on the unpruned "
            f"output itself (sup ||F(x)|| <= {scale:.4g})"
        )
    drifted = trained_since_masked(model if reference is None else reference)
    if reference is None and bound == 0 and not is_pruned(model):
        notes.append(
            "no prunebound masks: F is the model itself, so the bound is 0; a model baked by "
            "`remove` or physically shrunk has no record of its original: certify the masked "
            "model, or pass `reference=` (for a shrunk model, `expand` it first)"
        )
    if drifted:
        notes.append(
            f"layers {drifted[:5]} were trained after pruning: F is the model with its masks "
            "removed as it is now, not the dense model the pruning started from"
        )
    dtype = next(model.parameters()).dtype
    unit = torch.finfo(dtype).eps / 2
    notes.append(
        f"bound on the exact-arithmetic function of the stored {str(dtype).removeprefix('torch.')}"
        f" weights; evaluating the model in that precision adds rounding of order "
        f"u ||F|| = {unit * scale:.3g} (u = {unit:.3g}), not covered"
        + (" and not negligible here" if unit * scale > 0.01 * bound else "")
    )
    log.debug("certificate candidates %s; %s wins", cands, method)
    layers = []
    for (i, nm), c, rin in zip(sorted(norms.items()), contribs, r_in, strict=True):
        methods = sorted({nm.nw.method, nm.nt.method, nm.nd.method} - {"zero"})
        layers.append(
            LayerTerm(
                name=net.steps[i].name,
                norm_w=nm.nw.value,
                norm_kept=nm.nt.value,
                norm_delta=nm.nd.value,
                r_in=rin,
                contribution=c,
                norm_method="/".join(methods),
                pruned=nm.pruned,
                total=nm.total,
            )
        )
    assumptions = "deterministic: valid for any weights (trained or not)"
    if used_fail > 0:
        assumptions += (
            f"; Lanczos norm bounds: holds with probability >= 1 - {used_fail:.3g} "
            "over the algorithm's random start"
        )
    return Certificate(
        bound=bound,
        radius=float(radius),
        output_scale=scale,
        relative=bound / scale if scale > 0 else math.inf,
        layers=tuple(layers),
        method=method,
        candidates=cands,
        fail_prob=used_fail,
        assumptions=assumptions,
        notes=tuple(notes),
        seconds=time.perf_counter() - t_start,
        vacuous=vacuous,
    )
