"""Monte Carlo checks of theory plans (docs/theory.md §1 guarantee).

`verify` samples target networks from a plan's law, prunes each as planned and estimates its
worst gap sup_{||x|| <= R} ||f(x) - F(x)||; `largest_fraction` bisects the largest pruning that
still meets eps. Work is batched over networks: a chunk of N networks is held as (N, out, in)
weights (torch.baddbmm) or as one grouped convolution (groups=N), never a loop over networks.

The worst-gap estimate (random points on the sphere, then projected gradient ascent on the ball
from the best of them) is a LOWER bound on the true sup: violation counts are lower bounds too.
The optional deterministic certificates (`theory.certify`) bound each network's gap from above.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from prunebound._check import Seed, as_seed, check_float, check_int
from prunebound.check.batch import (
    Batch,
    SearchConfig,
    check_chain,
    chunk_generator,
    default_chunk,
    laws,
    prune_batch,
    sample_batch,
    sphere,
    to_module,
    worst_gap,
)
from prunebound.stats import clopper_pearson_upper
from prunebound.theory.certificate import certify
from prunebound.theory.values import Plan

OnProgress = Callable[[int, int], None]  # (networks done, total)

__all__ = [
    "LargestFraction",
    "SearchConfig",
    "VerifyReport",
    "largest_fraction",
    "verify",
]


@dataclass(frozen=True, repr=False)
class VerifyReport:
    """Monte Carlo check of a plan over `trials` sampled networks.

    `violations` counts gaps > eps, with `rate_upper` its Clopper-Pearson upper limit at
    `confidence`; `passed` is rate_upper <= delta. `gap_quantile` is the empirical (1 - delta)-
    quantile of the gaps and `tightness` = gap_quantile / eps (1 would be a tight plan).
    `relative_eps` = eps / output_scale (the plan's r_L). Gaps are LOWER estimates of each
    network's sup; `certificates` (when computed) are upper bounds, and `certified` counts the
    networks with certificate <= eps, so true violations <= trials - certified.
    `print(report)` gives a short summary; `repr` summarises `gaps`/`certificates`.
    """

    trials: int
    eps: float
    delta: float
    radius: float
    method: str
    sampling: str
    confidence: float
    violations: int
    rate: float
    rate_upper: float
    passed: bool
    gap_quantile: float
    gap_max: float
    tightness: float
    output_scale: float
    relative_eps: float
    gaps: tuple[float, ...]
    certificates: tuple[float, ...] | None
    certified: int | None
    search: SearchConfig
    seed: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name not in ("gaps", "certificates", "search")
        )
        certs = "None" if self.certificates is None else f"<{len(self.certificates)} floats>"
        return f"VerifyReport({shown}, gaps=<{len(self.gaps)} floats>, certificates={certs})"

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if not self.passed and self.violations == 0:
            verdict += " (no violation, but too few trials to bound the rate by delta)"
        g = sorted(self.gaps)
        lines = [
            f"VerifyReport: {verdict}: {self.violations}/{self.trials} networks with gap > eps "
            f"= {self.eps:.4g}; violation rate <= {self.rate_upper:.3g} (Clopper-Pearson, "
            f"{self.confidence:.0%}) vs delta = {self.delta:g}",
            f"  {self.method} ({self.sampling}) pruning, inputs ||x|| <= {self.radius:g}, "
            f"eps / r_L = {self.relative_eps:.4g}, seed {self.seed}, {self.seconds:.1f} s",
            f"  worst-gap estimates (lower bounds): min {g[0]:.4g}, median {g[len(g) // 2]:.4g}, "
            f"max {self.gap_max:.4g}; {1 - self.delta:.0%} quantile {self.gap_quantile:.4g} "
            f"(tightness {self.tightness:.3g})"
            if g
            else "  no gaps measured",
        ]
        if self.certified is not None:
            lines.append(f"  certified (certificate <= eps): {self.certified}/{self.trials}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LargestFraction:
    """The empirically largest pruning along the plan's per-layer fractions (`largest_fraction`).

    Layer l prunes min(1, scale * direction_l); `ratio` = empirical / planned per layer (None
    where the plan prunes nothing) and `total_ratio` the same for total counts. Because gaps are
    lower estimates, the empirical fractions are optimistic (upper estimates of the truth).
    """

    layers: tuple[str, ...]
    planned: tuple[float, ...]
    empirical: tuple[float, ...]
    ratio: tuple[float | None, ...]
    scale: float
    direction: str
    planned_total: int
    empirical_total: int
    total_ratio: float | None
    eps: float
    delta: float
    trials: int
    allowed_violations: int
    evaluations: tuple[tuple[float, int], ...]
    search: SearchConfig = field(default_factory=SearchConfig)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _amounts(plan: Plan, fractions: Sequence[float] | None) -> tuple[list[float], bool]:
    """Per-layer amounts for `prune_batch` and whether they are cutoffs."""
    if plan.sampling == "bernoulli":
        fr = fractions if fractions is not None else [lp.fraction for lp in plan.layers]
        return list(fr), True
    if fractions is not None:
        units = [s.shape[0] if plan.method == "neuron" else s.numel for s in plan.specs]
        return [round(f * n) for f, n in zip(fractions, units, strict=True)], False
    if plan.sampling == "threshold" and plan.method == "magnitude":
        return [lp.threshold if lp.threshold is not None else 0.0 for lp in plan.layers], True
    return [float(lp.count) for lp in plan.layers], False


def _certificate(batch: Batch, pruned: Sequence[torch.Tensor], i: int, radius: float) -> float:
    """`theory.certify` of network i, rebuilt as an nn.Sequential with prunebound masks."""
    model = to_module(batch, pruned, i)
    gen = torch.Generator().manual_seed(0)
    cert = certify(model, radius=radius, input_shape=batch.specs[0].in_shape, seed=gen)
    return cert.bound


def _check_run(plan: object, trials: object, confidence: object) -> Plan:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a prunebound.theory.Plan, got {type(plan).__name__}")
    check_int("trials", trials, 1)
    check_float("confidence", confidence, 0, 1, closed="neither")
    if not 0.0 < plan.delta < 1.0 or not plan.eps > 0 or not plan.radius > 0:
        raise ValueError(
            f"plan needs eps > 0, delta in (0, 1), radius > 0; got eps={plan.eps}, "
            f"delta={plan.delta}, radius={plan.radius}"
        )
    laws(plan)
    if plan.activation != "relu":
        raise ValueError(
            "verify rebuilds networks with ReLU between layers; this plan's target has other "
            "activations or steps between its layers (use pb.theory.certify on the model instead)"
        )
    check_chain(plan.specs)
    return plan


def _gaps(
    plan: Plan,
    fractions: Sequence[float] | None,
    trials: int,
    seed: int,
    search: SearchConfig,
    *,
    chunk: int | None,
    device: torch.device | str,
    dtype: torch.dtype,
    stop_above: int | None = None,
    certificates: bool = False,
    progress: OnProgress | None = None,
) -> tuple[list[float], list[float]]:
    """Gaps (and certificates) of `trials` networks, chunk by chunk; stops early once more than
    `stop_above` gaps exceed eps. Chunk c is drawn from generator (seed, c): weights, keys,
    then search inputs, so the same (seed, chunk) gives the same networks at every pruning."""
    size = chunk if chunk is not None else default_chunk(plan.specs)
    amounts, cut = _amounts(plan, fractions)
    gaps: list[float] = []
    certs: list[float] = []
    for c, start in enumerate(range(0, trials, size)):
        n = min(size, trials - start)
        gen = chunk_generator(seed, c)
        batch = sample_batch(plan, n, gen, device=device, dtype=dtype)
        x0 = sphere(n, search.samples, plan.specs[0].in_shape, plan.radius, gen)
        pruned = prune_batch(batch, amounts, cutoff=cut)
        g = worst_gap(batch, pruned, plan.radius, x0.to(device, dtype), search)
        gaps += g.double().cpu().tolist()
        if certificates:
            certs += [_certificate(batch, pruned, i, plan.radius) for i in range(n)]
        if progress is not None:
            progress(len(gaps), trials)
        if stop_above is not None and sum(v > plan.eps for v in gaps) > stop_above:
            break
    return gaps, certs


def verify(
    plan: Plan,
    *,
    trials: int = 200,
    seed: Seed = 0,
    search: SearchConfig | None = None,
    confidence: float = 0.95,
    certificates: bool = False,
    chunk: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: OnProgress | None = None,
) -> VerifyReport:
    """Check a plan by Monte Carlo: sample `trials` targets from its law (weights and biases),
    prune each as planned, estimate each worst gap and count those above eps.

    Pruning as `prune(model, plan=plan)` does: magnitude, the `count` smallest |w| per layer;
    random, a uniform `count`-subset (or each weight w.p. `fraction` if plan.sampling is
    "bernoulli"). Networks are rebuilt as Linear/Conv chains with ReLU between (as
    `models.mlp`). The gaps are LOWER bounds on each sup; `certificates=True` adds the
    deterministic upper bound of `theory.certify` per network (a loop: slower).

    Args:
        plan: a `theory.plan(...)` result with law "uniform" or "gaussian".
        trials: networks to sample, >= 1. seed: an int, a `torch.Generator` or None (fresh
            entropy; the int drawn is `VerifyReport.seed`); with `chunk`, reproducibility.
        search: worst-gap search effort (`SearchConfig()` by default).
        confidence: of the Clopper-Pearson upper limit on the violation rate.
        chunk: networks per batch (default: ~16 MB of weights); device, dtype: where to compute.
        progress: called with (networks done, trials) after each chunk.

    Raises:
        ValueError: trials < 1, confidence not in (0, 1), a plan without a law to sample, or
            layers that are not a plain chain. TypeError: `plan` is not a Plan.

    Example:
        >>> import prunebound as pb
        >>> p = pb.theory.plan([8, 16, 4], eps=0.5, delta=0.1)
        >>> rep = pb.verify(p, trials=20, search=pb.SearchConfig(samples=16, restarts=2, steps=5))
        >>> rep.violations, rep.gap_max <= p.eps
        (0, True)
    """
    plan = _check_run(plan, trials, confidence)
    seed = as_seed(seed)
    search = search if search is not None else SearchConfig()
    t0 = time.perf_counter()
    gaps, certs = _gaps(
        plan, None, trials, seed, search, chunk=chunk, device=device, dtype=dtype,
        certificates=certificates, progress=progress,
    )  # fmt: skip
    k = sum(g > plan.eps for g in gaps)
    q = float(np.quantile(gaps, 1.0 - plan.delta))
    return VerifyReport(
        trials=trials,
        eps=plan.eps,
        delta=plan.delta,
        radius=plan.radius,
        method=plan.method,
        sampling=plan.sampling,
        confidence=confidence,
        violations=k,
        rate=k / trials,
        rate_upper=clopper_pearson_upper(k, trials, 1.0 - confidence),
        passed=clopper_pearson_upper(k, trials, 1.0 - confidence) <= plan.delta,
        gap_quantile=q,
        gap_max=max(gaps),
        tightness=q / plan.eps,
        output_scale=plan.output_scale,
        relative_eps=plan.eps / plan.output_scale if plan.output_scale > 0 else math.inf,
        gaps=tuple(gaps),
        certificates=tuple(certs) if certificates else None,
        certified=sum(c <= plan.eps for c in certs) if certificates else None,
        search=search,
        seed=seed,
        seconds=time.perf_counter() - t0,
    )


def largest_fraction(
    plan: Plan,
    *,
    trials: int = 100,
    seed: Seed = 0,
    search: SearchConfig | None = None,
    iters: int = 8,
    chunk: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LargestFraction:
    """The empirically largest pruning along the plan's per-layer fractions that still meets eps.

    Layer l prunes min(1, s * planned_l); s is bisected (`iters` steps after checking the scale
    where the largest layer reaches 1) for the largest s whose Monte Carlo violation count
    (gap > eps over `trials` networks, same networks at every s) is <= floor(delta * trials),
    i.e. the empirical (1 - delta)-quantile of the gap is <= eps. If the plan prunes nothing
    at all, the direction is uniform (every layer the same fraction s) instead; a layer the
    plan leaves unpruned stays unpruned otherwise.
    """
    plan = _check_run(plan, trials, 0.95)
    seed = as_seed(seed)
    check_int("iters", iters, 1)
    search = search if search is not None else SearchConfig()
    t0 = time.perf_counter()
    planned = [lp.fraction for lp in plan.layers]
    base, direction = (planned, "plan") if max(planned) > 0 else ([1.0] * len(planned), "uniform")
    allowed = math.floor(plan.delta * trials)
    evals: list[tuple[float, int]] = []

    def ok(s: float) -> bool:
        fr = [min(1.0, s * f) for f in base]
        gaps, _ = _gaps(plan, fr, trials, seed, search, chunk=chunk, device=device,
                        dtype=dtype, stop_above=allowed)  # fmt: skip
        evals.append((s, sum(g > plan.eps for g in gaps)))
        return evals[-1][1] <= allowed

    lo, hi = 0.0, 1.0 / max(base)
    if ok(hi):
        lo = hi
    else:
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    emp = [min(1.0, lo * f) for f in base]
    numel = [s.numel for s in plan.specs]
    p_tot = sum(lp.count for lp in plan.layers)
    e_tot = sum(round(f * n) for f, n in zip(emp, numel, strict=True))
    return LargestFraction(
        layers=tuple(lp.name for lp in plan.layers),
        planned=tuple(planned),
        empirical=tuple(emp),
        ratio=tuple(e / p if p > 0 else None for e, p in zip(emp, planned, strict=True)),
        scale=lo,
        direction=direction,
        planned_total=p_tot,
        empirical_total=e_tot,
        total_ratio=e_tot / p_tot if p_tot > 0 else None,
        eps=plan.eps,
        delta=plan.delta,
        trials=trials,
        allowed_violations=allowed,
        evaluations=tuple(evals),
        search=search,
        seconds=time.perf_counter() - t0,
    )
