"""Coupled output units: channels tied across layers by the model's dataflow.

A residual add ties channel j of every conv feeding it; a depthwise conv ties its input channel
to its output channel; a BatchNorm entry belongs to the channel before it. Such a set of tied
channels is one *unit group*: it can be removed from the model only as a whole, and a
structured prune that wants a smaller model must prune it as a whole. The dataflow is traced
with Torch-Pruning's `DependencyGraph` (the optional `structured` extra; see docs/design.md for
why a kept library rather than a hand-written fx walk).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunebound._check import Seed, as_generator
from prunebound._masks import (
    alive_units,
    effective_weight,
    mask_module,
    original_weight,
    remove,
    set_mask,
    unit_view,
)
from prunebound.calibration import batches, model_output, output_grads
from prunebound.layer_types import CONV_TRANSPOSE, NORMS, is_transposed_linear
from prunebound.methods import Method, require_data, unit_taylor_scores

try:  # optional: pip install "prunebound[structured]"
    import torch_pruning as tp
except ImportError:  # pragma: no cover - exercised only without the extra
    tp = None

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
#: layers whose output channels the tracer can remove (weight rows; depthwise convs included)
TRACED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def require_torch_pruning() -> None:
    """Raise ImportError with the install hint when Torch-Pruning is missing."""
    if tp is None:  # pragma: no cover
        raise ImportError(
            "structured tracing needs Torch-Pruning: pip install 'prunebound[structured]'"
        )


def as_inputs(example_inputs: object) -> tuple[torch.Tensor, ...]:
    """`example_inputs` as a tuple of finite tensors, or TypeError/ValueError saying why not."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(
            "example_inputs must be a tensor (or a tuple of tensors) the model runs on, "
            f"got {type(example_inputs).__name__}"
        )
    for t in inputs:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError("example_inputs contain NaN or Inf")
    return inputs


def run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`model(*inputs)` without gradients, or ValueError naming the failure and the shapes."""
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as e:  # any failure: wrong shape, dtype, device
        shapes = [tuple(t.shape) for t in inputs]
        raise ValueError(
            f"model cannot run on example_inputs of shape {shapes}: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return one tensor, got {type(out).__name__}")
    return out


def baked_eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every prunebound mask baked into plain tensors."""
    return remove(copy.deepcopy(model)).eval()


def out_channel_fn(module: nn.Module) -> object:
    """Torch-Pruning's out-channel pruning function for a traced layer."""
    assert tp is not None
    return (
        tp.prune_linear_out_channels
        if isinstance(module, nn.Linear)
        else tp.prune_conv_out_channels
    )


def is_traced(module: nn.Module) -> bool:
    """Whether `module` is a layer whose output channels the tracer removes."""
    return (
        isinstance(module, TRACED)
        and not isinstance(module, CONV_TRANSPOSE)
        and not is_transposed_linear(module)
    )


def dependency_graph(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> object:
    """Torch-Pruning's DependencyGraph of `model` (which must be mask-free and in eval mode)."""
    require_torch_pruning()
    assert tp is not None
    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=inputs if len(inputs) > 1 else inputs[0]
        )
    except Exception as e:
        raise ValueError(
            f"cannot trace the model's channel dependencies: {type(e).__name__}: {e}"
        ) from e


@dataclass(frozen=True)
class UnitGroup:
    """Output channels tied together: unit u is channel `producers[name][u]` of each producer.

    `norms` maps each BatchNorm name to its entry for each unit; `consumers` each Linear/Conv
    that reads the group (groups=1) to the input columns of each unit (several per unit after a
    Flatten).
    """

    producers: dict[str, tuple[int, ...]]
    norms: dict[str, tuple[int, ...]]
    consumers: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(next(iter(self.producers.values())))


def _per_unit(idxs: Sequence[int], roots: Sequence[int], size: int) -> tuple[int, ...] | None:
    """Channel of each root unit (None unless one channel per unit)."""
    by_root: dict[int, int] = {}
    for i, r in zip(idxs, roots, strict=True):
        if r in by_root and by_root[r] != i:
            return None
        by_root[r] = int(i)
    return tuple(by_root[r] for r in range(size)) if len(by_root) == size else None


def unit_groups(model: nn.Module, example_inputs: object) -> list[UnitGroup]:
    """The coupled output-channel groups of every traced layer of `model`, in module order.

    Each Linear/Conv belongs to exactly one group as a producer (a plain chain gives one group
    per layer). Groups the tracer maps irregularly (a producer with several channels per unit)
    are left out.
    """
    inputs = as_inputs(example_inputs)
    work = baked_eval_copy(model)
    run(work, inputs)
    graph = dependency_graph(work, inputs)
    names = {id(m): n for n, m in work.named_modules()}
    seen: set[str] = set()
    groups: list[UnitGroup] = []
    for name, m in work.named_modules():
        if not is_traced(m) or name in seen:
            continue
        size = int(m.weight.shape[0])
        group = graph.get_pruning_group(m, out_channel_fn(m), list(range(size)))  # type: ignore[attr-defined]
        producers: dict[str, tuple[int, ...]] = {}
        norms: dict[str, tuple[int, ...]] = {}
        consumers: dict[str, tuple[tuple[int, ...], ...]] = {}
        ok = True
        for item in group.items:
            target = item.dep.target.module
            tname = names.get(id(target))
            if tname is None:
                continue
            out = graph.is_out_channel_pruning_fn(item.dep.handler)  # type: ignore[attr-defined]
            if isinstance(target, NORMS) or (is_traced(target) and out):
                per = _per_unit(item.idxs, item.root_idxs, size)
                if per is None:
                    ok = False
                    break
                (norms if isinstance(target, NORMS) else producers)[tname] = per
            elif is_traced(target) and getattr(target, "groups", 1) == 1:
                cols: list[list[int]] = [[] for _ in range(size)]
                for i, r in zip(item.idxs, item.root_idxs, strict=True):
                    if r is not None:
                        cols[r].append(int(i))
                consumers[tname] = tuple(tuple(c) for c in cols)
        seen.update(producers)
        if ok and name in producers:
            groups.append(UnitGroup(producers, norms, consumers))
    return groups


def mask_entries(module: nn.Module, tensor: str, keep: torch.Tensor) -> None:
    """Install or narrow a prunebound `Mask` on `module.<tensor>` (a bias, a BatchNorm entry):
    entries already masked stay masked."""
    if getattr(module, tensor, None) is None:
        return
    mm = mask_module(module, tensor)
    if mm is not None:
        keep = mm.mask & keep.to(mm.mask.device)
    set_mask(module, keep, tensor=tensor)


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
    for gr in groups:
        total = torch.zeros(gr.size, dtype=torch.float64)
        for n, per in (*gr.producers.items(), *gr.norms.items()):
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
