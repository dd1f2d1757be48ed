"""Probabilistic pruning plans: the largest per-layer counts whose certified gap is <= eps.

`plan` solves, `bound` evaluates. Both use Lemma A (docs/theory.md §2, `propagate`) with the
per-layer norm oracles of `prunebound.theory.layers` and a union bound over every failure event
(docs/theory.md §6). INFERRED: bounds derived in the setting of Qian & Klabjan (2021), not the
paper's theorems or constants.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch

from prunebound._masks import reset as pb_reset
from prunebound.theory.assumptions import check_law
from prunebound.theory.datacert import search_data_plan
from prunebound.theory.layers import PriorLayer, TrainedLayer
from prunebound.theory.network import extract
from prunebound.theory.propagate import Propagation, propagate
from prunebound.theory.relax import relax_bound
from prunebound.theory.sampled import sampled_plan
from prunebound.theory.split import Oracle, solve_budgets, solve_optimized
from prunebound.theory.targets import Target, resolve
from prunebound.theory.types import Law, LawName, LayerPlan, LayerSpec, Method, Plan

logger = logging.getLogger(__name__)

METHODS = ("magnitude", "random")
LAWS = ("uniform", "gaussian", "trained", "data")
SPLITS = ("optimized", "equal", "params")
SAMPLINGS = ("count", "bernoulli")
BOUNDS = ("theorem", "sampled")
LAW_CHECK_LEVEL = 0.05  # false-alarm rate of the law check on a model drawn from the law


@dataclass(frozen=True)
class BoundResult:
    """The certified gap of a given pruning (`bound`), with Lemma A's pieces per layer."""

    eps: float
    delta: float
    counts: tuple[int, ...]
    norm_w: tuple[float, ...]
    norm_kept: tuple[float, ...]
    norm_delta: tuple[float, ...]
    bias_norms: tuple[float, ...]
    terms: tuple[float, ...]
    output_scale: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _check_common(delta: float, radius: float, method: str, law: str, sampling: str) -> None:
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not (isinstance(radius, int | float) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be > 0 and finite, got {radius!r}")
    _check_choice("method", method, METHODS)
    _check_choice("law", law, LAWS)
    _check_choice("sampling", sampling, SAMPLINGS)
    if sampling == "bernoulli" and method != "random":
        raise ValueError(f"sampling='bernoulli' needs method='random', got method={method!r}")


def _law_for(spec: LayerSpec, law: str, scale: float | None) -> Law:
    s = scale if scale is not None else 1.0 / math.sqrt(spec.fan_in)
    if law == "uniform":
        return Law("uniform", s)
    return Law("gaussian", s)


def _layer_weights(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    mod = dict(model.named_modules())[name]
    try:
        from prunebound._masks import original_weight

        w = original_weight(mod)
    except (ImportError, AttributeError, TypeError, ValueError):
        w = mod.weight
    bias = getattr(mod, "bias", None)
    return w, bias if isinstance(bias, torch.Tensor) else None


def _deltas(specs: Sequence[LayerSpec], delta: float) -> list[float]:
    """delta_l = delta / L for every split: bounds depend on delta only through log(1/delta_l),
    so sharing it unevenly gains little, and `bound` stays the exact inverse of `plan` (§6)."""
    return [delta / len(specs)] * len(specs)


def _oracles(
    tgt: Target, method: str, law: str, deltas: Sequence[float], scale: float | None, sampling: str
) -> list[Oracle]:
    bern = sampling == "bernoulli"
    out: list[Oracle] = []
    nonneg = tgt.nonneg_input or (False,) * len(tgt.specs)
    for spec, d, nn_in in zip(tgt.specs, deltas, nonneg, strict=True):
        if law == "trained":
            if tgt.model is None:
                raise ValueError("law='trained' needs an nn.Module target, got widths/specs")
            w, b = _layer_weights(tgt.model, spec.name)
            out.append(TrainedLayer(spec, w, b, method, d, bernoulli=bern))
        else:
            out.append(
                PriorLayer(
                    spec, _law_for(spec, law, scale), method, d, bernoulli=bern, nonneg_input=nn_in
                )
            )
    return out


def _propagate(
    orcs: Sequence[Oracle], counts: Sequence[int], radius: float, tgt: Target
) -> Propagation:
    """Lemma A with the oracles' bounds; non-prunable offsets folded into the biases, and the
    input ball mapped through the steps before the first prunable layer (`Target.radius_in`)."""
    more = tgt.extra_bias if tgt.extra_bias is not None else [0.0] * len(orcs)
    return propagate(
        [o.norm_w() for o in orcs],
        [o.norm_kept(m) for o, m in zip(orcs, counts, strict=True)],
        [o.norm_delta(m) for o, m in zip(orcs, counts, strict=True)],
        [o.norm_b() + c for o, c in zip(orcs, more, strict=True)],
        tgt.radius_in(radius),  # steps before the first prunable layer grow the ball
        tgt.lipschitz,
    )


def plan(
    target: object,
    eps: float,
    delta: float,
    *,
    method: str = "magnitude",
    law: str = "uniform",
    radius: float = 1.0,
    split: str = "optimized",
    scale: float | None = None,
    data: object = None,
    alpha: float | None = None,
    input_shape: tuple[int, ...] | None = None,
    sampling: str = "count",
    tighten: bool = False,
    bound: str = "theorem",
    seed: int = 0,
    n_search: int = 32,
    n_cert: int | None = None,
) -> Plan:
    """Per-layer counts to prune with sup_{||x||<=radius} ||f(x) - F(x)|| <= eps w.p. >= 1-delta.

    Args:
        target: widths [n0, ..., nL] (layers named as in `prunebound.models.mlp`), a list of
            LayerSpec, or an nn.Module (shapes from `theory.network.extract`).
        eps: the worst-case output gap allowed, > 0.
        delta: failure probability over the weights (and mask), in (0, 1). Ignored (0 spent)
            for law='trained' with magnitude pruning, which is deterministic.
        method: "magnitude" (the m smallest |w| per layer) or "random" (uniform m-subset).
        law: "uniform" U[-scale, scale] / "gaussian" N(0, scale^2) i.i.d. weights and biases
            (scale defaults to 1/sqrt(fan_in), PyTorch's default init), "trained" (the model's
            weights, docs §5), "data" (delegates to `theory.datacert.search_data_plan`).
        split: how eps and delta are shared across layers: "optimized" (default; maximise the
            total count), "equal" or "params" (proportional to parameter counts). docs §6.
        sampling: "count" (exact counts; what `prune(plan=...)` applies) or "bernoulli"
            (method='random' only: each weight pruned independently with prob. `fraction`).
        tighten: law='trained', method='magnitude' only: grow the Lemma A plan while
            min(Lemma A, slope decomposition) of the pruned model stays <= eps (docs §7.5);
            the final pruning is certified directly, so the guarantee is unchanged. Costs
            ~26 L certificate evaluations.
        bound: "theorem" (default: the closed-form bounds above) or "sampled" (law uniform /
            gaussian: search on `n_search` sampled networks, certify on `n_cert` fresh ones
            with Clopper-Pearson at confidence 1 - alpha, alpha default 0.05; `seed` fixes
            the draws; a statistical guarantee, docs §6b, `theory.sampled.sampled_plan`).
        data: law='data' only: (search_data, certify_data), two disjoint i.i.d. samples, each a
            float tensor of inputs or (inputs, labels). A single (inputs, labels) pair is
            refused (split it yourself); views sharing inputs are refused.
        seed: law='data' with method='random': the seed of the mask searched and certified,
            recorded as `Plan.seed`, which `prune(model, plan=p)` uses when given no seed.

    Returns:
        A `Plan`: per-layer counts, fractions, thresholds (magnitude: the high-probability upper
        bound on the threshold), eps/delta shares and ||Delta|| bounds.

    Raises:
        ValueError: invalid eps, delta, radius, method, law, split or sampling.
    """
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be > 0 and finite, got {eps!r}")
    _check_common(delta, radius, method, law, sampling)
    _check_choice("split", split, SPLITS)
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be > 0 and finite, got {scale!r}")
    _check_choice("bound", bound, BOUNDS)
    if bound == "sampled" and (law not in ("uniform", "gaussian") or tighten):
        raise ValueError(
            f"bound='sampled' needs law 'uniform' or 'gaussian' and tighten=False, "
            f"got law={law!r}, tighten={tighten!r}"
        )
    if law == "data":
        return _data_plan(
            target,
            eps,
            delta,
            method=method,
            radius=radius,
            data=data,
            alpha=alpha,
            input_shape=input_shape,
            seed=seed,
        )
    if bound == "sampled":
        theorem = plan(
            target, eps, delta, method=method, law=law, radius=radius, split=split,
            scale=scale, input_shape=input_shape, sampling=sampling,
        )  # fmt: skip
        return sampled_plan(
            theorem, seed=seed, n_search=n_search, n_cert=n_cert,
            alpha=0.05 if alpha is None else alpha,
        ).plan  # fmt: skip
    if tighten and not (law == "trained" and method == "magnitude"):
        raise ValueError(
            f"tighten=True needs law='trained' and method='magnitude', got {law!r}/{method!r}"
        )
    tgt = resolve(target, input_shape)
    deltas = _deltas(tgt.specs, delta)
    orcs = _oracles(tgt, method, law, deltas, scale, sampling)
    if split == "optimized":
        counts = solve_optimized(orcs, lambda c: _propagate(orcs, c, radius, tgt), eps)
    else:
        tot = sum(s.numel for s in tgt.specs)
        shares = (
            [s.numel / tot for s in tgt.specs]
            if split == "params"
            else [1.0 / len(orcs)] * len(orcs)
        )
        counts = solve_budgets(
            orcs, lambda c: _propagate(orcs, c, radius, tgt), eps, shares, tgt.lipschitz
        )
    notes: list[str] = []
    out_scale = None
    if tighten:
        counts, best, out_scale = _tighten(tgt, orcs, counts, eps, radius, input_shape)
        notes.append(
            f"tightened: min(Lemma A, slope decomposition) certifies {best:.4g} <= eps for "
            "these counts; eps_share holds the Lemma A terms, which may sum above eps"
        )
    prop = _propagate(orcs, counts, radius, tgt)
    spent = 0.0 if (law == "trained" and method == "magnitude") else 1.0
    layers = tuple(
        LayerPlan(
            name=o.name,
            count=m,
            fraction=m / o.numel,
            threshold=o.threshold(m),
            eps_share=prop.terms[l],
            delta_share=deltas[l] * spent,
            law=None if law == "trained" else _law_for(s, law, scale),
            norm_bound=o.norm_delta(m),
        )
        for l, (o, m, s) in enumerate(zip(orcs, counts, tgt.specs, strict=True))
    )
    notes += _law_notes(tgt, law, scale)
    logger.info("plan: counts %s, certified gap %.4g <= eps %.4g", counts, prop.gap, eps)
    return Plan(
        method=cast(Method, method),
        law=cast(LawName, law),
        eps=eps,
        delta=delta,
        radius=float(radius),
        layers=layers,
        specs=tgt.specs,
        output_scale=prop.output_scale if out_scale is None else min(out_scale, prop.output_scale),
        sampling="bernoulli" if sampling == "bernoulli" else "count",
        split=split,
        notes=tuple(notes),
        activation="relu" if tgt.relu_chain else "other",
    )


def bound(
    target: object,
    amounts: Sequence[float] | Mapping[str, int] | Mapping[str, torch.Tensor],
    delta: float,
    *,
    method: str = "magnitude",
    law: str = "uniform",
    radius: float = 1.0,
    scale: float | None = None,
    input_shape: tuple[int, ...] | None = None,
    sampling: str = "count",
) -> BoundResult:
    """The inverse of `plan`: the certified eps for a given per-layer pruning, w.p. >= 1 - delta.

    `amounts`: per-layer fractions (sequence, in layer order), or {layer name: count}, or
    {layer name: bool keep-mask} (the count is the number of False entries). delta is shared
    equally across layers (docs §6).
    """
    _check_common(delta, radius, method, law, sampling)
    if law == "data":
        raise ValueError("bound: law must be one of ['uniform', 'gaussian', 'trained'], got 'data'")
    tgt = resolve(target, input_shape)
    counts = _counts_from(tgt.specs, amounts)
    deltas = _deltas(tgt.specs, delta)
    orcs = _oracles(tgt, method, law, deltas, scale, sampling)
    prop = _propagate(orcs, counts, radius, tgt)
    return BoundResult(
        eps=prop.gap,
        delta=delta,
        counts=tuple(counts),
        norm_w=tuple(o.norm_w() for o in orcs),
        norm_kept=tuple(o.norm_kept(m) for o, m in zip(orcs, counts, strict=True)),
        norm_delta=tuple(o.norm_delta(m) for o, m in zip(orcs, counts, strict=True)),
        bias_norms=tuple(o.norm_b() for o in orcs),
        terms=prop.terms,
        output_scale=prop.output_scale,
    )


def _tighten(
    tgt: Target,
    orcs: Sequence[Oracle],
    counts: Sequence[int],
    eps: float,
    radius: float,
    input_shape: tuple[int, ...] | None,
) -> tuple[list[int], float, float | None]:
    """Grow trained magnitude counts while min(Lemma A, relax) <= eps (docs §7.5).

    Each candidate pruning is applied to a copy of the model with `prunebound.prune(counts=)`
    (exactly what `prune(plan=...)` will do) and certified; only certified candidates are kept,
    so the result is valid whatever the search does. Search: a common fraction for all layers
    (bisection), then each layer, largest first, by bisection given the others.
    Returns (counts, certified gap, output scale bound).
    """
    import copy

    from prunebound.pruning import prune as apply_prune

    model = tgt.model
    assert model is not None
    names = [s.name for s in tgt.specs]
    numels = [s.numel for s in tgt.specs]
    base = copy.deepcopy(model)
    pb_reset(base)
    cache: dict[tuple[int, ...], tuple[float, float]] = {}

    def cert(c: Sequence[int]) -> tuple[float, float]:
        key = tuple(c)
        if key not in cache:
            lemma = _propagate(orcs, c, radius, tgt)
            trial = copy.deepcopy(base)
            apply_prune(trial, "magnitude", counts=dict(zip(names, c, strict=True)))
            with torch.no_grad():
                rel = relax_bound(extract(trial, input_shape), radius, per_step=False)
            cache[key] = (min(lemma.gap, rel.bound), min(lemma.output_scale, rel.output_scale))
        return cache[key]

    def ok(c: Sequence[int]) -> bool:
        return cert(c)[0] <= eps

    cur = list(counts)
    if not ok(cur):  # Lemma A alone certified it; relax can only lower the min
        return cur, cert(cur)[0], None

    for _ in range(2):  # two sweeps over the layers, largest first
        for l in sorted(range(len(cur)), key=lambda i: -numels[i]):
            a, b = cur[l], numels[l]
            if ok([*cur[:l], b, *cur[l + 1 :]]):
                cur[l] = b
                continue
            for _ in range(12):
                if b - a <= 1:
                    break
                mid = (a + b) // 2
                a, b = (mid, b) if ok([*cur[:l], mid, *cur[l + 1 :]]) else (a, mid)
            cur[l] = a
    gap, scale = cert(cur)
    return cur, gap, scale


def _counts_from(specs: Sequence[LayerSpec], amounts: object) -> list[int]:
    if isinstance(amounts, Mapping):
        names = {s.name for s in specs}
        unknown = sorted(set(amounts) - names)
        if unknown:
            raise ValueError(f"amounts: unknown layers {unknown}, allowed {sorted(names)}")
        out = []
        for s in specs:
            v = amounts.get(s.name, 0)
            m = int((~v.bool()).sum()) if isinstance(v, torch.Tensor) else v
            if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= s.numel:
                raise ValueError(
                    f"amounts[{s.name!r}] must be a count in [0, {s.numel}], got {m!r}"
                )
            out.append(m)
        return out
    if isinstance(amounts, Sequence) and len(amounts) == len(specs):
        out = []
        for s, f in zip(specs, amounts, strict=True):
            if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= f <= 1.0:
                raise ValueError(f"fraction for layer {s.name!r} must be in [0, 1], got {f!r}")
            out.append(round(f * s.numel))
        return out
    raise ValueError(
        f"amounts must be {len(specs)} fractions or a mapping layer -> count/mask, got {amounts!r}"
    )


def _law_notes(tgt: Target, law: str, scale: float | None) -> list[str]:
    """KS test of each layer's weights against the law the plan assumes (its scale), when a
    trained model is planned a priori (`assumptions.check_law`; docs/theory.md §5)."""
    if tgt.model is None or law not in ("uniform", "gaussian"):
        return []
    notes, failed = [], []
    level = LAW_CHECK_LEVEL / len(tgt.specs)  # Bonferroni: the whole model at LAW_CHECK_LEVEL
    for spec in tgt.specs:
        w, _ = _layer_weights(tgt.model, spec.name)
        lw = _law_for(spec, law, scale)
        chk = check_law(w, lw.name, scale=lw.scale, alpha=level, name=spec.name)
        if not chk.passed:
            failed.append(spec.name)
            notes.append(
                f"the probabilistic guarantee does not apply to layer {spec.name}: its weights "
                f"are not {lw.name} i.i.d. (KS p={chk.p_value:.3g} < {level:.3g}); the "
                "deterministic certificate (certify) still does"
            )
    if notes:
        warnings.warn(
            f"plan(law={law!r}) assumes i.i.d. {law} weights, but layers "
            f"{failed} of this model fail the law check (a "
            "trained model?): the plan's guarantee is void for it. Use law='trained' "
            "(deterministic, from the actual weights) or theory.data_certificate / "
            "theory.search_data_plan (held-out data) instead",
            UserWarning,
            stacklevel=3,
        )
    return notes


def _data_plan(
    target: object,
    eps: float,
    delta: float,
    *,
    method: str,
    radius: float,
    data: object,
    alpha: float | None,
    input_shape: tuple[int, ...] | None,
    seed: int = 0,
) -> Plan:
    """law='data': T1's `search_data_plan` on (search, certify) splits, wrapped as a Plan (§5).

    The guarantee is then P_x(||f(x) - F(x)|| > eps) <= alpha over the data distribution, with
    confidence 1 - delta (Clopper-Pearson on the certify split), not a sup over the ball.
    """
    if not isinstance(target, torch.nn.Module):
        raise ValueError(f"law='data' needs an nn.Module target, got {type(target).__name__}")
    search, certify_split = _data_splits(data)
    if alpha is None or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) for law='data', got {alpha!r}")
    counts, cert = search_data_plan(
        target, search, certify_split, eps, delta, alpha, method=method, seed=seed
    )
    tgt = resolve(target, input_shape)
    note = (
        f"data plan: P_x(||f(x) - F(x)|| > {eps:.4g}) <= {cert.exceed_upper:.4g} "
        f"(Clopper-Pearson, confidence {1 - delta:.4g}) on {cert.n} held-out inputs; "
        "not a sup over the ball"
    )
    if cert.exceed_upper > alpha:
        # the certify split rejects the searched pruning; trying smaller ones on the same split
        # would select on it (no longer a valid test), so fall back to pruning nothing (gap 0)
        note = (
            f"data plan: certification FAILED: the Clopper-Pearson upper limit "
            f"{cert.exceed_upper:.4g} of P_x(||f(x) - F(x)|| > {eps:.4g}) on {cert.n} held-out "
            f"inputs exceeds alpha = {alpha:.4g} for the searched counts "
            f"{ {k: v for k, v in counts.items() if v} }; this plan prunes nothing"
        )
        logger.warning(note)
        counts = dict.fromkeys(counts, 0)
    layers = tuple(
        LayerPlan(
            name=s.name,
            count=counts.get(s.name, 0),
            fraction=counts.get(s.name, 0) / s.numel,
            threshold=None,
            eps_share=0.0,
            delta_share=0.0,
        )
        for s in tgt.specs
    )
    return Plan(
        method=cast(Method, method),
        law="data",
        eps=eps,
        delta=delta,
        radius=float(radius),
        layers=layers,
        specs=tgt.specs,
        output_scale=0.0,
        split="data",
        notes=(note,),
        seed=seed if method == "random" else None,  # prune(plan=p) redraws this exact mask
        activation="relu" if tgt.relu_chain else "other",
    )


def _data_splits(data: object) -> tuple[Any, Any]:
    """data=(search_data, certify_data), each inputs or (inputs, labels); refuse (x, y)."""
    form = (
        "law='data' needs data=(search_data, certify_data): two disjoint i.i.d. samples, each "
        "a float tensor of inputs or a pair (inputs, labels), e.g. "
        "data=((x[:n], y[:n]), (x[n:], y[n:]))"
    )
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError(f"{form}; got {data!r:.60}")
    parts = []
    for which, part in zip(("search_data", "certify_data"), data, strict=True):
        x = part[0] if isinstance(part, tuple | list) and len(part) == 2 else part
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{form}; {which} is a {type(part).__name__}")
        if not (x.is_floating_point() or x.is_complex()):
            hint = (
                " (this looks like data=(inputs, labels): split it into two samples)"
                if which == "certify_data"
                else ""
            )
            raise ValueError(f"{form}; {which} inputs have dtype {x.dtype}{hint}")
        parts.append(x)
    if parts[0].shape[1:] != parts[1].shape[1:]:
        raise ValueError(
            f"{form}; search and certify inputs differ in sample shape: "
            f"{tuple(parts[0].shape[1:])} vs {tuple(parts[1].shape[1:])} "
            "(data=(inputs, targets)? split it into two samples)"
        )
    return (tuple(data[0]) if isinstance(data[0], list) else data[0]), (
        tuple(data[1]) if isinstance(data[1], list) else data[1]
    )
