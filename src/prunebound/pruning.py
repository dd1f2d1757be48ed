"""`prune`: validate, score, select an exact count (per layer or globally), then install masks.

One selection routine serves every ranking method and both scopes: find the k-th smallest score
among the surviving units without materialising all scores at once, then prune every unit below
it and, among ties, the first ones in (layer, flat index) order. Deterministic, exact-count, and
lean: a 100M-weight global magnitude prune holds one block of scores at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from prunebound._check import Seed, as_generator, check_choice, check_int, finite, is_float
from prunebound._masks import (
    LayerSelector,
    count_units,
    holders,
    mask_module,
    original_weight,
    prunable_layers,
    set_mask,
)
from prunebound.calibration import collect
from prunebound.coupled_prune import prune_coupled
from prunebound.heads import HEAD, attention_layouts, prune_heads
from prunebound.layer_types import CONV_TRANSPOSE, is_layer, unpruned_weights
from prunebound.methods import COUPLED_ONLY, Method, ScoreContext, get_method, require_data
from prunebound.outputs import leave_outputs
from prunebound.plan_layers import PlanLike, plan_counts
from prunebound.selection import check_pattern, nm_keep, parse_pattern, select


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
        if method.unit == "row" and isinstance(m, CONV_TRANSPOSE) and getattr(m, "groups", 1) > 1:
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


HF_COUPLED = (
    "coupled=True traces plain PyTorch models, not Hugging Face GPT-2/BERT attention; prune "
    "their heads with method 'head' and their MLP neurons with plain 'neuron' on the MLP input "
    "layers (layers=['*mlp.c_fc'] or ['*intermediate.dense']): `shrink` removes both"
)


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
    data: object = None,
    pattern: str | None = None,
    coupled: bool = False,
    example_inputs: object = None,
) -> nn.Module:
    """Prune the Linear/Conv weights of `model` in place and return it.

    Args:
        model: any module; Linear and Conv1d/2d/3d weights are prunable (biases are not).
        method: a key of `prunebound.METHODS` ("magnitude", "random", "bernoulli", "neuron",
            "filter", "head": whole attention heads of HF GPT-2/BERT, see `prunebound.heads`)
            or a `Method`.
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
        data: calibration inputs for the data-aware methods ("wanda", "obs", "obd", "taylor",
            "snip", or a `Method` with `needs`): a tensor of inputs, an (inputs, labels) pair,
            or an iterable of such batches (a DataLoader). See `prunebound.calibration`.
            Methods that need no data ignore it.
        pattern: "N:M" instead of `amount`: keep the N best-scored of every M consecutive input
            weights of each output row (semi-structured, "2:4" for GPU sparse kernels), for any
            weight-scoring method; needs M to divide every selected layer's input dimension.
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
    given = [x is not None for x in (amount, counts, plan, pattern)]
    if sum(given) != 1:
        raise ValueError("give exactly one of amount, counts, plan or pattern")
    if plan is not None:
        method, counts = plan.method, plan_counts(model, plan)
        if seed is None:  # a data plan certifies the mask of its recorded seed
            seed = getattr(plan, "seed", None)
    meth = get_method(method, norm)
    check_choice("scope", scope, ("layer", "global"))
    if meth.coupled and not coupled:
        raise ValueError(COUPLED_ONLY.format(name=meth.name))
    if meth.name == HEAD:  # whole attention heads (prunebound.heads); coupled by nature
        if amount is None:
            raise ValueError("method 'head' takes amount (a fraction of the surviving heads)")
        return prune_heads(
            model, meth, _check_amount(amount), scope=scope, layers=layers, seed=seed
        )
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
    nm = parse_pattern(pattern) if pattern is not None else None
    _check_data(meth, data, nm, scope, twins)
    contexts = {n: ScoreContext(n, m) for n, m in selected.items() if n not in twins}
    if nm is not None:
        for c in contexts.values():
            check_pattern(c, meth.name, nm)
    g = as_generator(seed)

    if amount is not None:
        amount = _check_amount(amount)
    if coupled:
        if meth.unit != "row" or meth.scores is None or amount is None or twins or nm:
            raise ValueError(
                "coupled=True needs a structured ranking method ('neuron', 'filter'), amount "
                f"(not counts, plan or pattern) and no tied weights; got method {meth.name!r}"
            )
        if example_inputs is None:
            raise ValueError("coupled=True needs example_inputs (a tensor the model runs on)")
        if attention_layouts(model):  # Torch-Pruning cannot follow HF attention
            raise ValueError(HF_COUPLED)
        prune_coupled(
            model,
            meth,
            amount,
            selected,
            scope=scope,
            seed=g,
            example_inputs=example_inputs,
            data=data,
        )
        return model
    if amount is None and counts is not None:
        for name, k in counts.items():
            if name not in selected:
                raise ValueError(
                    f"counts: {name!r} is not a selected prunable layer; "
                    f"choose from {sorted(selected)}"
                )
            check_int(f"counts[{name!r}]", k, 0)
            alive = count_units(selected[name], meth.unit)[1]
            if k > alive:
                raise ValueError(
                    f"counts[{name!r}] = {k} exceeds the {alive} surviving units of that layer"
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
    if meth.needs and meth.scores is not None:
        stats = collect(model, selected, data, needs=meth.needs, method=meth.name)
        contexts = {n: ScoreContext(n, m, stats=stats[n]) for n, m in selected.items()}
    ctxs = list(contexts.values())
    weights: dict[str, torch.Tensor] = {}
    if meth.reconstruct is not None:
        new, weights = _reconstruct(model, meth, selected, data, amount, counts, scope, nm)
    elif nm is not None:
        new = {c.name: nm_keep(c, meth, g, nm) for c in ctxs}
    elif meth.mask is not None:
        assert amount is not None
        new = {}
        for n, m in selected.items():
            keep = meth.mask(original_weight(m).detach(), amount, g).to(original_weight(m).device)
            mm = mask_module(m)
            new[n] = keep & mm.mask if mm is not None else keep
    elif scope == "global":
        assert amount is not None
        k = round(amount * sum(count_units(m, meth.unit)[1] for m in selected.values()))
        new = dict(zip(contexts, select(ctxs, meth, g, k), strict=True))
    else:
        new = {}
        for c in ctxs:
            units = count_units(c.module, meth.unit)[1]
            k = counts[c.name] if counts is not None else round(amount * units)  # type: ignore[operator]
            new[c.name] = select([c], meth, g, k)[0]
    for n, keep in new.items():  # all validation and selection done: now mutate
        if n in weights:
            with torch.no_grad():
                w = original_weight(selected[n])
                w.copy_(torch.where(keep, weights[n].to(w.device), w))
        set_mask(selected[n], keep)
    for twin, name in twins.items():
        set_mask(twin_layers[twin], new[name].clone())
    return model


def _reconstruct(
    model: nn.Module,
    meth: Method,
    selected: dict[str, nn.Module],
    data: object,
    amount: float | None,
    counts: Mapping[str, int] | None,
    scope: str,
    nm: tuple[int, int] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Keep-masks and new weights from a reconstruction method ("obs"), for per-layer counts,
    one count across the layers (global scope) or an N:M pattern."""
    assert meth.reconstruct is not None
    alive = {n: count_units(m)[1] for n, m in selected.items()}
    total, per_layer = None, None
    if nm is None and scope == "global":
        assert amount is not None
        total = round(amount * sum(alive.values()))
    elif nm is None:
        per_layer = (
            dict(counts) if counts is not None else {n: round(amount * a) for n, a in alive.items()}  # type: ignore[operator]
        )
    done = meth.reconstruct(
        model, selected, data, counts=per_layer, total=total, pattern=nm, method=meth.name
    )
    return {n: k for n, (k, _) in done.items()}, {n: w for n, (_, w) in done.items()}


def _check_data(
    meth: Method, data: object, nm: tuple[int, int] | None, scope: str, twins: Mapping[str, str]
) -> None:
    """The checks of `data=` and `pattern=` that need no statistics."""
    require_data(meth, data)
    if nm is not None and (meth.unit != "weight" or meth.mask is not None):
        raise ValueError(
            f"pattern needs a method scoring single weights; {meth.name!r} "
            + ("prunes whole rows" if meth.unit != "weight" else "samples a random mask")
        )
    if nm is not None and scope != "layer":
        raise ValueError(
            "pattern applies within each row; it cannot be combined with scope='global'"
        )
    if meth.reconstruct is not None and twins:
        raise ValueError(
            f"method {meth.name!r} updates weights from each layer's own inputs; tied weights "
            f"{sorted(twins)} cannot be reconstructed: exclude them"
        )
