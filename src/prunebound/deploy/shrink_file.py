"""Files of shrunk models: safetensors weights plus the layer sizes that differ from the class.

A shrunk model has the class of the model it came from but narrower layers, so a plain
state_dict does not load into a freshly built one. The file records, per Linear/Conv/BatchNorm,
its sizes (`in_features`, `out_channels`, `groups`, `num_features`, ...) and whether it has a
bias, and which original units it kept (`kept_units`, for `expand`); `load_shrunk` narrows a
fresh model to them, then loads the weights. No code is unpickled (safetensors plus JSON
metadata).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from prunebound._files import DIGEST_KEY, digest, read_checked, write_atomic
from prunebound.deploy.expand import KEPT, check_record

FORMAT = "prunebound-shrunk"
_SIZES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features"),
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
}


def _kind(m: nn.Module) -> type[nn.Module] | None:
    return next((t for t in _SIZES if type(m) is t), None)


def _architecture(model: nn.Module) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is not None:
            sizes: dict[str, object] = {a: int(getattr(m, a)) for a in _SIZES[kind]}
            out[name] = {
                "type": kind.__name__,
                "bias": getattr(m, "bias", None) is not None,
                **sizes,
            }
    return out


def save_shrunk(model: nn.Module, path: str | Path) -> Path:
    """Write a (shrunk, mask-free) model's weights and layer sizes to a safetensors file."""
    if any(".parametrizations." in f".{k}" for k in model.state_dict()):
        raise ValueError("save_shrunk takes a mask-free model (the result of pb.shrink)")
    path = Path(path)
    tensors = {k: t.detach().contiguous() for k, t in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "architecture": json.dumps(_architecture(model)),
        DIGEST_KEY: digest(tensors),
    }
    kept = getattr(model, KEPT, None)
    if isinstance(kept, dict):  # which original units survive (`expand`)
        meta[KEPT] = json.dumps(kept)
    write_atomic(tensors, path, meta)
    return path


def _narrow(name: str, m: nn.Module, spec: dict[str, object], path: Path) -> None:
    """Give layer `m` the recorded sizes (fresh, uninitialised tensors; the weights follow)."""
    kind = _kind(m)
    if kind is None or kind.__name__ != spec.get("type"):
        raise ValueError(
            f"{path}: layer {name!r} is a {spec.get('type')} in the file but a "
            f"{type(m).__name__} in the model"
        )
    for a in _SIZES[kind]:
        v = spec.get(a)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{path}: layer {name!r}: bad {a} {v!r}")
        setattr(m, a, v)
    w = m.weight
    assert isinstance(w, torch.Tensor)
    with torch.no_grad():
        if isinstance(m, nn.Linear):
            shape: tuple[int, ...] = (m.out_features, m.in_features)
        elif isinstance(m, nn.Conv1d | nn.Conv2d):
            shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        else:
            assert isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
            shape = (m.num_features,)
        m.weight = nn.Parameter(w.new_empty(shape))
        out = shape[0]
        if spec.get("bias"):
            m.bias = nn.Parameter(w.new_empty(out))
        elif not isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.bias = None
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.bias = nn.Parameter(w.new_empty(out))
            for b in ("running_mean", "running_var"):
                if getattr(m, b, None) is not None:
                    setattr(m, b, w.new_empty(out))


def load_shrunk(model: nn.Module, path: str | Path) -> nn.Module:
    """A copy of `model` (freshly built, the class of the saved one) narrowed to the file's
    layer sizes, with its weights loaded; `model` itself is left untouched."""
    path = Path(path)
    tensors, meta = read_checked(path)
    if meta.get("format") != FORMAT or "architecture" not in meta:
        raise ValueError(f"{path}: not a shrunk-model file (written by pb.save_shrunk)")
    try:
        arch = json.loads(meta["architecture"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt architecture record ({e})") from None
    modules = dict(model.named_modules())
    missing = [n for n in arch if n not in modules]
    if missing or set(arch) != set(_architecture(model)):
        raise ValueError(
            f"{path}: its layers {sorted(arch)} do not match the model's "
            f"{sorted(_architecture(model))}"
        )
    trial = copy.deepcopy(model)
    trial_modules = dict(trial.named_modules())
    for name in arch:
        _narrow(name, trial_modules[name], arch[name], path)
    try:
        trial.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: its tensors do not fit the model: {e}") from None
    if KEPT in meta:
        try:
            kept = json.loads(meta[KEPT])
            check_record(trial, kept)
        except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: corrupt {KEPT} record ({e})") from None
        setattr(trial, KEPT, kept)
    return trial
