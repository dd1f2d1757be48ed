"""Files of shrunk models: safetensors weights plus the layer sizes that differ from the class.

A shrunk model has the class of the model it came from but narrower layers, so a plain
state_dict does not load into a freshly built one. The file records, per Linear/Conv/BatchNorm,
its sizes (`in_features`, `out_channels`, `groups`, `num_features`, ...) and whether it has a
bias, and which original units it kept (`kept_units`, for `expand`), and for Hugging Face
GPT-2 / BERT the sizes of each `Conv1D` (`nx`, `nf`) and attention module (heads and their
width: `prunebound.heads.HEAD_SIZES`), which differ layer by layer from the config;
`load_shrunk` narrows a fresh model to them, then loads the weights. No code is unpickled
(safetensors plus JSON metadata).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from prunebound._files import DIGEST_KEY, digest, read_checked, write_atomic
from prunebound.deploy.expand import KEPT, check_record
from prunebound.heads import HEAD_SIZES, is_hf

FORMAT = "prunebound-shrunk"
_SIZES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features"),
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
}

#: transformers classes (by name; never imported) -> the sizes a shrink may change
_HF_SIZES: dict[str, tuple[str, ...]] = {"Conv1D": ("nx", "nf"), **HEAD_SIZES}


def _kind(m: nn.Module) -> type[nn.Module] | None:
    return next((t for t in _SIZES if type(m) is t), None)


def _hf_kind(m: nn.Module) -> str | None:
    return next((k for k in _HF_SIZES if is_hf(m, k)), None)


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
        elif (hf := _hf_kind(m)) is not None:
            out[name] = {"type": hf, **{a: int(getattr(m, a)) for a in _HF_SIZES[hf]}}
            if hf == "Conv1D":
                out[name]["bias"] = getattr(m, "bias", None) is not None
    return out


def save_shrunk(model: nn.Module, path: str | Path) -> Path:
    """Write a (shrunk, mask-free) model's weights and layer sizes to a safetensors file."""
    if any(".parametrizations." in f".{k}" for k in model.state_dict()):
        raise ValueError("save_shrunk takes a mask-free model (the result of pb.shrink)")
    path = Path(path)
    live = model.state_dict(keep_vars=True)
    first = {id(t): k for k, t in reversed(live.items())}
    # a tied weight (GPT-2's lm_head and wte) once, under its first key: safetensors refuses
    # shared tensors; `load_shrunk` fills the other keys from it
    tensors = {k: t.detach().contiguous() for k, t in live.items() if first[id(t)] == k}
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
    if _hf_kind(m) is not None:
        _narrow_hf(name, m, spec, path)
        return
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
        out = shape[0]
        if tuple(w.shape) == shape and (getattr(m, "bias", None) is not None) == spec.get("bias"):
            return  # as built: keep the parameters (and a tie, e.g. lm_head to wte)
        m.weight = nn.Parameter(w.new_empty(shape))
        if spec.get("bias"):
            m.bias = nn.Parameter(w.new_empty(out))
        elif not isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.bias = None
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.bias = nn.Parameter(w.new_empty(out))
            for b in ("running_mean", "running_var"):
                if getattr(m, b, None) is not None:
                    setattr(m, b, w.new_empty(out))


def _narrow_hf(name: str, m: nn.Module, spec: dict[str, object], path: Path) -> None:
    """`_narrow` for a transformers `Conv1D` (weight (nx, nf)) or attention module (ints)."""
    kind = _hf_kind(m)
    assert kind is not None
    if kind != spec.get("type"):
        raise ValueError(
            f"{path}: layer {name!r} is a {spec.get('type')} in the file but a "
            f"{type(m).__name__} in the model"
        )
    sizes = []
    for a in _HF_SIZES[kind]:
        v = spec.get(a)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{path}: layer {name!r}: bad {a} {v!r}")
        sizes.append(v)
    if kind in HEAD_SIZES:
        head_dim = getattr(m, "head_dim", getattr(m, "attention_head_size", None))
        if not isinstance(head_dim, int) or sizes[1] != sizes[0] * head_dim:
            raise ValueError(f"{path}: layer {name!r}: {sizes[1]} is not {sizes[0]} heads wide")
    for a, v in zip(_HF_SIZES[kind], sizes, strict=True):
        setattr(m, a, v)
    if kind == "Conv1D":
        w = m.weight
        assert isinstance(w, torch.Tensor)
        has_bias = getattr(m, "bias", None) is not None
        if tuple(w.shape) == tuple(sizes) and has_bias == spec.get("bias"):
            return  # as built: keep the parameters
        with torch.no_grad():
            m.weight = nn.Parameter(w.new_empty(sizes[0], sizes[1]))
            bias = nn.Parameter(w.new_empty(sizes[1])) if spec.get("bias") else None
            m.register_parameter("bias", bias)


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
    live = trial.state_dict(keep_vars=True)
    first = {id(t): k for k, t in reversed(live.items())}
    found = {k: tensors.get(k, tensors.get(first[id(t)])) for k, t in live.items()}
    tensors = tensors | {k: t for k, t in found.items() if t is not None}  # missing: named below
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
