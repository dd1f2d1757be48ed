"""`sparsity`: how many weights are zero, per layer, over the prunable layers and over the model.

Two shares, kept apart on purpose: `SparsityReport.sparsity` is over the prunable weights (the
Linear/Conv weights `prune` works on), `model_sparsity` over every parameter (biases, norms,
embeddings, recurrent weights). A model whose weights are mostly in layers prunebound does not
prune (`layer_types.UNPRUNED`, named in `SparsityReport.unpruned`) has a large first share and
a small second one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunebound._masks import count_units, effective_weight, original_weight, prunable_layers
from prunebound.layer_types import CONV_TRANSPOSE, LINEAR, is_layer, unpruned_weights

_SHOWN = 20  # layers listed by __str__


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros of one layer's effective weight; `flops` are per forward of one sample."""

    name: str
    shape: tuple[int, ...]
    total: int
    zeros: int
    sparsity: float
    dense_flops: int | None = None
    sparse_flops: int | None = None


@dataclass(frozen=True, repr=False)
class SparsityReport:
    """Sparsity of the prunable layers and of the whole model.

    `sparsity` = zeros / total over the prunable weights, `compression` = total / nonzero; a
    weight tied across layers has a row per layer but counts once in the totals.
    `model_sparsity` = 1 - model_nonzero / model_params, the share of zeros among *all*
    parameters; `unpruned` names weights of layers no method prunes (LSTM/GRU/RNN weights,
    `nn.MultiheadAttention.in_proj_weight`), which only that share counts.
    FLOPs count a multiply-add as 2 and cover the prunable layers (one sample of `input_shape`);
    sparse FLOPs count only nonzero weights, as an ideal sparse kernel would.
    `print(report)` gives a table; `repr` stays one line.
    """

    layers: tuple[LayerSparsity, ...]
    total: int
    zeros: int
    sparsity: float
    compression: float
    model_params: int
    model_nonzero: int
    model_sparsity: float
    unpruned: tuple[str, ...] = ()
    dense_flops: int | None = None
    sparse_flops: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        return (
            f"SparsityReport(sparsity={self.sparsity:.4f}, zeros={self.zeros}, "
            f"total={self.total}, compression={self.compression:.4g}, "
            f"model_sparsity={self.model_sparsity:.4f}, model_params={self.model_params}, "
            f"layers=<{len(self.layers)} layers>, unpruned=<{len(self.unpruned)} weights>)"
        )

    def __str__(self) -> str:
        head = [
            f"SparsityReport: prunable weights {self.sparsity:.1%} zero "
            f"({self.zeros:,} of {self.total:,}; compression {self.compression:.2f}x)",
            f"  all parameters {self.model_sparsity:.1%} zero "
            f"({self.model_params - self.model_nonzero:,} of {self.model_params:,})",
        ]
        if self.dense_flops is not None and self.sparse_flops is not None:
            head.append(
                f"  FLOPs per sample {self.dense_flops:,} dense, {self.sparse_flops:,} sparse"
            )
        width = max([5, *(len(ls.name) for ls in self.layers[:_SHOWN])])
        rows = [f"  {'layer':<{width}} {'shape':>16} {'zeros/total':>20} {'sparsity':>9}"]
        rows += [
            f"  {ls.name:<{width}} {'x'.join(map(str, ls.shape)):>16} "
            f"{f'{ls.zeros}/{ls.total}':>20} {ls.sparsity:>9.1%}"
            for ls in self.layers[:_SHOWN]
        ]
        if len(self.layers) > _SHOWN:
            rows.append(f"  ... {len(self.layers) - _SHOWN} more layers")
        if self.unpruned:
            names = ", ".join(self.unpruned[:6]) + (", ..." if len(self.unpruned) > 6 else "")
            rows.append(f"  not prunable here ({len(self.unpruned)} weights): {names}")
        return "\n".join([*head, *rows])


def _positions(
    model: nn.Module, layers: dict[str, nn.Module], input_shape: Sequence[int]
) -> dict[str, int]:
    """Positions per sample at which each layer applies its whole weight, by a dry run: 1 for
    Linear (per token), output H*W for Conv2d, input H*W for a transposed convolution."""
    out: dict[str, int] = {}
    handles = []
    for name, m in layers.items():

        def hook(mod: nn.Module, inp: Any, output: torch.Tensor, name: str = name) -> None:
            if is_layer(mod, LINEAR):
                out[name] = output[0].numel() // count_units(mod, "row")[0]
            elif isinstance(mod, CONV_TRANSPOSE):  # every input position meets every weight
                out[name] = inp[0][0, 0].numel()
            else:
                out[name] = output[0, 0].numel()

        handles.append(m.register_forward_hook(hook))
    try:
        p = next(model.parameters())
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return out


def sparsity(model: nn.Module, input_shape: Sequence[int] | None = None) -> SparsityReport:
    """Per-layer and overall sparsity of the Linear/Conv weights, and the share of zeros among
    all parameters; FLOPs if `input_shape` is given.

    Args:
        model: any module.
        input_shape: shape of one input sample (no batch dim), e.g. (64,) or (1, 28, 28).
    """
    layers = prunable_layers(model)
    positions = _positions(model, layers, input_shape) if input_shape is not None else {}
    rows, counted, seen = [], [], set()  # counted: rows of distinct weights (tied ones once)
    with torch.no_grad():
        for name, m in layers.items():
            w = effective_weight(m)
            total = w.numel()
            zeros = total - int(torch.count_nonzero(w))
            dense = sparse = None
            if name in positions:
                dense = 2 * total * positions[name]
                sparse = 2 * (total - zeros) * positions[name]
            rows.append(
                LayerSparsity(
                    name, tuple(w.shape), total, zeros, zeros / max(total, 1), dense, sparse
                )
            )
            if id(original_weight(m)) not in seen:
                seen.add(id(original_weight(m)))
                counted.append(rows[-1])
        params = list(model.parameters())  # originals: count effective zeros via the layers
        model_params = sum(p.numel() for p in params)
        masked_zeros = sum(r.zeros for r in counted)
        other_zero = sum(
            p.numel() - int(torch.count_nonzero(p))
            for n, p in model.named_parameters()
            if not n.endswith("parametrizations.weight.original")
            and not _is_layer_weight(n, layers)
        )
    total = sum(r.total for r in counted)
    zeros = sum(r.zeros for r in counted)
    flops = [r.dense_flops for r in rows]
    has_flops = input_shape is not None and all(f is not None for f in flops)
    nonzero = model_params - masked_zeros - other_zero
    return SparsityReport(
        layers=tuple(rows),
        total=total,
        zeros=zeros,
        sparsity=zeros / total if total else 0.0,
        compression=total / (total - zeros) if total > zeros else float("inf"),
        model_params=model_params,
        model_nonzero=nonzero,
        model_sparsity=1 - nonzero / model_params if model_params else 0.0,
        unpruned=tuple(unpruned_weights(model)),
        dense_flops=sum(r.dense_flops or 0 for r in rows) if has_flops else None,
        sparse_flops=sum(r.sparse_flops or 0 for r in rows) if has_flops else None,
    )


def _is_layer_weight(param_name: str, layers: dict[str, nn.Module]) -> bool:
    prefix, _, leaf = param_name.rpartition(".")
    return leaf == "weight" and prefix in layers
