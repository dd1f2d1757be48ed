"""Pruning coupled unit groups: their scores and their whole-unit masks.

`prune(model, "filter" | "neuron" | ..., amount, coupled=True, example_inputs=...)` lands here:
the groups come from `prunebound.coupling.unit_groups` (Torch-Pruning's trace); each unit is
scored by its rows' norms, by the group norm of everything it owns (`group_norms`: producer
rows, consumer columns, BatchNorm scales) or by the group Taylor importance (`unit_taylor`),
and the lowest are masked whole: weight rows, biases and BatchNorm entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from prunebound._check import Seed, as_generator
from prunebound._masks import (
    alive_units,
    effective_weight,
    mask_module,
    original_weight,
    set_mask,
    unit_view,
)
from prunebound.calibration import batches, model_output, output_grads
from prunebound.coupling import UnitGroup, baked_eval_copy, mask_entries, unit_groups
from prunebound.methods import Method, require_data, unit_taylor_scores


def _channels(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Per example and output channel, the sum over positions of `out` (channels last for a
    Linear, dim 1 otherwise)."""
    o = out.movedim(-1, 1) if isinstance(module, nn.Linear) else out
    o = o if o.dim() > 1 else o.unsqueeze(0)
    return o.flatten(2).sum(2) if o.dim() > 2 else o


def unit_taylor(
    model: nn.Module, groups: Sequence[UnitGroup], data: object, method: str
) -> list[torch.Tensor]:
    """Group first-order Taylor importance of every unit of `groups` (Molchanov et al. 2019):
    |sum over the unit's parameters p (its weight rows and biases in every producer, its
    BatchNorm gammas and betas) of p * dL/dp|, L the cross-entropy summed over `data` (against
    the labels, or the model's own predictions without). Each layer is affine in its own
    parameters, so a member's share is the sum over positions of out * dL/dout at the unit's
    channel: one forward and one backward per batch, on a masked-baked eval copy (the model is
    not touched). The first-order estimate of the loss change when the unit is removed."""
    work = baked_eval_copy(model)
    mods = dict(work.named_modules())
    names = sorted({n for gr in groups for n in (*gr.producers, *gr.norms)})
    outs: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    sums = {n: torch.zeros(0, dtype=torch.float64) for n in names}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def keep(mod: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
            if outs[name] is not None:
                raise ValueError(
                    f"method {method!r}: layer {name!r} runs more than once per forward; its "
                    "Taylor scores would mix the calls"
                )
            outs[name] = out
            return out.clone()  # an in-place op downstream (ReLU(inplace=True)) keeps `out`

        return keep

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    try:
        for x, y in batches(data):
            x = x.to(device)
            if x.is_floating_point():
                x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                grads = output_grads(model_output(work(x)), y, outs, method)
            for n, gr in grads.items():
                share = _channels(mods[n], (outs[n] * gr).detach().double()).sum(0).cpu()  # type: ignore[operator]
                sums[n] = share if sums[n].numel() == 0 else sums[n] + share
                outs[n] = None
            if not all(bool(torch.isfinite(sums[n]).all()) for n in names):
                raise ValueError(f"method {method!r}: gradients contain NaN or Inf")
    finally:
        for h in handles:
            h.remove()
    scores = []
    for group in groups:
        total = torch.zeros(group.size, dtype=torch.float64)
        for n, per in (*group.producers.items(), *group.norms.items()):
            total += sums[n][torch.tensor(per, dtype=torch.long)]
        scores.append(total.abs())
    return scores


def group_norms(model: nn.Module, groups: Sequence[UnitGroup]) -> list[torch.Tensor]:
    """Group L2 norm of every unit of `groups`: the root of the summed squares of everything the
    unit owns, as the layers compute with it (masked entries count zero): its weight rows in
    every producer, its input columns in every consumer, its BatchNorm scales (Torch-Pruning's
    `GroupMagnitudeImportance(p=2)`, up to its per-group mean normalisation). A unit whose
    outgoing weights are small scores low however large its incoming ones."""
    mods = dict(model.named_modules())
    scores = []
    for gr in groups:
        total = torch.zeros(gr.size, dtype=torch.float64)
        for name, per in gr.producers.items():
            w = unit_view(mods[name], effective_weight(mods[name]).detach(), "row")
            total += w.double().flatten(1).pow(2).sum(1).cpu()[torch.tensor(per)]
        for name, cols in gr.consumers.items():
            sq = effective_weight(mods[name]).detach().double().pow(2).movedim(1, 0).flatten(1)
            sq = sq.sum(1).cpu()
            total += torch.stack([sq[list(c)].sum() for c in cols])
        for name, per in gr.norms.items():
            gamma = getattr(mods[name], "weight", None)
            if isinstance(gamma, torch.Tensor):
                total += gamma.detach().double().pow(2).cpu()[torch.tensor(per)]
        scores.append(total.sqrt())
    return scores


def _group_scores(
    group: UnitGroup,
    layers: dict[str, nn.Module],
    method: Method,
    g: torch.Generator,
    given: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, alive flag) of each unit of `group`: `given` unit scores, or the members' row
    scores combined (summed for an L1 method, root of the summed squares otherwise); a unit is
    alive while any member row is."""
    assert method.scores is not None
    total = torch.zeros(group.size, dtype=torch.float64)
    alive = torch.zeros(group.size, dtype=torch.bool)
    for name, per in group.producers.items():
        m = layers[name]
        idx = torch.tensor(per, dtype=torch.long)
        a = alive_units(m, "row")
        alive |= True if a is None else a[idx.to(a.device)].cpu()
        if given is not None:
            continue
        w = original_weight(m).detach()
        mm = mask_module(m)
        if mm is not None:
            w = w * mm.mask
        s = method.scores(unit_view(m, w, "row"), g).detach().double().reshape(-1)
        s = s[idx.to(s.device)].cpu()
        total += s if method.name.endswith("_l1") else s * s
    score = total if method.name.endswith("_l1") else total.sqrt()
    score = given if given is not None else score
    return score.masked_fill(~alive, math.inf), alive


def prune_coupled(
    model: nn.Module,
    method: Method,
    amount: float,
    selected: dict[str, nn.Module],
    *,
    scope: str,
    seed: Seed,
    example_inputs: object,
    data: object = None,
    counts: dict[str, int] | None = None,
) -> None:
    """Prune `amount` of the alive coupled units (per group, or globally) of the groups whose
    producers are all `selected`, masking each pruned unit whole: its weight rows, biases and
    BatchNorm entries. A unit-Taylor method ("filter_taylor", "neuron_taylor") scores each
    unit with `unit_taylor` on the calibration `data`. Validates (traces, scores) before it
    changes anything. `counts` (layer scope): units to prune in the group of each named
    producer instead of `amount`."""
    require_data(method, data)
    if method.needs and method.scores is not unit_taylor_scores:
        raise ValueError(
            f"coupled=True scores data-aware units with the unit Taylor methods "
            f"('filter_taylor', 'neuron_taylor') only, got {method.name!r}"
        )
    groups = [gr for gr in unit_groups(model, example_inputs) if set(gr.producers) <= set(selected)]
    if not groups:
        raise ValueError(
            f"coupled {method.name!r}: no coupled group has all its layers selected "
            f"(selected {sorted(selected)})"
        )
    g = as_generator(seed)
    given: list[torch.Tensor | None] = [None] * len(groups)
    if method.needs:
        given = list(unit_taylor(model, groups, data, method.name))
    elif method.coupled:
        given = list(group_norms(model, groups))
    scored = [
        _group_scores(gr, selected, method, g, s) for gr, s in zip(groups, given, strict=True)
    ]
    alive = [a for _, a in scored]
    if scope == "global":
        flat = torch.cat([s for s, _ in scored])
        k = round(amount * int(sum(int(a.sum()) for a in alive)))
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[torch.sort(flat, stable=True).indices[:k]] = True
        parts = list(torch.split(drop, [gr.size for gr in groups]))
    else:
        parts = []
        for gr, (s, a) in zip(groups, scored, strict=True):
            k = _group_count(gr, int(a.sum()), amount, counts or {})
            drop = torch.zeros(s.numel(), dtype=torch.bool)
            drop[torch.sort(s, stable=True).indices[:k]] = True
            parts.append(drop)
    modules = dict(model.named_modules())
    for gr, drop, a in zip(groups, parts, alive, strict=True):  # now mutate
        dead = drop | ~a
        if not bool(dead.any()):
            continue
        for name, per in gr.producers.items():
            m = modules[name]
            idx = torch.tensor(per, dtype=torch.long)[dead]
            mm = mask_module(m)
            w = original_weight(m)
            keep = mm.mask.clone() if mm is not None else torch.ones_like(w, dtype=torch.bool)
            unit_view(m, keep, "row")[idx.to(keep.device)] = False
            set_mask(m, keep)
            _mask_channels(m, "bias", idx)
        for name, per in gr.norms.items():
            idx = torch.tensor(per, dtype=torch.long)[dead]
            _mask_channels(modules[name], "weight", idx)
            _mask_channels(modules[name], "bias", idx)


def _group_count(group: UnitGroup, alive: int, amount: float, counts: dict[str, int]) -> int:
    """Units to prune in `group`: its producers' entry of `counts`, else round(amount * alive)."""
    given = {counts[n] for n in group.producers if n in counts}
    if len(given) > 1 or any(not isinstance(k, int) or not 0 <= k <= alive for k in given):
        raise ValueError(
            f"counts for the coupled group {sorted(group.producers)}: one integer in "
            f"[0, {alive}] (its surviving units), got {sorted(given)}"
        )
    return given.pop() if given else round(amount * alive)


def _mask_channels(module: nn.Module, tensor: str, idx: torch.Tensor) -> None:
    t = getattr(module, tensor, None)
    if t is None:
        return
    keep = torch.ones(t.shape[0], dtype=torch.bool)
    keep[idx] = False
    mask_entries(module, tensor, keep)
