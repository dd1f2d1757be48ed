"""Calibration data for the data-aware methods: batches, per-layer statistics, layer algebra.

`prune(model, method, amount, data=...)` takes calibration inputs as a tensor, an
`(inputs, labels)` pair, or any iterable of batches (a `DataLoader`); `batches` reads all three.
`collect` runs them through the model once with hooks (eval mode, restored afterwards; no
`.grad` is touched and no graph outlives a batch) and accumulates, per selected layer, what the
methods ask for:

- "inputs": `input_sq`, the sum over calibration rows of x_j^2 per input feature (Wanda's
  squared norm ||X_j||_2^2);
- "hessian": `hessian`, X^T X in float64 (the layer-wise OBS / SparseGPT Hessian, undamped);
- "grad": `grad`, the weight gradient of the summed cross-entropy loss;
- "fisher": `fisher`, the sum over examples of the squared per-example weight gradient (the
  empirical Fisher diagonal, times the number of examples).

Every layer is seen as a matrix product: its inputs become rows X (one per example, token or
convolution position: `F.unfold` for Conv1d/2d), its weight a matrix W (out, in) with in the
flattened input dimension, so the layer computes X W^T (+ bias). Gradients need a loss: with
labels, cross-entropy against them; without, against the model's own predictions (argmax).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunebound._check import finite
from prunebound._masks import effective_weight
from prunebound.layer_types import is_transposed_linear

#: What a data-aware method may ask `collect` for.
NEEDS = ("inputs", "hessian", "grad", "fisher")
_BATCH = 128  # rows of a tensor given as data, run at once
_PER_SAMPLE = 1 << 22  # elements of per-example gradients held at once (16 MB of float32)

Batch = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one layer (fields not asked for are None).

    Attributes:
        rows: calibration rows X seen by the layer (examples x positions).
        examples: calibration examples (the sum in `grad` and `fisher` runs over these).
        input_sq: sum of x_j^2 per input feature, shaped to broadcast against the weight.
        hessian: X^T X, (in, in) float64, in the layer's flattened input order.
        grad: weight-shaped gradient of the summed loss.
        fisher: weight-shaped sum of squared per-example gradients.
    """

    rows: int
    examples: int
    input_sq: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    fisher: torch.Tensor | None = None


def _split(t: torch.Tensor, y: torch.Tensor | None) -> Iterator[Batch]:
    for i in range(0, t.shape[0], _BATCH):
        yield t[i : i + _BATCH], None if y is None else y[i : i + _BATCH]


def _pair(item: object) -> Batch:
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, tuple | list) and item and isinstance(item[0], torch.Tensor):
        y = item[1] if len(item) > 1 else None
        if y is not None and not isinstance(y, torch.Tensor):
            raise TypeError(f"calibration labels must be a tensor, got {type(y).__name__}")
        return item[0], y
    raise TypeError(
        "calibration data must be a tensor, an (inputs, labels) pair of tensors or an iterable "
        f"of such batches (a DataLoader), got a batch of type {type(item).__name__}"
    )


def batches(data: object) -> Iterator[Batch]:
    """(inputs, labels or None) batches of `data`, checked for type and matching lengths."""
    if isinstance(data, torch.Tensor) or (
        isinstance(data, tuple | list) and data and isinstance(data[0], torch.Tensor)
    ):
        items: Iterable[object] = _split(*_pair(data))
    elif isinstance(data, Iterable) and not isinstance(data, str | bytes | Mapping):
        items = data
    else:
        raise TypeError(
            "data must be a tensor, an (inputs, labels) pair or an iterable of batches "
            f"(a DataLoader), got {type(data).__name__}"
        )
    seen = False
    for item in items:
        x, y = _pair(item)
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"calibration batch has no examples (shape {tuple(x.shape)})")
        if y is not None and (y.shape[:1] != x.shape[:1] or y.is_floating_point()):
            raise ValueError(
                f"calibration labels must be integer class indices, one per input, got "
                f"{y.dtype} of shape {tuple(y.shape)} for inputs of shape {tuple(x.shape)}"
            )
        seen = True
        yield x, y
    if not seen:
        raise ValueError("calibration data is empty")


def check_layer(module: nn.Module, name: str, method: str) -> None:
    """ValueError unless `collect` can see `module` as a matrix product."""
    if isinstance(module, nn.Linear) or is_transposed_linear(module):
        return
    conv = isinstance(module, nn.Conv1d | nn.Conv2d)
    numeric = conv and not isinstance(module.padding, str) and module.padding_mode == "zeros"
    if numeric and module.groups == 1:
        return
    raise ValueError(
        f"method {method!r}: layer {name!r} ({type(module).__name__}) is not supported with "
        "calibration data (Linear, GPT-2 Conv1D and Conv1d/2d with groups=1, numeric zero "
        "padding); exclude it with layers="
    )


def _conv2d_args(module: nn.Module) -> dict[str, Any]:
    def two(v: Any) -> tuple[int, ...]:
        return (1, v[0]) if isinstance(module, nn.Conv1d) else tuple(v)

    return {
        "kernel_size": two(module.kernel_size),
        "dilation": two(module.dilation),
        "padding": (0, module.padding[0]) if isinstance(module, nn.Conv1d) else module.padding,
        "stride": two(module.stride),
    }


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (examples, positions, in): rows of the matrix product."""
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        x4 = x.unsqueeze(-2) if isinstance(module, nn.Conv1d) else x
        if x4.dim() == 3:  # unbatched input
            x4 = x4.unsqueeze(0)
        return F.unfold(x4, **_conv2d_args(module)).transpose(1, 2)
    return x.reshape(x.shape[0] if x.dim() > 1 else 1, -1, x.shape[-1])


def output_rows(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """An output-shaped tensor (an output gradient) as (examples, positions, out)."""
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        o = out if out.dim() == (3 if isinstance(module, nn.Conv1d) else 4) else out.unsqueeze(0)
        return o.flatten(2).transpose(1, 2)
    return out.reshape(out.shape[0] if out.dim() > 1 else 1, -1, out.shape[-1])


def as_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as the (out, in) matrix of the product X W^T."""
    return weight.t() if is_transposed_linear(module) else weight.flatten(1)


def from_matrix(module: nn.Module, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `as_matrix`."""
    return matrix.t().contiguous() if is_transposed_linear(module) else matrix.reshape(shape)


def layer_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's output on `x` computed with `weight` in place of its own."""
    bias = getattr(module, "bias", None)
    if isinstance(module, nn.Conv1d):
        return F.conv1d(x, weight, bias, module.stride, module.padding, module.dilation)
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation)
    if is_transposed_linear(module):
        out = x @ weight
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


def _in_features(module: nn.Module) -> int:
    w = effective_weight(module)
    return int(w.shape[0] if is_transposed_linear(module) else w.shape[1])


def check_input(module: nn.Module, x: torch.Tensor, name: str, method: str) -> None:
    """ValueError naming the method and layer for a wrong-shaped, wrong-dtype or NaN input."""
    w = effective_weight(module)
    where = f"method {method!r}: layer {name!r}"
    if x.dtype != w.dtype:
        raise ValueError(f"{where}: calibration input has dtype {x.dtype}, the weight {w.dtype}")
    conv = isinstance(module, nn.Conv1d | nn.Conv2d)
    axis, want = (-w.dim() + 1, module.in_channels) if conv else (-1, _in_features(module))
    if x.dim() < (w.dim() - 1 if conv else 1) or x.shape[axis] != want:
        kind = "input channels" if conv else "input features"
        raise ValueError(
            f"{where}: calibration input has shape {tuple(x.shape)}, the layer takes {want} {kind}"
        )
    if not finite(x.detach()):
        raise ValueError(f"{where}: calibration activations contain NaN or Inf")


def model_output(out: object) -> torch.Tensor:
    """Logits of a model output (a tensor, a tuple's first item, or `.logits`)."""
    logits = getattr(out, "logits", None)
    if isinstance(out, tuple | list) and out:
        logits = out[0]
    elif isinstance(out, torch.Tensor):
        logits = out
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output has no logits tensor: {type(out).__name__}")
    return logits


def summed_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy summed over examples (and positions), against the model's own argmax
    predictions when no labels are given."""
    flat = logits.reshape(-1, logits.shape[-1])
    target = flat.argmax(1) if labels is None else labels.reshape(-1).to(flat.device)
    if target.numel() != flat.shape[0]:
        raise ValueError(
            f"calibration labels of shape {tuple(labels.shape)} do not match model outputs "  # type: ignore[union-attr]
            f"of shape {tuple(logits.shape)}"
        )
    return F.cross_entropy(flat.float(), target.long(), reduction="sum")


class _Acc:
    """Running sums of one layer."""

    def __init__(self, module: nn.Module, needs: frozenset[str]) -> None:
        self.module, self.needs = module, needs
        self.rows = self.examples = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.x: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def inputs(self, x: torch.Tensor) -> None:
        rows = input_rows(self.module, x.detach())
        flat = rows.reshape(-1, rows.shape[-1]).double()
        self.rows += flat.shape[0]
        self.examples += rows.shape[0]
        if "inputs" in self.needs:
            self.add("input_sq", (flat * flat).sum(0))
        if "hessian" in self.needs:
            self.add("hessian", flat.t() @ flat)
        if self.needs & {"grad", "fisher"}:
            self.x = rows

    def gradient(self, g_out: torch.Tensor, name: str, method: str) -> None:
        assert self.x is not None
        if not finite(g_out):
            raise ValueError(f"method {method!r}: layer {name!r}: gradients contain NaN or Inf")
        g = output_rows(self.module, g_out).to(self.x.dtype)
        x = self.x
        if "grad" in self.needs:
            self.add("grad", torch.einsum("nlo,nli->oi", g, x).double())
        if "fisher" in self.needs:
            step = max(1, _PER_SAMPLE // max(1, g.shape[-1] * x.shape[-1]))
            for i in range(0, x.shape[0], step):
                per = torch.einsum("nlo,nli->noi", g[i : i + step], x[i : i + step]).double()
                self.add("fisher", (per * per).sum(0))
        self.x = None

    def stats(self) -> LayerStats:
        w = effective_weight(self.module)
        shaped = {}
        for key in ("grad", "fisher"):
            if key in self.sums:
                shaped[key] = from_matrix(self.module, self.sums[key], w.shape)
        input_sq = self.sums.get("input_sq")
        if input_sq is not None:
            input_sq = as_matrix(self.module, torch.ones_like(w, dtype=torch.float64))
            input_sq = from_matrix(self.module, input_sq * self.sums["input_sq"], w.shape)
        return LayerStats(
            rows=self.rows,
            examples=self.examples,
            input_sq=input_sq,
            hessian=self.sums.get("hessian"),
            **shaped,
        )


def output_grads(
    logits: torch.Tensor,
    y: torch.Tensor | None,
    outs: Mapping[str, torch.Tensor | None],
    method: str,
) -> dict[str, torch.Tensor]:
    """d(summed loss)/d(out) for each layer output `outs` (kept by forward hooks) of one batch;
    refuses a non-finite loss and a layer the gradient does not reach, naming `method`."""
    loss = summed_loss(logits, y)
    if not math.isfinite(value := float(loss.detach())):
        raise ValueError(f"method {method!r}: calibration loss is {value}")
    seen = [n for n, o in outs.items() if o is not None and o.requires_grad]
    if len(seen) < len(outs):
        missing = sorted(set(outs) - set(seen))
        raise ValueError(
            f"method {method!r}: no gradient reaches layers {missing} (not used by the "
            "forward, or their outputs do not require grad)"
        )
    grads = torch.autograd.grad(loss, [o for n in seen if (o := outs[n]) is not None])
    return dict(zip(seen, grads, strict=True))


def collect(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    data: object,
    *,
    needs: Iterable[str],
    method: str,
) -> dict[str, LayerStats]:
    """Run `data` through `model` and return the statistics `needs` asks for, per layer.

    The model is left as it was: modes restored, hooks removed, no `.grad` written.
    """
    need = frozenset(needs)
    unknown = need - set(NEEDS)
    if unknown:
        raise ValueError(f"method {method!r}: unknown statistics {sorted(unknown)}; use {NEEDS}")
    for name, m in layers.items():
        check_layer(m, name, method)
    accs = {name: _Acc(m, need) for name, m in layers.items()}
    grads = bool(need & {"grad", "fisher"})
    handles = []
    for name, m in layers.items():

        def pre(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            check_input(mod, args[0], name, method)
            if grads and accs[name].x is not None:
                raise ValueError(
                    f"method {method!r}: layer {name!r} is called more than once per forward; "
                    "its gradient statistics would mix the calls"
                )
            accs[name].inputs(args[0])

        def post(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name):  # type: ignore[no-untyped-def]
            accs[name].out = out

        handles.append(m.register_forward_pre_hook(pre))
        if grads:
            handles.append(m.register_forward_hook(post))
    modes = {m: m.training for m in model.modules()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        for x, y in batches(data):
            x = x.to(device)
            if grads and x.is_floating_point():
                x = x.detach().requires_grad_(True)
            with torch.set_grad_enabled(grads):
                logits = model_output(model(x))
            if not grads:
                continue
            outs = {n: a.out for n, a in accs.items()}
            for n, g_out in output_grads(logits, y, outs, method).items():
                accs[n].gradient(g_out.detach(), n, method)
                accs[n].out = None
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
        for a in accs.values():
            a.x = a.out = None
    for name, a in accs.items():
        if a.rows == 0:
            raise ValueError(f"method {method!r}: layer {name!r} saw no calibration input")
    return {name: a.stats() for name, a in accs.items()}
