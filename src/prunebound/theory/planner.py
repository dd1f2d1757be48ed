"""Probabilistic pruning plans: the largest per-layer counts whose certified gap is <= eps.

`plan` solves, `bound` evaluates, for weights drawn from a law (a "prior" plan) or the model's
own weights (a "trained" plan). Both use Lemma A (docs/theory.md §2, `lemma_a.propagate`) with
the per-layer norm oracles of `theory.oracles` and a union bound over every failure event
(docs/theory.md §6). The other planners have their own homes and guarantees: held-out data
(`theory.heldout_plan.data_plan`) and sampled networks (`check.sampled.sampled_plan`).
INFERRED: bounds derived in the setting of Qian & Klabjan (2021), not the paper's theorems or
constants.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, get_args

import torch

from prunebound._check import check_choice, check_float, is_float, is_int
from prunebound._masks import original_weight
from prunebound.theory.assumptions import check_law
from prunebound.theory.budget import solve_budgets, solve_optimized
from prunebound.theory.lemma_a import Propagation, propagate
from prunebound.theory.oracles import Oracle, PriorLayer, TrainedLayer
from prunebound.theory.resolve import Target, resolve_target
from prunebound.theory.tighten import tighten_counts
from prunebound.theory.values import (
    BudgetSplit,
    Law,
    LayerPlan,
    LayerSpec,
    Plan,
    PlanLaw,
    PlanMethod,
    Sampling,
)

logger = logging.getLogger(__name__)

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

    def __str__(self) -> str:
        return (
            f"BoundResult: gap <= {self.eps:.6g} w.p. >= {1 - self.delta:.4g} "
            f"(counts {list(self.counts)}, sup ||F|| <= {self.output_scale:.6g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_common(delta: float, radius: float, method: str, law: object, sampling: str) -> PlanLaw:
    """Checks the arguments `plan` and `bound` share; returns the law's name."""
    check_float("delta", delta, 0.0, 1.0, closed="neither", ints=False)
    check_float("radius", radius, 0.0, math.inf, closed="neither", ints=True)
    check_choice("method", method, get_args(PlanMethod))
    if isinstance(law, Law):
        check_float("law.scale", law.scale, 0.0, math.inf, closed="neither", ints=True)
        name: PlanLaw = law.name
    else:
        name = check_choice("law", law, get_args(PlanLaw))  # type: ignore[arg-type]
    check_choice("sampling", sampling, get_args(Sampling))
    if sampling == "bernoulli" and method != "random":
        raise ValueError(f"sampling='bernoulli' needs method='random', got method={method!r}")
    if method == "neuron" and name == "trained":
        raise ValueError(
            "method='neuron' plans need a prior law ('uniform', 'gaussian' or a Law); for the "
            "weights in hand prune the neurons and use theory.certify on the pruned model"
        )
    return name


def _law_for(spec: LayerSpec, law: PlanLaw | Law) -> Law:
    """The i.i.d. law of one layer: a `Law` as given, else its name with PyTorch's default
    scale 1/sqrt(fan_in)."""
    if isinstance(law, Law):
        return law
    return Law("uniform" if law == "uniform" else "gaussian", 1.0 / math.sqrt(spec.fan_in))


def _layer_weights(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    mod = dict(model.named_modules())[name]
    bias = getattr(mod, "bias", None)
    return original_weight(mod), bias if isinstance(bias, torch.Tensor) else None


def _deltas(specs: Sequence[LayerSpec], delta: float) -> list[float]:
    """delta_l = delta / L for every split: bounds depend on delta only through log(1/delta_l),
    so sharing it unevenly gains little, and `bound` stays the exact inverse of `plan` (§6)."""
    return [delta / len(specs)] * len(specs)


def _oracles(
    tgt: Target, method: str, law: PlanLaw | Law, deltas: Sequence[float], sampling: str
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
            if method == "neuron" and spec.kind != "linear":
                raise ValueError(
                    f"method='neuron' plans cover Linear layers only; layer {spec.name!r} is a "
                    f"{spec.kind} layer (filters are not planned yet)"
                )
            out.append(
                PriorLayer(spec, _law_for(spec, law), method, d, bernoulli=bern, nonneg_input=nn_in)
            )
    if method == "neuron":  # keep a neuron in each layer; leave the output layer (logits) alone
        for o in out:
            o.limit = o.units - 1
        out[-1].limit = 0
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
    method: PlanMethod = "magnitude",
    law: PlanLaw | Law = "uniform",
    radius: float = 1.0,
    split: BudgetSplit = "optimized",
    input_shape: tuple[int, ...] | None = None,
    sampling: Sampling = "count",
    tighten: bool = False,
) -> Plan:
    """Per-layer counts to prune with sup_{||x||<=radius} ||f(x) - F(x)|| <= eps w.p. >= 1-delta.

    Args:
        target: widths [n0, ..., nL] (layers named as in `prunebound.models.mlp`), a list of
            LayerSpec, or an nn.Module (shapes from `theory.network.extract`).
        eps: the worst-case output gap allowed, > 0.
        delta: failure probability over the weights (and mask), in (0, 1). Ignored (0 spent)
            for law='trained' with magnitude pruning, which is deterministic.
        method: "magnitude" (the m smallest |w| per layer), "random" (uniform m-subset) or
            "neuron" (the m rows of smallest L2 norm of each Linear layer but the output
            layer, what `prune(model, "neuron", counts=...)` removes; counts are neurons;
            prior laws only; docs §4.5).
        law: "uniform" U[-s, s] / "gaussian" N(0, s^2) i.i.d. weights and biases with PyTorch's
            default s = 1/sqrt(fan_in) per layer, or a `Law(name, scale)` for one scale in
            every layer (a "prior" plan); or "trained": the model's own weights (docs §5).
        split: how eps is shared across layers: "optimized" (default; maximise the total
            count), "equal" or "params" (proportional to parameter counts). docs §6.
        input_shape: one sample's shape, for conv models.
        sampling: "count" (exact counts; what `prune(plan=...)` applies) or "bernoulli"
            (method='random' only: each weight pruned independently with prob. `fraction`).
        tighten: law='trained', method='magnitude' only: grow the Lemma A plan while
            min(Lemma A, slope decomposition) of the pruned model stays <= eps (docs §7.5,
            `theory.tighten`); the final pruning is certified directly, so the guarantee is
            unchanged. Costs ~26 L certificate evaluations.

    Returns:
        A `Plan` (guarantee "prior" or "trained"): per-layer counts, fractions, thresholds
        (magnitude: the high-probability upper bound on the threshold), eps/delta shares and
        ||Delta|| bounds.

    Raises:
        ValueError: invalid eps, delta, radius, method, law, split or sampling.
    """
    check_float("eps", eps, 0.0, math.inf, closed="neither", ints=True)
    law_name = _check_common(delta, radius, method, law, sampling)
    check_choice("split", split, get_args(BudgetSplit))
    if tighten and not (law == "trained" and method == "magnitude"):
        raise ValueError(
            f"tighten=True needs law='trained' and method='magnitude', got {law!r}/{method!r}"
        )
    tgt = resolve_target(target, input_shape)
    deltas = _deltas(tgt.specs, delta)
    orcs = _oracles(tgt, method, law, deltas, sampling)

    def lemma(c: Sequence[int]) -> Propagation:
        return _propagate(orcs, c, radius, tgt)

    if split == "optimized":
        counts = solve_optimized(orcs, lemma, eps)
    else:
        tot = sum(s.numel for s in tgt.specs)
        shares = (
            [s.numel / tot for s in tgt.specs]
            if split == "params"
            else [1.0 / len(orcs)] * len(orcs)
        )
        counts = solve_budgets(orcs, lemma, eps, shares, tgt.lipschitz)
    notes: list[str] = []
    out_scale = None
    if tighten:
        counts, best, out_scale = tighten_counts(tgt, lemma, counts, eps, radius, input_shape)
        notes.append(
            f"tightened: min(Lemma A, slope decomposition) certifies {best:.4g} <= eps for "
            "these counts; eps_share holds the Lemma A terms, which may sum above eps"
        )
    prop = lemma(counts)
    trained = law_name == "trained"
    spent = 0.0 if (trained and method == "magnitude") else 1.0
    layers = tuple(
        LayerPlan(
            name=o.name,
            count=m,
            fraction=m / o.units,
            threshold=o.threshold(m),
            eps_share=prop.terms[l],
            delta_share=deltas[l] * spent,
            law=None if trained else _law_for(s, law),
            norm_delta=o.norm_delta(m),
        )
        for l, (o, m, s) in enumerate(zip(orcs, counts, tgt.specs, strict=True))
    )
    notes += _law_notes(tgt, law)
    logger.info("plan: counts %s, certified gap %.4g <= eps %.4g", counts, prop.gap, eps)
    return Plan(
        method=method,
        law=law_name,
        eps=float(eps),
        delta=delta,
        radius=float(radius),
        layers=layers,
        specs=tgt.specs,
        output_scale=prop.output_scale if out_scale is None else min(out_scale, prop.output_scale),
        sampling=sampling,
        split=split,
        notes=tuple(notes),
        activation="relu" if tgt.relu_chain else "other",
        guarantee="trained" if trained else "prior",
    )


def bound(
    target: object,
    amounts: Sequence[float] | Mapping[str, int] | Mapping[str, torch.Tensor],
    delta: float,
    *,
    method: PlanMethod = "magnitude",
    law: PlanLaw | Law = "uniform",
    radius: float = 1.0,
    input_shape: tuple[int, ...] | None = None,
    sampling: Sampling = "count",
) -> BoundResult:
    """The inverse of `plan`: the certified eps for a given per-layer pruning, w.p. >= 1 - delta.

    `amounts`: per-layer fractions (sequence, in layer order), or {layer name: count}, or
    {layer name: bool keep-mask} (the count is the number of False entries). delta is shared
    equally across layers (docs §6).
    """
    _check_common(delta, radius, method, law, sampling)
    tgt = resolve_target(target, input_shape)
    orcs = _oracles(tgt, method, law, _deltas(tgt.specs, delta), sampling)
    counts = _counts_from(tgt.specs, amounts, [o.units for o in orcs], rows=method == "neuron")
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


def _pruned(mask: torch.Tensor, name: str, rows: bool) -> int:
    """Pruned weights of a keep-mask, or for `rows` its whole pruned rows (ValueError if some
    row is only partly pruned: not a neuron pruning)."""
    drop = ~mask.bool()
    if not rows:
        return int(drop.sum())
    whole = drop.flatten(1).all(1)
    if bool((drop.flatten(1).any(1) & ~whole).any()):
        raise ValueError(f"amounts[{name!r}]: a neuron plan's mask must prune whole rows")
    return int(whole.sum())


def _counts_from(
    specs: Sequence[LayerSpec], amounts: object, units: Sequence[int], *, rows: bool
) -> list[int]:
    if isinstance(amounts, Mapping):
        names = {s.name for s in specs}
        unknown = sorted(set(amounts) - names)
        if unknown:
            raise ValueError(f"amounts: unknown layers {unknown}, allowed {sorted(names)}")
        out = []
        for s, n in zip(specs, units, strict=True):
            v = amounts.get(s.name, 0)
            m = _pruned(v, s.name, rows) if isinstance(v, torch.Tensor) else v
            if not is_int(m) or not 0 <= m <= n:
                raise ValueError(f"amounts[{s.name!r}] must be a count in [0, {n}], got {m!r}")
            out.append(m)
        return out
    if isinstance(amounts, Sequence) and len(amounts) == len(specs):
        out = []
        for s, f, n in zip(specs, amounts, units, strict=True):
            if not is_float(f, ints=True) or not 0.0 <= f <= 1.0:
                raise ValueError(f"fraction for layer {s.name!r} must be in [0, 1], got {f!r}")
            out.append(round(f * n))
        return out
    raise ValueError(
        f"amounts must be {len(specs)} fractions or a mapping layer -> count/mask, got {amounts!r}"
    )


def _law_notes(tgt: Target, law: PlanLaw | Law) -> list[str]:
    """KS test of each layer's weights against the law the plan assumes (its scale), when a
    trained model is planned a priori (`assumptions.check_law`; docs/theory.md §5)."""
    if tgt.model is None or law == "trained":
        return []
    notes, failed = [], []
    level = LAW_CHECK_LEVEL / len(tgt.specs)  # Bonferroni: the whole model at LAW_CHECK_LEVEL
    for spec in tgt.specs:
        w, _ = _layer_weights(tgt.model, spec.name)
        lw = _law_for(spec, law)
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
            f"plan(law={lw.name!r}) assumes i.i.d. {lw.name} weights, but layers "
            f"{failed} of this model fail the law check (a "
            "trained model?): the plan's guarantee is void for it. Use law='trained' "
            "(deterministic, from the actual weights) or theory.data_certificate / "
            "theory.data_plan (held-out data) instead",
            UserWarning,
            stacklevel=3,
        )
    return notes
