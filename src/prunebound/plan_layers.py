"""Matching a theory plan to a model: which layer of the model each planned count belongs to.

`prune(plan=...)` applies a plan only to the architecture it was made for; `plan_counts` checks
that and translates the plan's layer names into the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import nn

from prunebound._masks import original_weight, prunable_layers


class PlanLike(Protocol):
    """What `prune(plan=...)` needs of a theory plan."""

    @property
    def method(self) -> str: ...

    @property
    def counts(self) -> dict[str, int]: ...

    @property
    def specs(self) -> Sequence[Any]: ...  # LayerSpecs: .name and .shape of each planned layer


def plan_counts(model: nn.Module, plan: PlanLike) -> dict[str, int]:
    """The plan's per-layer counts keyed by `model`'s layer names, after checking that the model
    has the layers the plan was made for (ValueError otherwise: the guarantee would not apply).

    Layers match by name when every planned name is a prunable layer of `model`; otherwise by
    position (a plan from widths names its layers "1", "3", ... as `models.mlp` does, a user's
    own `nn.Sequential(Linear, ReLU, ...)` names them "0", "2", ...). Either way every weight
    shape must equal the planned one.
    """
    layers = prunable_layers(model)
    specs = list(plan.specs)
    planned = [(sp.name, tuple(sp.shape)) for sp in specs]
    if all(name in layers for name, _ in planned):
        pairs = [(name, name, shape) for name, shape in planned]
    elif len(layers) == len(planned):
        pairs = [(mine, name, shape) for mine, (name, shape) in zip(layers, planned, strict=True)]
    else:
        raise ValueError(
            f"plan is for {len(planned)} prunable layers {[n for n, _ in planned]}, but the model "
            f"has {len(layers)}: {list(layers)}; make a plan for this model"
        )
    counts = plan.counts
    out = {}
    for mine, name, shape in pairs:
        have = tuple(original_weight(layers[mine]).shape)
        if have != shape:
            raise ValueError(
                f"plan layer {name!r} has weight shape {shape}, but model layer {mine!r} has "
                f"{have}: the plan's guarantee is for another architecture; make a plan for "
                "this model"
            )
        out[mine] = counts[name]
    return out
