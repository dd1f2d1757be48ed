"""Which modules are prunable layers: the lowest concept of the library.

`LINEAR`, `CONV` and `PRUNABLE` are the layer types pruned by default, `OPT_IN` those pruned only
when selected explicitly, and `TRANSPOSED_LINEAR` names the Linear layers of other libraries that
store their weight transposed (found by name, so prunebound never imports those libraries).
`is_layer` and `output_axis` are the two questions every other module asks of a layer;
`unpruned_weights` names the weights of layers prunebound does not prune (recurrent layers,
attention's packed input projection), so that `prune` and `sparsity` can say so.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

#: What a method prunes and `count_units` counts: single weights, or whole output units (the
#: rows of a Linear weight, the channels of a Conv, the columns of a transposed linear).
Unit = Literal["weight", "row"]

LINEAR: tuple[type[nn.Module], ...] = (nn.Linear,)
#: Transposed convolutions store their weight as (in, out / groups, *kernel): output channels
#: (the units of "filter") are dim 1.
CONV_TRANSPOSE: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
CONV: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *CONV_TRANSPOSE)
PRUNABLE: tuple[type[nn.Module], ...] = LINEAR + CONV
#: Normalisation layers whose entries belong to the channel before them: a whole unit pruned
#: with `coupled=True` masks its BatchNorm weight and bias entries too.
NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
#: Prunable only when selected explicitly (by exact name or by type), never by default or by glob.
OPT_IN: tuple[type[nn.Module], ...] = (nn.Embedding,)

#: Layers with weights that prunebound does not prune (their weights are not a `.weight` of one
#: Linear/Conv): `prune` warns naming them and `sparsity` counts them only among all parameters.
#: `nn.MultiheadAttention`'s `out_proj` is an `nn.Linear` and is pruned like any other.
UNPRUNED: tuple[type[nn.Module], ...] = (nn.RNNBase, nn.MultiheadAttention)

#: Linear layers of other libraries that store their weight transposed, (in, out), found by
#: (module prefix, class name) so that prunebound never imports those libraries: transformers'
#: GPT-2-style `Conv1D` computes x @ W + b. They count as Linear wherever Linear is accepted.
TRANSPOSED_LINEAR: tuple[tuple[str, str], ...] = (("transformers", "Conv1D"),)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether `module` is one of the `TRANSPOSED_LINEAR` layers (weight stored as (in, out))."""
    return any(
        (c.__module__.split(".")[0], c.__name__) in TRANSPOSED_LINEAR for c in type(module).__mro__
    )


def is_layer(module: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """`isinstance(module, types)`, where a transposed linear (`TRANSPOSED_LINEAR`) is a Linear."""
    if isinstance(module, types):
        return True
    return any(issubclass(nn.Linear, t) for t in types) and is_transposed_linear(module)


def output_axis(module: nn.Module) -> int:
    """Axis of the weight indexing output units (neurons, channels): 1 for transposed linears
    and transposed convolutions, else 0."""
    return 1 if is_transposed_linear(module) or isinstance(module, CONV_TRANSPOSE) else 0


def unpruned_weights(model: nn.Module) -> list[str]:
    """Names of the weight parameters of `UNPRUNED` layers in `model` (`lstm.weight_ih_l0`,
    `attn.in_proj_weight`, ...): weights that no method prunes."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, UNPRUNED):
            prefix = f"{name}." if name else ""
            out += [
                prefix + p
                for p, _ in m.named_parameters(recurse=False)
                if p.startswith("weight") or p.endswith("_weight")
            ]
    return out
