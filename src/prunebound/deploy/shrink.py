"""`shrink`: a physically smaller dense model computing what the masked model computes.

A structured prune zeroes whole output rows; `shrink` deletes them, with everything that only
served them: the matching input columns/channels of every consumer (Flatten -> Linear column
blocks included), BatchNorm entries, depthwise channels, and residual channels where every
member of the coupled group lost them. Torch-Pruning's `DependencyGraph` finds what is tied to
what; prunebound decides what may go, exactly:

- a unit may go only if every producer row in its group is zero, and every consumer sees it as
  zero, or as an input-independent constant that a Linear or an unpadded conv absorbs into its
  bias (the fold).
  A pruned row whose bias (or BatchNorm shift) keeps a constant alive in front of a padded
  convolution stays (the border pattern is not a constant); `prune(..., coupled=True)` masks the
  bias and BatchNorm entries with the row, so nothing is left behind;
- the output layers keep all their units (removing a logit changes the output);
- the result is checked against the masked model on the example inputs before it is returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prunebound.coupling import (
    as_inputs,
    baked_eval_copy,
    dependency_graph,
    is_traced,
    out_channel_fn,
    require_torch_pruning,
    run,
)
from prunebound.deploy.expand import KEPT, check_record, record_prune, start_record
from prunebound.deploy.shrink_hf import check_same, is_transformer, shrink_hf
from prunebound.layer_types import NORMS
from prunebound.outputs import output_layers

#: modules without parameters that act on each channel separately (or reshape it)
CHANNELWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)


def _check_modules(model: nn.Module) -> None:
    """Refuse, naming them, the modules whose channels shrink cannot follow."""
    bad = []
    for name, m in model.named_modules():
        if is_traced(m):
            if isinstance(m, nn.Conv1d | nn.Conv2d) and (
                m.padding_mode != "zeros" or (m.groups > 1 and m.groups != m.in_channels)
            ):
                bad.append(f"{name} ({type(m).__name__}, groups={m.groups})")
            continue
        if isinstance(m, NORMS + CHANNELWISE):
            continue
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if own or (
            type(m).__module__.startswith("torch.nn")
            and not isinstance(m, nn.Sequential | nn.ModuleList | nn.ModuleDict)
        ):
            bad.append(f"{name or '<model>'} ({type(m).__name__})")
    if bad:
        raise ValueError(
            f"shrink cannot remove channels through {bad}: supported are Linear, Conv1d/2d "
            "(depthwise included), BatchNorm1d/2d, channel-wise activations, pooling, Flatten, "
            "Dropout, and parameter-free containers (residual adds, concat and split in forward)"
        )


@contextmanager
def _captured(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input of every traced layer while the block runs."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if is_traced(m):

            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                seen[name] = args[0].detach()

            handles.append(m.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _probe(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs and a perturbed copy: two samples at least, so that a constant seen
    by a consumer is constant across inputs, not one sample's value."""
    g = torch.Generator().manual_seed(0)
    out = []
    for t in inputs:
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
            t = torch.cat([t, t + noise * (t.std() + 1) if t.numel() > 1 else t + noise])
        else:
            t = torch.cat([t, t])
        out.append(t)
    return tuple(out)


def _input_units(x: torch.Tensor, consumer: nn.Module) -> torch.Tensor:
    """A consumer's input with its input units on dim 1 and every other dim flattened in dim 0."""
    if isinstance(consumer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _removable(
    group: object, names: dict[int, str], seen: dict[str, torch.Tensor], keep: set[str]
) -> tuple[set[int], dict[str, dict[int, float]]]:
    """Root units of `group` that fail the exactness test, and the constants to fold."""
    graph = group._DG  # type: ignore[attr-defined]
    blocked: set[int] = set()
    folds: dict[str, dict[int, float]] = {}
    for item in group.items:  # type: ignore[attr-defined]
        m = item.dep.target.module
        name = names.get(id(m))
        if name is None or not is_traced(m):
            continue
        if graph.is_out_channel_pruning_fn(item.dep.handler):
            if isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1:
                continue  # depthwise: its input decides; the consumers below check it
            rows = m.weight.detach().flatten(1).abs().sum(1)
            for i, r in zip(item.idxs, item.root_idxs, strict=True):
                if name in keep or rows[i] != 0:
                    blocked.add(r)
        elif name in seen:
            x = _input_units(seen[name], m)
            for i, r in zip(item.idxs, item.root_idxs, strict=True):
                col = x[:, i]
                if bool((col == 0).all()):
                    continue
                if _foldable(m) and bool((col == col[0]).all()):
                    folds.setdefault(name, {})[i] = float(col[0])
                else:
                    blocked.add(r)
    return blocked, folds


def _foldable(m: nn.Module) -> bool:
    """A consumer whose constant input channel is a constant shift of its output: a Linear, or
    an unpadded ungrouped conv (every output position sees the whole kernel)."""
    if isinstance(m, nn.Linear):
        return True
    return (
        isinstance(m, nn.Conv1d | nn.Conv2d)
        and m.groups == 1
        and not any(m.padding if isinstance(m.padding, tuple) else (1,))
    )


def _fold(module: nn.Module, consts: dict[int, float]) -> None:
    """Add sum_k W[:, j, k] * c_j to the bias for each constant input channel j to be removed."""
    idx = torch.tensor(list(consts), dtype=torch.long)
    weight, bias = module.weight, module.bias
    assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
    w = weight.detach()
    c = torch.tensor(list(consts.values()), dtype=w.dtype)
    shift = w[:, idx].flatten(2).sum(2) @ c.to(w.device) if w.dim() > 2 else w[:, idx] @ c
    with torch.no_grad():
        if bias is None:
            module.bias = nn.Parameter(shift.clone())
        else:
            bias += shift


def shrink(model: nn.Module, example_inputs: object, *, check: bool = True) -> nn.Module:
    """A new, physically smaller dense model computing the same function as masked `model`.

    Hugging Face GPT-2 / BERT models go to `prunebound.deploy.shrink_hf.shrink_hf` instead:
    attention heads and MLP neurons are removed there (no tracing).

    Args:
        model: a (structurally) pruned model; it is not changed.
        example_inputs: a tensor (or tuple) the model runs on: traces the dataflow and checks
            the result (for GPT-2 / BERT: input ids, or a dict of model inputs).
        check: compare the result with the masked model on the example inputs and raise if
            they differ (allclose: rtol 1e-4 in float32, 1e-9 in float64).

    Returns:
        a mask-free model in the training mode of `model`, with the pruned units removed (its
        `kept_units` attribute records which original units each layer kept: see `expand`). It
        computes the masked model's function in eval mode; a folded constant is the eval-mode
        value, so after a plain prune with BatchNorm or Dropout between a pruned unit and its
        folding consumer, train-mode outputs can differ (whole units, `coupled=True`, are zero
        in both modes).

    Raises:
        ValueError: a module shrink cannot follow (named), inputs the model cannot run on, a
            layer whose every unit is pruned, or a result that would differ.
        ImportError: Torch-Pruning (the `structured` extra) is missing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_transformer(model):  # HF GPT-2 / BERT: heads and MLP neurons (deploy.shrink_hf)
        return shrink_hf(model, example_inputs, check=check)
    require_torch_pruning()
    inputs = as_inputs(example_inputs)
    work = baked_eval_copy(model)
    _check_modules(work)
    reference = run(work, inputs)
    probe = _probe(inputs)
    graph = dependency_graph(work, inputs)
    names = {id(m): n for n, m in work.named_modules()}
    kept = start_record(work)
    keep = set(output_layers(model))  # empty for a one-layer model: that layer is the output
    keep = keep or {n for n, m in work.named_modules() if is_traced(m)}
    for name, m in list(work.named_modules()):
        if not is_traced(m) or name in keep:
            continue
        rows = m.weight.detach().flatten(1).abs().sum(1)
        dead = [int(i) for i in torch.nonzero(rows == 0).flatten()]
        if not dead:
            continue
        with _captured(work) as seen:
            run(work, probe)
        fn = out_channel_fn(m)
        group = graph.get_pruning_group(m, fn, dead)  # type: ignore[attr-defined]
        blocked, _ = _removable(group, names, seen, keep)
        dead = [i for i in dead if i not in blocked]
        if not dead:
            continue
        if len(dead) == rows.numel():
            raise ValueError(
                f"every output unit of layer {name!r} is pruned (the model is constant there); "
                "shrink would leave a zero-width layer: keep at least one unit"
            )
        group = graph.get_pruning_group(m, fn, dead)  # type: ignore[attr-defined]
        _, folds = _removable(group, names, seen, keep)
        for cname, consts in folds.items():
            _fold(work.get_submodule(cname), consts)
        record_prune(kept, group, names)
        group.prune()
    check_record(work, kept)
    setattr(work, KEPT, kept)  # which original units survive: `expand` undoes the shrink
    work.train(model.training)
    if check:
        was = work.training
        out = run(work.eval(), inputs)
        work.train(was)
        check_same(reference, out)
    return work
