"""`prune`: validate, score, select an exact count (per layer or globally), then install masks.

One selection routine serves every ranking method and both scopes: find the k-th smallest score
among the surviving units without materialising all scores at once, then prune every unit below
it and, among ties, the first ones in (layer, flat index) order. Deterministic, exact-count, and
lean: a 100M-weight global magnitude prune holds one block of scores at a time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from prunebound._check import Seed, as_generator, check_choice, check_int, finite, is_float
from prunebound._masks import (
    LayerSelector,
    alive_units,
    count_units,
    holders,
    mask_module,
    original_weight,
    prunable_layers,
    set_mask,
    unit_view,
)
from prunebound.coupling import prune_coupled
from prunebound.layer_types import CONV_TRANSPOSE, is_layer, unpruned_weights
from prunebound.methods import Method, get_method
from prunebound.outputs import leave_outputs
from prunebound.plan_layers import PlanLike, plan_counts

_BLOCK = 1 << 21  # elements scored at once (8 MB of float32 scores)
_SAMPLE = 1 << 18  # scores sampled to bracket the k-th smallest


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: look it up once
    return ctypes.CDLL(name) if name else None


def _libc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc only; a no-op elsewhere).

    Streaming over blocks frees the same few MB again and again; glibc keeps such chunks in the
    heap, so without this the resident size grows by hundreds of MB on a 100M-weight model.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _check_amount(amount: object) -> float:
    """A float (Python or numpy, any width) in [0, 1]; ints are refused (no count meaning)."""
    if not is_float(amount):
        raise TypeError(
            f"amount must be a float fraction in [0, 1], got {amount!r} ({type(amount).__name__}); "
            "for exact numbers of weights pass counts={layer: n}"
        )
    value = float(amount)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"amount must be in [0, 1], got {amount!r}")
    return value


def _check_layers(model: nn.Module, layers: dict[str, nn.Module], method: Method) -> dict[str, str]:
    """Validate the selection; return {twin layer: first layer} for weights tied across layers.

    A tied weight is pruned once, with one mask on every layer holding it, and only if all of
    them are selected: masking some of them would leave the others computing with the dense
    weight.
    """
    if not layers:
        skipped = sorted(n for n, m in model.named_modules() if is_layer(m, method.layer_types))
        raise ValueError(
            f"model has no prunable layer for method {method.name!r} "
            f"(types {[t.__name__ for t in method.layer_types]})"
            + (
                f"; embeddings and tied/shared layers {skipped} are pruned only when selected "
                "by exact name or type"
                if skipped
                else ""
            )
        )
    for name, m in layers.items():
        if not is_layer(m, method.layer_types):
            raise ValueError(
                f"method {method.name!r} cannot prune layer {name!r} ({type(m).__name__})"
            )
        if method.unit == "row" and isinstance(m, CONV_TRANSPOSE) and m.groups > 1:
            raise ValueError(  # dim 1 holds out/groups channels per group: no whole filters
                f"method {method.name!r}: layer {name!r} is a grouped {type(m).__name__} "
                f"(groups={m.groups}), whose output channels are not whole rows of its weight; "
                "use an unstructured method or exclude it"
            )
    owners = holders(model)
    first: dict[int, str] = {}
    twins: dict[str, str] = {}
    for name, m in layers.items():
        w = original_weight(m)
        group = owners.get(id(w), [name])
        if len(group) > 1:
            missing = [n for n in group if n not in layers]
            if missing:
                raise ValueError(
                    f"layer {name!r}: its weight is tied/shared with "
                    f"{[n for n in group if n != name]}; pruning some holders would leave the "
                    "others dense. Select all of "
                    f"{group} by name to prune the shared weight once (one mask on all), "
                    "untie it (copy the tensor), or exclude it"
                )
        if id(w) in first:
            twins[name] = first[id(w)]
            continue
        first[id(w)] = name
        if not finite(w.detach()):
            raise ValueError(f"layer {name!r}: weight contains NaN or Inf; refusing to prune")
    return twins


def _scored_blocks(
    layers: list[nn.Module], method: Method, g: torch.Generator
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (layer index, first row, flat scores with pruned units set to +inf), block by block."""
    assert method.scores is not None
    for i, m in enumerate(layers):
        w = unit_view(m, original_weight(m).detach(), method.unit)
        mm = mask_module(m)
        alive = alive_units(m, method.unit)
        rows = w.shape[0]
        step = max(1, _BLOCK // max(1, w[0].numel())) if method.blockwise else rows
        for r0 in range(0, rows, step):
            wb = w[r0 : r0 + step]
            if mm is not None:  # score the effective weight
                wb = wb * unit_view(m, mm.mask, method.unit)[r0 : r0 + step]
            s = method.scores(wb, g).detach().float().reshape(-1)
            if alive is not None:
                s = s.masked_fill(~alive[r0 : r0 + step].reshape(-1), math.inf)
            yield i, r0, s
            del s
    # once per pass, not per layer: trimming returns the freed block buffers to the OS, and
    # every block allocated after a trim page-faults its memory in again (3x slower on GPT-2)
    _libc_trim()


def _sampled_scores(
    module: nn.Module, method: Method, g: torch.Generator, stride: int
) -> torch.Tensor:
    """Scores of every `stride`-th weight of `module` (flat order), pruned ones set to +inf."""
    assert method.scores is not None
    w = original_weight(module).detach().reshape(-1)[::stride]
    mm = mask_module(module)
    keep = mm.mask.reshape(-1)[::stride] if mm is not None else None
    if keep is not None:
        w = w * keep  # score the effective weight
    s = method.scores(w, g).detach().float()
    return s if keep is None else s.masked_fill(~keep, math.inf)


def _kth_smallest(
    layers: list[nn.Module], method: Method, g: torch.Generator, k: int, n: int
) -> tuple[float, int]:
    """Exact k-th smallest score (1-based) among `n` alive units, and how many score below it.

    Two streaming passes: a strided sample brackets the k-th value, then one pass counts the
    scores below the bracket and keeps only those inside it.
    """
    state = g.get_state()
    stride = max(1, n // _SAMPLE)
    if method.elementwise:  # score only the sampled weights
        parts = [_sampled_scores(m, method, g, stride) for m in layers]
    else:
        parts = [
            s[::stride].clone() for _, _, s in _scored_blocks(layers, method, g)
        ]  # no views: they pin blocks
    sample = torch.cat(parts)
    sample = sample[torch.isfinite(sample)].sort().values
    m = sample.numel()
    pos = (k - 1) / max(n - 1, 1) * (m - 1)
    margin = 6 * math.sqrt(m) + 8
    lo = sample[math.floor(pos - margin)].item() if m and pos - margin > 0 else -math.inf
    hi = sample[math.ceil(pos + margin)].item() if m and pos + margin < m - 1 else math.inf
    for _ in range(2):  # second try only if the sampled bracket missed (rare), with a wide bracket
        g.set_state(state)
        below, cands = 0, []
        for _, _, s in _scored_blocks(layers, method, g):
            below += int(torch.count_nonzero(s < lo))
            cands.append(s[(s >= lo) & (s <= hi)])
        c = torch.cat(cands)
        if below < k <= below + c.numel():
            thr = c.kthvalue(k - below).values
            return float(thr), below + int((c < thr).sum())
        lo, hi = (-math.inf, hi) if below >= k else (lo, math.inf)
    raise RuntimeError("internal error: k-th smallest score not bracketed")  # pragma: no cover


def _select(
    layers: list[nn.Module], method: Method, g: torch.Generator, k: int
) -> list[torch.Tensor]:
    """New keep-masks (weight-shaped, composed with the old ones) after pruning the k
    lowest-scored alive units across `layers`; ties go first in (layer, flat index) order."""
    if k > 0:
        n = sum(count_units(m, method.unit)[1] for m in layers)
        state = g.get_state()
        thr, n_below = _kth_smallest(layers, method, g, k, n)
        ties = k - n_below
    keeps = []
    for m in layers:
        mm = mask_module(m)
        w = original_weight(m)
        keeps.append(
            mm.mask.clone()
            if mm is not None
            else torch.ones(w.shape, dtype=torch.bool, device=w.device)
        )
    if k == 0:
        return keeps
    g.set_state(state)
    for i, r0, s in _scored_blocks(layers, method, g):
        p = s < thr
        if ties > 0:
            eq = (s == thr).nonzero().flatten()[:ties]
            p[eq] = True
            ties -= eq.numel()
        p = p.to(keeps[i].device)
        if method.unit == "row":  # p: one flag per row of the block
            unit_view(layers[i], keeps[i], "row")[r0 : r0 + p.numel()][p] = False
        else:  # p: flat flags of whole rows r0, r0+1, ...
            rows = p.numel() // max(1, keeps[i][0].numel())
            keeps[i][r0 : r0 + rows].view(-1).masked_fill_(p, False)
    return keeps


def prune(
    model: nn.Module,
    method: str | Method = "magnitude",
    amount: float | None = None,
    *,
    scope: Literal["layer", "global"] = "layer",
    layers: Sequence[LayerSelector] | None = None,
    counts: Mapping[str, int] | None = None,
    plan: PlanLike | None = None,
    seed: Seed = None,
    norm: int | None = None,
    coupled: bool = False,
    example_inputs: object = None,
) -> nn.Module:
    """Prune the Linear/Conv weights of `model` in place and return it.

    Args:
        model: any module; Linear and Conv1d/2d/3d weights are prunable (biases are not).
        method: a key of `prunebound.METHODS` ("magnitude", "random", "bernoulli", "neuron",
            "filter") or a `Method`.
        amount: fraction in [0, 1] of the currently surviving weights (rows, for structured
            methods) to prune in this call: `round(amount * surviving)` per layer, or across all
            selected layers with scope="global". Bernoulli prunes each survivor with this
            probability.
        scope: "layer" (each layer loses the same fraction) or "global" (one ranking across
            layers).
        layers: names, glob patterns or module types to prune; default all Linear/Conv
            (including transposed linears: transformers' GPT-2 `Conv1D`). Embeddings and tied
            weights are pruned only when selected by exact name or type; a tied weight needs
            all its holders selected (`["transformer.wte", "lm_head"]`) and is pruned once,
            with one mask on each. Structured methods (unit "row": "neuron", "filter") leave
            the output layers alone (the last layer, any layer whose outputs are the model's
            outputs: see `prunebound.outputs.output_layers`) unless named exactly here or in
            `counts`/`plan`: pruning a classifier row deletes its class. See `prunable_layers`.
        counts: exact number of surviving units to prune per layer, instead of `amount`.
        plan: a `prunebound.theory.Plan`; applies its method and per-layer counts.
        seed: int or `torch.Generator` for random methods; None draws one from torch's global
            generator, so `torch.manual_seed` reproduces the masks.
        norm: 1 or 2, the row norm of "neuron" / "filter" (default 2: L2; "neuron_l1" and
            "filter_l1" are the same as norm=1).
        coupled: structured methods only: score and prune coupled groups of units together
            (channels tied by residual adds or depthwise convs, traced on `example_inputs`
            with Torch-Pruning), each pruned unit masked whole (weight rows, biases and the
            BatchNorm entries after it), so that `prunebound.shrink` removes all of it.
            Groups with a layer outside the selection are left alone; `amount` only.
        example_inputs: a tensor (or tuple) the model runs on; needed with coupled=True.

    Masks compose: pruning a pruned layer prunes among its survivors and never revives a weight
    (use `reset` for that). On invalid input nothing is changed and a ValueError/TypeError names
    the problem.

    Example:
        >>> import torch, prunebound as pb
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> _ = pb.prune(net, "magnitude", 0.5)
        >>> pb.sparsity(net).zeros
        60
    """
    given = [x is not None for x in (amount, counts, plan)]
    if sum(given) != 1:
        raise ValueError("give exactly one of amount, counts or plan")
    if plan is not None:
        method, counts = plan.method, plan_counts(model, plan)
        if seed is None:  # a data plan certifies the mask of its recorded seed
            seed = getattr(plan, "seed", None)
    meth = get_method(method, norm)
    check_choice("scope", scope, ("layer", "global"))
    if counts is not None and scope == "global":
        raise ValueError("counts are per layer; they cannot be combined with scope='global'")
    if counts is not None and meth.mask is not None:
        raise ValueError(
            f"method {meth.name!r} samples a random number of weights; it takes amount, not counts"
        )
    if layers is None and counts is not None:
        selected = prunable_layers(model, list(counts), types=meth.layer_types) if counts else {}
    else:
        selected = prunable_layers(model, layers, types=meth.layer_types)
        if meth.unit == "row":  # a whole output row of the classifier is a class: not by default
            selected, outs = leave_outputs(model, selected, layers, counts or ())
            if outs and not selected:
                raise ValueError(
                    f"method {meth.name!r} leaves the output layer(s) {list(outs)} alone by "
                    f"default and no other layer is selected; name them (layers={list(outs)}) "
                    "to prune their output units"
                )
    twins = _check_layers(model, selected, meth)
    if skipped := unpruned_weights(model):
        more = f" and {len(skipped) - 6} more" if len(skipped) > 6 else ""
        warnings.warn(
            f"prune: {len(skipped)} weights of {sorted({n.rpartition('.')[0] for n in skipped})}"
            f" stay dense: {skipped[:6]}{more} (LSTM/GRU/RNN weights and "
            "MultiheadAttention.in_proj_weight are not pruned; its out_proj is a Linear and is); "
            "pb.sparsity(model).model_sparsity counts them",
            stacklevel=2,
        )
    g = as_generator(seed)

    if amount is not None:
        amount = _check_amount(amount)
    if coupled:
        if meth.unit != "row" or meth.scores is None or amount is None or twins:
            raise ValueError(
                "coupled=True needs a structured ranking method ('neuron', 'filter'), amount "
                f"(not counts or plan) and no tied weights; got method {meth.name!r}"
            )
        if example_inputs is None:
            raise ValueError("coupled=True needs example_inputs (a tensor the model runs on)")
        prune_coupled(
            model, meth, amount, selected, scope=scope, seed=g, example_inputs=example_inputs
        )
        return model
    if amount is None:
        assert counts is not None
        for name, c in counts.items():
            if name not in selected:
                raise ValueError(
                    f"counts: {name!r} is not a selected prunable layer; "
                    f"choose from {sorted(selected)}"
                )
            check_int(f"counts[{name!r}]", c, 0)
            alive = count_units(selected[name], meth.unit)[1]
            if c > alive:
                raise ValueError(
                    f"counts[{name!r}] = {c} exceeds the {alive} surviving units of that layer"
                )
        for twin, name in twins.items():
            if twin in counts and counts[twin] != counts.get(name, counts[twin]):
                raise ValueError(
                    f"counts: {twin!r} and {name!r} share one tied weight, pruned once; "
                    f"give them the same count, got {counts[twin]} and {counts[name]}"
                )
            if twin in counts and name not in counts:
                counts = {**counts, name: counts[twin]}

    twin_layers = {n: selected[n] for n in twins}
    selected = {n: m for n, m in selected.items() if n not in twins}  # tied weights once
    names, mods = list(selected), list(selected.values())
    if meth.mask is not None:
        assert amount is not None
        new = {}
        for n, m in selected.items():
            keep = meth.mask(original_weight(m).detach(), amount, g).to(original_weight(m).device)
            mm = mask_module(m)
            new[n] = keep & mm.mask if mm is not None else keep
    elif scope == "global":
        assert amount is not None
        k = round(amount * sum(count_units(m, meth.unit)[1] for m in mods))
        new = dict(zip(names, _select(mods, meth, g, k), strict=True))
    else:
        new = {}
        for n, m in selected.items():
            k = counts[n] if counts is not None else round(amount * count_units(m, meth.unit)[1])  # type: ignore[operator]
            new[n] = _select([m], meth, g, k)[0]
    for n, keep in new.items():  # all validation and selection done: now mutate
        set_mask(selected[n], keep)
    for twin, name in twins.items():
        set_mask(twin_layers[twin], new[name].clone())
    return model
