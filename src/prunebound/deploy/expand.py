"""`expand`: a shrunk model back in its original shapes, the removed units zero.

`shrink` records which units of the model it came from each narrowed layer kept
(`shrunk.kept_units`: per Linear/Conv/BatchNorm, the original indices of the surviving output
units and input columns/channels; `save_shrunk`/`load_shrunk` keep it). `expand(shrunk,
original)` writes the shrunk weights back into a copy of `original` at those indices and zeroes
everything else (the weight rows and columns, the bias and the BatchNorm scale and shift of each
removed unit; its running statistics become 0 and 1). The result has the original's shapes and
computes exactly the shrunk model's function, so `prunebound.theory.certify(expand(shrunk,
original), reference=original)` certifies the shrunk model against the original: with the same
bound as its masked twin (whose effective weights are the same numbers).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunebound._masks import remove
from prunebound.layer_types import NORMS

#: parameter-free modules that map a zero channel to a zero channel
ZERO_TO_ZERO: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)  # fmt: skip
#: elementwise activations: zero-preserving when act(0) == 0 (not Sigmoid, Softplus)
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh,
    nn.Sigmoid, nn.Softplus,
)  # fmt: skip
#: the attribute of a shrunk model holding its record
KEPT = "kept_units"
#: layers `shrink` narrows (and records)
RECORDED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, *NORMS)
Record = dict[str, dict[str, list[int] | None]]


def _weight(m: nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w


def _sizes(m: nn.Module) -> tuple[int, ...]:
    """(out, in, ...) units of a recorded layer: (num_features,) for a BatchNorm."""
    if isinstance(m, NORMS):
        n = m.num_features
        assert isinstance(n, int)
        return (n,)
    return tuple(int(d) for d in _weight(m).shape)


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1


def start_record(model: nn.Module) -> Record:
    """Every unit of every recorded layer of `model`, before anything is removed."""
    out: Record = {}
    for name, m in model.named_modules():
        if isinstance(m, RECORDED):
            sizes = _sizes(m)
            flat = isinstance(m, NORMS) or _depthwise(m)  # in and out are the same units
            out[name] = {
                "out": list(range(sizes[0])),
                "in": None if flat else list(range(sizes[1])),
            }
    return out


def record_prune(kept: Record, group: object, names: dict[int, str]) -> None:
    """Drop from `kept` what Torch-Pruning's `group` is about to remove (positions are the
    layers' current ones: each entry removed once per layer and side)."""
    graph = group._DG  # type: ignore[attr-defined]
    drops: dict[tuple[str, str], set[int]] = {}
    for item in group.items:  # type: ignore[attr-defined]
        name = names.get(id(item.dep.target.module))
        if name is None or name not in kept:
            continue
        side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        if kept[name][side] is None:
            side = "out"  # depthwise convs and BatchNorm: in and out are the same units
        drops.setdefault((name, side), set()).update(int(i) for i in item.idxs)
    for (name, side), idx in drops.items():
        units = kept[name][side]
        assert units is not None
        kept[name][side] = [u for pos, u in enumerate(units) if pos not in idx]


def check_record(model: nn.Module, kept: Record) -> None:
    """Raise ValueError unless `kept` fits `model`'s recorded layers (their current sizes)."""
    modules = dict(model.named_modules())
    for name, sides in kept.items():
        m = modules.get(name)
        if not isinstance(m, RECORDED):
            raise ValueError(f"kept_units names layer {name!r}, which the model does not have")
        sizes = _sizes(m)
        for dim, side in enumerate(("out", "in")):
            units = sides.get(side)
            if units is not None and (dim >= len(sizes) or len(units) != sizes[dim]):
                raise ValueError(
                    f"kept_units of layer {name!r}: {len(units)} {side} units recorded, the "
                    f"layer has {sizes[dim] if dim < len(sizes) else 0}"
                )


def expand(shrunk: nn.Module, original: nn.Module) -> nn.Module:
    """A copy of `original` computing `shrunk`'s function: the shrunk weights at the indices
    `shrink` kept, zero wherever a unit was removed (see the module docstring).

    Args:
        shrunk: a model returned by `prunebound.shrink` (or `load_shrunk`), unchanged.
        original: the model it was shrunk from, or any model of that architecture (only its
            shapes and its layers without recorded units are used; masks are baked).

    Raises:
        ValueError: `shrunk` has no record of its kept units, or the record does not fit
            `shrunk` or `original` (a layer named).
    """
    kept = getattr(shrunk, KEPT, None)
    if not isinstance(kept, dict):
        raise ValueError(
            "expand needs the model returned by pb.shrink (or pb.load_shrunk): this one has no "
            f"record of the units it kept ({KEPT})"
        )
    check_record(shrunk, kept)
    out = remove(copy.deepcopy(original))
    columns = zero_preserving_chain(out)
    small, big = dict(shrunk.named_modules()), dict(out.named_modules())
    for name, sides in kept.items():
        s, b = small[name], big.get(name)
        if b is None or type(b) is not type(s):
            raise ValueError(
                f"layer {name!r} is a {type(s).__name__} in the shrunk model but "
                f"{type(b).__name__} in the original"
            )
        _embed(name, s, b, sides, columns=columns)
    out.train(shrunk.training)
    return out


def _index(units: list[int] | None, size: int, name: str) -> torch.Tensor:
    if units is None:
        return torch.arange(size)
    idx = torch.tensor(units, dtype=torch.long)
    if idx.numel() and (int(idx.max()) >= size or int(idx.min()) < 0):
        raise ValueError(f"kept_units of layer {name!r} reach past the original's {size} units")
    return idx


def zero_preserving_chain(model: nn.Module) -> bool:
    """Whether `model` is a chain (nested nn.Sequential) whose every other leaf maps a zero
    channel to a zero channel: then a removed unit (zero row, bias and BatchNorm entries) sends
    exactly 0 to its consumer, whatever the consumer's input column holds."""
    for m in model.modules():
        if type(m) is nn.Sequential or isinstance(m, RECORDED + ZERO_TO_ZERO):
            continue
        if type(m) in ELEMENTWISE:
            with torch.no_grad():
                if float(m(torch.zeros(1))) == 0.0:
                    continue
        return False
    return True


def _embed(
    name: str, s: nn.Module, b: nn.Module, sides: dict[str, list[int] | None], *, columns: bool
) -> None:
    """Write `s`'s tensors into `b` at the kept indices; zero (BatchNorm: 0 mean, 1 var) elsewhere.
    The removed input columns of kept rows keep `b`'s values when `columns` (their inputs are
    exactly zero), else they are zero too."""
    if isinstance(b, NORMS):
        rows = _index(sides.get("out"), _sizes(b)[0], name)
        fills = {"weight": 0.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
        for t, fill in fills.items():
            st, bt = getattr(s, t, None), getattr(b, t, None)
            if isinstance(st, torch.Tensor) and isinstance(bt, torch.Tensor):
                _put(name, t, bt, st, (rows,), fill)
        return
    bw = _weight(b)
    rows = _index(sides.get("out"), bw.shape[0], name)
    if _depthwise(b):
        _put(name, "weight", bw, s.weight, (rows,), 0.0)
    else:
        cols = _index(sides.get("in"), bw.shape[1], name)
        keep = bw.detach()[rows].clone() if columns else None
        _put(name, "weight", bw, s.weight, (rows.unsqueeze(1), cols), 0.0, keep=keep)
    sb = getattr(s, "bias", None)
    if isinstance(sb, torch.Tensor):
        if b.bias is None:  # shrink folded a constant into a layer that had no bias
            b.bias = nn.Parameter(bw.new_zeros(bw.shape[0]))
        bb = b.bias
        assert isinstance(bb, torch.Tensor)
        _put(name, "bias", bb, sb, (rows,), 0.0)


def _put(
    name: str,
    what: str,
    big: torch.Tensor,
    small: object,
    idx: tuple[torch.Tensor, ...],
    fill: float,
    *,
    keep: torch.Tensor | None = None,
) -> None:
    """big := fill (then big[idx[0]] := keep, if given), then big[idx] := small (shapes checked)."""
    want = torch.empty_like(big)[idx].shape
    if not isinstance(small, torch.Tensor) or small.shape != want:
        got = tuple(small.shape) if isinstance(small, torch.Tensor) else None
        raise ValueError(f"layer {name!r}: shrunk {what} {got} does not fit {tuple(want)}")
    with torch.no_grad():
        big.fill_(fill)
        if keep is not None:
            big[idx[0].flatten()] = keep
        big[idx] = small.to(big)
