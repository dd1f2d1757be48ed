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
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from prunebound._masks import (
    mask_module,
    remove,
    set_mask,
)
from prunebound.layer_types import CONV_TRANSPOSE, NORMS, is_transposed_linear

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
        with torch.enable_grad():  # the tracer follows autograd: works under a caller's no_grad
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
