"""Which layers produce the model's outputs: the ones structured pruning leaves alone by default.

Pruning a whole output row of a classifier deletes a class (its logit becomes the bias, for
every input), so the structured methods ("neuron", "filter", any `unit="row"` method) skip the
output layers unless they are named, as Torch-Pruning's `ignored_layers` does. An output layer
is one from which a model output is reachable without passing another prunable layer (found by
a `torch.fx` trace; a ReLU, softmax or reshape in between does not count), and the last prunable
layer in module order when the model cannot be traced symbolically.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence

import torch.fx
from torch import nn

from prunebound._masks import LayerSelector, maskable_layers
from prunebound.layer_types import OPT_IN, PRUNABLE, is_layer


class _LayerTracer(torch.fx.Tracer):
    """Traces every prunable layer (masked ones and transposed linears included) as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_layer(m, PRUNABLE + OPT_IN) or super().is_leaf_module(m, module_qualified_name)


def _traced_outputs(model: nn.Module, layers: Sequence[str]) -> tuple[str, ...] | None:
    """Layers with a path to the graph's output through no other layer; None if untraceable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx warns about what it cannot follow
            graph = _LayerTracer().trace(model)
    except Exception:  # any failure to trace: data-dependent control flow, custom ops, ...
        return None
    names = set(layers)
    found: set[str] = set()
    seen: set[torch.fx.Node] = set()
    todo = [n for n in graph.nodes if n.op == "output"]
    while todo:  # walk backwards from the output, stopping at the first layer on each path
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and node.target in names:
            found.add(str(node.target))
            continue
        todo.extend(node.all_input_nodes)
    return tuple(n for n in layers if n in found)


def output_layers(model: nn.Module) -> tuple[str, ...]:
    """Names of the layers whose outputs are the model's outputs (in module order).

    A layer counts when a model output is computed from its output without passing through
    another Linear/Conv layer (several heads give several). Models that `torch.fx` cannot trace
    get the last prunable layer in module order. A model with one prunable layer (or that is
    itself one) has none: that layer is the one the caller asked to prune.
    """
    layers = list(maskable_layers(model))
    if len(layers) <= 1:
        return ()
    traced = _traced_outputs(model, layers)
    return traced if traced is not None else (layers[-1],)


def leave_outputs(
    model: nn.Module,
    selected: dict[str, nn.Module],
    layers: Sequence[LayerSelector] | str | type[nn.Module] | None,
    counts: Collection[str] = (),
) -> tuple[dict[str, nn.Module], tuple[str, ...]]:
    """(`selected` without the output layers not named exactly in `layers` or `counts`, and
    the names of those left out).

    Structured methods call this: a glob or a type is not a name, so `layers=["fc*"]` still
    leaves the classifier alone, while `layers=["fc3"]` or `counts={"fc3": 2}` prunes it.
    """
    given = [layers] if isinstance(layers, str | type) else list(layers or ())
    named = {s for s in given if isinstance(s, str)} | set(counts)
    outs = [n for n in output_layers(model) if n in selected and n not in named]
    return {n: m for n, m in selected.items() if n not in outs}, tuple(outs)
