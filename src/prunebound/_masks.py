"""Masks as `torch.nn.utils.parametrize` parametrizations, and which layers carry them.

A pruned layer computes with `mask ⊙ weight`: the parameter keeps its identity (optimizers stay
valid), autograd gives zero gradient at pruned entries, and the mask is a bool buffer (one byte
per weight). `module.weight` is the effective (masked) weight; `original_weight(module)` is the
underlying parameter.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunebound._parametrized import drop_cache, make_picklable, masked_product
from prunebound.layer_types import OPT_IN, PRUNABLE, Unit, is_layer, output_axis

LayerSelector = str | type[nn.Module]


class Mask(nn.Module):
    """Parametrization `w -> w * mask` with a bool buffer (as torch.ao's FakeSparsity).

    `fingerprint` records the underlying weight when the mask was set (see `trained_since_masked`).
    """

    mask: torch.Tensor
    fingerprint: tuple[float, float] | None = None

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return masked_product(self, weight, self.mask)  # cached while autograd is off

    def __getstate__(self) -> dict[str, Any]:
        return drop_cache(self.__dict__)

    def extra_repr(self) -> str:
        return f"kept={int(self.mask.sum())}/{self.mask.numel()}"


def mask_module(module: nn.Module, tensor: str = "weight") -> Mask | None:
    """The `Mask` parametrization on `module.<tensor>` (default: its weight), or None."""
    if not parametrize.is_parametrized(module, tensor):
        return None
    plist: nn.ModuleList = getattr(module, "parametrizations")[tensor]  # noqa: B009
    for p in plist:
        if isinstance(p, Mask):
            return p
    return None


def original_tensor(module: nn.Module, tensor: str) -> torch.Tensor:
    """The underlying (unmasked) parameter `module.<tensor>` (a weight, a bias, a BatchNorm
    entry)."""
    if parametrize.is_parametrized(module, tensor):
        t = getattr(module, "parametrizations")[tensor].original  # noqa: B009
    else:
        t = getattr(module, tensor, None)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no {tensor} tensor")
    return t


def original_weight(module: nn.Module) -> torch.Tensor:
    """The underlying (unmasked) weight parameter of a layer."""
    return original_tensor(module, "weight")


def effective_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight` as the layer computes with it (masked, if pruned)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def _fingerprint(weight: torch.Tensor) -> tuple[float, float]:
    w = weight.detach().double()
    return float(w.sum()), float((w * w).sum())


def set_mask(module: nn.Module, keep: torch.Tensor, *, tensor: str = "weight") -> None:
    """Install or replace the keep-mask of `module.<tensor>` (default: its weight; a bias or a
    BatchNorm entry for whole units). No checks: callers validate."""
    existing = mask_module(module, tensor)
    original = original_tensor(module, tensor)
    keep = keep.to(device=original.device, dtype=torch.bool)
    if existing is not None:
        existing.mask = keep
    else:
        # unsafe=True: Mask keeps shape and dtype, so parametrize's consistency re-check (a full
        # forward of the parametrization) is not needed.
        parametrize.register_parametrization(module, tensor, Mask(keep), unsafe=True)
        make_picklable(module)
        existing = mask_module(module, tensor)
        assert existing is not None
    existing.fingerprint = _fingerprint(original)


def trained_since_masked(model: nn.Module) -> list[str]:
    """Names of masked layers whose underlying weight changed after their mask was set.

    After such retraining, `reset(model)` is not the dense model the pruning started from (it
    is the pruned weights as they drifted, revived), so it must not serve as the reference of a
    certificate. Detected by a fingerprint (sum, sum of squares in float64) taken by `set_mask`.
    """
    out = []
    for name, m in model.named_modules():
        mm = mask_module(m)
        if mm is not None and mm.fingerprint not in (None, _fingerprint(original_weight(m))):
            out.append(name)
    return out


def unit_view(module: nn.Module, t: torch.Tensor, unit: Unit) -> torch.Tensor:
    """A weight-shaped tensor as unit counting and selection see it: for unit "row", a view with
    the output units on dim 0 (a transposed linear's columns become rows; writes go through to
    `t`); for unit "weight", `t` itself."""
    return t.movedim(output_axis(module), 0) if unit == "row" else t


def alive_units(module: nn.Module, unit: Unit) -> torch.Tensor | None:
    """Flags of the surviving weights (or output rows, for unit "row"); None if not masked."""
    mm = mask_module(module)
    if mm is None:
        return None
    if unit == "row":
        return unit_view(module, mm.mask, unit).flatten(1).any(dim=1)
    return mm.mask


def count_units(module: nn.Module, unit: Unit = "weight") -> tuple[int, int]:
    """(total, surviving) units of a layer: weights, or for unit "row" its output units (rows of
    a Linear, channels of a Conv, columns of a transposed linear such as GPT-2's `Conv1D`).

    The one unit counter of the library: `prune`, the schedules and the FLOP counts use it.
    """
    w = original_weight(module)
    total = unit_view(module, w, unit).shape[0] if unit == "row" else w.numel()
    alive = alive_units(module, unit)
    return total, total if alive is None else int(alive.sum())


def is_pruned(model: nn.Module) -> bool:
    """True if any layer of `model` carries a prunebound mask."""
    return any(mask_module(m) is not None for m in model.modules())


def holders(model: nn.Module) -> dict[int, list[str]]:
    """`id(parameter)` -> names of the modules holding it; a tied weight has several.

    A masked weight is held by its layer (not by the parametrization); a module used twice in
    the model is one holder, since masking it masks every use.
    """
    out: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, parametrize.ParametrizationList):
            continue
        params = [p for _, p in mod.named_parameters(recurse=False)]
        if parametrize.is_parametrized(mod):
            plists = getattr(mod, "parametrizations").values()  # noqa: B009
            params += [plist.original for plist in plists]
        for p in params:
            out.setdefault(id(p), []).append(name)
    return out


def maskable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer a mask may sit on: default, opt-in and tied ones (for checkpoint loading)."""
    return {n: m for n, m in model.named_modules() if is_layer(m, PRUNABLE + OPT_IN)}


def prunable_layers(
    model: nn.Module,
    layers: Sequence[LayerSelector] | None = None,
    *,
    types: tuple[type[nn.Module], ...] = PRUNABLE + OPT_IN,
) -> dict[str, nn.Module]:
    """Select layers by name, glob pattern (`"features.*"`) or type; default: every Linear/Conv.

    Linear includes transposed linears such as transformers' GPT-2 `Conv1D` (see
    `prunebound.layer_types.TRANSPOSED_LINEAR`). Two kinds of layer are left alone unless selected
    explicitly, by exact name or by type: embeddings (`nn.Embedding`) and layers whose weight is
    tied/shared with another parameter (a language model's output head tied to its input
    embedding). The default and glob patterns skip them, unless they already carry a mask.

    Only weights are pruned; biases are left alone (they are few, and pruning them saves nothing
    while shifting every output).
    """
    candidates = {name: m for name, m in model.named_modules() if is_layer(m, types)}
    owners = holders(model)
    default = {
        n: m
        for n, m in candidates.items()
        if mask_module(m) is not None
        or not (isinstance(m, OPT_IN) or len(owners.get(id(original_weight(m)), ())) > 1)
    }
    if layers is None:
        return default
    if isinstance(layers, str | type):
        layers = [layers]
    selected: dict[str, nn.Module] = {}
    for sel in layers:
        if isinstance(sel, type):
            hits = {n: m for n, m in candidates.items() if is_layer(m, (sel,))}
        elif isinstance(sel, str):
            hits = {n: m for n, m in candidates.items() if n == sel} or {
                n: m for n, m in default.items() if fnmatch.fnmatchcase(n, sel)
            }
        else:
            raise TypeError(f"layers entries must be names, glob patterns or types, got {sel!r}")
        if not hits:
            kinds = "/".join(t.__name__ for t in types)
            raise ValueError(
                f"layers: {sel!r} matches no {kinds} layer; "
                f"prunable layers are {sorted(candidates)}"
            )
        selected.update(hits)
    return {n: selected[n] for n in candidates if n in selected}  # model order


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bool keep-masks (True = kept) of every masked layer, keyed by module name."""
    out = {}
    for name, m in model.named_modules():
        mm = mask_module(m)
        if mm is not None:
            out[name] = mm.mask
    return out


def masked_tensors(module: nn.Module) -> list[str]:
    """Names of the tensors of `module` itself carrying a prunebound `Mask` (the weight; for
    whole units pruned with `coupled=True`, also the bias and BatchNorm entries)."""
    if not parametrize.is_parametrized(module):
        return []
    plists = getattr(module, "parametrizations")  # noqa: B009
    return [n for n, plist in plists.items() if any(isinstance(p, Mask) for p in plist)]


def tensor_masks(model: nn.Module) -> dict[str, tuple[nn.Module, str, Mask]]:
    """Every prunebound `Mask` of `model`, on any tensor, keyed by the masked tensor's dense
    `state_dict` key (`"0.weight"`, `"0.bias"`, `"1.weight"` of a BatchNorm): (module, tensor
    name, mask), in module order."""
    out = {}
    for name, m in model.named_modules():
        for t in masked_tensors(m):
            mm = mask_module(m, t)
            assert mm is not None
            out[f"{name}.{t}" if name else t] = (m, t, mm)
    return out


def drop_masks(module: nn.Module, *, bake: bool, tensors: Sequence[str] | None = None) -> None:
    """Remove the mask parametrizations of `module` itself (of `tensors` only, if given),
    baking the masks into plain tensors (`bake=True`) or reviving the values behind them.

    Safe for deep copies: `copy.deepcopy` of a parametrized module shares its dynamically
    created class, and `remove_parametrizations` deletes the property from that class, which
    would break every copy. So the layer first gets a private class holding the same attributes.
    """
    for name in masked_tensors(module):
        if tensors is not None and name not in tensors:
            continue
        cls = type(module)
        attrs = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, attrs)
        parametrize.remove_parametrizations(module, name, leave_parametrized=bake)


def remove(model: nn.Module) -> nn.Module:
    """Bake the masks into plain weights (pruned entries become 0) and drop the parametrizations."""
    for m in model.modules():
        drop_masks(m, bake=True)
    return model


def reset(model: nn.Module) -> nn.Module:
    """Drop the masks, reviving the pruned weights (and masked biases) with their values."""
    for m in model.modules():
        drop_masks(m, bake=False)
    return model
